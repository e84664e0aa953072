"""The `train_controlnet` DVC stage as a Prefect flow (`python -m flows.train_controlnet`); the work is in
`stages/train_controlnet.py`. Registers the trained ControlNet folder (with its control.json) as `ldm-controlnet`."""

from prefect import flow

from flows.stage_flow import main, run_stage
from stages import train_controlnet as stage


@flow(name="train_controlnet")
def train_controlnet(params: str = "params.yaml"):
    return run_stage("train_controlnet", stage.run, params, registered_model="ldm-controlnet")


if __name__ == "__main__":
    main(train_controlnet)
