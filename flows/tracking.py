"""MLflow tracking for pipeline stages: one run per stage execution, tagged so it can be traced back to
the exact code (git commit), stage (DVC) and inputs (DVC's md5 of each dependency).

Tracking URI: `MLFLOW_TRACKING_URI` when set (a server), else a SQLite store `mlflow.db` in the repo with
artifacts in `mlartifacts/` (both ignored by git).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml
from dvc_data.hashfile.build import build
from dvc_data.hashfile.db import HashFileDB
from dvc_objects.fs.local import LocalFileSystem
from dvc_objects.fs.memory import MemoryFileSystem
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

EXPERIMENT = "ldm-pipeline"
DVC_FILE = "dvc.yaml"
TEMPLATE = re.compile(r"\$\{\s*([\w.]+)\s*\}")
# Set by flows/pipeline.py (`python -m flows.pipeline`, the Prefect deployment) to its MLflow run "pipeline",
# which each stage's run then nests under.
MLFLOW_PARENT_RUN_ENV = "LDM_MLFLOW_PARENT_RUN_ID"


def tracking_uri(repo: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(repo / 'mlflow.db').resolve()}"


def git_commit(repo: Path, generated: set[str]) -> str:
    """HEAD's hash, with "-dirty" when tracked files other than the pipeline's own products (`generated`:
    dvc.lock, committed metrics and plots, which `dvc repro` rewrites as it goes) differ from it: the run
    is then not reproducible from the commit alone, and the tag says so."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return done.stdout.rstrip() if done.returncode == 0 else ""

    def is_generated(path: str) -> bool:
        return any(path == g or path.startswith(g.rstrip("/") + "/") for g in generated)

    commit = git("rev-parse", "HEAD") or "unknown"
    # Porcelain lines are "XY path" (or "XY old -> new" for a rename).
    changed = [line[3:].split(" -> ")[-1] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return commit + ("-dirty" if any(not is_generated(path) for path in changed) else "")


def dotted_get(mapping: dict, key: str):
    """`mapping["a"]["b"]` for the key "a.b", as DVC names params."""
    for part in key.split("."):
        mapping = mapping[part]
    return mapping


def pipeline_stages(repo: Path, variables: dict) -> dict[str, dict]:
    """dvc.yaml's stages, with `${a.b}` templates filled from `variables` (the params) the way DVC fills
    them from params.yaml."""
    stages = yaml.safe_load((repo / DVC_FILE).read_text())["stages"]

    def lookup(match: re.Match) -> str:
        return str(dotted_get(variables, match.group(1)))

    def fill(node):
        if isinstance(node, str):
            return TEMPLATE.sub(lookup, node)
        if isinstance(node, list):
            return [fill(item) for item in node]
        if isinstance(node, dict):
            return {fill(k): fill(v) for k, v in node.items()}
        return node

    return fill(stages)


def generated_paths(stages: dict[str, dict]) -> set[str]:
    """Every file or folder `dvc repro` writes: dvc.lock and each stage's outs, metrics and plots."""
    paths = {"dvc.lock"}
    for definition in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in definition.get(kind, []):
                paths.update(entry if isinstance(entry, dict) else [entry])
    return paths


def dependency_hashes(repo: Path, deps: list[str]) -> dict[str, str]:
    """DVC's md5 of each dependency, computed with DVC's own hashing (what `dvc.lock` records for it:
    the file's md5, or a folder's `.dir` tree hash). Computed here because DVC writes dvc.lock only
    after the stage's command has finished."""
    fs = LocalFileSystem()
    odb = HashFileDB(MemoryFileSystem(), "/hashes")
    hashes = {}
    for dep in deps:
        path = repo / dep
        if path.exists():
            _, _, obj = build(odb, str(path), fs, "md5", dry_run=True)
            hashes[dep] = obj.hash_info.value
    return hashes


def flatten(section: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class StageRun:
    """The MLflow run of one stage execution. Uses the client with an explicit run id rather than
    MLflow's fluent (thread-local) active run, because Prefect may run tasks on other threads."""

    def __init__(self, client: MlflowClient, run_id: str, tags: dict[str, str]):
        self.client, self.run_id, self.tags = client, run_id, tags

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        timestamp = int(1000 * time.time())
        metrics = [Metric(k, float(v), timestamp, step or 0) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, key: str, image, step: int) -> None:
        """A PIL image at `step`; the MLflow UI shows a key's images with a step slider."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def register_model(self, model_dir: Path, name: str, artifact_path: str = "model") -> str:
        """Log the model folder as the run's artifact `artifact_path` and add it to the registry as a new
        version of `name`, carrying the run's lineage tags (git commit, stage, dependency hashes); returns
        the version."""
        tags = {k: v for k, v in self.tags.items() if not k.startswith("mlflow.")}
        self.log_artifact(model_dir, artifact_path)
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        version = self.client.create_model_version(
            name, f"{artifact_uri}/{artifact_path}", run_id=self.run_id, tags=tags
        )
        return str(version.version)  # the client gives an int; URIs and the REST API spell it as a string


def pipeline_experiment(client: MlflowClient, repo: Path) -> str:
    """The id of the experiment every pipeline run goes to, created on first use."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    # The local store keeps artifacts beside it; a server decides for itself where they go.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (repo / "mlartifacts").resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


@contextmanager
def closing_run(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Mark the run FINISHED when the block completes, FAILED when it raises (or is interrupted)."""
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


@contextmanager
def stage_run(repo: Path, stage: str, stages: dict[str, dict], params: dict, profile: str) -> Iterator[StageRun]:
    """Open the stage's MLflow run with its tags and params; close it FINISHED or FAILED."""
    uri = tracking_uri(repo)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = pipeline_experiment(client, repo)
    if stage not in stages:
        raise KeyError(f"{DVC_FILE} has no stage {stage!r}; stages: {sorted(stages)}")
    definition = stages[stage]
    commit = git_commit(repo, generated_paths(stages))
    tags = {
        "mlflow.runName": stage,
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "dvc_stage": stage,
        "profile": profile,
        **{f"dvc_dep.{dep}": md5 for dep, md5 in dependency_hashes(repo, definition.get("deps", [])).items()},
    }
    if parent_run := os.environ.get(MLFLOW_PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent_run
    run = client.create_run(experiment_id, tags=tags, run_name=stage)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(params).items()])
    with closing_run(client, run.info.run_id):
        yield StageRun(client, run.info.run_id, tags)
