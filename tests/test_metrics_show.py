"""`dvc metrics show` and `dvc metrics diff` on the committed run are legible in a 120-column terminal: each
stage declares a short headline of numbers (stages/reporting.write_headline), and its full detail file is read
by naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flows.tracking import pipeline_stages

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


def dvc(*args: str) -> str:
    return subprocess.run([DVC, *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


STAGES_WITH_NUMBERS = (
    "ingest", "train_vae", "cache_latents", "train_unet", "evaluate", "finetune_lora", "train_controlnet"
)


def test_each_stage_with_numbers_declares_one_headline_of_numbers_and_keeps_its_detail_as_an_output():
    # As DVC resolves dvc.yaml: the declared metrics, and each stage's outputs (outs, metrics and plots).
    [workspace] = json.loads(dvc("metrics", "show", "--json")).values()
    stages = pipeline_stages(REPO)
    assert sorted(workspace["data"]) == sorted(f"metrics/headline/{s}.json" for s in STAGES_WITH_NUMBERS)
    for stage in STAGES_WITH_NUMBERS:
        headline = f"metrics/headline/{stage}.json"
        values = workspace["data"][headline]["data"]
        assert all(isinstance(v, (int, float)) for v in values.values()), (headline, values)  # no prose
        detail = "eval/metrics.json" if stage == "evaluate" else f"metrics/{stage}.json"
        assert {headline, detail} <= set(stages[stage].outs)


def test_metrics_show_and_diff_fit_120_columns():
    shown = dvc("metrics", "show").splitlines()
    assert shown[0].split()[0] == "Path" and len(shown) == 1 + 7  # one row per stage's headline
    assert max(map(len, shown)) <= 120, "\n".join(shown)
    assert "metrics/headline/evaluate.json" in "\n".join(shown)
    assert "adherence" in shown[0] and "val_psnr" in shown[0]

    diffed = dvc("metrics", "diff", "--all").splitlines()
    assert diffed[0].split()[:2] == ["Path", "Metric"] and len(diffed) > 7
    assert max(map(len, diffed)) <= 120, "\n".join(diffed)


def test_a_stage_s_full_numbers_are_shown_by_naming_its_file():
    detail = json.loads(dvc("metrics", "show", "--json", "eval/metrics.json"))
    [workspace] = detail.values()
    numbers = workspace["data"]["eval/metrics.json"]["data"]
    assert "samplers" in numbers and "real" in numbers
