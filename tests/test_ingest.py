"""The ingest stage: every source layout, every kind of bad input rejected with its reason, every odd
image converted, and an output that is the ingested format, split by hash and the same on every run."""

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm.data.images import ImageRejected, load_image
from ldm.data.ingested import (
    MANIFEST_NAME,
    REJECTS_NAME,
    SCHEMA,
    ShardWriter,
    content_id,
    read_table,
    split_of,
)
from ldm.data.shapes import parse_caption
from stages.ingest import REASONS, main, run
from stages.params import Params, ParamsError
from stages.sources import SourceError
from tests.ci_stages import RecordingReporter

REPO = Path(__file__).resolve().parents[1]


def params_for(tmp_path, source, **ingest):
    return Params(
        paths={"ingested": str(tmp_path / "out" / "ingested"), "metrics": str(tmp_path / "out" / "metrics")},
        ingest={"source": str(source), **ingest},
    )


def ingest(tmp_path, source, **knobs):
    """Run the stage; its metrics, output rows and rejects."""
    params = params_for(tmp_path, source, **knobs)
    recorder = RecordingReporter()
    metrics = run(params, recorder).metrics
    assert recorder.final == metrics
    assert recorder.progress_calls[-1] == ("ingest", metrics["inputs"], metrics["inputs"])
    assert json.loads((tmp_path / "out" / "metrics" / "ingest.json").read_text()) == metrics
    assert metrics["accepted"] + metrics["rejected"] == metrics["inputs"]
    out = Path(params.paths.ingested)
    rows = read_table(out).to_pylist()
    rejects = [json.loads(line) for line in (out / REJECTS_NAME).read_text().splitlines()]
    assert len(rejects) == metrics["rejected"]
    return metrics, rows, rejects


def encode(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def solid(color, size=(40, 40)):
    return encode(Image.new("RGB", size, color))


def noise(size=64, seed=0):
    return encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)))


