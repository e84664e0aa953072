"""The ingested dataset: Parquet shards of training-size PNG images with their captions.

One row per (image, caption) pair; an image with several captions has several rows sharing its `id`.
`manifest.json` lists the shards with their row counts and sha256: readers check every shard against it,
so a shard truncated or altered since it was written is reported by name and never read.

    id          string   sha256 of the stored PNG bytes (the content hash)
    image       binary   PNG, RGB, image_size x image_size
    caption     string
    width       int32    original size, before resizing and cropping
    height      int32
    source      string   where it came from ("shapes", or the path relative to the dataset root)
    split       string   "train" or "val", decided by a content hash (of the source file's bytes; of the
                         image itself for generated data), so it never depends on row order or image size
    attributes  string   JSON of what the image shows (built-in shapes data), or null
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ldm.data.buckets import Size, png_size
from ldm.data.images import png_to_tensor
from ldm.errors import InputError, InputNotFoundError
from ldm.models.modeling import file_sha256

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("attributes", pa.string()),
    ]
)
REJECTS_NAME = "rejects.jsonl"
MANIFEST_NAME = "manifest.json"
# The fix for damaged ingested data; a pipeline stage adds its own command for it.
REBUILD = "ingest the dataset again"


class IngestedDataError(InputError):
    """The ingested dataset's files do not match its manifest: missing, truncated or altered."""


def content_id(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


def split_of(content_hash: str, val_fraction: float) -> str:
    """Deterministic train/val assignment from a content hash: the same image always lands the same side."""
    bucket = int(content_hash[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    """The shards `manifest.json` lists, each checked against its recorded sha256 (IngestedDataError if not)."""
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        if not any(directory.glob("*.parquet")):
            raise InputNotFoundError(f"no ingested data in {directory}; ingest a dataset there first")
        raise IngestedDataError(
            f"{manifest} is missing, so the shards in {directory} cannot be checked; {REBUILD}"
        )
    try:
        shards = json.loads(manifest.read_text())["shards"]
        listed = [(directory / s["file"], s["sha256"]) for s in shards]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise IngestedDataError(f"{manifest} is damaged ({e!r}); {REBUILD}") from None
    for path, recorded in listed:
        if not path.is_file():
            raise IngestedDataError(f"{path}, listed in {manifest}, is missing; {REBUILD}")
        if file_sha256(path) != recorded:
            raise IngestedDataError(
                f"{path} was truncated or altered since ingest wrote it (its sha256 differs from {manifest}); "
                f"it was not read; {REBUILD}"
            )
    if not listed:
        raise InputNotFoundError(f"{manifest} lists no shards; ingest a dataset there first")
    return [path for path, _ in listed]


def read_table(directory: str | os.PathLike, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows (or one split's) of the ingested dataset, as one Arrow table."""
    filters = None if split is None else [("split", "=", split)]
    return pq.read_table([str(p) for p in shard_paths(directory)], columns=columns, filters=filters, schema=SCHEMA)


class IngestedImages(torch.utils.data.Dataset):
    """The decoded images of one split, for training and encoding: item -> (3, H, W) in [-1, 1].

    Holds the PNG bytes in memory (a few KB per training-size image) and decodes on access. Images may differ
    in size (aspect-ratio buckets): `sizes` holds each one's (width, height), read from its PNG header.
    """

    def __init__(self, directory: str | os.PathLike, split: str | None = "train"):
        table = read_table(directory, split, columns=["id", "image", "caption"])
        self.ids: list[str] = table.column("id").to_pylist()
        self.captions: list[str] = table.column("caption").to_pylist()
        self._images: list[bytes] = table.column("image").to_pylist()
        if not self._images:
            raise InputError(f"the ingested dataset in {directory} has no {split!r} rows; ingest more data")
        self.sizes: list[Size] = [png_size(png) for png in self._images]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return png_to_tensor(self._images[index])

    def batch(self, indices: list[int]) -> torch.Tensor:  # (B, 3, H, W)
        """The images at `indices`, stacked: they must share one size (`by_size` groups them)."""
        return torch.stack([self[i] for i in indices])

    def by_size(self, indices: list[int]) -> list[list[int]]:
        """`indices` split into lists of one image size each, in order of each size's first index."""
        groups: dict[Size, list[int]] = {}
        for i in indices:
            groups.setdefault(self.sizes[i], []).append(i)
        return list(groups.values())

    def iter_batches(self, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices, (B, 3, H, W)) over the split: each size's images in order, batches of one size."""
        for group in self.by_size(list(range(len(self)))):
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                yield chunk, self.batch(chunk)


ROWS_PER_SHARD = 4096


class ShardWriter:
    """Writes rows (dicts keyed by SCHEMA's names) into `directory` as part-00000.parquet, part-00001.parquet, ...

    `rows_per_shard` rows each, then `manifest.json`. As a context manager it writes the last, partial shard
    and the manifest on a clean exit.
    """

    def __init__(self, directory: str | os.PathLike, rows_per_shard: int = ROWS_PER_SHARD):
        self.directory = Path(directory)
        self.rows_per_shard = rows_per_shard
        self.paths: list[Path] = []
        self._rows: list[dict] = []
        self._shards: list[dict] = []  # the manifest's entries

    def write(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.rows_per_shard:
            self.flush()

    def close(self) -> list[Path]:
        """Write what is buffered, then the manifest; the shard files written, in order."""
        self.flush()
        (self.directory / MANIFEST_NAME).write_text(json.dumps({"shards": self._shards}, indent=1) + "\n")
        return self.paths

    def flush(self) -> None:
        """End the current shard: write the rows buffered so far as one file (nothing when none are)."""
        if not self._rows:
            return
        path = self.directory / f"part-{len(self.paths):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA), path)
        self.paths.append(path)
        self._shards.append({"file": path.name, "rows": len(self._rows), "sha256": file_sha256(path)})
        self._rows = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
