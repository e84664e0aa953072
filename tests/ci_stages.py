"""The ci profile's first stages, run as plain functions (no DVC, Prefect or MLflow) into a folder, for tests of
the stages that build on a trained text-to-image model."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from stages import cache_latents, ingest, train_unet, train_vae
from stages.params import Params

REPO = Path(__file__).resolve().parents[1]
CI_PARAMS = REPO / "configs" / "ci.yaml"


def ci_params(root: Path) -> Params:
    """configs/ci.yaml with every path under `root`."""
    raw = yaml.safe_load(CI_PARAMS.read_text())
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    return Params(**raw)


def copy_repo(dst: Path, params: Path) -> None:
    """This repo's files (tracked, and untracked ones git does not ignore) as a fresh git repo in `dst`, with
    `params` as its params.yaml: a workspace `dvc repro` can run in without touching this one."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    shutil.copy2(params, dst / "params.yaml")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-qm", f"params from {params.name}"], cwd=dst, check=True)


def write_params(params: Params, path: Path) -> Path:
    """`params` as a params file a stage's `--params` reads."""
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


class RecordingReporter:
    """Keeps everything a stage reports, so a test can check what it said: the one copy the tests share.

    lines (also `messages`): the info lines; progress_calls: (task, done, total); steps: the step of each
    metrics call (None for a final one); step_metrics: (step, values) of the per-step calls; final: the values
    of the final (step-less) calls, merged; images: (name, size, step)."""

    def __init__(self):
        self.lines: list[str] = []
        self.progress_calls: list[tuple[str, int, int]] = []
        self.steps: list[int | None] = []
        self.step_metrics: list[tuple[int, dict[str, float]]] = []
        self.final: dict[str, float] = {}
        self.images: list[tuple[str, tuple[int, int], int]] = []

    @property
    def messages(self) -> list[str]:
        return self.lines

    def info(self, message: str) -> None:
        self.lines.append(message)

    def progress(self, task: str, done: int, total: int) -> None:
        self.progress_calls.append((task, done, total))

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.steps.append(step)
        if step is None:
            self.final.update(values)
        else:
            self.step_metrics.append((step, dict(values)))

    def image(self, name: str, image, step: int) -> None:
        self.images.append((name, image.size, step))


def train_ci_model(params: Params) -> None:
    """ingest -> train_vae -> cache_latents -> train_unet, as `dvc repro train_unet` would run them."""
    for stage in (ingest, train_vae, cache_latents, train_unet):
        stage.run(params, RecordingReporter())


@torch.no_grad()
def denoising_loss(pipeline, unet, images: torch.Tensor, captions: list[str], controls: torch.Tensor | None = None,
                   draws: int = 8, seed: int = 0) -> float:
    """The training loss (MSE to the schedule's target) of `unet` on `images` (N, 3, H, W) in [-1, 1] with their
    `captions`, averaged over `draws` seeded draws of timesteps and noise: the same draws for every model, so two
    models' losses compare on equal terms. With `controls` (N, C, H, W), `pipeline.controlnet`'s residuals at
    scale 1 are added, as in ControlNet training."""
    latents = pipeline.vae.scale_latents(pipeline.vae.encode(images).mode())
    context = pipeline.text_encoder.encode(captions)
    mask = None if context.attention_mask.all() else context.attention_mask
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        t = torch.randint(pipeline.schedule.num_train_timesteps, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = pipeline.schedule.add_noise(latents, noise, t)
        residuals = {}
        if controls is not None:
            down, mid = pipeline.controlnet(noisy, t, context.hidden_states, mask, controls)
            residuals = {"down_residuals": down, "mid_residual": mid}
        prediction = unet(noisy, t, context.hidden_states, mask, **residuals)
        total += F.mse_loss(prediction.float(), pipeline.schedule.training_target(latents, noise, t)).item()
    return total / draws
