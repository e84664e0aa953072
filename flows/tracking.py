"""MLflow tracking for pipeline stages: one run per stage execution, tagged so it can be traced back to
the exact code (git commit), stage (DVC) and inputs (DVC's md5 of each dependency).

Tracking URI: `MLFLOW_TRACKING_URI` when set (a server), else a SQLite store `mlflow.db` in the repo with
artifacts in `mlartifacts/` (both ignored by git).

A server that stops answering once a stage runs does not stop the stage: what could not be sent waits in a
queue, is sent again later, and what is still unsent when the stage ends is stated in one warning.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path

import mlflow
import requests
from dvc_data.hashfile.build import build
from dvc_data.hashfile.db import HashFileDB
from dvc_objects.fs.local import LocalFileSystem
from dvc_objects.fs.memory import MemoryFileSystem
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, LoggedModelOutput, LoggedModelStatus, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from ldm.data.ingested import MANIFEST_NAME
from ldm.urls import redacted

EXPERIMENT = "ldm-pipeline"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = {EXPERIMENT_KIND_TAG: "custom_model_development"}
CODE_FOLDERS = ("ldm/", "stages/")  # a stage's deps under these are its code, not its data
DVC_FILE = "dvc.yaml"
PARAMS_FILE = "params.yaml"  # DVC's default params file: the one `${}` templates and bare `params:` keys read
# Set by flows/pipeline.py (`python -m flows.pipeline`, the Prefect deployment) to its MLflow run "pipeline",
# which each stage's run then nests under.
MLFLOW_PARENT_RUN_ENV = "LDM_MLFLOW_PARENT_RUN_ID"
# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) make each call to a dead server cost minutes;
# these cost seconds and still ride out a blip. Values the user set win.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
RETRY_INTERVAL_S = 30  # while the server does not answer, how often a stage's tracking calls try it again


def tracking_uri(repo: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(repo / 'mlflow.db').resolve()}"


def tracking_client(repo: Path) -> MlflowClient:
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri(repo))


def server_unavailable(error: Exception) -> bool:
    """Whether a tracking call failed because the server did not answer (or failed itself: 5xx), rather than
    because it refused the call. MLflow reports a connection error or a timeout as INTERNAL_ERROR."""
    if isinstance(error, MlflowException):
        return error.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
    if isinstance(error, requests.HTTPError):  # an artifact upload's status
        return error.response is not None and error.response.status_code >= 500
    return isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def git_commit(repo: Path, generated: set[str]) -> str:
    """HEAD's hash, with "-dirty" when tracked files other than the pipeline's own products (`generated`:
    dvc.lock, committed metrics and plots, which `dvc repro` rewrites as it goes; paths relative to `repo`)
    differ from it: the run is then not reproducible from the commit alone, and the tag says so. "unknown"
    outside a git repository or before its first commit. Read with scmrepo, DVC's own git layer."""
    from scmrepo.exceptions import SCMError
    from scmrepo.git import Git

    try:
        scm = Git(str(repo))  # the repository holding `repo`, as git finds it from there
    except SCMError:
        return "unknown"
    try:
        if scm.no_commits:
            return "unknown"
        commit = scm.get_rev()
        staged, unstaged, _ = scm.status(untracked_files="no")
        # git reports paths from its own root, which may lie above `repo`
        prefix = os.path.relpath(Path(repo).resolve(), Path(scm.root_dir).resolve())
    finally:
        scm.close()
    mine = {os.path.normpath(os.path.join(prefix, g)) for g in generated}

    def is_generated(path: str) -> bool:
        return any(path == g or path.startswith(g + "/") for g in mine)

    changed = chain(*staged.values(), unstaged)
    return commit + ("-dirty" if any(not is_generated(path) for path in changed) else "")


def dotted_get(mapping: dict, key: str):
    """`mapping["a"]["b"]` for the key "a.b", as DVC names params."""
    for part in key.split("."):
        mapping = mapping[part]
    return mapping


@dataclass(frozen=True)
class DvcStage:
    """A stage of dvc.yaml as DVC resolves it. Paths are relative to the repository root."""

    deps: list[str]  # files and folders the stage reads (not its params)
    outs: list[str]  # what `dvc repro` records of it: its outs, metrics and plots
    params: list[str]  # the params.yaml keys it lists (dotted keys allowed)
    cmd: str = ""  # its command, as dvc.yaml gives it


