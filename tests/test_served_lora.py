"""The served `ldm-text2img` model's `lora` param: adapters shipped with the model or registered in MLflow, by
name, never a filesystem path named in a request."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flows.text2img_model import log_text2img_model
from flows.tracking import StageRun
from ldm import Text2Image
from ldm.models.lora import LoraSpec, load_loras
from tests.adapters import save_random_lora
from tests.servers import BIN, _server, free_port, use_tracking_store
from tests.test_text2img_model import LINEAGE, PROMPTS, _post, decode, direct, tiny_pipeline

SEED, STEPS = 3, 2
SHIPPED_NAME = "hexagons"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[dict]:
    """A tiny pipeline logged as ldm-text2img/1 with the LoRA "hexagons" shipped inside it, and another LoRA
    registered as ldm-lora/1 (alias `champion`) the way the finetune_lora flow registers it; MLflow's default
    URIs point at the store."""
    root = tmp_path_factory.mktemp("served_lora")
    pipeline = tiny_pipeline(root / "pipeline")
    torch.manual_seed(1)
    shipped = save_random_lora(root / "pipeline" / "unet", root / "hexagons-lora")
    torch.manual_seed(2)
    registered = save_random_lora(root / "pipeline" / "unet", root / "registered-lora")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = MlflowClient(uri)
        experiment = client.create_experiment("ldm-pipeline", artifact_location=(root / "artifacts").as_uri())
        run = client.create_run(experiment, tags=LINEAGE)
        tracked = StageRun(client, run.info.run_id, LINEAGE)
        assert log_text2img_model(tracked, root / "pipeline", loras={SHIPPED_NAME: shipped}) == "1"
        assert tracked.register_model(registered, "ldm-lora") == "1"  # as flows.stage_flow.record_results does
        client.set_registered_model_alias("ldm-lora", "champion", "1")
        client.set_terminated(run.info.run_id)
        use_tracking_store(mp, uri)
        yield {"pipeline": pipeline, "pipeline_dir": root / "pipeline", "uri": uri, "root": root,
               "shipped": shipped, "registered": registered}


def with_lora(store: dict, folder: Path, scale: float) -> np.ndarray:
    """What the library draws for PROMPTS[0] with the LoRA in `folder` at `scale`, as `ldm sample --lora` does."""
    adapted = Text2Image.from_pretrained(store["pipeline_dir"], text_encoder=store["pipeline"].text_encoder)
    adapted.load_loras([LoraSpec(folder, scale)], merge=True)
    return direct(adapted, PROMPTS[:1], seed=SEED, steps=STEPS)[0]


def hostile_values(store: dict) -> list[str]:
    """`lora` values that name the real LoRA folders on the serving machine (or nothing the model accepts)."""
    shipped, registered = store["shipped"], store["registered"]
    return [
        str(shipped),                                   # an absolute path to a real LoRA folder
        f"{registered}:0.5",                            # ... with a scale
        os.path.relpath(registered, Path.cwd()),        # a relative path from the server's cwd to one
        "../registered-lora",
        f"{SHIPPED_NAME}/../../registered-lora",
        "..",
        registered.as_uri(),                            # file:///...
        f"file:{registered}",
        f"file:{SHIPPED_NAME}",
        "~/registered-lora",
        "registered-lora",                              # an unknown name (the folder's, not a shipped one)
        "models:/no-such-lora/1",
        "ldm-lora/9",
        "ldm-lora@nope",
        f"{SHIPPED_NAME},{registered}",                 # one good, one bad: the request is refused
    ]


def refused(message: str, value: str) -> bool:
    """The 400's message names the refused item (the value's last) and says what the param takes."""
    return repr(value.split(",")[-1]) in message and "shipped with the model" in message and "registered" in message and "not accepted" in message


def test_served_model_refuses_lora_paths_and_applies_shipped_and_registered_adapters(store):
    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/ldm-text2img/1",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "--workers", "1"]
    env = {"MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_DISABLE_TELEMETRY": "true", "LDM_DEVICE": "cpu",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with _server(cmd, f"http://127.0.0.1:{port}/ping", env, store["root"] / "serve.log", timeout=180):
        url = f"http://127.0.0.1:{port}/invocations"

        def ask(lora: str | None) -> tuple[int, dict]:
            params = {"seed": SEED, "steps": STEPS} | ({"lora": lora} if lora is not None else {})
            return _post(url, {"dataframe_split": {"columns": ["prompt"], "data": [[PROMPTS[0]]]}, "params": params})

        status, body = ask(None)
        assert status == 200, body
        base = decode(body["predictions"][0]["image"])
        np.testing.assert_array_equal(base, direct(store["pipeline"], PROMPTS[:1], seed=SEED, steps=STEPS)[0])

        for value in hostile_values(store):
            status, body = ask(value)
            assert status == 400, (value, body)
            assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "predictions" not in body, (value, body)
            assert refused(body["message"], value), (value, body["message"])

        # A registered model that is not a LoRA is refused too (only its adapter files would be downloaded).
        status, body = ask("ldm-text2img/1")
        assert status == 400 and "not a LoRA adapter" in body["message"], body

        for value, folder, scale in (
            (f"{SHIPPED_NAME}:0.5", store["shipped"], 0.5),
            ("ldm-lora/1", store["registered"], 1.0),
            ("models:/ldm-lora@champion:0.5", store["registered"], 0.5),
        ):
            status, body = ask(value)
            assert status == 200, (value, body)
            got, want = decode(body["predictions"][0]["image"]), with_lora(store, folder, scale)
            assert not np.array_equal(want, base), value  # the LoRA changes what is drawn
            np.testing.assert_array_equal(got, want, err_msg=value)

        # Each request's LoRA went into a copy of the UNet: the next request without one is the base model.
        status, body = ask(None)
        np.testing.assert_array_equal(decode(body["predictions"][0]["image"]), base)


class _Touches:
    """Records the file operations on paths containing `marker`: Python-level opens, directory listings and
    walks (audit events) and stats (os.stat / os.lstat, which Path.exists / is_dir / is_file use)."""

    def __init__(self, marker: str):
        self.marker, self.active, self.seen = marker, False, []
        sys.addaudithook(self._hook)  # cannot be removed: it records only while active

    def _hit(self, what: str, args) -> None:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)) and self.marker in os.fsdecode(arg):
                self.seen.append((what, os.fsdecode(arg)))

    def _hook(self, event: str, args) -> None:
        if self.active and event in ("open", "os.listdir", "os.scandir", "os.walk", "shutil.copytree", "os.chdir"):
            self._hit(event, args)

    def watch(self, monkeypatch):
        for name in ("stat", "lstat"):
            original = getattr(os, name)

            def wrapped(path, *args, _original=original, _name=name, **kwargs):
                if self.active:
                    self._hit(f"os.{_name}", [path])
                return _original(path, *args, **kwargs)

            monkeypatch.setattr(os, name, wrapped)
        return self


def test_a_refused_lora_value_never_touches_the_path_it_names(store, monkeypatch):
    model = mlflow.pyfunc.load_model("models:/ldm-text2img/1", model_config={"device": "cpu"})
    touches = _Touches("-lora").watch(monkeypatch)  # both LoRA folders end in "-lora"

    # The watch sees the library reading a LoRA folder (as a server that opened the requested path would).
    touches.active = True
    load_loras(Text2Image.from_pretrained(store["pipeline_dir"], text_encoder=store["pipeline"].text_encoder).unet,
               [LoraSpec(store["registered"])])
    touches.active = False
    assert any(what == "open" for what, _ in touches.seen), touches.seen

    for value in hostile_values(store):
        touches.seen.clear()
        touches.active = True
        try:
            with pytest.raises(MlflowException) as error:
                model.predict(pd.DataFrame({"prompt": ["a"]}), params={"steps": 1, "lora": value})
        finally:
            touches.active = False
        assert error.value.error_code == "INVALID_PARAMETER_VALUE" and refused(error.value.message, value), value
        assert not [seen for seen in touches.seen if "ldm-registered-loras-" not in seen[1]], (value, touches.seen)
