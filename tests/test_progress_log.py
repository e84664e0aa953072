"""What a stage's log shows while it works: a progress line at each tenth and at least every 30 s, each with
its rate and the time left, and no progress-bar frames."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from stages.reporting import PROGRESS_LINE_SECONDS, ConsoleReporter, progress_line
from tests.ci_stages import REPO, ci_params, write_params


class Lines:
    def __init__(self, clock):
        self.clock, self.lines = clock, []

    def info(self, message, *args):
        self.lines.append((self.clock(), message % args))


def test_a_slow_task_logs_a_line_at_least_every_30_seconds_and_at_every_tenth():
    now = [0.0]
    log = Lines(lambda: now[0])
    reporter = ConsoleReporter(stream=io.StringIO(), logger=log, clock=lambda: now[0])
    for done in range(0, 1001, 10):  # 10 steps every 12 s: a tenth takes 2 minutes
        now[0] = 1.2 * done
        reporter.progress("train_vae", done, 1000)
    times = [t for t, _ in log.lines]
    assert max(b - a for a, b in zip(times, times[1:])) <= PROGRESS_LINE_SECONDS + 12
    tenths = {int(m.group(1)) for _, line in log.lines if (m := re.search(r"\((\d+)%\)", line))}
    assert set(range(0, 101, 10)) <= tenths
    assert log.lines[-1][1] == "train_vae: 1000/1000 (100%), 0.833/s, done in 20m 00s"
    assert log.lines[1][1] == "train_vae: 30/1000 (3%), 0.833/s, 19m 24s left"


def test_the_line_formats_rates_and_durations_plainly():
    assert progress_line("evaluate dpmpp_2m-20", 0, 600, 0.0, 0) == "evaluate dpmpp_2m-20: 0/600 (0%)"
    assert progress_line("train_unet", 210, 700, 30.0, 210) == "train_unet: 210/700 (30%), 7/s, 1m 10s left"
    assert progress_line("train_unet", 100, 100_000, 60.0, 100) == "train_unet: 100/100000 (0%), 1.67/s, 16h 39m left"
    # Fast tasks (images encoded per second) read as plain numbers, not "3.12e+03/s".
    assert progress_line("cache_latents", 6250, 24000, 2.0, 6250) == "cache_latents: 6250/24000 (26%), 3,125/s, 6s left"


def test_a_stage_run_in_a_pipe_logs_progress_lines_without_bar_frames(tmp_path):
    path = write_params(ci_params(tmp_path), tmp_path / "params.yaml")
    probe = ("import sys; from stages import ingest, train_vae; "
             "sys.exit(ingest.main(['--params', sys.argv[1]]) or train_vae.main(['--params', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "\r" not in log and "Loading weights" not in log and "it/s]" not in log
    progress = [line for line in log.splitlines() if re.match(r"train_vae: \d+/\d+ \(\d+%\)", line)]
    # The first report has no rate yet; every later one says its rate and the time left.
    assert len(progress) > 2 and all(re.search(r", [\d.]+/s, ((\d+m )?\d+s left|done in)", line)
                                     for line in progress[1:]), progress
    assert progress[-1].startswith("train_vae: 30/30 (100%)") and "done in" in progress[-1]
