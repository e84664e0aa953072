"""The `ldm` command line.

Only argparse and the names of the choices are imported up front, so that `ldm --help` answers at once;
each command imports torch and the models it needs when it runs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

from ldm.diffusion.names import SAMPLERS
from ldm.errors import InputError, InputNotFoundError

DEFAULT_SAMPLE_MODEL = "models/text2img"  # where the pipeline's train_unet stage writes the trained pipeline
DEFAULT_CONTROLNET = "models/controlnet"  # where the pipeline's train_controlnet stage writes its ControlNet
MAX_INPUT_PIXELS = 50_000_000  # input images above this are refused as decompression bombs, outputs as too large
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # models:/..., runs:/..., s3://..., file:///...


def _convert_from_diffusers(args: argparse.Namespace) -> str:
    from ldm.interop.diffusers import load_diffusers_folder

    model = load_diffusers_folder(args.src)
    model.save_pretrained(args.dst)
    return f"converted diffusers folder {args.src} to an ldm {model.kind} in {args.dst}"


def _convert_to_diffusers(args: argparse.Namespace) -> str:
    from ldm.interop.diffusers import load_ldm_folder, save_diffusers_folder

    model = load_ldm_folder(args.src)
    save_diffusers_folder(model, args.dst)
    return f"converted ldm {model.kind} {args.src} to a diffusers folder in {args.dst}"


def _finite(text: str) -> float:
    """argparse type of the float options: float() also reads "nan" and "inf", which would sample NaN images."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _device(name: str):
    from ldm.devices import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise InputError(f"--device {e}") from None


def _load_sample_pipeline(model: str, device: str, controlnet: Path | None):
    from ldm.diffusion.pipeline import Text2Image

    if URI_SCHEME.match(model) and not Path(model).exists():
        from ldm.interop.mlflow_models import download_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            return Text2Image.from_pretrained(download_pipeline(model, Path(tmp)), device=device, controlnet=controlnet)
    folder = Path(model)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise InputNotFoundError(
            f"model folder {folder} {what}: train the pipeline first (its train_unet stage writes "
            f"{DEFAULT_SAMPLE_MODEL}), or pass --model a pipeline folder or an MLflow model URI such as "
            "models:/ldm-text2img/latest"
        )
    return Text2Image.from_pretrained(folder, device=device, controlnet=controlnet)


