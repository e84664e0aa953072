"""The `ldm` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.diffusers_interop import load_diffusers_folder, load_ldm_folder, save_diffusers_folder


def _convert_from_diffusers(args: argparse.Namespace) -> str:
    model = load_diffusers_folder(args.src)
    model.save_pretrained(args.dst)
    return f"converted diffusers folder {args.src} to an ldm {model.kind} in {args.dst}"


def _convert_to_diffusers(args: argparse.Namespace) -> str:
    model = load_ldm_folder(args.src)
    save_diffusers_folder(model, args.dst)
    return f"converted ldm {model.kind} {args.src} to a diffusers folder in {args.dst}"


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(args.handler(args))
    except (FileNotFoundError, ValueError) as e:
        # A user mistake (wrong folder, unsupported config): say what and how to fix it, without a traceback.
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
