"""The MLflow tracking path as it runs beyond one machine: a real `mlflow server` whose backend store is PostgreSQL
and whose artifacts it serves itself (proxied, as an object store looks to clients), with a real stage flow
tracking into it. PostgreSQL comes from Debian's `postgresql` package and is started by the test on 127.0.0.1."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text

from stages import ingest
from tests.ci_stages import RecordingReporter, ci_params
from tests.servers import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[1]
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres", "createdb")
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def postgres_bin_dir() -> Path | None:
    """The folder holding the PostgreSQL server binaries: the one of `pg_ctl` on PATH, else Debian's newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH)."""
    on_path = shutil.which("pg_ctl")
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda bin_dir: int(bin_dir.parent.name) if bin_dir.parent.name.isdigit() else 0, reverse=True)
    for candidate in ([Path(on_path).resolve().parent] if on_path else []) + debian:
        if all((candidate / name).is_file() for name in SERVER_BINARIES):
            return candidate
    return None


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own on 127.0.0.1 with an empty database; yields its SQLAlchemy URI."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in "
                    "/usr/lib/postgresql/*/bin: install Debian's `postgresql` package")
    as_server_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the system user Debian's package creates
        try:
            server_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, PostgreSQL needs the `postgres` system user: install Debian's `postgresql` "
                        "package")
        as_server_user = ["runuser", "-u", "postgres", "--"]

    # Not under pytest's tmp_path: as root that is a folder the server user cannot enter, and its long name would
    # not fit a unix socket path (107 bytes).
    with tempfile.TemporaryDirectory(prefix="ldm-postgres-") as root:
        root_dir, data, port = Path(root), Path(root) / "data", free_port()
        if as_server_user:
            os.chown(root_dir, server_user.pw_uid, server_user.pw_gid)

        def server_command(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*as_server_user, *args], cwd=root_dir, capture_output=True, text=True)

        # -U: the same superuser name whoever runs initdb; --no-sync: a throw-away cluster need not reach the disk.
        created = server_command(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                                 "--no-sync")
        assert created.returncode == 0, created.stdout + created.stderr
        with open(data / "postgresql.conf", "a") as conf:
            # fsync off: MLflow's schema migrations write a lot, and nothing here has to survive a crash.
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root_dir}'\n"
                       "fsync = off\n")
        (data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")  # no password, from 127.0.0.1 only
        log = root_dir / "server.log"
        try:
            started = server_command(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "start")
            assert started.returncode == 0, started.stdout + started.stderr + (log.read_text() if log.exists() else "")
            subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
                           check=True, capture_output=True)
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
        finally:
            # Also after a failed start: whatever postgres process it left must not outlive the test.
            server_command(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")


def test_a_stage_tracks_into_an_mlflow_server_backed_by_postgresql(postgres, tmp_path):
    artifacts = tmp_path / "mlflow" / "artifacts"

    # The ci profile's ingested data, for the cheapest stage that logs params, metrics and artifacts and
    # registers a model: train_vae.
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    shutil.copy2(REPO / "dvc.yaml", workspace / "dvc.yaml")
    shutil.copy2(REPO / "configs" / "ci.yaml", workspace / "params.yaml")
    ingest.run(ci_params(workspace), RecordingReporter())

    # The stage's own Prefect (a temporary server in PREFECT_HOME), this test's MLflow server.
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    with mlflow_server(tmp_path / "mlflow", backend_store_uri=postgres) as tracking:
        env = {**inherited, **QUIET, "PREFECT_HOME": str(tmp_path / "prefect"), **tracking}
        done = subprocess.run([sys.executable, "-m", "flows.train_vae", "--params", "params.yaml"], cwd=workspace,
                              env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "not recorded" not in done.stderr  # the server took every call

    engine = create_engine(postgres)
    try:
        with engine.connect() as db:
            [(run_id, status, experiment_id)] = db.execute(text(
                "SELECT run_uuid, status, experiment_id FROM runs WHERE name = 'train_vae'")).all()
            params = dict(db.execute(
                text("SELECT key, value FROM params WHERE run_uuid = :run"), {"run": run_id}).all())
            final_metrics = dict(db.execute(text(
                "SELECT key, value FROM latest_metrics WHERE run_uuid = :run AND step = 0"), {"run": run_id}).all())
            loss_steps = db.execute(text(
                "SELECT step FROM metrics WHERE run_uuid = :run AND key = 'loss' ORDER BY step"), {"run": run_id}
            ).scalars().all()
            [(version_run_id, source)] = db.execute(text(
                "SELECT run_id, source FROM model_versions WHERE name = 'ldm-vae' AND version = 1")).all()
            [(model_id, model_name, location)] = db.execute(text(
                "SELECT model_id, name, artifact_location FROM logged_models WHERE source_run_id = :run"),
                {"run": run_id}).all()
    finally:
        engine.dispose()

    ci = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    assert status == "FINISHED"
    assert params["seed"] == str(ci["seed"])
    assert params["train_vae.max_steps"] == str(ci["train_vae"]["max_steps"])
    assert final_metrics == json.loads((workspace / "metrics" / "train_vae.json").read_text())
    assert loss_steps[-1] == ci["train_vae"]["max_steps"]  # the per-step curve, not only the final values
    # The VAE is the run's logged model, and the registered version is made from its artifacts.
    assert version_run_id == run_id and model_name == "model" and source == location
    assert location == f"mlflow-artifacts:/{experiment_id}/models/{model_id}/artifacts"

    # Proxied artifacts: the server wrote them under its destination, by experiment, then run or logged model.
    run_artifacts = artifacts / str(experiment_id) / run_id / "artifacts"
    vae = workspace / "models" / "vae" / "model.safetensors"
    model_artifacts = artifacts / str(experiment_id) / "models" / model_id / "artifacts"
    assert (model_artifacts / "model.safetensors").read_bytes() == vae.read_bytes()
    assert (run_artifacts / "loss.csv").is_file()
    # Nothing was tracked locally beside the server.
    assert not [name for name in ("mlflow.db", "mlruns", "mlartifacts") if (workspace / name).exists()]