def _read_image(path: Path | None, option: str):
    """The image file an option names, decoded safely (`ldm.data.images.load_image`), or None without one."""
    if path is None:
        return None
    from ldm.data.images import ImageRejected, load_image

    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise InputNotFoundError(f"{option} {path} {what}; give the path of a PNG or JPEG image")
    try:
        return load_image(path.read_bytes(), max_pixels=MAX_INPUT_PIXELS)
    except OSError as e:
        raise InputError(f"{option} {path} cannot be read: {e.strerror or e}") from None
    except ImageRejected as e:
        raise InputError(f"{option} {path}: {e}") from None


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that would otherwise fail only after the model is loaded and has sampled, or deep inside torch."""
    from PIL import Image

    for option, value in (("--height", args.height), ("--width", args.width)):
        # 0 would silently mean "the default", a negative size would reach torch as a negative shape.
        if value is not None and value < 1:
            raise InputError(f"{option} must be a positive number of pixels, got {value}")
    # The side not given is the model's training size, unknown before loading: 1 here, a lower bound.
    pixels = (args.height or 1) * (args.width or args.height or 1)
    if pixels > MAX_INPUT_PIXELS:
        raise InputError(
            f"--height x --width = {pixels} pixels is more than the limit of {MAX_INPUT_PIXELS}; "
            "ask for a smaller image"
        )
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise InputError(f"--strength must be in 0..1 (0 keeps the input, 1 ignores it), got {args.strength}")
    # Prompt i is drawn with SEED + i, and a torch generator takes 64-bit seeds only.
    last = args.seed + len(args.prompts) - 1
    if args.seed < -(2**63) or last >= 2**64:
        raise InputError(f"--seed {args.seed} is out of range for {len(args.prompts)} prompt(s); use 0 .. 2**63")
    if args.output.is_dir():
        raise InputError(f"--output {args.output} is a folder; give the image to write, e.g. {args.output / 'a.png'}")
    if args.output.suffix and args.output.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"--output {args.output}: unknown image suffix {args.output.suffix!r}; use .png or .jpg")


def _sample(args: argparse.Namespace) -> str:
    import torch

    from ldm.data.images import image_tensor, map_tensor, tensor_to_pil
    from ldm.evaluation.grids import prompt_sheet
    from ldm.models.lora import parse_lora_spec

    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if any(not prompt.strip() for prompt in args.prompts):
        raise InputError("a prompt is empty; give each prompt some text (use --negative-prompt for what to avoid)")

    _check_options(args)
    loras = [parse_lora_spec(text) for text in args.lora]
    init_image, mask = _read_image(args.init_image, "--init-image"), _read_image(args.mask, "--mask")
    control_image = _read_image(args.control_image, "--control-image")
    if mask is not None and init_image is None:
        raise InputError("--mask needs --init-image: the image whose unmasked part is kept")
    pipeline = _load_sample_pipeline(
        args.model, _device(args.device), args.controlnet if control_image is not None else None
    )
    if loras:
        pipeline.load_loras(loras, merge=args.merge_loras)
    if args.compile:
        pipeline.use_compiled_unet()
    if args.sampler:
        pipeline.sampler = args.sampler
    conditioning = {
        "guidance_rescale": args.guidance_rescale,
        "strength": args.strength,
        "init_image": None if init_image is None else image_tensor(init_image),
        "mask": None if mask is None else map_tensor(mask, 1),
        "control_scale": args.control_scale,
        "control_image": None if control_image is None else map_tensor(
            control_image, pipeline.controlnet.config.conditioning_channels
        ),
    }
    prompts, size = args.prompts, args.batch_size
    batches = [
        pipeline(
            prompts[start:start + size], negative_prompt=args.negative_prompt, steps=args.steps,
            guidance_scale=args.guidance, seed=[args.seed + i for i in range(start, min(start + size, len(prompts)))],
            height=args.height, width=args.width, **conditioning,
        )
        for start in range(0, len(prompts), size)
    ]
    images = torch.cat(batches)
    output: Path = args.output
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--output: cannot create the folder {output.parent}: {e.strerror or e}") from None
    if len(prompts) == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}-{i:03d}{output.suffix}") for i in range(len(prompts))]
    image_format = None if output.suffix else "PNG"  # PIL picks the format from the suffix; none: PNG
    pictures = [tensor_to_pil(image) for image in images]
    if len(prompts) > 1:
        paths.append(output.with_name(f"{output.stem}-grid{output.suffix}"))
        pictures.append(prompt_sheet(pictures, prompts, columns=math.ceil(math.sqrt(len(prompts)))))
    for picture, path in zip(pictures, paths):
        try:
            picture.save(path, format=image_format)
        except OSError as e:
            raise InputError(f"--output: cannot write {path}: {e.strerror or e}") from None
    return "\n".join(str(path) for path in paths)


def _add_sample_parser(commands) -> None:
    sample = commands.add_parser(
        "sample", help="generate images from text prompts with a trained pipeline",
        description="Generate one image per prompt with a trained text-to-image pipeline. With one prompt the "
        "image is written to --output; with several, OUTPUT's stem gets -000, -001, ... per prompt, plus a "
        "-grid image of them all. Prints the paths written.",
    )
    sample.add_argument("prompts", nargs="+", metavar="PROMPT", help="text prompt(s); quote each one")
    sample.add_argument(
        "--model", default=DEFAULT_SAMPLE_MODEL,
        help="a pipeline folder (vae/, unet/, pipeline.json, as the pipeline's train_unet stage writes it) or an MLflow model URI "
        "(models:/ldm-text2img/latest, models:/ldm-text2img@champion, runs:/RUN_ID/text2img), resolved in "
        "the store MLFLOW_TRACKING_URI names, else sqlite:///mlflow.db in the current directory "
        "(default: %(default)s)",
    )
    sample.add_argument(
        "--steps", type=int, default=None, help="denoising steps, at least 1 (default: the model's, saved in training)"
    )
    sample.add_argument(
        "--sampler", choices=SAMPLERS, default=None, help="sampler; default: the one saved with the pipeline"
    )
    sample.add_argument(
        "--guidance", type=_finite, default=None,
        help="classifier-free guidance scale; 1 or less turns guidance off (default: the model's, saved in training)",
    )
    sample.add_argument(
        "--seed", type=int, default=0,
        help="random seed: the same seed, prompts and options give the same images; prompt i is drawn from "
        "SEED+i, so with a deterministic sampler its image does not depend on --batch-size (default: %(default)s)",
    )
    sample.add_argument(
        "--negative-prompt", default=None,
        help="what the images should not show (all prompts): its embedding replaces the empty prompt's in "
        "classifier-free guidance, so guidance steers away from it",
    )
    sample.add_argument(
        "--guidance-rescale", type=_finite, default=0.0,
        help="0..1: pull the guided prediction's spread back to the conditional one's (Lin et al. 2023), "
        "against the over-saturation of high --guidance (default: %(default)s, off)",
    )
    sample.add_argument(
        "--init-image", type=Path, default=None,
        help="img2img: start from this image (its size is the output size unless --height/--width say "
        "otherwise, which it must then match) instead of pure noise",
    )
    sample.add_argument(
        "--strength", type=_finite, default=None,
        help="with --init-image, how much of the denoising schedule is re-run, 0..1: 0 returns the image "
        "(through the VAE), 1 ignores it (default: 0.8, or 1 with --mask)",
    )
    sample.add_argument(
        "--mask", type=Path, default=None,
        help="inpainting, with --init-image: a grayscale image of the same size, white where the image is "
        "regenerated from the prompt and black where it is kept",
    )
    sample.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]",
        help="a LoRA adapter folder (as the pipeline's finetune_lora stage writes it, e.g. models/lora) and its scale "
        "(default 1); repeat the option to combine several",
    )
    sample.add_argument(
        "--merge-loras", action="store_true",
        help="fold the --lora adapters into the UNet's weights before sampling: as fast as the base model",
    )
    sample.add_argument(
        "--control-image", type=Path, default=None,
        help="ControlNet conditioning: the control map itself, e.g. a Canny edge map (white edges on black), at "
        "the output size; needs --controlnet",
    )
    sample.add_argument(
        "--control-scale", type=_finite, default=None,
        help="how strongly --control-image steers: the ControlNet's residuals are scaled by it, 0 turns it off "
        "(default: the scale saved with the ControlNet in its control.json, else 1)",
    )
    sample.add_argument(
        "--controlnet", type=Path, default=Path(DEFAULT_CONTROLNET),
        help="the ControlNet folder used with --control-image (as the pipeline's train_controlnet stage "
        "writes it; default: %(default)s)",
    )
    sample.add_argument(
        "--batch-size", type=int, default=8,
        help="how many prompts are sampled together in one forward pass (default: %(default)s)",
    )
    sample.add_argument(
        "--compile", action="store_true",
        help="run the UNet through torch.compile: 10-30 s of compiling per batch shape, then faster steps; "
        "for many prompts in one call",
    )
    sample.add_argument(
        "--height", type=int, default=None,
        help="image height in pixels, a multiple of the VAE x UNet downsampling factor; default: the training size",
    )
    sample.add_argument("--width", type=int, default=None, help="image width in pixels; default: the height")
    sample.add_argument(
        "--device", default="auto",
        help="torch device: auto (cuda when present, else cpu), cpu, cuda, cuda:1, mps, ... (default: %(default)s)",
    )
    sample.add_argument(
        "-o", "--output", type=Path, default=Path("sample.png"),
        help="the PNG to write (its folder is created); with several prompts, the stem of the numbered files "
        "(default: %(default)s)",
    )
    sample.set_defaults(handler=_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion (Stable Diffusion) from scratch.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert", help="convert a VAE or UNet between ldm and diffusers folders (the kind is read from the config)"
    )
    directions = convert.add_subparsers(dest="direction", required=True)
    for name, handler, src_help, dst_help in (
        ("from-diffusers", _convert_from_diffusers,
         "a diffusers AutoencoderKL or UNet2DConditionModel folder (config.json + diffusion_pytorch_model.safetensors)",
         "the ldm model folder to write (config.json + model.safetensors)"),
        ("to-diffusers", _convert_to_diffusers,
         "an ldm model folder (config.json + model.safetensors)",
         "the diffusers folder to write, loadable with diffusers' from_pretrained"),
    ):
        sub = directions.add_parser(name, help=f"convert {name.replace('-', ' ')}")
        sub.add_argument("src", type=Path, help=src_help)
        sub.add_argument("dst", type=Path, help=dst_help)
        sub.set_defaults(handler=handler)
    _add_sample_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(args.handler(args))
    except InputError as e:
        # A user mistake (wrong folder, unsupported config, an output path that cannot be written): say what
        # and how to fix it, without a traceback. Anything else is a bug, and its traceback is kept.
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
