"""Bad input, fuzzed: params files, captions and images from random and hostile generators, and the command
lines on user mistakes. Each either works or is refused with a message that names the bad input: never
another exception, never a traceback, never unbounded memory."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import struct
import subprocess
import sys
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm import Text2Image, cli
from stages import cache_latents, evaluate, finetune_lora, ingest, sample, train_controlnet, train_unet, train_vae
from stages.ingest import REASONS
from stages.params import IngestParams, Params, ParamsError, load_params, resolve_device
from stages.sources import (
    Rejected,
    _captions,
    _csv_rows,
    _image,
    _Input,
    _jsonl_rows,
    _read_caption_file,
    normalize_caption,
)

REPO = Path(__file__).resolve().parents[1]
CI = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
MODEL = REPO / "tests" / "fixtures" / "text2img"
LDM = Path(sys.executable).parent / "ldm"  # the console script pip installed beside this interpreter

# 100 examples each keeps the file within a minute on two slow shared cores; database=None: no state between runs.
FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder for the files of hypothesis examples, which share one anyway (each test call runs them all)."""
    return tmp_path_factory.mktemp("bad-input")


# ---------------------------------------------------------------------------------------------- params


def leaves(node, path=()):
    """Every (path, value) of a YAML document that is not a mapping: scalars, lists, and list items."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
        return
    yield path, node
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from leaves(item, (*path, index))


def replaced(document, path, value):
    document = copy.deepcopy(document)
    node = document
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return document


CI_LEAVES = sorted((path for path, _ in leaves(CI)), key=str)
HOSTILE_STRINGS = [
    "", " ", "nan", ".nan", "inf", "-.inf", "1e400", "0x10", "yes", "~", "null", "\x00", "\u202e", "\ufeff",
    "2020-01-01", "-1", "dpmpp_2m ", "DDIM", "cuda:99", "../../etc", "a\nb", "x" * 1000,
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.sampled_from([0, -1, -(2**63), 2**31, 2**64, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 1.0, -1.0]),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_STRINGS),
)
KEYS = st.one_of(st.text(max_size=8), st.integers(-2, 2), st.none(), st.booleans())
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6
)


def check_params(path: Path, named: list[str] = ()) -> Params | None:
    """load_params(path) gives a Params or a ParamsError naming the file and each of `named`, nothing else;
    what a stage derives from a loaded Params (the VAE config, the device) is a ParamsError too or works."""
    try:
        params = load_params(path)
    except ParamsError as e:
        message = str(e)
        assert str(path) in message
        for name in named:
            assert name in message, (name, message)
        return None
    assert isinstance(params, Params)
    assert all(math.isfinite(value) for _, value in leaves(params.model_dump()) if isinstance(value, float))
    for derived in (params.vae_config, lambda: resolve_device(params.device)):
        try:
            derived()
        except ParamsError as e:
            assert str(e)
    return params


def dump(document) -> str:
    return yaml.safe_dump(document, allow_unicode=True, sort_keys=False)


@FUZZ
@given(st.one_of(VALUES, st.dictionaries(st.one_of(KEYS, st.sampled_from(list(Params.model_fields))), VALUES)))
def test_random_params_documents_load_or_name_the_bad_key(scratch, document):
    path = scratch / "random.yaml"
    text = dump(document)
    path.write_text(text, encoding="utf-8")
    raw = yaml.safe_load(text)
    # Pydantic reports every field, so each unknown top-level key is named, whatever else is wrong.
    unknown = [str(key) for key in raw if key not in Params.model_fields] if isinstance(raw, dict) else []
    check_params(path, unknown)


@FUZZ
@given(st.sampled_from(CI_LEAVES), VALUES)
def test_one_bad_leaf_of_the_ci_params_is_named(scratch, path, value):
    document = replaced(CI, path, value)
    assume(document != CI)
    params_file = scratch / "mutated.yaml"
    params_file.write_text(dump(document), encoding="utf-8")
    dotted = ".".join(map(str, path))
    name = next(str(part) for part in reversed(path) if isinstance(part, str))
    try:
        params = load_params(params_file)
    except ParamsError as e:
        # The key itself, or (for a check across keys such as image_size against the VAE's levels, or
        # attention_levels against block_out_channels) the message of its section's check names it.
        assert dotted in str(e) or name in str(e), (dotted, str(e))
    else:
        assert isinstance(params, Params)
        check_params(params_file)


def test_the_ci_params_load():
    assert check_params(REPO / "configs" / "ci.yaml").profile == "ci"


def test_the_own_data_profile_differs_from_the_default_only_where_the_readme_says():
    own, default = check_params(REPO / "configs" / "own_data.yaml"), load_params(REPO / "params.yaml")
    assert own.profile == "own_data" and own.ingest.source != "shapes"
    assert own.train_vae.flip and own.cache_latents.flip
    assert (own.train_unet.max_steps, own.train_unet.validate_every) == (700, 100)
    same = own.model_copy(update={
        "profile": default.profile, "ingest": default.ingest, "sample": default.sample,
        "train_vae": own.train_vae.model_copy(update={"flip": False}),
        "cache_latents": own.cache_latents.model_copy(update={"flip": False}),
        "train_unet": own.train_unet.model_copy(update={"max_steps": 1600, "validate_every": 250}),
    })
    assert same == default


HOSTILE_FILES = [
    b"",
    b"\n\n",
    b"---\n...\n",
    b"- a list\n- at the top\n",
    b"just a string",
    b"seed: [1, 2",
    b"seed: {a: 1",
    b"\tseed: 1",
    b"seed: *undefined",
    b"seed: !!python/object/apply:os.system ['echo pwned']",
    b"seed: !!binary aGVsbG8=",
    b"seed: !!set {1, 2}",
    b"seed: !!int abc",
    b"seed: !!float",
    b"seed: !!timestamp 99999-01-01",
    b"profile: 2024-13-01",
    b"seed: " + b"9" * 5000,
    b"1: 2\n",
    b"null: x\n",
    b"true: x\n",
    b"? [a, b]\n: c\n",
    b"seed: 1\nseed: 2\n",
    b"%YAML 9.9\n---\nseed: 1\n",
    b"\xef\xbb\xbfseed: 1\n",
    "seed: 1\n".encode("utf-16"),
    b"\xff\xfe\x00garbage\x80\x81",
    b"seed: \x00\n",
    b"seed: " + b"[" * 3000 + b"]" * 3000 + b"\n",
    b"ingest: " + b"{a: " * 3000 + b"1" + b"}" * 3000 + b"\n",
    b"train_vae:\n  lr: .inf\n",
    b"train_vae:\n  lr: .nan\n",
    b"sample:\n  guidance_scale: .inf\n",
    b"image_size: -16\n",
    b"image_size: 1000000000000000000000000\n",
    b"ingest: null\n",
    b"train_unet:\n  model: [16, 32]\n",
    b"evaluate:\n  samplers: [{sampler: nope, steps: 0}]\n",
    b"sample:\n  prompts: []\n",
    b"seed: " + b"x" * 100_000 + b"\n",
    b"a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nsample: {prompts: [*b, *b, *b]}\n",
]


@FUZZ
@given(st.one_of(st.sampled_from(HOSTILE_FILES), st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_hostile_params_files_load_or_are_a_params_error(scratch, data):
    path = scratch / "hostile.yaml"
    path.write_bytes(data)
    check_params(path)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"1: 2\nnull: 3\n", ["1: Keys should be strings", "None: Keys should be strings"]),
        (b"\xff\xfe\x00garbage\x80", ["not valid YAML"]),
        (b"\xef\xbb\xbf\x80seed: 1\n", ["not valid YAML"]),
        (b"seed: " + b"[" * 3000 + b"]" * 3000, ["nests"]),
        (b"train_vae:\n  lr: .inf\n  weight_decay: .inf\n", ["train_vae.lr", "train_vae.weight_decay", "finite"]),
        (b"sample:\n  guidance_scale: .nan\n", ["sample.guidance_scale", "finite"]),
        (b"profile: 2024-13-01\n", ["2024-13-01", "line 1", "quote it"]),
        (b"seed: " + b"9" * 5000 + b"\n", ["line 1", "quote it"]),
        (b"seed: !!timestamp 99999-01-01\n", ["99999-01-01", "line 1"]),
        (b"seed: " + b"x" * 100_000 + b"\n", ["seed: Input should be a valid integer"]),
    ],
    ids=["number-keys", "binary", "bom-then-binary", "deep", "inf", "nan", "bad-date", "huge-int", "bad-timestamp",
         "long-value"],
)
def test_params_mistakes_found_by_fuzzing(tmp_path, data, named):
    path = tmp_path / "params.yaml"
    path.write_bytes(data)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    for name in named:
        assert name in str(error.value)
    assert len(str(error.value)) < 2000  # a long value is cut short, not echoed


def test_a_missing_or_unreadable_params_path(tmp_path):
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(ParamsError, match="not found"):
            load_params(path)


# ---------------------------------------------------------------------------------------------- captions

# Characters (and a few sequences) that break line-based formats, render backwards, vanish, compose, or are not
# Unicode at all (lone surrogates).
HOSTILE_CHARS = [
    "\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\t", "\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x1f",
    "\u00a0", "\u1680", "\u2000", "\u2028", "\u2029", "\u200b", "\u200d", "\u200e", "\u200f", "\u202a", "\u202e",
    "\u2066", "\u3000", "\ufeff", "\ufffd", "\uffff", "\U0010ffff", "\u0301", "e\u0301", "\u1e9b\u0323", "\ud800",
    "\udcff", "\U0001f3a8", "\u0627\u0644",
]
HOSTILE_TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(HOSTILE_CHARS)), max_size=40).map("".join)
# What JSON metadata may hold where a caption is expected, and what Parquet may too (bytes).
NOT_TEXT_JSON = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)
NOT_TEXT = st.one_of(NOT_TEXT_JSON, st.binary(max_size=8))


def caption_values(not_text):
    return st.one_of(
        HOSTILE_TEXT,
        st.sampled_from(["", " \n\t ", "x" * 100_000, "a\u2028b", "\ud800"]),
        st.lists(HOSTILE_TEXT, max_size=4),
        st.lists(st.one_of(HOSTILE_TEXT, not_text), min_size=1, max_size=3),
        st.lists(st.lists(st.text(max_size=3), max_size=2), min_size=1, max_size=2),
        not_text,
    )


def has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def is_normalized(caption: str) -> bool:
    return (
        caption == caption.strip()
        and "  " not in caption
        and all(c == " " or not c.isspace() for c in caption)
        and len(caption.splitlines()) <= 1  # splitlines splits on \x1c-\x1e, \x85, \u2028 too: all whitespace
        and unicodedata.is_normalized("NFC", caption)
    )


@FUZZ
@given(HOSTILE_TEXT)
def test_normalize_caption_is_idempotent_and_one_line(text):
    caption = normalize_caption(text)
    assert normalize_caption(caption) == caption
    assert is_normalized(caption)
    # Only whitespace goes: every other character, control characters included, is kept in order.
    assert "".join(caption.split()) == "".join(unicodedata.normalize("NFC", text).split())


def check_captions(value):
    """_captions(value) gives the captions (normalized, non-empty, UTF-8) or a Rejected with a known reason."""
    try:
        captions = _captions(value)
    except Rejected as e:
        assert e.reason in REASONS and e.detail and len(e.detail) < 300
        return e
    assert captions and all(isinstance(c, str) and c and is_normalized(c) for c in captions)
    for caption in captions:
        caption.encode("utf-8")
    return captions


def promised_captions(value) -> list[str] | str:
    """What ingest documents for a caption value: its non-blank normalized texts, or the reason it is rejected."""
    if value is None:
        return "missing_caption"
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        return "invalid_caption"
    captions = [caption for caption in map(normalize_caption, texts) if caption]
    if not captions:
        return "empty_caption"
    return "invalid_caption" if any(map(has_surrogate, captions)) else captions


@FUZZ
@given(caption_values(NOT_TEXT))
def test_captions_are_accepted_normalized_or_rejected_with_a_reason(value):
    outcome = check_captions(value)
    promised = promised_captions(value)
    assert outcome == promised if isinstance(promised, list) else outcome.reason == promised


JSON_LINES = st.one_of(
    HOSTILE_TEXT,
    st.sampled_from([
        "{", "[]", "null", "42", '"text"', '{"file_name": null}', '{"file_name": "   ", "text": "x"}',
        '{"file_name": 7, "text": "x"}', '{"file_name": "a.png"}', '{"file_name": "a.png", "text": null}',
        '{"file_name": "a.png", "text": "\\ud800"}', '{"file_name": "a.png", "text": ' + "1" * 5000 + "}",
        "[" * 100_000, '{"file_name": "a.png", "text": NaN}', '{"file_name": "a.png", "text": "a\\u2028b"}',
    ]),
    st.fixed_dictionaries(
        {"file_name": st.one_of(st.text(max_size=10), NOT_TEXT_JSON)}, optional={"text": caption_values(NOT_TEXT_JSON)}
    ).map(lambda row: json.dumps(row, ensure_ascii=False)),
)


@FUZZ
@given(st.lists(JSON_LINES, max_size=6))
def test_jsonl_metadata_rows_become_inputs_or_rejects(lines):
    text = "\n".join(lines)
    inputs = list(_jsonl_rows("metadata.jsonl", text, "text"))
    assert len(inputs) == sum(1 for line in text.split("\n") if line.strip())
    for item in inputs:
        if item.problem is not None:
            assert item.problem.reason == "bad_metadata" and item.problem.detail
        else:
            assert isinstance(item.file, str) and item.file.strip()
            check_captions(item.text)


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=10), st.one_of(HOSTILE_TEXT, st.just("x" * 140_000))), max_size=5))
def test_csv_metadata_rows_round_trip_or_are_rejected(rows):
    # Lone surrogates cannot be in a decoded file; the caption-file test covers undecodable bytes.
    assume(not any(has_surrogate(f + t) for f, t in rows))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file_name", "text"])
    writer.writerows(rows)
    inputs = list(_csv_rows(Path("metadata.csv"), buffer.getvalue(), "text"))
    assert len(inputs) == len(rows)
    for item, (file_name, text) in zip(inputs, rows):
        if len(text) > csv.field_size_limit():
            assert (item.problem.reason, "field limit" in item.problem.detail) == ("bad_metadata", True)
        elif not file_name.strip():
            assert item.problem.reason == "bad_metadata"
        else:
            assert (item.problem, item.file, item.text) == (None, file_name, text)
            check_captions(item.text)


@FUZZ
@given(st.one_of(st.binary(max_size=200), HOSTILE_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_caption_files_are_read_or_rejected(scratch, data):
    (scratch / "caption.txt").write_bytes(data)
    try:
        lines = _read_caption_file(scratch, "caption.txt")
    except Rejected as e:
        assert e.reason == "invalid_caption" and "caption.txt" in e.detail
        return
    assert lines == data.decode("utf-8-sig").splitlines()
    check_captions(lines)


@FUZZ
@given(st.lists(st.one_of(HOSTILE_TEXT, st.just("a red circle " * 2000), NOT_TEXT), min_size=1, max_size=3))
def test_the_text_encoder_encodes_any_text_or_names_the_bad_prompt(loaded, prompts):
    encoder = loaded.text_encoder
    try:
        embedding = encoder.encode(prompts)
    except TypeError as e:
        assert any(not isinstance(p, str) for p in prompts) and "list of strings" in str(e)
        return
    except ValueError as e:
        assert any(has_surrogate(p) for p in prompts) and "is not valid Unicode text" in str(e)
        return
    assert not any(has_surrogate(p) for p in prompts)
    states, mask = embedding.hidden_states, embedding.attention_mask
    assert states.shape[0] == len(prompts) and states.shape[1] <= encoder.max_length
    assert mask[:, 0].all() and states.isfinite().all()  # every prompt has a token, even one of NULs only


# ---------------------------------------------------------------------------------------------- images

SIZE = 16
KNOBS = IngestParams(min_image_size=4, max_image_pixels=1_000_000)


def check_image(data: bytes):
    """ingest's _image on bytes: a SIZE x SIZE RGB PNG and the original size, or a Rejected with a reason."""
    outcome = _image(None, _Input("fuzz", "fuzz", data=data), KNOBS, SIZE)
    if isinstance(outcome, Rejected):
        assert outcome.reason in REASONS and outcome.detail
        return outcome
    png, width, height, split = outcome
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (SIZE, SIZE))
    assert min(width, height) >= KNOBS.min_image_size and width * height <= KNOBS.max_image_pixels
    assert split in ("train", "val")
    return png, width, height


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# (mode, format) pairs Pillow writes: every mode an image file in the wild decodes to.
MODES = [
    ("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("RGBA", "PNG"), ("1", "BMP"),
    ("P", "BMP"), ("L", "JPEG"), ("CMYK", "JPEG"), ("YCbCr", "JPEG"), ("P", "GIF"), ("L", "GIF"), ("I", "TIFF"),
    ("F", "TIFF"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("CMYK", "TIFF"), ("LAB", "TIFF"), ("RGBX", "TIFF"),
    ("LA", "TIFF"), ("1", "PPM"), ("L", "PPM"), ("I", "PPM"), ("RGBA", "WEBP"), ("RGB", "WEBP"),
]


@st.composite
def odd_images(draw):
    mode, fmt = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode in ("I;16", "I;16B"):
        image = Image.fromarray(rng.integers(0, 2**16, (height, width)).astype("<u2" if mode == "I;16" else ">u2"))
    elif mode == "I":
        image = Image.fromarray(rng.integers(-(2**31), 2**31, (height, width)).astype(np.int32))
    elif mode == "F":
        scale = draw(st.sampled_from([1.0, 1e4, 1e38, -1e38, np.inf, -np.inf, np.nan]))
        with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf is NaN, 1e38 overflows float32: both wanted
            image = Image.fromarray((rng.random((height, width)) * scale).astype(np.float32))
    else:
        rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
        image = rgba.convert(mode) if mode in ("RGBA", "LA") else rgba.convert("RGB").convert(mode)
    options = {}
    if fmt == "GIF" and draw(st.booleans()):
        frames = [image.rotate(90 * i) for i in range(1, 4)]
        options = {"save_all": True, "append_images": frames, "duration": 10, "loop": 0}
    if fmt == "PNG" and mode == "P" and draw(st.booleans()):
        options = {"transparency": 0}
    data = encoded(image, fmt, **options)
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return data if cut is None else data[:cut]


# Pillow warns about the damage it reads past (corrupt EXIF, tags past the end): expected here.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
@FUZZ
@given(odd_images())
def test_images_of_every_mode_whole_or_truncated_become_training_size_rgb_or_rejects(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's on NaN pixels, e.g., would be a crash in -W error
        check_image(data)


def png_claiming(width: int, height: int, depth: int = 8, color: int = 2) -> bytes:
    """A PNG whose header (with a correct CRC) claims width x height pixels while holding almost no data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


SMALL = {fmt: encoded(Image.new("RGB", (20, 12), (200, 30, 10)), fmt) for fmt in ("GIF", "BMP", "JPEG")}


def claiming(fmt: str, width: int, height: int) -> bytes:
    """A small real image of `fmt` whose header is patched to claim width x height."""
    data = bytearray(SMALL[fmt])
    if fmt == "GIF":  # the logical screen: little-endian 16-bit
        data[6:10] = struct.pack("<HH", width % 2**16, height % 2**16)
    elif fmt == "BMP":  # BITMAPINFOHEADER: little-endian signed 32-bit
        data[18:26] = struct.pack("<ii", width % 2**31, height % 2**31)
    else:  # the JPEG start-of-frame segment: height, then width, big-endian 16-bit
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height % 2**16, width % 2**16)
    return bytes(data)


CLAIMED_SIDES = [0, 1, 1000, 65535, 100_000, 2**31 - 1]
PNG_FORMATS = [(8, 2), (16, 6), (1, 0), (8, 3), (3, 2), (8, 7)]

# Run in a fresh interpreter: the peak memory (VmHWM, reset once the imports are done) over its memory then, in MiB, of
# checking every claim of CLAIMED_SIDES x CLAIMED_SIDES in every format ("claims"), or of allocating argv[2] MiB
# ("allocate": shows that the measurement sees an allocation). This process's own peak would hide anything below
# what an earlier test already reached.
MEMORY_CHILD = """
import sys
from tests.test_bad_input import CLAIMED_SIDES, PNG_FORMATS, check_image, claiming, png_claiming


def status_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


check_image(claiming("GIF", 8, 8))  # whatever the check imports on first use is loaded before the baseline
# The peak so far holds the imports' transient allocations: reset it (Linux) so only what follows counts.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_mib("VmRSS")
if sys.argv[1] == "claims":
    for width in CLAIMED_SIDES:
        for height in CLAIMED_SIDES:
            for png_format in PNG_FORMATS:
                check_image(png_claiming(width, height, *png_format))
            for kind in ("GIF", "BMP", "JPEG"):
                check_image(claiming(kind, width, height))
else:
    block = bytearray(int(sys.argv[2]) * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
print(status_mib("VmHWM") - before)
"""


def child_peak_mib(*args: str) -> float:
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split()[-1])


def test_declared_huge_dimensions_allocate_nothing_of_their_size_in_a_fresh_process():
    # A 100000 x 100000 image would take 30 GB; decoding even a 65535 x 65535 GIF, 12 GB.
    assert child_peak_mib("claims") < 200
    assert child_peak_mib("allocate", "300") > 250  # the same measurement does see 300 MiB


@FUZZ
@given(
    st.sampled_from(["PNG", "GIF", "BMP", "JPEG"]),
    st.one_of(st.integers(0, 2**31 - 1), st.sampled_from(CLAIMED_SIDES)),
    st.one_of(st.integers(0, 2**31 - 1), st.sampled_from(CLAIMED_SIDES)),
    st.sampled_from(PNG_FORMATS),
)
def test_declared_huge_or_empty_dimensions_are_rejected_before_decoding(kind, width, height, png_format):
    data = png_claiming(width, height, *png_format) if kind == "PNG" else claiming(kind, width, height)
    outcome = check_image(data)
    if isinstance(outcome, tuple):
        assert outcome[1] * outcome[2] <= KNOBS.max_image_pixels
    # (What decoding allocates is measured in a fresh process: the test above.)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (png_claiming(100_000, 100_000), "decompression_bomb"),
        (png_claiming(2000, 2000), "decompression_bomb"),  # over KNOBS' 1M pixels, under Pillow's own limit
        (png_claiming(0, 0), "not_an_image"),
        (encoded(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
        (encoded(Image.new("RGB", (3, 300)), "PNG"), "too_small"),
        (claiming("GIF", 65535, 65535), "decompression_bomb"),
        (claiming("JPEG", 65500, 65500), "decompression_bomb"),
        (b"", "empty_file"),
        (b"%PDF-1.4 not an image", "not_an_image"),
    ],
    ids=["png-100000x100000", "png-2000x2000", "png-0x0", "1x1", "3x300", "gif-65535x65535", "jpeg-65500x65500",
         "empty", "pdf"],
)
def test_known_bad_images_are_rejected_with_their_reason(data, reason):
    assert check_image(data).reason == reason


@pytest.mark.parametrize(("value", "gray"), [(np.nan, 0), (-np.inf, 0), (np.inf, 255)])
def test_a_float_image_of_non_finite_pixels_converts_without_a_warning(value, gray):
    data = encoded(Image.fromarray(np.full((12, 20), value, dtype=np.float32)), "TIFF")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png, width, height = check_image(data)
    assert (width, height) == (20, 12)
    assert (np.asarray(Image.open(io.BytesIO(png))) == gray).all()


# ---------------------------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def loaded():
    """The fixture model, loaded once: `ldm sample` calls below get it instead of loading it again."""
    return Text2Image.from_pretrained(MODEL, device="cpu")


@pytest.fixture
def cli_pipeline(loaded, monkeypatch):
    sampler = loaded.sampler
    monkeypatch.setattr(cli, "_load_sample_pipeline", lambda model, device, controlnet: loaded)
    yield loaded
    loaded.sampler = sampler  # --sampler sets it on the shared pipeline


def one_error_line(capsys, prefix: str) -> str:
    """The run's single error line on stderr (argparse puts its usage before it; the weights' progress bar
    may come first), checked for a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


def sample_cli(args: list[str]) -> int:
    try:
        return cli.main(["sample", *args])
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-files")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "init.png")
    (root / "notes.png").write_text("this is text, not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (root / "a-file").write_text("x")
    (root / "folder").mkdir()
    return root


BEFORE_LOADING = [
    # (arguments, what the error line must name); each is refused before the model is loaded.
    (["--steps", "abc"], "--steps: invalid int value: 'abc'"),
    (["--steps", "1.5"], "--steps: invalid int value"),
    (["--guidance", "nan"], "--guidance: 'nan' is not a finite number"),
    (["--guidance", "inf"], "--guidance: 'inf' is not a finite number"),
    (["--guidance", "lots"], "--guidance: invalid float value: 'lots'"),
    (["--guidance-rescale=-inf"], "--guidance-rescale: '-inf' is not a finite number"),
    (["--control-scale", "nan"], "--control-scale: 'nan' is not a finite number"),
    (["--strength", "2", "--init-image", "{init}"], "--strength must be in 0..1"),
    (["--strength", "-0.5", "--init-image", "{init}"], "--strength must be in 0..1"),
    (["--strength", "nan"], "--strength: 'nan' is not a finite number"),
    (["--sampler", "DDIM"], "--sampler: invalid choice: 'DDIM'"),
    (["--sampler", ""], "--sampler: invalid choice: ''"),
    (["--height", "0"], "--height must be a positive number of pixels, got 0"),
    (["--width", "-16"], "--width must be a positive number of pixels, got -16"),
    (["--height", "100000", "--width", "100000"], "more than the limit of 50000000"),
    (["--height", "100000"], "more than the limit of 50000000"),
    (["--width", "60000000"], "more than the limit of 50000000"),
    (["--height", "x16"], "--height: invalid int value: 'x16'"),
    (["--seed", str(2**64)], f"--seed {2**64} is out of range"),
    (["--seed", str(-(2**63) - 1)], "is out of range"),
    (["--batch-size", "-1"], "--batch-size must be at least 1"),
    (["--lora", ""], "LoRA spec '' has an empty path"),
    (["--lora", ":0.5"], "LoRA spec ':0.5' has an empty path"),
    (["--lora", "{folder}:inf"], "has the scale inf"),
    (["--init-image", "{folder}/none.png"], "--init-image {folder}/none.png does not exist"),
    (["--init-image", "{folder}"], "--init-image {folder} is not a file"),
    (["--init-image", "{folder}/notes.png"], "--init-image {folder}/notes.png: not a readable image"),
    (["--init-image", "{folder}/empty.png"], "--init-image {folder}/empty.png: the file is empty"),
    (["--init-image", "{folder}/bomb.png"], "decompression bomb"),
    (["--init-image", "{init}", "--mask", "{folder}/none.png"], "--mask {folder}/none.png does not exist"),
    (["--init-image", "{init}", "--mask", "{folder}/notes.png"], "--mask {folder}/notes.png: not a readable image"),
    (["--control-image", "{folder}/none.png"], "--control-image {folder}/none.png does not exist"),
    (["--control-image", "{folder}/empty.png"], "--control-image {folder}/empty.png: the file is empty"),
    (["-o", "{folder}"], "--output {folder} is a folder"),
    (["-o", "{folder}/out.xyz"], "unknown image suffix '.xyz'"),
    (["--model", "{folder}/a-file"], "model folder {folder}/a-file is not a folder"),
    (["--device", "tpu"], "--device"),
]


def test_sample_mistakes_before_loading_the_model_exit_2_naming_the_input(files, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a mistake that needs no model")

    monkeypatch.setattr(Text2Image, "from_pretrained", never)
    for args, named in BEFORE_LOADING:
        args = [a.format(folder=files, init=files / "init.png") for a in args]
        assert sample_cli(["a red circle", "--model", str(MODEL), *args]) == 2, args
        line = one_error_line(capsys, "ldm sample: error: ")
        assert named.format(folder=files) in line, (args, line)


def test_sample_mistakes_found_with_the_model_exit_2_naming_the_input(cli_pipeline, files, tmp_path, capsys):
    factor = cli_pipeline.vae.downsampling_factor * cli_pipeline.unet.downsampling_factor
    size = cli_pipeline.unet.config.sample_size * cli_pipeline.vae.downsampling_factor
    odd = size + factor // 2  # not a multiple of the factor
    Image.new("RGB", (size, size)).save(tmp_path / "init.png")
    Image.new("RGB", (odd, odd)).save(tmp_path / "init-odd.png")
    Image.new("L", (factor, factor), 255).save(tmp_path / "small-mask.png")
    out = tmp_path / "out.png"
    for args, named in [
        (["\ud800 a red circle"], "the prompt '\\ud800 a red circle' is not valid Unicode"),
        (["a red circle", "--negative-prompt", "\udcff"], "the prompt '\\udcff' is not valid Unicode"),
        (["a red circle", "--height", str(odd)], f"not a multiple of {factor}"),
        (["a red circle", "--width", str(odd)], f"{size}x{odd} is not a multiple of {factor}"),
        (["a red circle", "--init-image", str(tmp_path / "init-odd.png")], f"not a multiple of {factor}"),
        (["a red circle", "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "small-mask.png")],
         f"the mask is {factor}x{factor} but the output is {size}x{size}"),
        (["a red circle", "--lora", str(files / "folder")], f"{files / 'folder'} is not a LoRA folder"),
    ]:
        assert sample_cli([*args, "--steps", "1", "--device", "cpu", "-o", str(out)]) == 2, args
        assert named in one_error_line(capsys, "ldm sample: error: "), args
    assert not out.exists()

    # The output's folder is a file: found only when writing, after sampling, and still one line naming it.
    assert sample_cli(["a red circle", "--steps", "1", "--device", "cpu", "-o", str(files / "a-file" / "x.png")]) == 2
    assert str(files / "a-file") in one_error_line(capsys, "ldm sample: error: ")


STAGES = [ingest, train_vae, cache_latents, train_unet, evaluate, sample, finetune_lora, train_controlnet]


def test_every_stage_reports_a_bad_params_file_in_one_message(tmp_path, capsys):
    cases = {
        "missing.yaml": (None, "not found"),
        "wrong-type.yaml": (b"seed: abc\ntrain_unet:\n  max_steps: [1]\n", "train_unet.max_steps"),
        "number-key.yaml": (b"7: x\n", "7: Keys should be strings"),
        "binary.yaml": (b"\x80\x81\xfe", "not valid YAML"),
        "bad-date.yaml": (b"profile: 2024-13-01\n", "2024-13-01"),
    }
    for name, (data, _) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    for stage in STAGES:
        for name, (_, named) in cases.items():
            assert stage.main(["--params", str(tmp_path / name)]) == 2, (stage.STAGE, name)
            err = capsys.readouterr().err
            assert "Traceback" not in err and err.startswith(f"{stage.STAGE}: error: ")
            assert str(tmp_path / name) in err and named in err, (stage.STAGE, name, err)


def run_command(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, timeout=300, check=False)


def test_command_lines_end_to_end_exit_2_without_a_traceback(tmp_path):
    """Through real processes: a prompt argument that is not UTF-8 (Python decodes it to a lone surrogate)
    reaches the text encoder, and a stage's module entry point on a params file with a number key."""
    done = run_command(str(LDM), b"sample", b"a \xff circle", b"--model", str(MODEL), b"--steps", b"1",
                       b"--device", b"cpu", b"-o", str(tmp_path / "x.png"))
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2 and "Traceback" not in err, err
    assert "ldm sample: error: the prompt 'a \\udcff circle' is not valid Unicode" in err
    assert not (tmp_path / "x.png").exists()

    (tmp_path / "params.yaml").write_text("1: 2\nsample:\n  steps: 1.5\n")
    done = run_command(sys.executable, "-m", "stages.sample", "--params", str(tmp_path / "params.yaml"))
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err, err
    assert "1: Keys should be strings" in err and "sample.steps" in err
