"""Running a pipeline stage as a Prefect flow with its MLflow run: the part every stage flow shares.

A stage flow is: validate params (task) -> run the stage (task, progress and per-step metrics streamed to
the Prefect log and MLflow) -> record its results (task: metrics, artifacts, registered model).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.tracking import StageRun, dotted_get, pipeline_stages, stage_run
from stages.params import DEFAULT_PARAMS_FILE, Params, ParamsError, load_params
from stages.reporting import ConsoleReporter, Reporter, StageResult

REPO = Path.cwd()  # DVC runs every stage command from the repository root

StageFn = Callable[[Params, Reporter], StageResult]


class FlowReporter:
    """Sends a stage's reports to the terminal (progress bar), the Prefect run log and the MLflow run."""

    def __init__(self, tracked: StageRun):
        self.tracked = tracked
        self.logger = get_run_logger()
        self.console = ConsoleReporter(logger=self.logger, lines_on_terminal=True)

    def info(self, message: str) -> None:
        self.logger.info(message)

    def progress(self, task: str, done: int, total: int) -> None:
        self.console.progress(task, done, total)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.tracked.log_metrics(values, step)
        if step is None:
            self.logger.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in values.items()))


# Stage inputs (params objects, live clients) are not hashable inputs of a cache key, and a stage must
# really run each time DVC asks for it: no Prefect caching.
@task(name="validate params", cache_policy=NO_CACHE)
def validate_params(path: str) -> Params:
    return load_params(path)


def stage_params(params: Params, keys: list[str]) -> dict:
    """The values of the params keys dvc.yaml lists for a stage (dotted keys allowed)."""
    dumped = params.model_dump(mode="json")
    return {key: dotted_get(dumped, key) for key in keys}


@task(name="record results", cache_policy=NO_CACHE)
def record_results(tracked: StageRun, result: StageResult, registered_model: str | None) -> None:
    logger = get_run_logger()
    tracked.log_metrics(result.metrics)
    for path in result.artifacts:
        tracked.log_artifact(Path(path))
    if registered_model and result.model_dir is not None:
        version = tracked.register_model(Path(result.model_dir), registered_model)
        logger.info("registered %s version %s", registered_model, version)


def run_stage(stage: str, stage_fn: StageFn, params_path: str, registered_model: str | None = None) -> StageResult:
    """The body of every stage flow."""
    params = validate_params(params_path)
    stages = pipeline_stages(REPO, params.model_dump(mode="json"))
    logged = stage_params(params, stages.get(stage, {}).get("params", []))
    with stage_run(REPO, stage, stages, logged, params.profile) as tracked:
        result = task(name=stage, cache_policy=NO_CACHE)(stage_fn)(params, FlowReporter(tracked))
        record_results(tracked, result, registered_model)
    return result


def main(flow_fn: Callable[[str], StageResult]) -> None:
    """`python -m flows.<stage> [--params PATH]`: a user mistake exits with one line, not a traceback."""
    parser = argparse.ArgumentParser(description=f"Run the {flow_fn.__name__} stage as a Prefect flow.")
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args()
    try:
        load_params(args.params)  # fail before Prefect and MLflow spend their start-up time
    except ParamsError as e:
        sys.exit(f"error: {e}")
    flow_fn(args.params)
