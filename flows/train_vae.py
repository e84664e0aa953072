"""The `train_vae` DVC stage as a Prefect flow (`python -m flows.train_vae`); the work is in `stages/train_vae.py`."""

from prefect import flow

from flows.stage_flow import main, run_stage
from stages import train_vae as stage


@flow(name="train_vae")
def train_vae(params: str = "params.yaml"):
    return run_stage("train_vae", stage.run, params, registered_model="ldm-vae")


if __name__ == "__main__":
    main(train_vae, stage.main)