def pipeline_stages(repo: Path) -> dict[str, DvcStage]:
    """dvc.yaml's stages as DVC itself reads them (`${}` templates from params.yaml and `vars`, `foreach` and
    `matrix` stages as `name@key`), by name. Raises DVC's error when dvc.yaml cannot be resolved."""
    from dvc.dependency.param import ParamsDependency
    from dvc.dvcfile import load_file
    from dvc.fs import LocalFileSystem
    from dvc.repo import Repo
    from dvc.stage.loader import StageLoader

    root = Path(repo).resolve()
    params_file = str(root / PARAMS_FILE)

    def relative(entry) -> str:
        return os.path.relpath(entry.fs_path, root) if entry.is_in_repo else entry.def_path

    # Absolute paths throughout: DVC resolves relative ones from the current directory. `uninitialized` (and
    # an explicit fs, so that the root stays `repo`) also reads a dvc.yaml in a folder without `.dvc/`.
    with Repo(str(root), uninitialized=True, fs=LocalFileSystem()) as dvc:
        dvcfile = load_file(dvc, str(root / DVC_FILE))
        # Without dvc.lock (`dvcfile.stages` would read it): `dvc repro` rewrites it while the stages run.
        return {
            stage.name: DvcStage(
                deps=[relative(dep) for dep in stage.deps if not isinstance(dep, ParamsDependency)],
                outs=[relative(out) for out in stage.outs],
                params=[key for dep in stage.params if dep.fs_path == params_file for key in dep.params],
                cmd=stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd),
            )
            for stage in StageLoader(dvcfile, dvcfile.contents).values()
        }


def generated_paths(stages: dict[str, DvcStage]) -> set[str]:
    """Every file or folder `dvc repro` writes: dvc.lock and each stage's outs, metrics and plots."""
    return {"dvc.lock"}.union(*(stage.outs for stage in stages.values()))


def stage_outputs(stages: dict[str, DvcStage], stage: str) -> list[str]:
    """What `dvc repro` records of one stage: its outs, metrics and plots."""
    return sorted(stages[stage].outs)


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


@dataclass
class Unsent:
    """A tracking call the server did not answer, waiting to be sent again."""

    send: Callable[[], object]
    what: str  # for the warning: "image samples (step 40)", "model ldm-unet", ...
    metric_values: int = 0


