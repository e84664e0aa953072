"""How a stage reports what it is doing, without knowing who listens.

Stages and `ldm` training loops call a `Reporter`; run alone they get `ConsoleReporter` (a progress bar
on a terminal, log lines otherwise); run by a Prefect flow they get one that also writes to the flow's
log and to the MLflow run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image
from tqdm import tqdm

from ldm.devices import use_threads
from ldm.errors import InputError
from ldm.models.modeling import atomic_path
from ldm.training.checkpoint import NonFiniteLoss, TrainingInterrupted
from ldm.training.distributed import launched_rank

log = logging.getLogger("ldm")


class Reporter(Protocol):
    def info(self, message: str) -> None: ...

    def progress(self, task: str, done: int, total: int) -> None:
        """`done` of `total` units of `task` are finished (called often; implementations throttle)."""

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Numbers to record: per-step training metrics (with `step`) or final ones (without)."""

    def image(self, name: str, image: Image.Image, step: int) -> None:
        """A picture of progress at `step` (a validation grid); the stage writes its final products itself."""


# A log line of a task's progress at least this often, beside one per tenth: a quiet log reads as a hung run.
PROGRESS_LINE_SECONDS = 30.0


def progress_line(task: str, done: int, total: int, seconds: float, advanced: int) -> str:
    """"train_vae: 480/2400 (20%), 4.12/s, 7m 46s left": the rate is over `advanced` units in `seconds` (since
    the task's first report, so a resumed run's rate is its own), and the time left assumes it holds."""
    line = f"{task}: {done}/{total} ({100 * done // max(total, 1)}%)"
    if seconds <= 0 or advanced <= 0:
        return line
    rate = advanced / seconds
    if done >= total:
        return f"{line}, {_rate(rate)}/s, done in {_duration(seconds)}"
    return f"{line}, {_rate(rate)}/s, {_duration((total - done) / rate)} left"


