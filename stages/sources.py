"""Reading a dataset source as ingest does: the built-in shapes data, an image folder with metadata, images
with caption files, or Parquet. Shared by ingest and finetune_lora (whose concept is such a source).

Each input becomes rows or a rejection with its reason; nothing here writes."""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ldm.data import images
from ldm.data.buckets import Size, fit_to_bucket, nearest_bucket
from ldm.data.images import ImageRejected, load_image, resize_center_crop, to_png
from ldm.data.ingested import content_id, split_of
from ldm.data.shapes import ShapesConfig, caption, generate
from ldm.errors import InputError
from stages.params import IngestParams, ParamsError

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
REASONS = (
    "bad_metadata",
    "missing_file",
    "unreadable_file",
    "outside_dataset",
    "missing_caption",
    "empty_caption",
    "invalid_caption",
    "missing_image",
    *images.REASONS,
)
LAYOUTS = (
    "accepted sources:\n"
    "  - shapes: the built-in generated dataset (ingest.source: shapes)\n"
    "  - imagefolder: a folder with metadata.jsonl or metadata.csv whose rows have file_name (relative to the "
    "folder) and text (the caption; ingest.text_column)\n"
    "  - captions_txt: a folder of images, each with a NAME.txt caption file beside NAME.png / NAME.jpg / ...\n"
    "  - parquet: a .parquet file or a folder of them, with an image column (bytes, or a struct with a bytes "
    "field) and a text column (ingest.image_column, ingest.text_column)"
)
_MISSING = object()


class SourceError(InputError):
    """ingest.source cannot be read as a dataset at all; the message names the path and the accepted layouts."""


