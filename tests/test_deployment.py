"""The whole pipeline started from the Prefect API, as from the UI: `python -m flows.serve` in a copy of this repo
(ci profile) against real Prefect and MLflow servers, one deployment run with overrides, then DVC's, Prefect's
and MLflow's records of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort
from prefect.states import Cancelling

from flows.pipeline import (
    MLFLOW_PARENT_RUN_ENV,
    PIPELINE_FLOW_RUN_ENV,
    apply_overrides,
    check_overrides,
    dvc_command,
)
from flows.tracking import pipeline_stages
from stages.params import ParamsError, load_params
from tests.ci_stages import CI_PARAMS, REPO, copy_repo
from tests.servers import mlflow_server, prefect_client, prefect_server

DEPLOYMENT = "ldm-pipeline"
# The stages to reproduce: train_vae and the stage before it, enough to show the deployment's path through
# Prefect, DVC and MLflow (test_pipeline_e2e.py runs every stage); or those DEPLOYMENT_TEST_TARGETS names
# (space-separated; "all" for the whole pipeline) and the stages they depend on.
_TARGETS = os.environ.get("DEPLOYMENT_TEST_TARGETS", "train_vae").split()
TARGETS = None if _TARGETS == ["all"] else _TARGETS
OVERRIDES = ["train_vae.max_steps=20", "seed=1"]  # fewer steps than the ci profile's 30: a shorter run
RUN_TIMEOUT = 900  # the ci pipeline takes 2-4 min on 2 busy cores; generous
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _logs(client, flow_run_id: str) -> list[str]:
    """Every log message of a flow run, oldest first (the API pages at 200)."""
    messages = []
    while True:
        page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])), limit=200,
                                offset=len(messages), sort=LogSort.TIMESTAMP_ASC)
        messages += [log.message for log in page]
        if len(page) < 200:
            return messages


def _dvc_stages(repo: Path) -> list[str]:
    """The stages the run reproduces: dvc.yaml's, or TARGETS and the stages whose outs they depend on."""
    stages = pipeline_stages(repo)
    if not TARGETS:
        return list(stages)

    def upstream(name: str) -> set[str]:
        parents = {other for other in stages for out in stages[other].outs
                   for dep in stages[name].deps if dep == out or dep.startswith(out.rstrip("/") + "/")}
        return {name}.union(*(upstream(parent) for parent in parents))

    return sorted(set().union(*(upstream(target) for target in TARGETS)))


def _wait(condition, timeout: float, what: str, serve: subprocess.Popen, serve_log: Path, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise RuntimeError(f"flows.serve exited with {serve.returncode}:\n{serve_log.read_text()[-4000:]}")
        if (value := condition()) is not None:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not within {timeout:.0f} s; flows.serve's log ends:\n{serve_log.read_text()[-4000:]}")


def _state(client, flow_run_id) -> str:
    return client.read_flow_run(flow_run_id).state.type.value


def _cancel(client, flow_run_id, timeout: float = 45) -> None:
    if _state(client, flow_run_id) in TERMINAL:
        return
    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _state(client, flow_run_id) not in TERMINAL:
        time.sleep(1)


@contextmanager
def _both_servers(root: Path) -> Iterator[tuple[dict, dict]]:
    """The Prefect and MLflow servers, started side by side (each takes several seconds to answer)."""
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        servers = [prefect_server(root / "prefect"), mlflow_server(root / "mlflow")]
        started = [pool.submit(stack.enter_context, server) for server in servers]
        yield tuple(future.result() for future in started)


@pytest.fixture(scope="module")
def deployment_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    repo = root / "repo"
    repo.mkdir()
    copy_repo(repo, CI_PARAMS)
    for key, value in (("user.name", "test"), ("user.email", "test@localhost")):  # `dvc exp run` commits
        subprocess.run(["git", "config", key, value], cwd=repo, check=True)
    with _both_servers(root) as (prefect_env, mlflow_env), prefect_client(prefect_env["PREFECT_API_URL"]) as client:
        env = {
            **{k: v for k, v in os.environ.items() if k not in (PIPELINE_FLOW_RUN_ENV, MLFLOW_PARENT_RUN_ENV)},
            **prefect_env, **mlflow_env,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # pick the triggered run up sooner than the default 10 s
        }
        serve_log = root / "serve.log"
        with open(serve_log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--name", DEPLOYMENT], cwd=repo, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        run = None
        try:
            def deployment():
                found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT])))
                return found[0] if found else None

            deployment = _wait(deployment, 180, "the deployment listed", serve, serve_log)
            assert deployment.parameters["repo"] == str(repo.resolve())
            started = time.monotonic()
            run = client.create_flow_run_from_deployment(deployment.id,
                                                         parameters={"set_params": OVERRIDES, "targets": TARGETS})

            def finished():
                state = client.read_flow_run(run.id).state
                return state if state and state.type.value in TERMINAL else None

            state = _wait(finished, RUN_TIMEOUT, "the pipeline run finished", serve, serve_log, every=2)
            print(f"pipeline run: {time.monotonic() - started:.0f} s from trigger to {state.type.value}")
            assert state.type.value == "COMPLETED", (
                f"{state.type.value}: {state.message}\n" + "\n".join(_logs(client, str(run.id))[-150:])
            )
            yield repo, prefect_env["PREFECT_API_URL"], str(run.id), MlflowClient(mlflow_env["MLFLOW_TRACKING_URI"])
        finally:
            if run is not None and serve.poll() is None:
                _cancel(client, run.id)  # the runner then stops the run, DVC and its stage: none outlives the test
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()


