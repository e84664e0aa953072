"""The finetune_lora stage on the ci profile's tiny model: what it writes, that it resumes, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.diffusion.pipeline import Text2Image
from ldm.models.lora import LoraSpec, lora_metadata
from stages import finetune_lora
from stages.evaluation import InputError
from tests.ci_stages import RecordingReporter, ci_params, train_ci_model


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    params = ci_params(tmp_path_factory.mktemp("lora"))
    train_ci_model(params)
    return params


def test_writes_the_adapter_its_metrics_and_picture_and_resumes(params):
    first = finetune_lora.run(params, RecordingReporter())
    paths = params.paths
    metadata = lora_metadata(paths.lora)
    assert metadata["rank"] == "4" and metadata["concept_source"] == "shapes"
    assert "hexagon" in metadata["example_caption"]
    pipeline = Text2Image.from_pretrained(paths.text2img, device="cpu")
    base = pipeline("a small red hexagon in the center on a white background", steps=2, seed=0)
    pipeline.load_loras([LoraSpec(paths.lora)])
    assert not torch.equal(pipeline("a small red hexagon in the center on a white background", steps=2, seed=0), base)

    saved = json.loads((Path(paths.metrics) / "finetune_lora.json").read_text())
    for key in ("concept_adherence_before", "concept_adherence_after", "base_adherence_before", "base_adherence_after"):
        assert 0.0 <= saved["headline"][key] <= 1.0
        assert first.metrics[f"headline.{key}"] == saved["headline"][key]
    assert saved["steps"] == 10 and saved["concept_train_images"] > 0
    plots = Path(paths.plots) / "finetune_lora"
    assert (plots / "concept.png").is_file() and (plots / "loss.csv").read_text().startswith("step,loss,lr")
    assert first.model_dir == Path(paths.lora)

    again = RecordingReporter()
    finetune_lora.run(params, again)
    assert any("resuming" in line and "step 10 of 10" in line for line in again.lines), again.lines


def test_inputs_it_cannot_use_are_named(params, tmp_path):
    missing = params.model_copy(update={"paths": params.paths.model_copy(update={"text2img": str(tmp_path / "none")})})
    with pytest.raises(InputError, match="dvc repro train_unet"):
        finetune_lora.run(missing, RecordingReporter())
    concept = params.finetune_lora.concept.model_copy(update={"source": str(tmp_path / "no-folder")})
    nowhere = params.model_copy(update={"finetune_lora": params.finetune_lora.model_copy(update={"concept": concept})})
    with pytest.raises(InputError, match="finetune_lora.concept"):
        finetune_lora.run(nowhere, RecordingReporter())
