"""The `finetune_lora` DVC stage as a Prefect flow (`python -m flows.finetune_lora`); the work is in
`stages/finetune_lora.py`. Registers the adapter folder as a new version of `ldm-lora`, with the run's lineage."""

from prefect import flow

from flows.stage_flow import main, run_stage
from stages import finetune_lora as stage


@flow(name="finetune_lora")
def finetune_lora(params: str = "params.yaml"):
    return run_stage("finetune_lora", stage.run, params, registered_model="ldm-lora")


if __name__ == "__main__":
    main(finetune_lora)
