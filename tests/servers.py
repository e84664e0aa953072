"""Real Prefect and MLflow servers on 127.0.0.1 for end-to-end tests, started and stopped by the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

BIN = Path(sys.executable).parent


def use_tracking_store(mp, uri: str) -> None:
    """Point this process's MLflow at `uri` through the environment, as a served or CLI process finds it: a URI
    set in-process earlier (mlflow.set_tracking_uri) would win over the environment, so it is cleared."""
    import mlflow

    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    mp.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def prefect_client(api: str) -> Iterator[SyncPrefectClient]:
    """Prefect's own (sync) client for the server at `api`. A busy server (its SQLite database locked while a flow
    run writes its logs and states) answers 503: the client (prefect/client/base.py, PrefectHttpxSyncClient.send)
    retries 429, 502, 503 and 408 (plus PREFECT_CLIENT_RETRY_EXTRA_CODES), timeouts and dropped connections, up
    to PREFECT_CLIENT_MAX_RETRIES times (default 5), after 2, 4, 8, 16, 32 s (+-20% jitter) or what a
    Retry-After header asks."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


@contextmanager
def _server(cmd: list[str], health_url: str, env: dict, log: Path, timeout: float) -> Iterator[None]:
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_healthy(health_url, process, log, timeout)
        yield
    finally:
        # The whole process group: both servers start workers of their own. A server that failed to start
        # has already exited; its error (raised above) is the one to report.
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """Yields the environment that points a process at the server."""
    port = free_port()
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    home.mkdir(parents=True, exist_ok=True)
    with _server(cmd, f"http://127.0.0.1:{port}/api/health", env, home / "server.log", timeout=90):
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}


@contextmanager
def mlflow_server(root: Path, port: int | None = None, backend_store_uri: str | None = None) -> Iterator[dict[str, str]]:
    """Yields the environment that points a process at the server; given the `port` and `root` of an earlier
    one, it is that server again, with its store. The store is `backend_store_uri`, by default a SQLite file
    in `root`; artifacts go to `root / "artifacts"`."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    with _server(cmd, f"http://127.0.0.1:{port}/health", env, root / "server.log", timeout=120):
        yield {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_DISABLE_TELEMETRY": "true"}
