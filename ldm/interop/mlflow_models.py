"""The one door from the library to MLflow: fetch a text-to-image pipeline that MLflow stores.

`ldm sample --model models:/...` imports this module only when it is given such a URI; nothing else in
`ldm/` imports MLflow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import yaml
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException

from ldm.diffusion.pipeline import PIPELINE_CONFIG_NAME
from ldm.errors import InputError, InputNotFoundError
from ldm.urls import redacted


def pipeline_in(folder: Path, uri: str) -> Path:
    """The pipeline folder inside a downloaded MLflow artifact: the folder itself, or the `pipeline`
    artifact of an ldm-text2img pyfunc model."""
    if (folder / PIPELINE_CONFIG_NAME).is_file():
        return folder
    if (folder / "MLmodel").is_file():
        flavor = yaml.safe_load((folder / "MLmodel").read_text()).get("flavors", {}).get("python_function", {})
        artifact = flavor.get("artifacts", {}).get("pipeline")
        if artifact and (folder / artifact["path"] / PIPELINE_CONFIG_NAME).is_file():
            return folder / artifact["path"]
    raise InputError(
        f"{uri} holds no text-to-image pipeline (neither {PIPELINE_CONFIG_NAME} nor a pyfunc artifact 'pipeline'); "
        "point --model at an ldm-text2img model, e.g. models:/ldm-text2img/latest"
    )


def download_pipeline(uri: str, destination: Path) -> Path:
    """Download an MLflow model URI into `destination` and return the pipeline folder inside it. The store:
    MLFLOW_TRACKING_URI, else the pipeline's default `mlflow.db` in the current directory."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    if tracking.startswith("sqlite:///") and not Path(tracking.removeprefix("sqlite:///")).is_file():
        # Opening a missing SQLite store would create an empty one here.
        raise InputNotFoundError(
            f"no MLflow store at {tracking} to resolve {uri}: run from the folder whose mlflow.db registered "
            "ldm-text2img (the pipeline's train_unet stage does), or set MLFLOW_TRACKING_URI to the store that "
            "has the model"
        )
    if not sys.stderr.isatty():  # a progress bar's frames in a log or a pipe are noise
        os.environ.setdefault(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false")
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(destination), tracking_uri=tracking, registry_uri=registry
        )
    except MlflowException as e:
        raise InputError(redacted(f"cannot load {uri} from the MLflow store {tracking}: {e.message}")) from None
    except OSError as e:
        raise InputError(redacted(f"cannot download {uri} from the MLflow store {tracking}: {e}")) from None
    return pipeline_in(Path(local), uri)
