"""`ldm sample`: images from a local pipeline folder or an MLflow model URI, and its errors."""

from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from flows.text2img_model import save_text2img_model
from ldm import Text2Image
from ldm.cli import main
from ldm.data.images import image_tensor, map_tensor, tensor_to_pil
from ldm.diffusion import pipeline as pipeline_module
from ldm.diffusion.names import SAMPLERS
from ldm.models.lora import LoraSpec
from tests.adapters import save_random_controlnet, save_random_lora
from tests.test_text2img_model import registered_store, tiny_pipeline

FAST = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sample") / "pipeline"
    return tiny_pipeline(directory), directory


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def error_line(capsys) -> str:
    """The one error line on stderr (the text encoder's loading progress bar may come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "Loading weights" not in line and line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ldm sample: error: "), err
    return lines[0]


def test_one_prompt_writes_the_output_png_deterministically(tiny, tmp_path, capsys):
    pipeline, folder = tiny
    out = tmp_path / "new" / "a.png"
    assert main(["sample", "a red circle", "--model", str(folder), "--seed", "1", "-o", str(out), *FAST]) == 0
    assert capsys.readouterr().out.split() == [str(out)]
    assert Image.open(out).format == "PNG" and Image.open(out).size == (16, 16)
    np.testing.assert_array_equal(pixels(out), np.asarray(tensor_to_pil(pipeline("a red circle", steps=2, seed=1)[0])))

    # The seed decides the image: the same one gives the pipeline's own image above, another a new one.
    other = tmp_path / "other.png"
    assert main(["sample", "a red circle", "--model", str(folder), "--seed", "2", "-o", str(other), *FAST]) == 0
    assert not np.array_equal(pixels(other), pixels(out))


def test_several_prompts_write_numbered_files_and_a_grid(tiny, tmp_path, capsys):
    _, folder = tiny
    out = tmp_path / "shapes.png"
    prompts = ["a red circle", "a blue square", "a green triangle"]
    assert main(["sample", *prompts, "--model", str(folder), "--batch-size", "2", "--sampler", "ddim",
                 "--negative-prompt", "blurry", "-o", str(out), *FAST]) == 0
    written = [tmp_path / f"shapes-{i:03d}.png" for i in range(3)] + [tmp_path / "shapes-grid.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert not out.exists()
    assert all(Image.open(p).size == (16, 16) for p in written[:3])
    # 2x2 of the 16 px images shown at 8x, 4 px apart, each above its caption.
    width, height = Image.open(written[3]).size
    assert width == 2 * (128 + 4) + 4 and height > 2 * (128 + 4) + 4


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["sample", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--steps", "--sampler", "--guidance", "--seed", "--negative-prompt", "--batch-size",
                   "--height", "--width", "--device", "--output", "models:/ldm-text2img", *SAMPLERS,
                   "--guidance-rescale", "--init-image", "--strength", "--mask", "--lora", "PATH[:SCALE]",
                   "--merge-loras", "--control-image", "--control-scale", "--controlnet", "--compile"):
        assert option in text, option


def test_each_option_takes_effect(tiny, tmp_path, capsys):
    """Each option gives the pipeline's own image for that setting, and a different image from the default."""
    pipeline, folder = tiny
    default = np.asarray(tensor_to_pil(pipeline("a red circle", steps=2, seed=1)[0]))
    other_sampler = next(s for s in ("ddim", "euler_ancestral") if s != pipeline.sampler)
    resampled = copy.copy(pipeline)
    resampled.sampler = other_sampler
    for options, want in (
        (["--steps", "4"], pipeline("a red circle", steps=4, seed=1)),
        (["--sampler", other_sampler], resampled("a red circle", steps=2, seed=1)),
        (["--negative-prompt", "a blue square"], pipeline("a red circle", negative_prompt="a blue square", steps=2,
                                                          seed=1)),
        (["--guidance", "7"], pipeline("a red circle", guidance_scale=7.0, steps=2, seed=1)),
        (["--guidance-rescale", "0.7"], pipeline("a red circle", guidance_rescale=0.7, steps=2, seed=1)),
        (["--height", "24", "--width", "32"], pipeline("a red circle", height=24, width=32, steps=2, seed=1)),
    ):
        out = tmp_path / "option" / f"{options[0].strip('-')}.png"
        assert main(["sample", "a red circle", "--model", str(folder), "--seed", "1", "--device", "cpu",
                     *(["--steps", "2"] if "--steps" not in options else []), *options, "-o", str(out)]) == 0, options
        assert capsys.readouterr().out.split() == [str(out)]  # written where asked
        np.testing.assert_array_equal(pixels(out), np.asarray(tensor_to_pil(want[0])), err_msg=str(options))
        assert pixels(out).shape != default.shape or not np.array_equal(pixels(out), default), options
    assert Image.open(tmp_path / "option" / "height.png").size == (32, 24)

    # --batch-size changes how prompts are grouped, not the images (prompt i is drawn from SEED+i).
    prompts = ["a red circle", "a blue square", "a green triangle"]
    want = pipeline(prompts, steps=2, seed=[1, 2, 3])
    for size in ("1", "3"):
        out = tmp_path / f"batch{size}" / "x.png"
        assert main(["sample", *prompts, "--model", str(folder), "--seed", "1", "--batch-size", size, "-o", str(out),
                     *FAST]) == 0
        for i in range(3):
            np.testing.assert_array_equal(pixels(out.with_name(f"x-{i:03d}.png")), np.asarray(tensor_to_pil(want[i])))
    # An output without a suffix is still a PNG, at that very path.
    out = tmp_path / "no-suffix"
    assert main(["sample", "a red circle", "--model", str(folder), "--seed", "1", "-o", str(out), *FAST]) == 0
    assert Image.open(out).format == "PNG"
    np.testing.assert_array_equal(pixels(out), default)
    capsys.readouterr()


