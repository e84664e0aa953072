"""The `threads` param: every stage applies it before any work and says so in its first log line."""

from __future__ import annotations

import subprocess
import sys

import torch

from stages.reporting import start_line
from tests.ci_stages import REPO, ci_params, write_params


def test_a_stage_run_alone_computes_on_the_threads_it_is_given_and_says_so_first(tmp_path):
    params = ci_params(tmp_path).model_copy(update={"threads": 1})
    path = write_params(params, tmp_path / "params.yaml")
    probe = (
        "import sys, torch; from stages import ingest; code = ingest.main(['--params', sys.argv[1]]); "
        "print('threads after:', torch.get_num_threads()); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stderr + done.stdout).splitlines()
    assert lines[0] == "ingest: device auto, 1 CPU threads (the threads param)"
    assert "threads after: 1" in lines


def test_without_the_param_torch_keeps_its_own_choice():
    before = torch.get_num_threads()
    assert start_line("evaluate", "cpu", None) == (
        f"evaluate: device cpu, {before} CPU threads (torch's choice; set the threads param to change it)"
    )
    assert torch.get_num_threads() == before