class StageRun:
    """The MLflow run of one stage execution. Uses the client with an explicit run id rather than
    MLflow's fluent (thread-local) active run, because Prefect may run tasks on other threads.

    A call the server does not answer (see `server_unavailable`) raises nothing: it joins `unsent`, which is
    sent again in order before a later call (at most every RETRY_INTERVAL_S) and a last time by `close`."""

    def __init__(self, client: MlflowClient, run_id: str, tags: dict[str, str]):
        self.client, self.run_id, self.tags = client, run_id, tags
        self.unsent: list[Unsent] = []
        self.not_done: list[str] = []  # see `not_recorded`
        self.silent_since: str | None = None  # when (and at which step) the server first failed to answer
        self._step: int | None = None
        self._last_failure = 0.0
        self._spool: Path | None = None  # copies of the artifacts in `unsent`, whose originals may be temporary

    def _record(self, call: Unsent) -> bool:
        """Send `call` (after what waits), or queue it when the server does not answer; True when sent."""
        if self.unsent and not self.send_unsent(wait=True):
            self.unsent.append(call)
            return False
        try:
            call.send()
        except Exception as e:
            if not server_unavailable(e):
                raise
            self._failed()
            self.unsent.append(call)
            return False
        return True

    def _failed(self) -> None:
        self._last_failure = time.monotonic()
        if self.silent_since is None:
            step = f" (step {self._step})" if self._step is not None else ""
            self.silent_since = time.strftime("%H:%M:%S") + step

    def send_unsent(self, wait: bool = False) -> bool:
        """Send what waits, in order, until a call fails; True when nothing is left. With `wait`, tries only
        when RETRY_INTERVAL_S have passed since the last failure: a dead server costs each call nothing."""
        if wait and time.monotonic() - self._last_failure < RETRY_INTERVAL_S:
            return False
        while self.unsent:
            try:
                self.unsent[0].send()
            except Exception:  # noqa: BLE001 - whatever the reason, it stays queued and is reported
                self._failed()
                return False
            self.unsent.pop(0)
        return True

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> bool:
        """True when sent, False when queued (as for the other calls)."""
        timestamp = int(1000 * time.time())
        metrics = [Metric(k, float(v), timestamp, step or 0) for k, v in values.items()]
        self._step = step if step is not None else self._step
        send = partial(self.client.log_batch, self.run_id, metrics=metrics)
        return self._record(Unsent(send, f"{len(metrics)} metric values", len(metrics)))

    def log_image(self, key: str, image, step: int) -> bool:
        """A PIL image at `step`; the MLflow UI shows a key's images with a step slider."""
        self._step = step
        send = partial(self.client.log_image, self.run_id, image, key=key, step=step)
        return self._record(Unsent(send, f"image {key} (step {step})"))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> bool:
        def upload(source: Path) -> None:
            if source.is_dir():
                self.client.log_artifacts(self.run_id, str(source), artifact_path or source.name)
            else:
                self.client.log_artifact(self.run_id, str(source), artifact_path)

        what = f"artifact {artifact_path or path.name}" if path.is_dir() else f"artifact {path.name}"
        if self._record(Unsent(partial(upload, path), what)):
            return True
        self.unsent[-1] = Unsent(partial(upload, self._keep(path)), what)
        return False

    def _keep(self, path: Path) -> Path:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="ldm-unsent-"))
        kept = Path(tempfile.mkdtemp(dir=self._spool)) / path.name
        if path.is_dir():
            shutil.copytree(path, kept)
        else:
            shutil.copy2(path, kept)
        return kept

    def log_dataset(self, path: Path, digest: str, rows: int | None) -> bool:
        """The dataset the run reads, as an MLflow dataset input (the run page's "Datasets"): named by its
        folder, with DVC's hash of it as the digest, so a run's data is matched to dvc.lock by eye."""
        dataset = Dataset(
            name=path.name, digest=digest, source_type="local", source=json.dumps({"uri": path.resolve().as_uri()}),
            profile=json.dumps({"rows": rows}) if rows is not None else None,
        )
        send = partial(self.client.log_inputs, self.run_id, datasets=[DatasetInput(dataset)])
        return self._record(Unsent(send, f"dataset input {path.name}"))

    def register_model(self, model_dir: Path, name: str, artifact_path: str = "model") -> str | None:
        """Log the model folder as one of the run's logged models (MLflow 3's LoggedModel, named
        `artifact_path`: the run page lists it under "Logged models", and `runs:/<run>/<artifact_path>` still
        reads it) and add it to the registry as a new version of `name` linked to it, carrying the
        run's lineage tags (git commit, stage, dependency hashes, the stage's params as JSON): with them,
        `git checkout <commit>` + `dvc repro <stage>` rebuilds it; returns the version, or None when the
        registration waits in `unsent` (a copy of the folder waits with it)."""
        tags = {k: v for k, v in self.tags.items() if not k.startswith("mlflow.")}
        created: dict[str, str] = {}  # the logged model made by a try the server broke off, reused by the next
        versions = []

        def log_and_register(source: Path) -> None:
            if "model_id" not in created:
                experiment_id = self.client.get_run(self.run_id).info.experiment_id
                logged = self.client.create_logged_model(
                    experiment_id, name=artifact_path, source_run_id=self.run_id, tags=tags
                )
                created.update(model_id=logged.model_id, location=logged.artifact_location)
            model_id = created["model_id"]
            self.client.log_model_artifacts(model_id, str(source))
            self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, self._step or 0)])
            try:
                self.client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            # The source is where the artifacts lie: a `models:/<id>` source would be resolved by the registry
            # against the default tracking URI, which need not be this client's.
            version = self.client.create_model_version(
                name, created["location"], run_id=self.run_id, tags=tags, model_id=model_id
            )
            # The logged model's page links to its registered versions by this tag, as mlflow.register_model sets it.
            self.client.set_logged_model_tags(model_id, {
                MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": str(version.version)}])
            })
            versions.append(str(version.version))  # the client gives an int; URIs and the REST API use strings

        what = f"registration of model {name}"
        if not self._record(Unsent(partial(log_and_register, model_dir), what)):
            self.unsent[-1] = Unsent(partial(log_and_register, self._keep(model_dir)), what)
        return versions[0] if versions else None

    def not_recorded(self, what: str) -> None:
        """Note tracking work done beside this class (e.g. with `client` itself) that failed for want of the
        server: it is named in the warning."""
        self.not_done.append(what)
        self._failed()

    def close(self, status: str) -> None:
        """End the run as `status` (FINISHED, FAILED) after a last try to send what waits; what the server
        still did not take stays in `unsent`."""
        self.send_unsent()
        self._record(Unsent(partial(self.client.set_terminated, self.run_id, status), f"run status {status}"))
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)

    def incomplete(self, outputs: list[str] | None) -> str | None:
        """The one warning about what this run lacks (None when nothing): `outputs`, the stage's outputs, are
        named as complete on disk (None: the stage failed)."""
        if not self.unsent and not self.not_done:
            return None
        metric_values = sum(call.metric_values for call in self.unsent)
        lost = [f"{metric_values} metric values"] if metric_values else []
        lost += [call.what for call in self.unsent if not call.metric_values] + self.not_done
        complete = f"; the stage's outputs on disk are complete: {', '.join(outputs)}" if outputs else ""
        server = redacted(self.client.tracking_uri)
        return (
            f"the MLflow tracking server {server} stopped answering at {self.silent_since}; not recorded in its "
            f"run {self.run_id}: {', '.join(lost)}{complete}"
        )


