"""The servers a stage reports to, when the environment names them: an MLflow tracking server
(`MLFLOW_TRACKING_URI` http(s)://...) and a Prefect server (`PREFECT_API_URL`).

Checked before any work: against a server that is down, MLflow and Prefect would each retry for minutes and
then fail with a traceback, possibly in the middle of training. Once the work has started, losing a server
no longer stops it (flows/tracking.py `StageRun`, flows/stage_flow.py `main`).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from contextlib import AbstractContextManager, nullcontext
from urllib.parse import urlsplit, urlunsplit

from ldm.urls import redacted  # a server URL may carry `user:password@`, which no message may show

HEALTH_TIMEOUT_S = 5


def no_answer(url: str) -> str | None:
    """Why GET `url` got no answer ("connection refused", "no answer within 5 s", "HTTP 503"), or None when
    the server answered: any status below 500 (a 401 or a 404 comes from a running server)."""
    parts = urlsplit(url)
    # urllib takes no user info in a URL; a health check needs no credentials.
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    try:
        with urllib.request.urlopen(bare, timeout=HEALTH_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}" if e.code >= 500 else None
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, TimeoutError):
            return f"no answer within {HEALTH_TIMEOUT_S} s"
        return reason.strerror.lower() if isinstance(reason, OSError) and reason.strerror else str(reason)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


def prefect_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL  # Prefect's own resolution: environment, then profile

    return PREFECT_API_URL.value()


def silent_servers() -> list[str]:
    """One line for each server the environment names that does not answer: which, why, how to start it."""
    problems = []
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")) and (why := no_answer(uri.rstrip("/") + "/health")):
        host, port = _host_port(uri)
        problems.append(
            f"the MLflow tracking server at {redacted(uri)} is not answering ({why}); start it with `mlflow server "
            f"--host {host} --port {port} --backend-store-uri sqlite:///mlflow.db`, or unset MLFLOW_TRACKING_URI to "
            "track into the local mlflow.db"
        )
    api = prefect_api_url()
    if api and (why := no_answer(api.rstrip("/") + "/health")):
        host, port = _host_port(api)
        problems.append(
            f"the Prefect server at {redacted(api)} is not answering ({why}); start it with `prefect server start "
            f"--host {host} --port {port}`, or unset PREFECT_API_URL to use a temporary local server"
        )
    return problems


def require_servers() -> None:
    """Exit with status 2 and one line per silent server (see `silent_servers`) on stderr."""
    problems = silent_servers()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(2)


def few_prefect_retries() -> AbstractContextManager:
    """Prefect's client retries a call 5 times with exponential backoff, a minute or more per call to a dead
    server; 2 retries still ride out a blip. A value the user set wins."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    if "PREFECT_CLIENT_MAX_RETRIES" in os.environ:
        return nullcontext()
    return temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 2})
