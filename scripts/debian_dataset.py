"""Turn Debian's tuxpaint-stamps-default package into an image folder that ingest reads (ingest.source: OUT_DIR).

    python scripts/debian_dataset.py tuxpaint-stamps-default OUT_DIR [--limit N] [--seed S]

Writes OUT_DIR/metadata.jsonl ({"file_name": "images/...", "text": caption} per line) and the stamps under
OUT_DIR/images/ as RGB PNGs on white, keeping the package's category folders (the same stamp name occurs in
several of them). Three stamps have a shorter side under ingest's default min_image_size of 16 pixels; they are kept
here, as that limit is ingest's parameter, and ingest rejects them as too_small.

Each stamp NAME.png has a NAME.txt beside it: one untagged line, the English description, and one `LANG.utf8=...`
line per translation. Stamps that are skipped: those shipped only as SVG (neither Pillow nor ingest reads SVG),
and NAME_mirror.png, the flipped copy Tux Paint shows when a stamp is mirrored, which has no caption of its own.

openclipart-png is not offered: its only description of an image is the file name, a title cut to 24 characters
with the author's name appended (acquila_architetto_franc_01.png), often Italian, or none (fc26.png, int.png).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

PACKAGES = {"tuxpaint-stamps-default": Path("/usr/share/tuxpaint/stamps")}
TRANSLATION = re.compile(r"^[A-Za-z]+(_[A-Za-z]+)?(@[A-Za-z]+)?\.utf8=")


def english_caption(txt: Path) -> str:
    """The untagged line of a Tux Paint description file, whitespace collapsed; "" if it has none."""
    lines = txt.read_text(encoding="utf-8").splitlines()
    return " ".join(next((line for line in lines if not TRANSLATION.match(line)), "").split())


def on_white(image: Image.Image) -> Image.Image:
    """The image composited over white, as RGB."""
    # Done here, not left to ingest: ingest's load_image composites RGBA, LA and palette transparency, but passes
    # an RGB image whose transparency is a tRNS colour key through unchanged (seasonal/easter/chick-hatched.png,
    # whose transparent third would turn near-black).
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def stamps(root: Path) -> tuple[list[tuple[Path, str]], Counter]:
    """(PNG, caption) of every usable stamp sorted by path, and how many stamps were skipped per reason."""
    usable, skipped = [], Counter()
    for stem in sorted({p.parent / p.stem for pattern in ("*.png", "*.svg") for p in root.rglob(pattern)}):
        png, txt = (stem.parent / f"{stem.name}{suffix}" for suffix in (".png", ".txt"))
        if stem.name.endswith("_mirror"):
            skipped["mirror copy"] += 1
        elif not png.is_file():
            skipped["SVG only"] += 1
        elif not txt.is_file() or not (caption := english_caption(txt)):
            skipped["no English description"] += 1
        else:
            usable.append((png, caption))
    return sorted(usable), skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", choices=sorted(PACKAGES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--limit", type=int, help="keep this many stamps, drawn with --seed from the usable ones")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")

    root = PACKAGES[args.package]
    if not root.is_dir():
        sys.exit(
            f"error: Debian's {args.package} package is not installed ({root} does not exist); install it with\n"
            f"  apt-get install --no-install-recommends {args.package}"
        )
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        # Files left from an earlier run would have no metadata row, and ingest rejects each of them.
        sys.exit(f"error: {args.out_dir} is not empty; give a new or empty folder")

    chosen, skipped = stamps(root)
    if args.limit is not None:
        random.Random(args.seed).shuffle(chosen)
        chosen = sorted(chosen[: args.limit])

    (args.out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows, ratios = [], []
    for png, caption in chosen:
        file_name = Path("images", png.relative_to(root))
        (args.out_dir / file_name).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(png) as image:
            on_white(image).save(args.out_dir / file_name)
            ratios.append(image.width / image.height)
        rows.append(json.dumps({"file_name": file_name.as_posix(), "text": caption}, ensure_ascii=False) + "\n")
    (args.out_dir / "metadata.jsonl").write_text("".join(rows), encoding="utf-8")

    lengths = [len(caption) for _, caption in chosen]
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "none"
    print(
        f"{args.package}: wrote {len(rows)} images to {args.out_dir}; skipped {sum(skipped.values())} ({reasons}); "
        f"captions {min(lengths, default=0)}-{max(lengths, default=0)} chars; "
        f"aspect ratio (w/h) {min(ratios, default=0):.2f}-{max(ratios, default=0):.2f}"
    )


if __name__ == "__main__":
    main()