class Rejected(Exception):
    """One input that cannot become a row: `reason` is one of REASONS, `detail` says what was found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Input:
    name: str  # how rejects.jsonl names it
    source: str  # the `source` column of its rows
    text: object = _MISSING  # the caption value as found: a string, a list of strings, None, ...
    file: str | None = None  # the image, relative to the dataset folder
    data: bytes | None = None  # the image's bytes, when the source holds them (Parquet)
    problem: Rejected | None = None  # known to be unusable already when listed
    reused_later: bool = False  # a later input names the same file


def _row(png: bytes, text: str, width: int, height: int, source: str, split: str, attributes=None) -> dict:
    return {
        "id": content_id(png),
        "image": png,
        "caption": text,
        "width": width,
        "height": height,
        "source": source,
        "split": split,
        "attributes": attributes,
    }


def read_source(
    knobs: IngestParams, image_size: int, seed: int, section: str, buckets: list[Size] | None = None
) -> tuple[int, str, Iterator[tuple[str, list[dict] | Exception]]]:
    """Read a source as ingest does: (how many inputs, a description of them, per input its name and its
    rows, or its name and why it was rejected: an exception with `.reason` and `.detail`). `section` names
    the params section `knobs` come from, for error messages. Images are centre-cropped to image_size squares,
    or with `buckets` fitted whole to the bucket of nearest aspect ratio (generated shapes are square)."""
    if knobs.source == "shapes":
        total, outcomes = _shapes(knobs, image_size, seed, section)
        return total, f"{total} generated shapes images", outcomes
    root = Path(knobs.source)
    layout = detect_format(root, knobs.format)
    root = root.resolve()
    total, inputs = _list_inputs(root, layout, knobs)
    return total, f"{total} inputs from {root} ({layout})", _convert_all(root, inputs, knobs, image_size, buckets)


def _shapes(
    knobs: IngestParams, image_size: int, seed: int, section: str
) -> tuple[int, Iterator[tuple[str, list[dict]]]]:
    shapes = knobs.shapes
    try:
        config = ShapesConfig(
            shapes=tuple(shapes.shapes),
            colors=tuple(shapes.colors),
            sizes=tuple(shapes.sizes),
            positions=tuple(shapes.positions),
            backgrounds=tuple(shapes.backgrounds),
            two_object_fraction=shapes.two_object_fraction,
            image_size=image_size,
        )
    except ValueError as e:
        raise ParamsError(f"{section}.shapes: {e}") from None

    def outcomes() -> Iterator[tuple[str, list[dict]]]:
        size, val_fraction = image_size, knobs.val_fraction
        for index in range(shapes.num_images):
            image, scene = generate(config, seed, index)
            attributes = json.dumps(scene.to_dict(), separators=(",", ":"))
            png = to_png(image)
            row = _row(png, caption(scene), size, size, "shapes", split_of(content_id(png), val_fraction), attributes)
            yield f"shapes:{index}", [row]

    return shapes.num_images, outcomes()


def detect_format(root: Path, forced: str = "auto") -> str:
    """The layout of the dataset at `root` ("imagefolder", "captions_txt" or "parquet"), or SourceError."""
    where = f"ingest.source {str(root)!r}" + ("" if root.is_absolute() else f" (resolved to {root.resolve()})")
    if not root.exists():
        raise SourceError(f"{where} does not exist; point it at a dataset, or use 'shapes'.\n{LAYOUTS}")
    if root.is_file():
        if root.suffix == ".parquet" and forced in ("auto", "parquet"):
            return "parquet"
        raise SourceError(f"{where} is a file, so it must be a .parquet file (format auto or parquet).\n{LAYOUTS}")
    metadata = [name for name in METADATA_NAMES if (root / name).is_file()]
    if forced == "imagefolder" or (forced == "auto" and metadata):
        if not metadata:
            needed = " or ".join(METADATA_NAMES)
            raise SourceError(f"{where} has no {needed}, which ingest.format imagefolder needs.\n{LAYOUTS}")
        if len(metadata) > 1:
            raise SourceError(f"{where} has both {' and '.join(metadata)}; keep one of them")
        return "imagefolder"
    if forced == "parquet" or (forced == "auto" and _walk(root, (".parquet",))):
        if not _walk(root, (".parquet",)):
            raise SourceError(f"{where} holds no .parquet file, which ingest.format parquet needs.\n{LAYOUTS}")
        return "parquet"
    if forced == "captions_txt" or _walk(root, (*IMAGE_SUFFIXES, ".txt")):
        return "captions_txt"
    raise SourceError(f"{where} has no metadata, Parquet, image or caption file: its layout is unknown.\n{LAYOUTS}")


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Files under root with these suffixes, as sorted relative POSIX paths; hidden files and folders skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)


def _list_inputs(root: Path, layout: str, knobs: IngestParams) -> tuple[int, Iterator[_Input]]:
    if layout == "parquet":
        return _parquet_inputs(root, knobs.image_column, knobs.text_column)
    inputs = _imagefolder_inputs(root, knobs.text_column) if layout == "imagefolder" else _captions_txt_inputs(root)
    seen: set[str] = set()
    for item in reversed(inputs):
        if item.file:
            key = os.path.normpath(item.file)
            item.reused_later = key in seen
            seen.add(key)
    return len(inputs), iter(inputs)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None


def _imagefolder_inputs(root: Path, text_column: str) -> list[_Input]:
    metadata = next(root / name for name in METADATA_NAMES if (root / name).is_file())
    text = _read_text(metadata)
    if metadata.suffix == ".jsonl":
        inputs = list(_jsonl_rows(metadata.name, text, text_column))
    else:
        inputs = list(_csv_rows(metadata, text, text_column))
    listed = {os.path.normpath(item.file) for item in inputs if item.file}
    for file in _walk(root, IMAGE_SUFFIXES):
        if os.path.normpath(file) not in listed:
            problem = Rejected("missing_caption", f"{file} has no row in {metadata.name}, so it has no caption")
            inputs.append(_Input(name=file, source=file, file=file, problem=problem))
    return inputs


def _jsonl_rows(name: str, text: str, text_column: str) -> Iterator[_Input]:
    # Split on newlines only: str.splitlines would also split inside a JSON string holding U+2028.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            row = json.loads(line)
        # Besides JSONDecodeError: a ValueError for an integer of over 4300 digits, a RecursionError for
        # arrays nested thousands deep.
        except (ValueError, RecursionError) as e:
            yield _Input(where, where, problem=Rejected("bad_metadata", f"not valid JSON ({e})"))
            continue
        if not isinstance(row, dict):
            yield _Input(where, where, problem=Rejected("bad_metadata", f"a JSON object is needed, got {line[:80]!r}"))
            continue
        yield _metadata_input(where, row.get("file_name"), row.get(text_column, _MISSING))


def _csv_rows(path: Path, text: str, text_column: str) -> Iterator[_Input]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames or []
    except csv.Error as e:
        raise SourceError(f"{path}: its header line is not valid CSV ({e})") from None
    missing = [c for c in ("file_name", text_column) if c not in fieldnames]
    if missing:
        raise SourceError(
            f"{path} has columns {fieldnames} but needs file_name and {text_column!r} (missing {missing}); "
            "rename the columns, or set ingest.text_column to the caption column"
        )
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        # A field over csv.field_size_limit() (128 KiB) spoils its row only: the reader resumes at the next line.
        except csv.Error as e:
            # DictReader updates its own line_num only on a good row; its csv.reader counts the bad one too.
            where = f"{path.name}:{reader.reader.line_num}"
            yield _Input(where, where, problem=Rejected("bad_metadata", f"not valid CSV ({e})"))
            continue
        where = f"{path.name}:{reader.line_num}"
        text_value = row.get(text_column)
        yield _metadata_input(where, row.get("file_name"), _MISSING if text_value is None else text_value)


def _metadata_input(where: str, file_name, text) -> _Input:
    if not isinstance(file_name, str) or not file_name.strip():
        detail = f"file_name must be a non-empty path relative to the folder, got {file_name!r}"
        return _Input(where, where, problem=Rejected("bad_metadata", detail))
    return _Input(name=f"{where} {file_name}", source=file_name, text=text, file=file_name)


def _captions_txt_inputs(root: Path) -> list[_Input]:
    images_by_stem: dict[str, list[str]] = {}
    for file in _walk(root, IMAGE_SUFFIXES):
        images_by_stem.setdefault(os.path.splitext(file)[0], []).append(file)
    captions = {os.path.splitext(file)[0]: file for file in _walk(root, (".txt",))}
    inputs = []
    for stem in sorted(images_by_stem.keys() | captions.keys()):
        txt = captions.get(stem)
        if stem not in images_by_stem:
            detail = f"no image beside it (looked for {stem}{{{','.join(IMAGE_SUFFIXES)}}})"
            inputs.append(_Input(txt, txt, problem=Rejected("missing_file", detail)))
            continue
        text, problem = _MISSING, None
        if txt is None:
            problem = Rejected("missing_caption", f"no caption file {stem}.txt beside it")
        else:
            try:
                text = _read_caption_file(root, txt)
            except Rejected as e:
                problem = e
        for file in images_by_stem[stem]:
            inputs.append(_Input(name=file, source=file, text=text, file=file, problem=problem))
    return inputs


def _read_caption_file(root: Path, txt: str) -> list[str]:
    path = _inside(root, txt)
    try:
        return path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise Rejected("invalid_caption", f"{txt} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise Rejected("unreadable_file", f"cannot read {txt}: {e.strerror or e}") from None


def _parquet_inputs(root: Path, image_column: str, text_column: str) -> tuple[int, Iterator[_Input]]:
    files = [(root, root.name)] if root.is_file() else [(root / rel, rel) for rel in _walk(root, (".parquet",))]
    total = 0
    for path, rel in files:
        if not root.is_file() and not path.resolve().is_relative_to(root.resolve()):
            raise SourceError(
                f"{path} links to {path.resolve()}, outside the dataset folder {root}; copy the file into the folder"
            )
        try:
            schema, rows = pq.read_schema(path), pq.read_metadata(path).num_rows
        except (pa.ArrowException, OSError) as e:
            raise SourceError(f"{path} is not a readable Parquet file ({e})") from None
        for column, key in ((image_column, "ingest.image_column"), (text_column, "ingest.text_column")):
            if column not in schema.names:
                raise SourceError(
                    f"{path} has no column {column!r} (its columns: {schema.names}); set {key} to the right one"
                )
        if not _is_image_type(schema.field(image_column).type):
            raise SourceError(
                f"{path}: column {image_column!r} is {schema.field(image_column).type}, not image bytes; it must be "
                "binary, or a struct with a binary 'bytes' field (as Hugging Face datasets writes images)"
            )
        total += rows

    def inputs() -> Iterator[_Input]:
        for path, rel in files:
            number = 0
            try:
                with pq.ParquetFile(path) as parquet:
                    # Small batches: a row may hold a full-size photo.
                    for batch in parquet.iter_batches(batch_size=64, columns=[image_column, text_column]):
                        for cell, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                            yield _parquet_input(f"{rel}[{number}]", cell, text)
                            number += 1
            except (pa.ArrowException, OSError) as e:
                raise SourceError(f"{rel}: cannot read rows after row {number} ({e}); the file is damaged") from None

    return total, inputs()


def _is_image_type(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _is_image_type(kind.field("bytes").type)


def _parquet_input(where: str, cell, text) -> _Input:
    if isinstance(cell, dict):
        if cell.get("bytes") is None:
            kept = f" only its path {cell['path']!r}" if cell.get("path") else " no bytes"
            detail = f"the image cell holds{kept}; write the dataset with the image bytes embedded"
            return _Input(where, where, problem=Rejected("missing_image", detail))
        cell = cell["bytes"]
    if cell is None:
        return _Input(where, where, problem=Rejected("missing_image", "the image cell is null"))
    return _Input(where, where, text=text, data=cell)


def normalize_caption(text: str) -> str:
    """NFC, with every run of whitespace (any Unicode space, newline, tab) made one space, ends trimmed."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _captions(value) -> list[str]:
    if value is _MISSING or value is None:
        raise Rejected("missing_caption", "it has no caption (the caption field is missing or null)")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise Rejected("invalid_caption", f"a caption must be text or a list of texts, got {str(value)[:80]!r}")
    # A list, or the lines of a caption file, may hold blank entries between captions; they are skipped.
    captions = [c for c in map(normalize_caption, texts) if c]
    if not captions:
        raise Rejected("empty_caption", "the caption is empty or only whitespace")
    for text in captions:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Rejected("invalid_caption", f"the caption {text[:80]!r} is not valid Unicode ({e.reason})") from None
    return captions