def _rate(per_second: float) -> str:
    """Three significant digits, never in exponent notation: 0.0412, 4.12, 412, 3,125."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class ConsoleReporter:
    """tqdm bars on a terminal; on a pipe or in a log, a `progress_line` at each tenth of a task and at least
    every PROGRESS_LINE_SECONDS instead of a redrawn bar.

    `logger` receives the lines (a flow passes Prefect's run logger); `lines_on_terminal` writes them even
    when a bar is drawn, so a run log shows progress whatever the terminal. `clock`: seconds, for tests.
    """

    def __init__(
        self, stream=None, logger: logging.Logger | logging.LoggerAdapter = log, lines_on_terminal: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream or sys.stderr
        self.logger = logger
        self.lines_on_terminal = lines_on_terminal
        self.clock = clock
        self._bars: dict[str, tqdm] = {}
        self._started: dict[str, tuple[float, int]] = {}  # task -> (time, done) at its first report
        self._last_line: dict[str, tuple[float, int]] = {}  # task -> (time, tenth) of its last line

    def info(self, message: str) -> None:
        self.logger.info(message)

    def progress(self, task: str, done: int, total: int) -> None:
        on_terminal = self.stream.isatty()
        if on_terminal:
            bar = self._bars.get(task)
            if bar is None:
                bar = self._bars[task] = tqdm(total=total, desc=task, file=self.stream, dynamic_ncols=True)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()
                del self._bars[task]
        if on_terminal and not self.lines_on_terminal:
            return
        now = self.clock()
        started_at, started_done = self._started.setdefault(task, (now, done))
        tenth = 10 * done // max(total, 1)
        last = self._last_line.get(task)
        if last is None or tenth != last[1] or now - last[0] >= PROGRESS_LINE_SECONDS:
            self._last_line[task] = (now, tenth)
            self.logger.info("%s", progress_line(task, done, total, now - started_at, done - started_done))
        if done >= total:  # the task may run again (another sampler, a resumed run): start afresh
            del self._started[task], self._last_line[task]

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.logger.info("%s%s", f"step {step}: " if step is not None else "", shown)

    def image(self, name: str, image: Image.Image, step: int) -> None:
        self.logger.info("step %d: %s image ready (%dx%d)", step, name, *image.size)


def write_csv(path: Path, rows: list[dict[str, float]], columns: tuple[str, ...]) -> None:
    """A DVC plot's CSV (a header, then one line per row), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

# What the pipeline runs to rebuild an input the library found missing or damaged (the library's messages
# say what is wrong; only the stages know the DVC command that fixes it).
REBUILD_INGESTED = "to rebuild it: `dvc repro --force ingest`"


@dataclass
class StageResult:
    """What a stage hands back to whoever runs it (a flow logs all of it to MLflow).

    metrics: final numbers (also written to the stage's DVC metrics file);
    artifacts: files or folders worth keeping with the run (grids, reports, plots);
    model_dir: a saved ldm model folder to register in the model registry, if the stage trained one.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    model_dir: Path | None = None


def training_progress(reporter: Reporter, stage: str) -> Callable[[int, int, dict[str, float]], None]:
    """A training loop's `on_step`: the step's metrics to the reporter, and the stage's progress."""

    def on_step(step: int, total: int, values: dict[str, float]) -> None:
        reporter.metrics(values, step)
        reporter.progress(stage, step, total)

    return on_step


def report_stopped_training(stage: str, error: TrainingInterrupted | NonFiniteLoss) -> int:
    """Say in one line why training stopped and which checkpoint resumes it; returns the exit status: 128 + the
    signal for an interruption (as a shell reports a process a signal ended), 1 for a non-finite loss."""
    if isinstance(error, TrainingInterrupted):
        print(f"{stage}: {error}", file=sys.stderr)
        return 128 + error.signal_number
    print(f"{stage}: error: {error}", file=sys.stderr)
    return 1


def stage_main(
    stage: str,
    description: str,
    run: Callable[..., StageResult],
    summary: Callable[[StageResult], str],
    argv: list[str] | None = None,
) -> int:
    """`python -m stages.<stage> [--params PATH]`: run a stage without Prefect or MLflow.

    A user mistake (an `InputError`: a bad param, a missing input, a stage not run yet) prints one line
    saying what and how to fix it and exits 2, without a traceback; any other exception is a bug and keeps
    its traceback. So does a training run that stopped
    itself: on SIGINT/SIGTERM (exit 128 + the signal, as a shell reports a signal) or on a non-finite loss
    (exit 1); each message says which checkpoint to resume from.
    """
    from stages.params import DEFAULT_PARAMS_FILE, load_params

    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="the params file (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params)
        reporter = ConsoleReporter()
        reporter.info(start_line(stage, params.device, params.threads))
        result = run(params, reporter)
    except InputError as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        return 2
    except (TrainingInterrupted, NonFiniteLoss) as e:
        return report_stopped_training(stage, e)
    if launched_rank() == 0:  # in a data-parallel run rank 0 alone has the outputs to sum up
        print(f"{stage}: {summary(result)}")
    return 0


def start_line(stage: str, device: str, threads: int | None) -> str:
    """Applies the `threads` param (`ldm.devices.use_threads`) and says what the stage computes on: its first
    log line, the first thing to read when a run is slower than expected."""
    used = use_threads(threads)
    chosen = "the threads param" if threads is not None else "torch's choice; set the threads param to change it"
    return f"{stage}: device {device}, {used} CPU threads ({chosen})"


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested metrics as one level of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


HEADLINE_FOLDER = "headline"


def write_headline(metrics_dir: str | os.PathLike, stage: str, values: dict[str, float]) -> Path:
    """The stage's headline, `metrics_dir/headline/<stage>.json`: the few numbers a reader compares across
    commits, which dvc.yaml declares as the pipeline's DVC metrics. Their keys, shared where the meaning is
    (`rows`, `adherence`), and floats at 4 significant digits keep `dvc metrics show` within 120 columns; the
    stage's full numbers stay in its own file."""
    rounded = {k: v if isinstance(v, int) else float(f"{v:.4g}") for k, v in values.items()}
    return write_json(Path(metrics_dir) / HEADLINE_FOLDER / f"{stage}.json", rounded)


def write_json(path: str | os.PathLike, values: dict) -> Path:
    """`values` as indented JSON at `path` (its folder made), written atomically: a DVC metrics file is the old
    one or the complete new one, never half of it. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(values, indent=2) + "\n")
    return path