def test_user_mistakes_exit_2_with_one_line(tiny, tmp_path, capsys):
    _, folder = tiny
    missing = tmp_path / "no-model"
    assert main(["sample", "a", "--model", str(missing), "-o", str(tmp_path / "x.png")]) == 2
    line = error_line(capsys)
    assert str(missing) in line and "does not exist" in line and "models:/ldm-text2img/latest" in line

    assert main(["sample", "a", "--model", str(folder), "--steps", "0"]) == 2
    assert "--steps" in error_line(capsys)
    assert main(["sample", "a", "--model", str(folder), "--device", "gpu0"]) == 2
    assert "not a torch device" in error_line(capsys)
    assert main(["sample", "a", "--model", str(folder), "--height", "10", "-o", str(tmp_path / "x.png"), *FAST]) == 2
    assert "multiple of 4" in error_line(capsys)
    assert not (tmp_path / "x.png").exists()

    with pytest.raises(SystemExit) as done:
        main(["sample", "a", "--sampler", "fastest"])
    assert done.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err


def test_mlflow_model_uris(tiny, tmp_path, monkeypatch, capsys):
    pipeline, folder = tiny
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri, version, run_id = registered_store(tmp_path / "store", folder)
    MlflowClient(uri).set_registered_model_alias("ldm-text2img", "champion", version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    want = np.asarray(tensor_to_pil(pipeline("a red circle", steps=2, seed=5)[0]))
    for model in ("models:/ldm-text2img/latest", "models:/ldm-text2img@champion", f"runs:/{run_id}/text2img"):
        out = tmp_path / f"{model.replace('/', '_').replace(':', '_')}.png"
        assert main(["sample", "a red circle", "--model", model, "--seed", "5", "-o", str(out), *FAST]) == 0, model
        np.testing.assert_array_equal(pixels(out), want)
    capsys.readouterr()

    assert main(["sample", "a", "--model", "models:/no-such-model/1", *FAST]) == 2
    line = error_line(capsys)
    assert "models:/no-such-model/1" in line and uri in line

    # No MLFLOW_TRACKING_URI: the pipeline's mlflow.db in the current folder, which is not here.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "a", "--model", "models:/ldm-text2img/latest", *FAST]) == 2
    assert "no MLflow store" in error_line(capsys)
    assert not (tmp_path / "mlflow.db").exists()


def save_png(tensor: torch.Tensor, path: Path) -> Path:
    """(1, 3, H, W) in [-1, 1] -> an RGB PNG at `path`."""
    tensor_to_pil(tensor[0]).save(path)
    return path


def test_img2img_and_inpainting_options(tiny, tmp_path, capsys):
    pipeline, folder = tiny
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    init = save_png(image, tmp_path / "init.png")
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(16)[None, :] >= 8, 255, 0).repeat(16, 0).astype(np.uint8)).save(mask)
    read = image_tensor(Image.open(init))
    for options, kwargs in (
        (["--strength", "0.5"], {"init_image": read, "strength": 0.5}),
        (["--mask", str(mask)], {"init_image": read, "mask": map_tensor(Image.open(mask), 1)}),
    ):
        out = tmp_path / "out.png"
        assert main(["sample", "a red circle", "--model", str(folder), "--init-image", str(init), *options,
                     "--seed", "3", "-o", str(out), *FAST]) == 0
        want = pipeline("a red circle", steps=2, seed=3, **kwargs)[0]
        np.testing.assert_array_equal(pixels(out), np.asarray(tensor_to_pil(want)))
    capsys.readouterr()

    assert main(["sample", "a", "--model", str(folder), "--mask", str(mask), *FAST]) == 2
    assert "--mask needs --init-image" in error_line(capsys)
    assert main(["sample", "a", "--model", str(folder), "--init-image", str(tmp_path / "none.png"), *FAST]) == 2
    assert "--init-image" in error_line(capsys)
    (tmp_path / "text.png").write_text("not an image")
    assert main(["sample", "a", "--model", str(folder), "--init-image", str(tmp_path / "text.png"), *FAST]) == 2
    assert "not a readable image" in error_line(capsys)


