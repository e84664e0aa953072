"""The `ingest` DVC stage as a Prefect flow (`python -m flows.ingest`); the work is in `stages/ingest.py`."""

from prefect import flow

from flows.stage_flow import main, run_stage
from stages import ingest as stage


@flow(name="ingest")
def ingest(params: str = "params.yaml"):
    return run_stage("ingest", stage.run, params)


if __name__ == "__main__":
    main(ingest)
