"""bench/gpu_check.sh: its CPU path (--dry-run, tiny shapes) runs every check and writes the table; without
CUDA a plain run says so and exits 0."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.ci_stages import REPO


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_the_dry_run_measures_every_check_on_the_cpu_and_writes_the_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = run_check("--dry-run", "--no-compile", "--out", str(out))  # compiling on a CPU takes minutes
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert table.startswith("GPU check on CPU (dry run, tiny shapes)")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    checks = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert checks == ["training step, eager, batch 4", "3-step guided DPM-Solver++ at 16 px, eager",
                      "ci profile end to end on cpu, loaded back on the CPU"]
    for row in rows[:2]:
        cells = row.split(" | ")
        assert float(cells[3].removesuffix("x")) > 0  # ours over diffusers, a measured ratio
    assert rows[2].rstrip(" |").endswith("ok")
    assert "137 images/s per A100" in table and "1.06 s compiled" in table
    assert table in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: a plain run would measure it")
def test_without_cuda_a_plain_run_says_so_and_exits_0(tmp_path):
    done = run_check("--out", str(tmp_path / "gpu_check.md"))
    assert done.returncode == 0
    assert "no CUDA device" in done.stdout
    assert not (tmp_path / "gpu_check.md").exists()