def test_lora_and_controlnet_options(tiny, tmp_path, capsys):
    pipeline, folder = tiny
    save_random_lora(folder / "unet", tmp_path / "lora")
    with_lora = Text2Image.from_pretrained(folder, text_encoder=pipeline.text_encoder)
    with_lora.load_loras([LoraSpec(tmp_path / "lora", 0.5)])
    want = np.asarray(tensor_to_pil(with_lora("a red circle", steps=2, seed=3)[0]))
    plain = np.asarray(tensor_to_pil(pipeline("a red circle", steps=2, seed=3)[0]))
    assert not np.array_equal(want, plain)
    out = tmp_path / "lora.png"
    for merge in ([], ["--merge-loras"]):
        assert main(["sample", "a red circle", "--model", str(folder), "--lora", f"{tmp_path / 'lora'}:0.5", *merge,
                     "--seed", "3", "-o", str(out), *FAST]) == 0
        assert np.abs(pixels(out).astype(int) - want).max() <= 1  # merging rounds differently, by a level at most

    save_random_controlnet(pipeline, tmp_path / "controlnet")
    edges = tmp_path / "edges.png"
    Image.fromarray((np.eye(16) * 255).astype(np.uint8)).save(edges)
    steered = Text2Image.from_pretrained(folder, text_encoder=pipeline.text_encoder, controlnet=tmp_path / "controlnet")
    want = steered("a red circle", steps=2, seed=3, control_image=map_tensor(Image.open(edges), 1), control_scale=0.7)
    out = tmp_path / "control.png"
    assert main(["sample", "a red circle", "--model", str(folder), "--control-image", str(edges), "--control-scale",
                 "0.7", "--controlnet", str(tmp_path / "controlnet"), "--seed", "3", "-o", str(out), *FAST]) == 0
    np.testing.assert_array_equal(pixels(out), np.asarray(tensor_to_pil(want[0])))
    capsys.readouterr()

    assert main(["sample", "a", "--model", str(folder), "--lora", str(tmp_path / "no-lora"), *FAST]) == 2
    assert "no-lora" in error_line(capsys)
    assert main(["sample", "a", "--model", str(folder), "--control-image", str(edges), "--controlnet",
                 str(tmp_path / "no-controlnet"), *FAST]) == 2
    assert "train_controlnet" in error_line(capsys)


def test_compile_samples_through_the_compiled_unet(tiny, tmp_path, capsys, monkeypatch):
    """--compile hands the UNet to compile_for_sampling once and samples with what it returns. That a compiled
    UNet draws the eager images is tests/test_pipeline.py's test_compiled_pipeline_gives_the_eager_images; here
    the stand-in compile (a recorded copy) saves the 40 s of a real one."""
    compiled, calls = [], []

    def recorded_copy(unet):
        twin = copy.deepcopy(unet)
        twin.register_forward_pre_hook(lambda module, args: calls.append(1))
        compiled.append(twin)
        return twin

    monkeypatch.setattr(pipeline_module, "compile_for_sampling", recorded_copy)
    _, folder = tiny
    prompts = ["a red circle", "a blue square", "a green triangle"]
    eager, fast = tmp_path / "eager.png", tmp_path / "fast.png"
    assert main(["sample", *prompts, "--model", str(folder), "-o", str(eager), *FAST]) == 0
    assert not compiled
    assert main(["sample", *prompts, "--model", str(folder), "-o", str(fast), "--compile", *FAST]) == 0
    assert len(compiled) == 1 and calls  # the returned UNet is the one that sampled
    for i in range(len(prompts)):
        assert np.array_equal(pixels(tmp_path / f"eager-{i:03d}.png"), pixels(tmp_path / f"fast-{i:03d}.png"))

    save_text2img_model(folder, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"), model_config={"device": "cpu", "compile": True})
    assert model.unwrap_python_model().pipeline.compile  # it samples through compile_for_sampling, as the CLI did
