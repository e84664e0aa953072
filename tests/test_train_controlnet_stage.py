"""The `train_controlnet` stage on the ci profile, run as a function (no DVC): its model folder, metrics, plot,
resume, and the error for a missing input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm.data.ingested import ShardWriter
from ldm.models.controlnet import CONTROL_CONFIG_NAME, ControlNet
from stages import train_controlnet as stage
from stages.params import Params
from tests.ci_stages import RecordingReporter, ci_params, train_ci_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The earlier stages' outputs, then one run of the stage: (params, result, what it reported)."""
    params = ci_params(tmp_path_factory.mktemp("train_controlnet"))
    train_ci_model(params)
    reporter = RecordingReporter()
    return params, stage.run(params, reporter), reporter


def test_saves_a_loadable_controlnet_with_its_control_settings(trained):
    params, result, reporter = trained
    folder = Path(params.paths.controlnet)
    assert result.model_dir == folder
    controlnet = ControlNet.from_pretrained(folder)
    assert controlnet.config.conditioning_channels == 1 and controlnet.config.vae_downsampling_factor == 2
    control = json.loads((folder / CONTROL_CONFIG_NAME).read_text())
    assert control == {"control_map": "canny", "low_threshold": 50, "high_threshold": 100, "control_scale": 0.8}
    assert reporter.steps == [5, 10]


def test_reports_where_the_object_lands(trained):
    params, result, _ = trained
    metrics = json.loads((Path(params.paths.metrics) / "train_controlnet.json").read_text())
    assert "evaluation_skipped" not in metrics
    assert metrics["eval_prompts"] == 4 and metrics["steps"] == 10
    for kind in ("unplaced", "conflicting"):
        for key in ("without_control", "with_control"):
            placed = metrics[kind][key]
            for name in ("position_follows_control", "position_follows_prompt", "shape_color_adherence"):
                assert 0.0 <= placed[name] <= 1.0
                assert result.metrics[f"{kind}.{key}.{name}"] == placed[name]
            # One object read at one place: it cannot be at the edge map's and at the caption's.
            assert placed["position_follows_control"] + placed["position_follows_prompt"] <= 1.0
    assert 0.0 <= metrics["classifier"]["position"] <= 1.0
    plots = Path(params.paths.plots) / "train_controlnet"
    assert result.artifacts == [Path(params.paths.metrics) / "train_controlnet.json", plots]
    assert (plots / "control.png").is_file()
    assert (plots / "loss.csv").read_text().splitlines()[0] == "step,loss,lr"


def test_a_second_run_resumes_from_the_last_checkpoint(trained):
    params, first, _ = trained
    reporter = RecordingReporter()
    again = stage.run(params, reporter)
    assert any("resuming" in line and "step 10 of 10" in line for line in reporter.lines), reporter.lines
    assert reporter.steps == []  # no step trained again
    assert again.metrics["train_loss_final"] == first.metrics["train_loss_final"]


def test_a_missing_model_names_the_stage_that_makes_it(trained, tmp_path):
    params, *_ = trained
    missing = Params(**(params.model_dump() | {"paths": params.paths.model_dump() | {"text2img": str(tmp_path)}}))
    with pytest.raises(stage.InputError, match="dvc repro train_unet"):
        stage.run(missing, RecordingReporter())


def test_data_without_shapes_attributes_skips_the_position_evaluation(tmp_path):
    params = ci_params(tmp_path)
    ingested = Path(params.paths.ingested)
    ingested.mkdir(parents=True)
    rows = [{"id": f"{i}", "image": b"", "caption": "a photo", "width": 16, "height": 16, "source": "test",
             "split": "val", "attributes": None} for i in range(3)]
    with ShardWriter(ingested) as writer:
        for row in rows:
            writer.write(row)
    with pytest.raises(stage.EvaluationSkipped, match="no shapes attributes"):
        stage.moved_scenes(params)
