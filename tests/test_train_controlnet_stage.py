"""The `train_controlnet` stage on the ci profile, run as a function (no DVC): its model folder, metrics, plot,
that the trained ControlNet steers (and scale 0 is the base model), resume, and the error for a missing input.

At the ci profile's sizes (10 ControlNet steps, a classifier of 5 steps on 50 images) the stage's position evaluation
reads nothing (every rate is 0, the classifier included), so placement is not asserted from it here; what the
tests measure instead is the trained ControlNet's effect on the frozen model's images and denoising loss."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.control_maps import control_map
from ldm.data.images import tensor_to_pil
from ldm.data.ingested import ShardWriter
from ldm.data.shapes import caption_without_positions, render
from ldm.diffusion.pipeline import Text2Image
from ldm.models.controlnet import CONTROL_CONFIG_NAME, ControlNet
from stages import train_controlnet as stage
from stages.evaluation import RealImages
from stages.params import Params
from stages.reporting import flatten
from tests.ci_stages import RecordingReporter, ci_params, denoising_loss, train_ci_model


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
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", CONTROL_CONFIG_NAME}
    control = json.loads((folder / CONTROL_CONFIG_NAME).read_text())
    section = params.train_controlnet
    assert control == {"control_map": section.control_map, "low_threshold": section.low_threshold,
                       "high_threshold": section.high_threshold, "control_scale": section.control_scale}
    assert control == {"control_map": "canny", "low_threshold": 50, "high_threshold": 100, "control_scale": 0.8}
    assert controlnet.config.unet == Text2Image.from_pretrained(params.paths.text2img, device="cpu").unet.config
    assert reporter.steps == [5, 10]


def test_metrics_file_result_reporter_and_loss_plot_agree(trained):
    params, result, reporter = trained
    saved = json.loads((Path(params.paths.metrics) / "train_controlnet.json").read_text())
    # The file the DVC metric is, the numbers the flow logs to MLflow: the same, key for key.
    assert {k: v for k, v in flatten(saved).items() if isinstance(v, (int, float))} == result.metrics
    assert saved["steps"] == 10 and saved["eval_prompts"] == 4
    assert saved["parameters"] == sum(p.numel() for p in ControlNet.from_pretrained(params.paths.controlnet).parameters())
    with open(Path(params.paths.plots) / "train_controlnet" / "loss.csv") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    # Each logged step's numbers reached the reporter (so the MLflow curve) and the DVC plot alike.
    assert [(int(r["step"]), {"loss": r["loss"], "lr": r["lr"]}) for r in rows] == reporter.step_metrics
    assert result.metrics["train_loss_final"] == rows[-1]["loss"]
    assert all(r["loss"] > 0 for r in rows) and rows[-1]["lr"] < rows[0]["lr"]  # warm-up, then the decay


def test_reports_where_the_object_lands(trained):
    params, result, reporter = trained
    metrics = json.loads((Path(params.paths.metrics) / "train_controlnet.json").read_text())
    assert "position_evaluation" not in metrics
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
    width, height = Image.open(plots / "control.png").size
    # Three rows (edge maps, without control, with it) of the 4 cases: 16 px images shown at 8x, captioned.
    assert width == 96 + 4 * (128 + 4) + 4 and height > 3 * (128 + 4) + 4
    assert any("unplaced prompts with control" in line for line in reporter.lines), reporter.lines
    assert (plots / "loss.csv").read_text().splitlines()[0] == "step,loss,lr"


def test_reports_how_well_the_drawn_edges_follow_the_control_maps(trained):
    params, result, reporter = trained
    edges = json.loads((Path(params.paths.metrics) / "train_controlnet.json").read_text())["edge_agreement"]
    assert edges["eval_images"] == 4
    for key in ("without_control", "with_control"):
        scores = edges[key]
        assert set(scores) == {"precision", "recall", "f1"} and all(0.0 <= v <= 1.0 for v in scores.values())
        assert result.metrics[f"edge_agreement.{key}.f1"] == scores["f1"]
    assert any("F1" in line and "without control" in line for line in reporter.lines), reporter.lines


def evaluation_cases(params: Params) -> tuple[list[str], torch.Tensor]:
    """The stage's evaluation cases: prompts without positions and the edge maps of their moved scenes."""
    _, scenes, moved = stage.moved_scenes(params)
    section = params.train_controlnet
    maps = [control_map(section.control_map, render(scene, params.image_size, random.Random(i)),
                        section.low_threshold, section.high_threshold) for i, scene in enumerate(moved)]
    return [caption_without_positions(s) for s in scenes], torch.stack(maps)


def test_the_trained_controlnet_steers_and_scale_zero_or_an_untrained_one_is_the_base_model(trained):
    params, *_ = trained
    base = Text2Image.from_pretrained(params.paths.text2img, device="cpu")
    steered = Text2Image.from_pretrained(params.paths.text2img, device="cpu", controlnet=params.paths.controlnet)
    assert steered.control_scale == 0.8  # control.json's
    prompts, controls = evaluation_cases(params)
    seeds = list(range(len(prompts)))
    plain = base(prompts, seed=seeds)
    torch.testing.assert_close(steered(prompts, seed=seeds, control_image=controls, control_scale=0.0), plain)
    on = steered(prompts, seed=seeds, control_image=controls)
    other_maps = steered(prompts, seed=seeds, control_image=controls.roll(1, 0))
    # A fresh ControlNet starts from zero convolutions: it changes nothing, so the change is what training did.
    steered.controlnet = ControlNet.from_unet(base.unet, conditioning_channels=1, vae_downsampling_factor=2, seed=0)
    torch.testing.assert_close(steered(prompts, seed=seeds, control_image=controls), plain)
    # Measured (images in [-1, 1], 10 training steps): mean |with control - without| 5.9e-4; |these edge maps -
    # the other cases' maps| 5.3e-6: the map itself barely matters yet, which is all 10 steps of 16 teach.
    assert (on - plain).abs().mean() > 2e-4
    assert (on - other_maps).abs().mean() > 1e-6


def test_the_trained_controlnet_lowers_the_denoising_loss_of_val_images_given_their_edge_maps(trained):
    params, *_ = trained
    pipeline = Text2Image.from_pretrained(params.paths.text2img, device="cpu", controlnet=params.paths.controlnet)
    val = RealImages(params.paths.ingested, "val", None, params.seed, params.image_size)
    section = params.train_controlnet
    maps = torch.stack([control_map(section.control_map, tensor_to_pil(image), section.low_threshold,
                                    section.high_threshold) for image in val.images])
    without = denoising_loss(pipeline, pipeline.unet, val.images, val.captions)
    with_control = denoising_loss(pipeline, pipeline.unet, val.images, val.captions, maps)
    # Measured on the 17 val images, 8 draws: 0.46998 without, 0.46891 with (10 training steps).
    assert with_control < without - 3e-4, (without, with_control)


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
