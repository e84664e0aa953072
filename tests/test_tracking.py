"""flows/tracking.py's reading of the repository: dvc.yaml's stages as DVC resolves them, and the git commit a
run is tagged with. Temporary repositories; no servers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows.pipeline import has_commit
from flows.tracking import DvcStage, generated_paths, git_commit, pipeline_stages, stage_outputs

REPO = Path(__file__).resolve().parents[1]

DVC_YAML = """\
vars:
  - suffix: v1
stages:
  prepare:
    cmd: echo ${seed}
    params: [seed, prepare.size]
    deps:
      - src/prepare.py
    outs:
      - ${paths.data}
    metrics:
      - ${paths.metrics}/prepare.json:
          cache: false
  train:
    foreach: [small, big]
    do:
      cmd: echo ${item}
      params:
        - train
        - other.yaml:
            - lr
      deps:
        - ${paths.data}/${item}
      outs:
        - models/${item}-${suffix}
      plots:
        - plots/${item}.csv
  grid:
    matrix:
      size: [1, 2]
    cmd: echo ${item.size}
    outs:
      - grid/${item.size}
"""
PARAMS_YAML = """\
seed: 0
prepare: {size: 4}
train: {steps: 2}
paths: {data: data/prepared, metrics: metrics}
"""


def _git(repo: Path, *args: str) -> str:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    return subprocess.run([*git, *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text(PARAMS_YAML)
    (tmp_path / "other.yaml").write_text("lr: 0.1\n")
    return tmp_path


def test_stages_are_read_as_dvc_resolves_them_templates_vars_foreach_and_matrix(repo, tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # DVC resolves relative paths from the current directory: nothing here may depend on it
    stages = pipeline_stages(repo)
    assert sorted(stages) == ["grid@1", "grid@2", "prepare", "train@big", "train@small"]
    assert stages["prepare"] == DvcStage(
        deps=["src/prepare.py"], outs=["data/prepared", "metrics/prepare.json"], params=["seed", "prepare.size"],
        cmd="echo 0",
    )
    # Only params.yaml's keys: what the stage's MLflow run logs from the validated params.
    assert stages["train@small"] == DvcStage(
        deps=["data/prepared/small"], outs=["models/small-v1", "plots/small.csv"], params=["train"],
        cmd="echo small",
    )
    assert stages["grid@2"].outs == ["grid/2"]
    assert stage_outputs(stages, "prepare") == ["data/prepared", "metrics/prepare.json"]
    assert generated_paths(stages) == {
        "dvc.lock", "data/prepared", "metrics/prepare.json", "models/small-v1", "plots/small.csv",
        "models/big-v1", "plots/big.csv", "grid/1", "grid/2",
    }
    assert not (repo / ".dvc").exists()  # reading a folder without `.dvc/` leaves none behind


def test_a_template_dvc_cannot_fill_is_dvcs_error(repo):
    from dvc.parsing import ResolveError

    (repo / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(ResolveError, match="paths.data"):
        pipeline_stages(repo)


def test_this_repositorys_stages_hold_every_stage_with_its_params(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    stages = pipeline_stages(REPO)
    assert {"ingest", "train_vae", "train_unet", "evaluate"} <= set(stages)
    assert "train_vae" in stages["train_vae"].params
    assert any(dep.startswith("stages/") for dep in stages["train_vae"].deps)
    assert "params.yaml" not in stages["train_vae"].deps


def test_git_commit_is_head_dirty_only_for_changes_outside_the_pipelines_products(repo):
    assert git_commit(repo, {"dvc.lock"}) == "unknown"  # not a git repository
    _git(repo, "init", "-q")
    assert git_commit(repo, {"dvc.lock"}) == "unknown" and not has_commit(repo)  # no commit yet
    (repo / "metrics").mkdir()
    (repo / "metrics" / "prepare.json").write_text("{}")
    (repo / "dvc.lock").write_text("")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first")
    head = _git(repo, "rev-parse", "HEAD")
    generated = generated_paths(pipeline_stages(repo))
    assert has_commit(repo)
    assert git_commit(repo, generated) == head
    (repo / "untracked.txt").write_text("not tracked: not a change")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "metrics" / "prepare.json").write_text('{"a": 1}')
    assert git_commit(repo, generated) == head  # what `dvc repro` rewrites does not count
    (repo / "params.yaml").write_text(PARAMS_YAML + "extra: 1\n")
    assert git_commit(repo, generated) == f"{head}-dirty"
    _git(repo, "add", "params.yaml")  # staged counts too
    assert git_commit(repo, generated) == f"{head}-dirty"


def test_git_commit_of_a_pipeline_in_a_subfolder_of_the_git_repository(tmp_path):
    sub = tmp_path / "project"
    sub.mkdir()
    (sub / "dvc.lock").write_text("")
    (sub / "code.py").write_text("")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    (sub / "dvc.lock").write_text("changed")
    assert git_commit(sub, {"dvc.lock"}) == head
    (sub / "code.py").write_text("changed")
    assert git_commit(sub, {"dvc.lock"}) == f"{head}-dirty"


def test_the_champion_has_the_best_adherence_and_among_equals_copies_least():
    from types import SimpleNamespace

    from flows.evaluate import champion_of

    def version(number, adherence=None, copies=None):
        tags = {} if adherence is None else {"prompt_adherence": str(adherence)}
        if copies is not None:
            tags["copy_rate_seen"] = str(copies)
        return SimpleNamespace(version=str(number), tags=tags)

    # Two models at the capped adherence of 1: the one that redraws 61% of its train images loses.
    memorising, generalising = version(1, 1.0, 0.61), version(2, 1.0, 0.03)
    assert champion_of([memorising, generalising, version(3)]) is generalising
    assert champion_of([generalising, memorising]) is generalising
    assert champion_of([memorising, version(4, 0.98, 0.0)]) is memorising  # adherence comes first
    assert champion_of([version(5, 0.9), version(6, 0.9, 0.5)]).version == "6"  # unknown copy rate ranks below
    assert champion_of([version(7, 0.9, 0.1), version(8, 0.9, 0.1)]).version == "8"  # then the newest
