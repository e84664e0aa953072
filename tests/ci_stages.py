"""The ci profile's first stages, run as plain functions (no DVC, Prefect or MLflow) into a folder, for tests of
the stages that build on a trained text-to-image model."""

from __future__ import annotations

from pathlib import Path

import yaml

from stages import cache_latents, ingest, train_unet, train_vae
from stages.params import Params

CI_PARAMS = Path(__file__).resolve().parents[1] / "configs" / "ci.yaml"


def ci_params(root: Path) -> Params:
    """configs/ci.yaml with every path under `root`."""
    raw = yaml.safe_load(CI_PARAMS.read_text())
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    return Params(**raw)


def write_params(params: Params, path: Path) -> Path:
    """`params` as a params file a stage's `--params` reads."""
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


class RecordingReporter:
    """Keeps what a stage reports, so a test can check what it said."""

    def __init__(self):
        self.lines: list[str] = []
        self.steps: list[int] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def progress(self, task: str, done: int, total: int) -> None:
        pass

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if step is not None:
            self.steps.append(step)

    def image(self, name: str, image, step: int) -> None:
        pass


def train_ci_model(params: Params) -> None:
    """ingest -> train_vae -> cache_latents -> train_unet, as `dvc repro train_unet` would run them."""
    for stage in (ingest, train_vae, cache_latents, train_unet):
        stage.run(params, RecordingReporter())
