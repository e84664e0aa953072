"""The finetune_lora stage on the ci profile's tiny model: what it writes, that its metrics file, result and reports
agree, that the adapter learnt the concept without costing the base prompts, that it resumes, and its errors.

At the ci profile's sizes (10 LoRA steps, a classifier of 5 steps) the stage's adherence numbers are all 0, so
"the concept's adherence rises" is measured here as the denoising loss of held-out concept images."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.diffusion.pipeline import Text2Image
from ldm.errors import InputError
from ldm.models.lora import LoraSpec, lora_metadata
from stages import finetune_lora
from stages.evaluation import RealImages
from stages.reporting import flatten
from tests.ci_stages import RecordingReporter, ci_params, denoising_loss, train_ci_model


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    params = ci_params(tmp_path_factory.mktemp("lora"))
    train_ci_model(params)
    return params


def test_writes_the_adapter_its_metrics_and_picture_and_resumes(params):
    reporter = RecordingReporter()
    first = finetune_lora.run(params, reporter)
    paths = params.paths
    assert {p.name for p in Path(paths.lora).iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    metadata = lora_metadata(paths.lora)
    assert metadata["rank"] == "4" and metadata["concept_source"] == "shapes"
    assert "hexagon" in metadata["example_caption"]
    unet_weights = Path(paths.text2img) / "unet" / "model.safetensors"
    assert metadata["base_unet_sha256"] == hashlib.sha256(unet_weights.read_bytes()).hexdigest()
    pipeline = Text2Image.from_pretrained(paths.text2img, device="cpu")
    base = pipeline("a small red hexagon in the center on a white background", steps=2, seed=0)
    off = copy.copy(pipeline)
    off.unet = copy.deepcopy(pipeline.unet)
    off.load_loras([LoraSpec(paths.lora, 0.0)])
    assert torch.equal(off("a small red hexagon in the center on a white background", steps=2, seed=0), base)
    pipeline.load_loras([LoraSpec(paths.lora)])
    assert not torch.equal(pipeline("a small red hexagon in the center on a white background", steps=2, seed=0), base)

    saved = json.loads((Path(paths.metrics) / "finetune_lora.json").read_text())
    # The DVC metrics file and what the flow logs to MLflow: the same numbers, key for key.
    assert {k: v for k, v in flatten(saved).items() if isinstance(v, (int, float))} == first.metrics
    headline = saved["headline"]
    assert headline["concept_adherence_before"] == saved["concept.base"]["all"]
    assert headline["concept_adherence_after"] == saved["concept.lora"]["all"]
    assert headline["base_adherence_before"] == saved["base_prompts.base"]["all"]
    assert headline["base_adherence_after"] == saved["base_prompts.lora"]["all"]
    assert headline["base_adherence_drop"] == headline["base_adherence_before"] - headline["base_adherence_after"]
    concept = [r for r in finetune_lora.read_concept(params, RecordingReporter()) if r["split"] == "train"]
    # The concept split is by content hash at val_fraction 0.25: about 24 of its 32 images train.
    assert saved["steps"] == 10 and saved["concept_train_images"] == len(concept) and 16 <= len(concept) < 32
    plots = Path(paths.plots) / "finetune_lora"
    with open(plots / "loss.csv") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    # Each logged step reached the reporter (so the MLflow curve) and the DVC plot alike.
    assert [(int(r["step"]), {"loss": r["loss"], "lr": r["lr"]}) for r in rows] == reporter.step_metrics
    assert [step for step, _ in reporter.step_metrics] == [5, 10]
    assert saved["train_loss_final"] == rows[-1]["loss"]
    # The grid: base model, LoRA, real images, of the 7 concept val prompts: 16 px images shown at 8x, captioned.
    width, height = Image.open(plots / "concept.png").size
    assert width == 96 + 7 * (128 + 4) + 4 and height > 3 * (128 + 4) + 4
    assert saved["status"] == "trained"
    losses = saved["held_out_loss"]
    assert losses["concept_drop"] == losses["concept_before"] - losses["concept_after"] > 0
    assert losses["base_rise"] == losses["base_after"] - losses["base_before"]
    assert first.model_dir == Path(paths.lora)
    assert first.artifacts == [Path(paths.metrics) / "finetune_lora.json", plots / "loss.csv", plots / "concept.png"]

    again = RecordingReporter()
    finetune_lora.run(params, again)
    assert any("resuming" in line and "step 10 of 10" in line for line in again.lines), again.lines


def test_the_adapter_learnt_the_concept_and_left_the_base_images_alone(params):
    if not Path(params.paths.lora).exists():
        finetune_lora.run(params, RecordingReporter())
    base = Text2Image.from_pretrained(params.paths.text2img, device="cpu")
    adapted = Text2Image.from_pretrained(params.paths.text2img, device="cpu")
    adapted.load_loras([LoraSpec(params.paths.lora)], merge=True)
    concept = finetune_lora.ConceptImages(finetune_lora.read_concept(params, RecordingReporter()), "val")
    assert len(concept) == 7  # held out: never trained on
    before = denoising_loss(base, base.unet, concept.images, concept.captions)
    after = denoising_loss(base, adapted.unet, concept.images, concept.captions)
    real = RealImages(params.paths.ingested, "val", None, params.seed, params.image_size)
    base_before = denoising_loss(base, base.unet, real.images, real.captions)
    base_after = denoising_loss(base, adapted.unet, real.images, real.captions)
    # Measured (8 draws, 10 LoRA steps): concept 0.47460 -> 0.47421; base val images 0.46998 -> 0.46976.
    assert after < before - 1e-4, (before, after)
    assert base_after < base_before + 5e-4, (base_before, base_after)


def test_inputs_it_cannot_use_are_named(params, tmp_path):
    missing = params.model_copy(update={"paths": params.paths.model_copy(update={"text2img": str(tmp_path / "none")})})
    with pytest.raises(InputError, match="dvc repro train_unet"):
        finetune_lora.run(missing, RecordingReporter())
    concept = params.finetune_lora.concept.model_copy(update={"source": str(tmp_path / "no-folder")})
    nowhere = params.model_copy(update={"finetune_lora": params.finetune_lora.model_copy(update={"concept": concept})})
    with pytest.raises(InputError, match="finetune_lora.concept"):
        finetune_lora.run(nowhere, RecordingReporter())