def png_claiming(width, height):
    """A PNG whose header claims width x height pixels while holding almost no data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


def write(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return root


def decoded(row):
    return Image.open(io.BytesIO(row["image"]))


def captions_by_image(rows):
    grouped = {}
    for row in rows:
        grouped.setdefault(row["id"], set()).add(row["caption"])
    return sorted(grouped.values(), key=sorted)


RED, BLUE = solid((255, 0, 0)), solid((0, 0, 255), size=(50, 36))
RED_CAPTIONS, BLUE_CAPTIONS = ["a red square", "a red square again"], ["a blue block", "a blue square"]
EXPECTED_CAPTIONS = [set(BLUE_CAPTIONS), set(RED_CAPTIONS)]


def jsonl_folder(root):
    rows = [{"file_name": "a.png", "text": c} for c in RED_CAPTIONS]
    rows.append({"file_name": "sub/b.png", "text": BLUE_CAPTIONS})
    metadata = "\n".join(json.dumps(r) for r in rows)
    return write(root, {"a.png": RED, "sub/b.png": BLUE, "metadata.jsonl": metadata}), {}, 3


def csv_folder(root):
    metadata = 'file_name,text,extra\na.png,a red square,x\na.png,"a red square again",y\n'
    metadata += "".join(f'sub/b.png,"{c}",z\n' for c in BLUE_CAPTIONS)
    return write(root, {"a.png": RED, "sub/b.png": BLUE, "metadata.csv": metadata}), {}, 4


def captions_txt_folder(root):
    files = {"a.png": RED, "a.txt": "\n".join(RED_CAPTIONS) + "\n", "sub/b.png": BLUE}
    files["sub/b.txt"] = f"{BLUE_CAPTIONS[0]}\n\n  {BLUE_CAPTIONS[1]}  "
    return write(root, files), {"format": "captions_txt"}, 2


def parquet_bytes(root):
    root.mkdir()
    table = pa.table({"image": [RED, RED, BLUE, BLUE], "text": RED_CAPTIONS + BLUE_CAPTIONS})
    pq.write_table(table, root / "data.parquet")
    return root / "data.parquet", {}, 4


def parquet_hf_structs(root):
    # Hugging Face datasets writes an Image feature as struct<bytes, path>; two files in a folder.
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (root / "data").mkdir(parents=True)
    for name, data, captions in (("train-0.parquet", RED, RED_CAPTIONS), ("train-1.parquet", BLUE, BLUE_CAPTIONS)):
        images = pa.array([{"bytes": data, "path": "x.png"}], image)
        table = pa.table({"img": images, "caption": pa.array([captions], pa.list_(pa.string()))})
        pq.write_table(table, root / "data" / name)
    return root, {"image_column": "img", "text_column": "caption"}, 2


@pytest.mark.parametrize("layout", [jsonl_folder, csv_folder, captions_txt_folder, parquet_bytes, parquet_hf_structs])
def test_each_layout_with_several_captions_per_image(tmp_path, layout):
    source, knobs, inputs = layout(tmp_path / "dataset")
    metrics, rows, rejects = ingest(tmp_path, source, **knobs)
    assert (metrics["inputs"], metrics["accepted"], rejects) == (inputs, inputs, [])
    assert metrics["images"] == 2 and len(rows) == 4
    assert captions_by_image(rows) == EXPECTED_CAPTIONS
    for row in rows:
        image = decoded(row)
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        assert image.getpixel((16, 16)) in ((255, 0, 0), (0, 0, 255))
    assert {(r["width"], r["height"]) for r in rows} == {(40, 40), (50, 36)}


def bad_imagefolder(root, outside):
    """A folder holding one of every bad input, and the reason each must be rejected with."""
    files = {
        "good.png": RED,
        "empty.png": b"",
        "text.png": "this is a text file, not an image",
        "truncated.png": noise()[:2000],
        "tiny.png": solid((0, 255, 0), size=(4, 4)),
        "bomb.png": png_claiming(100_000, 100_000),
        "big.png": solid((0, 255, 0), size=(400, 400)),
        "orphan.png": RED,
    }
    write(root, files)
    os.symlink(outside, root / "outside_link.png")
    os.symlink(root / "good.png", root / "inner_link.png")
    rows = [
        ({"file_name": "good.png", "text": "a good image"}, None),
        ({"file_name": "empty.png", "text": "x"}, "empty_file"),
        ({"file_name": "text.png", "text": "x"}, "not_an_image"),
        ({"file_name": "truncated.png", "text": "x"}, "corrupt_image"),
        ({"file_name": "tiny.png", "text": "x"}, "too_small"),
        ({"file_name": "bomb.png", "text": "x"}, "decompression_bomb"),
        ({"file_name": "big.png", "text": "x"}, "decompression_bomb"),
        ({"file_name": "missing.png", "text": "x"}, "missing_file"),
        ({"file_name": "../outside.png", "text": "x"}, "outside_dataset"),
        ({"file_name": str(outside), "text": "x"}, "outside_dataset"),
        ({"file_name": "outside_link.png", "text": "x"}, "outside_dataset"),
        ({"file_name": "inner_link.png", "text": "linked from inside"}, None),
        ({"file_name": "good.png", "text": ""}, "empty_caption"),
        ({"file_name": "good.png", "text": " \t\u3000\n "}, "empty_caption"),
        ({"file_name": "good.png"}, "missing_caption"),
        ({"file_name": "good.png", "text": 42}, "invalid_caption"),
        ({"text": "no file"}, "bad_metadata"),
        ("{not json", "bad_metadata"),
    ]
    lines = [row if isinstance(row, str) else json.dumps(row) for row, _ in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    expected = []
    for number, (row, reason) in enumerate(rows, 1):
        if reason:
            name = row.get("file_name") if isinstance(row, dict) else None
            expected.append((f"metadata.jsonl:{number}" + (f" {name}" if name else ""), reason))
    return expected + [("orphan.png", "missing_caption")]


@pytest.fixture
def bad_folder(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(RED)
    root = tmp_path / "dataset"
    return root, bad_imagefolder(root, outside)


def test_every_bad_input_is_rejected_with_its_reason(tmp_path, bad_folder):
    root, expected = bad_folder
    metrics, rows, rejects = ingest(tmp_path, root, max_image_pixels=100_000)
    assert [(r["input"], r["reason"]) for r in rejects] == expected
    assert all(r["detail"] for r in rejects)
    assert (metrics["inputs"], metrics["accepted"], metrics["rejected"]) == (len(expected) + 2, 2, len(expected))
    for reason in REASONS:
        assert metrics[f"rejected_{reason}"] == sum(r == reason for _, r in expected), reason
    assert sorted(r["caption"] for r in rows) == ["a good image", "linked from inside"]
    assert len({r["id"] for r in rows}) == 1


def test_captions_txt_rejects(tmp_path):
    root = write(
        tmp_path / "dataset",
        {
            "a.png": RED, "a.txt": "a red square",
            "b.png": RED,
            "c.txt": "a caption without its image",
            "d.png": RED, "d.txt": "  \n\t\n",
            "e.png": b"", "e.txt": "an empty file",
            "f.png": RED, "f.txt": b"\xff\xfe not utf-8",
            ".hidden.png": RED, "notes.md": "ignored",
        },
    )
    metrics, rows, rejects = ingest(tmp_path, root)
    assert [(r["input"], r["reason"]) for r in rejects] == [
        ("b.png", "missing_caption"),
        ("c.txt", "missing_file"),
        ("d.png", "empty_caption"),
        ("e.png", "empty_file"),
        ("f.png", "invalid_caption"),
    ]
    assert (metrics["accepted"], [r["caption"] for r in rows]) == (1, ["a red square"])


def test_parquet_rejects(tmp_path):
    images = [RED, None, b"", b"garbage", RED, RED]
    texts = ["ok", "no image", "empty", "not an image", None, "   "]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "text": texts}), tmp_path / "d.parquet")
    metrics, rows, rejects = ingest(tmp_path, tmp_path / "d.parquet")
    assert [(r["input"], r["reason"]) for r in rejects] == [
        ("d.parquet[1]", "missing_image"),
        ("d.parquet[2]", "empty_file"),
        ("d.parquet[3]", "not_an_image"),
        ("d.parquet[4]", "missing_caption"),
        ("d.parquet[5]", "empty_caption"),
    ]
    assert (metrics["accepted"], rows[0]["source"]) == (1, "d.parquet[0]")


def two_halves(mode, left, right, size=(32, 32)):
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def test_odd_images_and_captions_are_converted(tmp_path):
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.paste(1, (16, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to show
    long_caption = "a photo of " + " ".join(["a very long and detailed description"] * 30)
    files = {
        "gray.png": encode(Image.new("L", (32, 32), 100)),
        "gray_alpha.png": encode(two_halves("LA", (0, 0), (0, 255))),
        "palette.png": encode(palette, transparency=0),
        "cmyk.jpg": encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95),
        "sixteen.png": encode(Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))),
        "rgba.png": encode(two_halves("RGBA", (0, 0, 0, 0), (0, 0, 255, 255))),
        # An RGB image whose transparency is a colour key (a tRNS chunk), as some tux paint stamps have.
        "color_key.png": encode(two_halves("RGB", (0, 0, 0), (0, 0, 255)), transparency=(0, 0, 0)),
        "exif.jpg": encode(two_halves("RGB", (255, 0, 0), (0, 0, 255), size=(64, 32)), "JPEG", exif=exif, quality=95),
        "unicode.png": RED,
        "long.png": BLUE,
    }
    captions = {name: name.split(".")[0] for name in files}
    captions["unicode.png"] = "  Cafe\u0301\u3000au  lait,\n\tя люблю 日本語 🎨  "
    captions["long.png"] = long_caption
    root = write(tmp_path / "dataset", files)
    metadata = [{"file_name": name, "text": text} for name, text in captions.items()]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(m, ensure_ascii=False) for m in metadata))
    assert Image.open(root / "sixteen.png").mode.startswith("I;16")

    metrics, rows, rejects = ingest(tmp_path, root)
    assert (rejects, metrics["captions_truncated"]) == ([], 1)
    out = {row["source"]: row for row in rows}
    pixel = {name: np.asarray(decoded(row)).astype(int) for name, row in out.items()}
    assert (pixel["gray.png"] == 100).all()
    assert (pixel["gray_alpha.png"][:, :14] == 255).all() and (pixel["gray_alpha.png"][:, 18:] == 0).all()
    assert (pixel["palette.png"][:, :14] == 255).all() and (pixel["palette.png"][:, 18:] == (0, 0, 255)).all()
    assert (pixel["rgba.png"][:, :14] == 255).all() and (pixel["rgba.png"][:, 18:] == (0, 0, 255)).all()
    assert (pixel["color_key.png"][:, :14] == 255).all() and (pixel["color_key.png"][:, 18:] == (0, 0, 255)).all()
    assert (abs(pixel["sixteen.png"] - 128) <= 1).all()
    assert (abs(pixel["cmyk.jpg"] - (255, 0, 0)) < 40).all()
    # Shown upright the red half is on top: the crop of the 32x64 portrait keeps red above, blue below.
    assert (out["exif.jpg"]["width"], out["exif.jpg"]["height"]) == (32, 64)
    assert (abs(pixel["exif.jpg"][:12] - (255, 0, 0)) < 40).all()
    assert (abs(pixel["exif.jpg"][20:] - (0, 0, 255)) < 40).all()
    assert out["unicode.png"]["caption"] == "Caf\u00e9 au lait, я люблю 日本語 🎨"
    assert out["long.png"]["caption"] == long_caption


def test_shapes_output_is_the_ingested_format_split_by_hash(tmp_path):
    metrics, rows, rejects = ingest(tmp_path, "shapes", shapes={"num_images": 300, "two_object_fraction": 0.3})
    out = tmp_path / "out" / "ingested"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "part-00000.parquet", REJECTS_NAME]
    assert pq.read_schema(out / "part-00000.parquet").remove_metadata() == SCHEMA
    assert (out / REJECTS_NAME).read_bytes() == b"" and rejects == []
    assert len(rows) == metrics["inputs"] == metrics["accepted"] == 300
    for row in rows:
        image = decoded(row)
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        assert row["id"] == content_id(row["image"])
        assert row["split"] == split_of(row["id"], 0.1)
        assert json.loads(row["attributes"]) == parse_caption(row["caption"]).to_dict()
        assert (row["source"], row["width"], row["height"]) == ("shapes", 32, 32)
    splits = [row["split"] for row in rows]
    assert (metrics["train_rows"], metrics["val_rows"]) == (splits.count("train"), splits.count("val"))
    assert metrics["val_rows"] > 10 and metrics["train_rows"] > 200
    assert metrics["images"] == len({row["id"] for row in rows})


def test_a_source_images_split_is_the_same_at_every_image_size(tmp_path):
    # The split hashes the source file's bytes: rows made at 16 and 32 px land on the same sides, and a copy of a
    # file under another name lands beside it.
    folder = tmp_path / "folder"
    folder.mkdir()
    lines = []
    for index in range(60):
        (folder / f"{index}.png").write_bytes(noise(24, seed=index))
        lines.append(json.dumps({"file_name": f"{index}.png", "text": f"noise {index}"}))
    (folder / "copy.png").write_bytes((folder / "7.png").read_bytes())
    lines.append(json.dumps({"file_name": "copy.png", "text": "a copy of noise 7"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    splits = {}
    for size in (16, 32):
        params = params_for(tmp_path / str(size), folder, val_fraction=0.3).model_copy(update={"image_size": size})
        run(params, RecordingReporter())
        rows = read_table(params.paths.ingested).to_pylist()
        splits[size] = {row["source"]: row["split"] for row in rows}
        assert {row["split"] for row in rows} == {"train", "val"}
        assert all(row["split"] == split_of(content_id((folder / row["source"]).read_bytes()), 0.3) for row in rows)
    assert splits[16] == splits[32]
    assert splits[16]["copy.png"] == splits[16]["7.png"]


def test_shard_writer_splits_rows_into_numbered_shards(tmp_path):
    rows = [{"id": f"{i:064x}", "image": b"x", "caption": str(i), "split": "train"} for i in range(7)]
    with ShardWriter(tmp_path, rows_per_shard=3) as writer:
        for row in rows:
            writer.write(row)
    assert [p.name for p in writer.paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert read_table(tmp_path).column("caption").to_pylist() == [str(i) for i in range(7)]


def test_running_twice_gives_identical_output(tmp_path, bad_folder):
    root, _ = bad_folder

    def snapshot():
        ingest(tmp_path, root, max_image_pixels=100_000)
        return {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}

    first = snapshot()
    assert snapshot() == first
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ingested", "metrics"]


def test_a_source_with_nothing_accepted_fails_and_keeps_the_old_output(tmp_path):
    ingest(tmp_path, "shapes", shapes={"num_images": 20})
    before = sorted((tmp_path / "out" / "ingested").iterdir())
    root = write(tmp_path / "dataset", {"a.png": b"", "a.txt": "empty image"})
    with pytest.raises(SourceError, match="no input .* was accepted .*empty_file"):
        run(params_for(tmp_path, root), RecordingReporter())
    assert sorted((tmp_path / "out" / "ingested").iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ingested", "metrics"]


@pytest.mark.parametrize(
    ("make", "knobs", "message"),
    [
        (lambda root: root / "nowhere", {}, "does not exist"),
        (lambda root: write(root, {"readme.md": "hi"}), {}, "layout is unknown"),
        (lambda root: write(root, {"metadata.csv": "path,text\na.png,x\n"}), {}, "needs file_name"),
        (lambda root: write(root, {"a.png": RED}), {"format": "imagefolder"}, "metadata.jsonl or metadata.csv"),
        (lambda root: write(root, {"a.txt": "x"}), {"format": "parquet"}, "no .parquet"),
    ],
)
def test_unreadable_sources_stop_with_the_path_and_the_layouts(tmp_path, make, knobs, message):
    source = make(tmp_path / "dataset")
    with pytest.raises(SourceError, match=message) as error:
        run(params_for(tmp_path, source, **knobs), RecordingReporter())
    assert str(source) in str(error.value)


def test_parquet_without_the_columns_names_them(tmp_path):
    pq.write_table(pa.table({"picture": [RED], "text": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(SourceError, match=r"no column 'image' \(its columns: \['picture', 'text'\]\).*image_column"):
        run(params_for(tmp_path, tmp_path / "d.parquet"), RecordingReporter())


def test_unknown_shape_names_are_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="ingest.shapes: unknown shapes \\['blob'\\].*hexagon"):
        run(params_for(tmp_path, "shapes", shapes={"shapes": ["circle", "blob"]}), RecordingReporter())


def test_command_line_reports_user_mistakes_in_one_message(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  source: {tmp_path / 'nowhere'}\n")
    assert main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ingest: error: ingest.source") and "nowhere" in err and "Traceback" not in err

    bad = tmp_path / "BAD.yaml"
    bad.write_text("ingest:\n  sourse: shapes\n")
    done = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "--params", str(bad)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "ingest.sourse" in done.stderr and "unknown key" in done.stderr
    assert "Traceback" not in done.stderr


VALID = [
    encode(Image.new("RGB", (20, 20), (10, 200, 30))),
    noise(24),
    encode(Image.new("RGB", (20, 20), (10, 200, 30)), "JPEG"),
    encode(Image.new("P", (20, 20), 3), "GIF"),
    encode(Image.new("RGBA", (20, 20), (1, 2, 3, 4)), "WEBP"),
    encode(Image.new("L", (20, 20), 9), "TIFF"),
    encode(Image.new("RGB", (20, 20), 9), "BMP"),
]


def check_loads_or_rejects(data):
    try:
        image = load_image(data, max_pixels=250_000, min_size=2)
    except ImageRejected as e:
        assert e.reason and str(e)
    else:
        assert image.mode == "RGB" and min(image.size) >= 2 and image.width * image.height <= 250_000


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_load_image_on_arbitrary_bytes_only_rejects(data):
    check_loads_or_rejects(data)


# Pillow warns about the damage it reads past (corrupt EXIF, oversized tags): expected here.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(1, 10_000),
)
def test_load_image_on_damaged_images_only_rejects(original, flips, keep):
    data = bytearray(original[: max(keep, len(original) // 4)])
    for position, value in flips:
        data[position % len(data)] = value
    check_loads_or_rejects(bytes(data))
