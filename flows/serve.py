"""`python -m flows.serve [--name ldm-pipeline] [--repo .]`: serve the pipeline flow (`flows/pipeline.py`) as a
deployment of the running Prefect server, so that the whole pipeline can be started from the Prefect UI
(Deployments -> ldm-pipeline -> Run -> Custom run: set_params, targets, force) or its API.

Needs a Prefect server and `PREFECT_API_URL` pointing at it:

    prefect server start --host 127.0.0.1 --port 4200 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve

The process keeps running and executes the triggered runs itself (one at a time: DVC locks the repository),
in subprocesses, in the repository given by --repo (default: the working directory). Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

START_SERVER = (
    "start one with `prefect server start --host 127.0.0.1 --port 4200` and "
    "`export PREFECT_API_URL=http://127.0.0.1:4200/api`"
)


def check_server(api_url: str | None) -> None:
    """Exit with a one-line explanation unless a Prefect server answers at `api_url`."""
    if not api_url:
        sys.exit(f"error: PREFECT_API_URL is not set, and a deployment needs a running Prefect server: {START_SERVER}")
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=10) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except OSError as e:
        problem = str(getattr(e, "reason", e))
    sys.exit(f"error: no Prefect server answers at PREFECT_API_URL={api_url} ({problem}); {START_SERVER}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the DVC pipeline as a Prefect deployment.")
    parser.add_argument("--name", default="ldm-pipeline", help="deployment name (default: ldm-pipeline)")
    parser.add_argument("--repo", default=".", help="repository the runs reproduce (default: the working directory)")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    if not (repo / "dvc.yaml").is_file():
        sys.exit(f"error: {repo} has no dvc.yaml; pass --repo the repository root")

    from prefect.settings import (
        PREFECT_API_URL,  # a value from a Prefect profile counts too
    )

    check_server(PREFECT_API_URL.value())

    from flows.pipeline import pipeline

    pipeline.serve(
        name=args.name,
        parameters={"repo": str(repo)},
        limit=1,  # one pipeline run at a time: DVC would refuse a second one (its repository lock)
        tags=["ldm"],
        description="Reproduce the DVC pipeline (stale stages only); set_params runs `dvc exp run --set-param`.",
    )


if __name__ == "__main__":
    main()