def _inside(root: Path, file_name: str) -> Path:
    """The file `file_name` names in the resolved folder `root`, symlinks followed; Rejected if outside or missing."""
    if os.path.isabs(file_name):
        detail = f"{file_name!r} is an absolute path; name files relative to the dataset folder"
        raise Rejected("outside_dataset", detail)
    try:
        path = (root / file_name).resolve()
        inside = path.is_relative_to(root)
        is_file = path.is_file()
    except (OSError, RuntimeError, ValueError) as e:
        raise Rejected("missing_file", f"{file_name!r} cannot be resolved ({e})") from None
    if not inside:
        detail = f"{file_name!r} leads to {path}, outside the dataset folder; copy the file into the folder"
        raise Rejected("outside_dataset", detail)
    if not is_file:
        raise Rejected("missing_file", f"{file_name!r} is not a file in the dataset folder")
    return path


def _convert_all(
    root: Path, inputs: Iterable[_Input], knobs: IngestParams, image_size: int, buckets: list[Size] | None
) -> Iterator[tuple[str, list[dict] | Rejected]]:
    """Per input, in order: its name and its rows, or its name and why it was rejected."""
    # A file named by several metadata rows is decoded once and kept only until its next use.
    kept: dict[str, tuple[bytes, int, int, str] | Rejected] = {}
    for item in inputs:
        key = os.path.normpath(item.file) if item.file else None
        image = kept.pop(key, None)
        if item.problem is not None:
            yield item.name, item.problem
            continue
        try:
            captions = _captions(item.text)
        except Rejected as e:
            yield item.name, e
            continue
        if image is None:
            image = _image(root, item, knobs, image_size, buckets)
        if item.reused_later:
            kept[key] = image
        if isinstance(image, Rejected):
            yield item.name, image
            continue
        png, width, height, split = image
        yield item.name, [_row(png, text, width, height, item.source, split) for text in captions]


def _image(
    root: Path, item: _Input, knobs: IngestParams, image_size: int, buckets: list[Size] | None = None
) -> tuple[bytes, int, int, str] | Rejected:
    """The training-size PNG of the input's image (an image_size square, or its bucket's size), its original
    size and its split, or why it cannot be used.

    The split hashes the source file's bytes, not the PNG made from them: an image stays on its side at any
    image_size, and the same file under two names cannot land on both sides."""
    try:
        if item.file is not None:
            path = _inside(root, item.file)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise Rejected("unreadable_file", f"cannot read {item.file}: {e.strerror or e}") from None
        else:
            data = item.data
        image = load_image(data, knobs.max_image_pixels, knobs.min_image_size)
    except Rejected as e:
        return e
    except ImageRejected as e:
        return Rejected(e.reason, str(e))
    split = split_of(content_id(data), knobs.val_fraction)
    if buckets:
        fitted = fit_to_bucket(image, nearest_bucket(image.width, image.height, buckets))
    else:
        fitted = resize_center_crop(image, image_size)
    return to_png(fitted), image.width, image.height, split
