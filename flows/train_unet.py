"""The `train_unet` DVC stage as a Prefect flow (`python -m flows.train_unet`); the work is in `stages/train_unet.py`.

Registers the UNet (EMA weights) as `ldm-unet` and the whole text-to-image model as the pyfunc `ldm-text2img`,
whose version is tagged with the model folder's DVC hash so the evaluate stage can find and rank it.
"""

from pathlib import Path

from prefect import flow, get_run_logger

from flows.stage_flow import REPO, main, run_stage
from flows.text2img_model import MODEL_NAME, log_text2img_model
from flows.tracking import StageRun, dependency_hashes
from stages import train_unet as stage
from stages.params import Params
from stages.reporting import StageResult

MODEL_HASH_TAG = "text2img_md5"


def register_text2img(tracked: StageRun, params: Params, result: StageResult) -> None:
    folder = params.paths.text2img
    version = log_text2img_model(tracked, Path(folder))
    md5 = dependency_hashes(REPO, [folder])[folder]
    tracked.client.set_model_version_tag(MODEL_NAME, version, MODEL_HASH_TAG, md5)
    get_run_logger().info("registered %s version %s (%s %s)", MODEL_NAME, version, MODEL_HASH_TAG, md5)


@flow(name="train_unet")
def train_unet(params: str = "params.yaml"):
    return run_stage("train_unet", stage.run, params, registered_model="ldm-unet", finish=register_text2img)


if __name__ == "__main__":
    main(train_unet, stage.main)
