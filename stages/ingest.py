"""DVC stage `ingest`: raw images and captions (or the built-in shapes data) -> the ingested dataset.

reads:  ingest.source ("shapes", or a path); params seed, image_size, text_encoder, ingest, and the block counts
        of train_vae.model and train_unet.model (what aspect-ratio bucket sides are multiples of)
writes: paths.ingested/ (part-*.parquet in the format of ldm.data.ingested, and rejects.jsonl),
        paths.metrics/ingest.json (every count), paths.metrics/headline/ingest.json (the DVC metric: rows)

Every input (a metadata row, an image of a captions folder, a Parquet row, a generated image) is either
accepted, giving one row per caption, or rejected with a reason in rejects.jsonl: accepted + rejected =
inputs. Rejecting is for bad items; a source that cannot be read at all (missing path, unknown layout,
missing columns) stops the stage with a SourceError instead.

    python -m stages.ingest [--params params.yaml]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from ldm.data.buckets import png_size
from ldm.data.ingested import REJECTS_NAME, ShardWriter
from ldm.models.text_encoder import resolve_folder
from stages.params import Params
from stages.reporting import Reporter, StageResult, stage_main, write_headline, write_json
from stages.sources import LAYOUTS, REASONS, Rejected, SourceError, read_source

STAGE = "ingest"
METRICS_NAME = "ingest.json"
# How often progress is reported, in inputs: often enough for a live bar, rarely enough to cost nothing.
_PROGRESS_EVERY = 256
_TOKENIZE_BATCH = 1024


def run(params: Params, reporter: Reporter) -> StageResult:
    started = time.perf_counter()
    knobs = params.ingest
    tokenizer = AutoTokenizer.from_pretrained(resolve_folder(params.text_encoder.name), local_files_only=True)
    buckets = params.bucket_sizes()
    total, described, outcomes = read_source(knobs, params.image_size, params.seed, "ingest", buckets)
    reporter.info(f"{STAGE}: {described} -> {params.paths.ingested}")

    out = Path(params.paths.ingested)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        counts = _write(tmp, outcomes, total, reporter)
        if not counts.accepted:
            raise _nothing_accepted(knobs.source, counts)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    metrics = {
        "inputs": counts.accepted + counts.rejected,
        "accepted": counts.accepted,
        "rejected": counts.rejected,
        "captions_truncated": _count_truncated(tokenizer, counts.captions, params.text_encoder.max_length),
        "images": len(counts.ids),
        "train_rows": counts.splits["train"],
        "val_rows": counts.splits["val"],
        **{f"rejected_{reason}": counts.reasons[reason] for reason in REASONS},
        # Rows per aspect-ratio bucket, every bucket listed (0 where no image fits it).
        **({f"bucket_{w}x{h}": counts.sizes[w, h] for w, h in buckets} if buckets else {}),
    }
    metrics_path = write_json(Path(params.paths.metrics) / METRICS_NAME, metrics)
    # Rows alone: the table of every stage's headline must fit 120 columns; the rejects are in METRICS_NAME.
    write_headline(params.paths.metrics, STAGE, {"rows": counts.accepted})
    reporter.info(
        f"{STAGE}: {metrics['inputs']} inputs: {counts.accepted} accepted, {counts.rejected} rejected "
        f"({dict(counts.reasons.most_common()) or 'none'}); {metrics['train_rows']} train and {metrics['val_rows']} "
        f"val rows of {metrics['images']} images in {time.perf_counter() - started:.1f} s"
    )
    reporter.metrics(metrics)
    return StageResult(metrics=metrics, artifacts=[out / REJECTS_NAME, metrics_path])


@dataclass
class _Counts:
    accepted: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    captions: Counter = field(default_factory=Counter)  # accepted rows per caption
    sizes: Counter = field(default_factory=Counter)  # accepted rows per stored image size (width, height)
    ids: set = field(default_factory=set)
    examples: list = field(default_factory=list)  # the first rejects, to show when nothing was accepted


def _write(
    directory: Path, outcomes: Iterable[tuple[str, list[dict] | Rejected]], total: int, reporter: Reporter
) -> _Counts:
    """Shards and rejects.jsonl into `directory`; what was accepted and rejected."""
    counts = _Counts()
    with ShardWriter(directory) as shards, open(directory / REJECTS_NAME, "w", encoding="utf-8") as rejects:
        for done, (name, outcome) in enumerate(outcomes, 1):
            if isinstance(outcome, Rejected):
                counts.rejected += 1
                counts.reasons[outcome.reason] += 1
                record = {"input": name, "reason": outcome.reason, "detail": outcome.detail}
                line = json.dumps(record, ensure_ascii=False)
                rejects.write(line + "\n")
                if len(counts.examples) < 5:
                    counts.examples.append(f"  - {line}")
            else:
                counts.accepted += 1
                for row in outcome:
                    shards.write(row)
                    counts.splits[row["split"]] += 1
                    counts.captions[row["caption"]] += 1
                    counts.sizes[png_size(row["image"])] += 1
                    counts.ids.add(row["id"])
            if done % _PROGRESS_EVERY == 0 or done == total:
                reporter.progress(STAGE, done, total)
    return counts


def _nothing_accepted(source: str, counts: _Counts) -> SourceError:
    if not counts.rejected:
        return SourceError(f"ingest.source {source!r} holds no inputs; add images with captions.\n{LAYOUTS}")
    reasons = ", ".join(f"{reason}: {n}" for reason, n in counts.reasons.most_common())
    return SourceError(
        f"no input of {source} was accepted ({counts.rejected} rejected: {reasons}); the first rejects:\n"
        + "\n".join(counts.examples)
    )


def _swap_in(tmp: Path, directory: Path) -> None:
    """Put the finished folder `tmp` at `directory`, replacing what was there."""
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists() or directory.is_symlink():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink(missing_ok=True)


def _count_truncated(tokenizer, captions: Counter, max_length: int) -> int:
    """How many rows have a caption longer than the text encoder takes (special tokens included)."""
    distinct = list(captions)
    truncated = 0
    for start in range(0, len(distinct), _TOKENIZE_BATCH):
        batch = distinct[start : start + _TOKENIZE_BATCH]
        # verbose=False: the tokenizer would warn about every caption longer than its model's limit,
        # which is exactly what is being counted here.
        ids = tokenizer(batch, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        truncated += sum(captions[text] for text, tokens in zip(batch, ids) if len(tokens) > max_length)
    return truncated


# ---------------------------------------------------------------------------------------------- shapes


# ---------------------------------------------------------------------------------------------- sources


# ---------------------------------------------------------------------------------------------- conversion


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        STAGE, "Turn raw images and captions, or the built-in shapes data, into the ingested Parquet dataset.", run,
        lambda r: f"{r.metrics['accepted']} of {r.metrics['inputs']} inputs accepted ({r.metrics['rejected']} rejected), "
        f"{r.metrics['images']} images",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
