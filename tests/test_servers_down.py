"""A tracking or orchestration server that is down, or goes down mid-run: the stage stops before any work with
the command that starts the server, or it keeps its work and states what tracking it lost. Real servers
(tests/servers.py) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import mlflow
import pytest
import urllib3.util.connection
from mlflow import MlflowClient
from PIL import Image
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import pipeline, servers
from flows.tracking import HTTP_RETRY_DEFAULTS, DvcStage, stage_run
from tests.servers import free_port, mlflow_server, prefect_server

REPO = Path(__file__).resolve().parents[1]
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}

# A stage flow whose stage, once its output is written, waits until the test has stopped the Prefect server.
PROBE_FLOW = '''
import time
import urllib.error
from pathlib import Path

from prefect import flow

from flows.stage_flow import main, run_stage
from stages.reporting import StageResult


def outlive_the_server(params, reporter):
    Path("models/m").mkdir(parents=True)
    Path("models/m/weights.bin").write_bytes(b"trained")
    Path("started").touch()
    while not Path("server-gone").exists():
        time.sleep(0.1)
    return StageResult(metrics={"loss": 0.25}, model_dir=Path("models/m"))


@flow(name="probe")
def probe(params: str = "params.yaml"):
    return run_stage("probe", outlive_the_server, params)


if __name__ == "__main__":
    main(probe)
'''


def _environment(tmp_path: Path, **servers: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    return {**env, **QUIET, "PREFECT_HOME": str(tmp_path / "prefect"), **servers}


def test_a_stage_whose_mlflow_server_is_down_stops_at_once_naming_it_and_how_to_start_it(tmp_path):
    shutil.copy2(REPO / "configs" / "ci.yaml", tmp_path / "params.yaml")
    port = free_port()
    # MLflow's own minute-long retries (values the user set win over the stage's short ones): had the stage made
    # a single tracking call before its check, it would still be retrying when the generous timeout (a guard
    # against a hang only) ends it.
    env = {**_environment(tmp_path, MLFLOW_TRACKING_URI=f"http://ci:s3cret@127.0.0.1:{port}"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}
    done = subprocess.run([sys.executable, "-m", "flows.ingest"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)

    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        f"error: the MLflow tracking server at http://ci:***@127.0.0.1:{port} is not answering (connection refused); "
        f"start it with `mlflow server --host 127.0.0.1 --port {port} --backend-store-uri sqlite:///mlflow.db`, "
        "or unset MLFLOW_TRACKING_URI"
    ), line
    assert "s3cret" not in done.stdout + done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()  # no work was done


def test_a_silent_server_costs_one_health_check_each_not_retries(monkeypatch):
    """The check before any work asks each named server once, with a short timeout, and asks nothing else."""
    mlflow_port, prefect_port = free_port(), free_port()
    asked = []

    def refused(url, timeout):
        asked.append((url, timeout))
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(servers.urllib.request, "urlopen", refused)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ci:s3cret@127.0.0.1:{mlflow_port}")
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{prefect_port}/api"}):
        problems = servers.silent_servers()
    assert asked == [(f"http://127.0.0.1:{mlflow_port}/health", servers.HEALTH_TIMEOUT_S),
                     (f"http://127.0.0.1:{prefect_port}/api/health", servers.HEALTH_TIMEOUT_S)]
    assert [p.split(" is not answering (")[1].split(")")[0] for p in problems] == ["connection refused"] * 2


def test_the_pipeline_whose_prefect_server_is_down_stops_at_once_naming_it_and_how_to_start_it(
    tmp_path, monkeypatch, capsys
):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    monkeypatch.setattr(sys, "argv", ["pipeline", "--repo", str(tmp_path)])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's SIGTERM handler is not for pytest
    with temporary_settings({PREFECT_API_URL: api}), pytest.raises(SystemExit) as exit:
        pipeline.main()
    assert exit.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"error: the Prefect server at {api} is not answering (connection refused); start it with "
        f"`prefect server start --host 127.0.0.1 --port {port}`, or unset PREFECT_API_URL"
    ), line


def test_an_mlflow_server_going_down_mid_run_costs_the_stage_its_tracking_not_its_work(tmp_path, monkeypatch):
    for name, value in {**QUIET, **HTTP_RETRY_DEFAULTS}.items():  # as the stage sets them, undone after the test
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # stage_run sets it
    port, root = free_port(), tmp_path / "mlflow"
    stages = {"train": DvcStage(deps=[], outs=["models/m", "metrics/train.json"], params=[])}
    model = tmp_path / "packaged"  # a model packaged into a temporary folder, as text2img_model does
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w" * 1000)
    lost_warnings, resumed_warnings = [], []
    with mlflow_server(root, port) as env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        lost_run = stage_run(tmp_path, "train", stages, {"lr": 0.1}, "ci", warn=lost_warnings.append)
        resumed_run = stage_run(tmp_path, "train", stages, {"lr": 0.1}, "ci", warn=resumed_warnings.append)
        lost, resumed = lost_run.__enter__(), resumed_run.__enter__()
        assert lost.log_metrics({"loss": 1.0}, step=1) and resumed.log_metrics({"loss": 1.0}, step=1)

    # A dead server costs seconds, not MLflow's minutes of retries: count the connections tried to it. The first
    # call that fails tries 1 + MLFLOW_HTTP_REQUEST_MAX_RETRIES (2) times; the calls after it, queued within
    # RETRY_INTERVAL_S, try none; the run's end tries once more (one request).
    tried = []
    connect = urllib3.util.connection.create_connection

    def counted(address, *args, **kwargs):
        if address[1] == port:
            tried.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counted)
    assert not lost.log_metrics({"loss": 0.5}, step=2)
    first_failure = len(tried)
    assert first_failure == 1 + int(HTTP_RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert not lost.log_metrics({"loss": 0.4}, step=3)
    assert not lost.log_image("grid", Image.new("RGB", (8, 8)), step=3)
    assert lost.register_model(model, "ldm-test") is None
    assert len(tried) == first_failure  # queued: not one connection more
    lost_run.__exit__(None, None, None)  # the stage ends with the server still down
    assert len(tried) <= 2 * first_failure  # the last try: one request, stopped at the first failure
    for step, loss in ((2, 0.5), (3, 0.4)):
        assert not resumed.log_metrics({"loss": loss}, step=step)
    assert resumed.register_model(model, "ldm-test") is None
    assert len(tried) <= 3 * first_failure
    monkeypatch.setattr(urllib3.util.connection, "create_connection", connect)
    shutil.rmtree(model)  # the temporary folder goes; a copy of it waits to be sent

    [warning] = lost_warnings
    assert warning.startswith(f"the MLflow tracking server http://127.0.0.1:{port} stopped answering at ")
    assert "(step 2)" in warning
    for item in ("2 metric values", "image grid (step 3)", "registration of model ldm-test",
                 "run status FINISHED", "the stage's outputs on disk are complete: metrics/train.json, models/m"):
        assert item in warning, warning

    with mlflow_server(root, port) as env:  # back, with the same store
        resumed_run.__exit__(None, None, None)  # the last try, at the end of the stage, sends what waited
        assert resumed_warnings == []
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        history = sorted((m.step, m.value) for m in client.get_metric_history(resumed.run_id, "loss"))
        assert history == [(1, 1.0), (2, 0.5), (3, 0.4)]
        assert client.get_run(resumed.run_id).info.status == "FINISHED"
        [version] = client.search_model_versions("name='ldm-test'")
        assert version.run_id == resumed.run_id
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=resumed.run_id, artifact_path="model", dst_path=str(tmp_path / "downloaded"),
            tracking_uri=env["MLFLOW_TRACKING_URI"],
        )
        assert (Path(downloaded) / "weights.bin").read_bytes() == b"w" * 1000
        assert client.get_run(lost.run_id).info.status == "RUNNING"
        assert [m.step for m in client.get_metric_history(lost.run_id, "loss")] == [1]


def test_a_prefect_server_going_down_mid_run_leaves_the_stage_done_and_exiting_0(tmp_path):
    shutil.copy2(REPO / "configs" / "ci.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  probe:\n    cmd: python probe.py\n    outs:\n      - models/m\n")
    (tmp_path / "probe.py").write_text(PROBE_FLOW)
    with prefect_server(tmp_path / "prefect") as prefect_env:
        # No retries of the flow run's last state: the stage costs seconds less, the outcome is the same.
        env = {**_environment(tmp_path, **prefect_env), "PREFECT_CLIENT_MAX_RETRIES": "0"}
        process = subprocess.Popen([sys.executable, "probe.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while not (tmp_path / "started").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
    (tmp_path / "server-gone").touch()
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 0, stderr[-3000:]
    api = prefect_env["PREFECT_API_URL"]
    [warning] = [line for line in stderr.splitlines() if line.startswith("warning: the Prefect server")]
    assert warning.startswith(f"warning: the Prefect server at {api} stopped answering (connection refused) while "
                              "stage probe ran: its work is done and its outputs are on disk (models/m)")
    assert (tmp_path / "models" / "m" / "weights.bin").read_bytes() == b"trained"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("ldm-pipeline").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.25}
