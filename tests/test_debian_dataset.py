"""scripts/debian_dataset.py on Debian's tuxpaint-stamps-default: an image folder of one English caption per stamp,
the same on every run, that ingest's reader accepts.

The package must be installed (.ci/run installs it): without it these tests fail, naming the apt command."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from stages.params import IngestParams
from stages.sources import read_source

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "debian_dataset.py"
PACKAGE = "tuxpaint-stamps-default"
LIMIT = 48

_spec = importlib.util.spec_from_file_location("debian_dataset", SCRIPT)
debian_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(debian_dataset)
STAMPS = debian_dataset.PACKAGES[PACKAGE]


def build(out: Path, seed: int) -> str:
    """Run the script on LIMIT stamps; its summary line."""
    if not STAMPS.is_dir():
        pytest.fail(
            f"Debian's {PACKAGE} package is not installed (no {STAMPS}); install it with "
            f"`apt-get install --no-install-recommends {PACKAGE}` (.ci/run does)",
            pytrace=False,
        )
    command = [sys.executable, str(SCRIPT), PACKAGE, str(out), "--limit", str(LIMIT), "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tuxpaint") / "seed0"
    return out, build(out, seed=0)


def test_metadata_rows_name_exactly_the_written_images(dataset):
    out, summary = dataset
    names = [row["file_name"] for row in rows(out)]
    written = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file())
    assert sorted(p.name for p in out.iterdir()) == ["images", "metadata.jsonl"]
    assert len(names) == LIMIT and sorted(set(names)) == written
    assert summary.startswith(f"{PACKAGE}: wrote {LIMIT} images") and summary.count("\n") == 1


def test_captions_are_one_line_of_english(dataset):
    out, _ = dataset
    for row in rows(out):
        text = row["text"]
        assert text and text == " ".join(text.split()), row
        assert sum(c.isascii() for c in text) >= 0.9 * len(text) and re.search("[A-Za-z]{2}", text), row
        assert not debian_dataset.TRANSLATION.match(text), row
    # frog.txt holds 68 translations, en_AU and en_GB among them; the untagged line is the description.
    assert debian_dataset.english_caption(STAMPS / "animals/amphibians/frog.txt") == "A frog."


def test_images_are_rgb_with_transparency_on_white(dataset):
    out, _ = dataset
    for row in rows(out):
        with Image.open(out / row["file_name"]) as image:
            assert image.mode == "RGB" and "transparency" not in image.info, row["file_name"]
    # A colour key (tRNS) on an RGB image: the one kind of transparency ingest itself leaves unconverted.
    keyed = Image.new("RGB", (2, 1), (0, 0, 1))
    keyed.putpixel((1, 0), (9, 9, 9))
    keyed.info["transparency"] = (0, 0, 1)
    flat = debian_dataset.on_white(keyed)
    assert (flat.getpixel((0, 0)), flat.getpixel((1, 0))) == ((255, 255, 255), (9, 9, 9))
    assert debian_dataset.on_white(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_a_seed_draws_the_same_subset_and_another_seed_another(dataset, tmp_path):
    out, _ = dataset
    build(tmp_path / "again", seed=0)
    build(tmp_path / "other", seed=1)
    assert (tmp_path / "again" / "metadata.jsonl").read_bytes() == (out / "metadata.jsonl").read_bytes()
    assert {r["file_name"] for r in rows(tmp_path / "other")} != {r["file_name"] for r in rows(out)}


def test_ingest_accepts_every_image_of_a_usable_size(dataset):
    out, _ = dataset
    knobs = IngestParams(source=str(out))
    total, _, outcomes = read_source(knobs, image_size=32, seed=0, section="ingest")
    accepted, rejected = [], {}
    for name, outcome in outcomes:
        if isinstance(outcome, Exception):
            rejected[name.split(" ", 1)[1]] = outcome.reason
        else:
            accepted += outcome
    too_small = set()
    for row in rows(out):
        with Image.open(out / row["file_name"]) as image:
            if min(image.size) < knobs.min_image_size:
                too_small.add(row["file_name"])
    assert total == LIMIT
    assert rejected == dict.fromkeys(too_small, "too_small")
    assert len(accepted) == LIMIT - len(too_small)
    assert {row["caption"] for row in accepted} <= {row["text"] for row in rows(out)}


def test_a_missing_package_is_named_with_its_apt_command(tmp_path, monkeypatch):
    monkeypatch.setitem(debian_dataset.PACKAGES, PACKAGE, tmp_path / "absent")
    with pytest.raises(SystemExit) as exited:
        debian_dataset.main([PACKAGE, str(tmp_path / "out")])
    assert f"{PACKAGE} package is not installed" in str(exited.value.code)
    assert f"apt-get install --no-install-recommends {PACKAGE}" in str(exited.value.code)