def pipeline_experiment(client: MlflowClient, repo: Path) -> str:
    """The id of the experiment every pipeline run goes to, created on first use, of MLflow 3's model-training
    kind: untagged, the UI opens it in its GenAI view, without the runs' charts and comparisons."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        # The local store keeps artifacts beside it; a server decides for itself where they go.
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else (repo / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_KIND)
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND[EXPERIMENT_KIND_TAG]:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND[EXPERIMENT_KIND_TAG])
    return experiment_id


def dataset_read(stages: dict[str, DvcStage], stage: str) -> str | None:
    """The dependency path of the dataset `stage` reads: for ingest its source (its one dep outside the code),
    for the stages that read ingest's output that output; None for the others."""
    ingest = stages.get("ingest")
    if ingest is None:
        return None
    if stage == "ingest":
        return next((d for d in ingest.deps if not d.startswith(CODE_FOLDERS)), None)
    return next((out for out in ingest.outs if out in stages[stage].deps), None)


def dataset_rows(path: Path) -> int | None:
    """The rows of an ingested dataset (its manifest's count); None for a source ingest has not read yet."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return None
    return sum(shard["rows"] for shard in json.loads(manifest.read_text())["shards"])


def warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def closing_run(client: MlflowClient, run_id: str, warn: Callable[[str], object] = warn_on_stderr) -> Iterator[None]:
    """Mark the run FINISHED when the block completes, FAILED when it raises (or is interrupted). A server that
    does not answer by then costs a warning, not the block's work."""
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield
        status = RunStatus.to_string(RunStatus.FINISHED)
    finally:
        try:
            client.set_terminated(run_id, status)
        except Exception as e:
            if not server_unavailable(e):
                raise
            warn(f"the MLflow tracking server {redacted(client.tracking_uri)} is not answering: run {run_id} "
                 f"could not be marked {status}")


@contextmanager
def stage_run(
    repo: Path, stage: str, stages: dict[str, DvcStage], params: dict, profile: str,
    warn: Callable[[str], object] = warn_on_stderr,
) -> Iterator[StageRun]:
    """Open the stage's MLflow run with its tags and params; close it FINISHED or FAILED, then `warn` about
    what the server did not take, if anything (StageRun.incomplete)."""
    mlflow.set_tracking_uri(tracking_uri(repo))
    client = tracking_client(repo)
    experiment_id = pipeline_experiment(client, repo)
    if stage not in stages:
        raise KeyError(f"{DVC_FILE} has no stage {stage!r}; stages: {sorted(stages)}")
    definition = stages[stage]
    commit = git_commit(repo, generated_paths(stages))
    tags = {
        "mlflow.runName": stage,
        # What the run page shows as its Source: the command DVC runs for the stage, at this commit.
        "mlflow.source.name": definition.cmd or f"dvc repro {stage}",
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "dvc_stage": stage,
        "profile": profile,
        # The values of the params keys dvc.yaml lists for the stage, as dvc.lock records them.
        "params": json.dumps(params, sort_keys=True, separators=(",", ":")),
        **{f"dvc_dep.{dep}": md5 for dep, md5 in dependency_hashes(repo, definition.deps).items()},
    }
    if parent_run := os.environ.get(MLFLOW_PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent_run
    run = client.create_run(experiment_id, tags=tags, run_name=stage)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(params).items()])
    tracked = StageRun(client, run.info.run_id, tags)
    if (dataset := dataset_read(stages, stage)) and (digest := tags.get(f"dvc_dep.{dataset}")):
        tracked.log_dataset(repo / dataset, digest, dataset_rows(repo / dataset))
    finished = False
    try:
        yield tracked
        finished = True
    finally:
        tracked.close(RunStatus.to_string(RunStatus.FINISHED if finished else RunStatus.FAILED))
        if report := tracked.incomplete(stage_outputs(stages, stage) if finished else None):
            warn(report)