def test_dvc_ran_every_stage_with_the_overrides(deployment_run):
    repo, *_ = deployment_run
    stages = _dvc_stages(repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(stages) <= set(lock)  # the copied dvc.lock holds every stage; these ran again, with the overrides
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["seed"] == 1 and params["train_vae"]["max_steps"] == 20  # `dvc exp run` leaves them applied
    original, written = CI_PARAMS.read_text().splitlines(), (repo / "params.yaml").read_text().splitlines()
    assert len(original) == len(written) and sum(a != b for a, b in zip(original, written)) == len(OVERRIDES)
    assert lock["train_vae"]["params"]["params.yaml"]["train_vae"]["max_steps"] == 20
    assert lock["ingest"]["params"]["params.yaml"]["seed"] == 1
    # ... and recorded the run as a DVC experiment
    refs = subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True, text=True, check=True)
    assert refs.stdout.strip()


def test_each_stage_is_a_subflow_run_with_its_logs(deployment_run):
    repo, api, pipeline_id, _ = deployment_run
    stages = _dvc_stages(repo)
    with prefect_client(api) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(pipeline_id)])))
        by_stage = {flows[r.flow_id]: r for r in children}
        assert sorted(by_stage) == sorted(stages)
        tagged = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"pipeline-run:{pipeline_id}"])))
        assert {r.id for r in tagged} == {r.id for r in children}
        for stage, run in by_stage.items():
            assert run.state.type.value == "COMPLETED", stage
            tracking = client.read_task_run(run.parent_task_run_id)
            assert str(tracking.flow_run_id) == pipeline_id and tracking.name == stage
            assert tracking.state.type.value == "COMPLETED"
            assert any(stage in message for message in _logs(client, str(run.id))), stage
        # DVC's own output streamed into the pipeline run's log
        messages = "\n".join(_logs(client, pipeline_id))
    for stage in stages:
        assert f"Running stage '{stage}'" in messages


def test_stage_runs_are_children_of_the_pipeline_run_in_mlflow(deployment_run):
    repo, _, pipeline_id, client = deployment_run
    experiment = client.get_experiment_by_name("ldm-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect_flow_run_id"] == pipeline_id
    assert parent.data.params["set_params"] == " ".join(OVERRIDES)
    stage_runs = {r.data.tags["dvc_stage"]: r for r in runs if "dvc_stage" in r.data.tags}
    assert sorted(stage_runs) == sorted(_dvc_stages(repo))
    for stage, run in stage_runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
    assert stage_runs["train_vae"].data.params["train_vae.max_steps"] == "20"


# Without servers: how overrides are checked and which DVC command runs.

def test_a_bad_override_fails_before_dvc_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "configs" / "ci.yaml").read_text())
    check_overrides(tmp_path, OVERRIDES)
    with pytest.raises(ParamsError, match=r"train_vae\.max_stepz: unknown key"):
        check_overrides(tmp_path, ["train_vae.max_stepz=20"])
    with pytest.raises(ParamsError, match=r"seed: Input should be a valid integer"):
        check_overrides(tmp_path, ["seed=one"])
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        check_overrides(tmp_path, ["seed"])
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["seed"] == 0  # only a copy was changed


def test_dvc_command():
    assert dvc_command(None, None, False)[1:] == ["-m", "dvc", "repro"]
    assert dvc_command(None, ["train_vae"], True)[3:] == ["repro", "--force", "train_vae"]
    assert dvc_command(["seed=1", "a.b=2"], None, False)[3:] == ["exp", "run"]  # apply_overrides wrote them


def test_overrides_change_only_their_values_in_params_yaml(tmp_path):
    original = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    overrides = ["seed=3", "train_unet.model.block_out_channels=[48,96]", "sample.width=40",
                 "ingest.buckets=[[24,40],[32,32]]", "evaluate.num_prompts=300"]
    check_overrides(tmp_path, overrides)
    apply_overrides(tmp_path, overrides)
    written = (tmp_path / "params.yaml").read_text()
    changed = [(a, b) for a, b in zip(original.splitlines(), written.splitlines()) if a != b]
    assert len(original.splitlines()) == len(written.splitlines()) and len(changed) == len(overrides)
    for before, after in changed:  # each line keeps its comment and layout; only the value moved
        assert before.split(":")[0] == after.split(":")[0]
        assert before.partition("#")[2] == after.partition("#")[2]
    assert "block_out_channels: [48, 96]" in written and "buckets: [[24, 40], [32, 32]]" in written
    params = load_params(tmp_path / "params.yaml")
    assert params.seed == 3 and params.sample.width == 40 and params.evaluate.num_prompts == 300
