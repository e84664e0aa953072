"""The `sample` DVC stage as a Prefect flow (`python -m flows.sample`); the work is in `stages/sample.py`."""

from prefect import flow

from flows.stage_flow import main, run_stage
from stages import sample as stage


@flow(name="sample")
def sample(params: str = "params.yaml"):
    return run_stage("sample", stage.run, params)


if __name__ == "__main__":
    main(sample)
