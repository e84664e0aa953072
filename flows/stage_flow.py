"""Running a pipeline stage as a Prefect flow with its MLflow run: the part every stage flow shares.

A stage flow is: validate params (task) -> run the stage (task, progress and per-step metrics streamed to
the Prefect log and MLflow) -> record its results (task: metrics, artifacts, registered model).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from uuid import UUID, uuid4

from PIL import Image
from prefect import Flow, Task, get_run_logger, tags, task
from prefect.cache_policies import NO_CACHE

from flows.tracking import StageRun, dotted_get, pipeline_stages, stage_run
from stages.params import DEFAULT_PARAMS_FILE, Params, ParamsError, load_params
from stages.reporting import ConsoleReporter, Reporter, StageResult

REPO = Path.cwd()  # DVC runs every stage command from the repository root

StageFn = Callable[[Params, Reporter], StageResult]
# Set by flows/pipeline.py for the stage commands DVC runs: the pipeline's flow run, which a stage's flow run
# then joins as a subflow run (run_as_subflow).
PIPELINE_FLOW_RUN_ENV = "LDM_PIPELINE_FLOW_RUN_ID"


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

    def image(self, name: str, image: Image.Image, step: int) -> None:
        self.tracked.log_image(name, image, step)
        self.logger.info("step %d: %s image logged to MLflow", step, name)


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


FinishFn = Callable[[StageRun, Params, StageResult], None]


def run_stage(
    stage: str,
    stage_fn: StageFn,
    params_path: str,
    registered_model: str | None = None,
    finish: FinishFn | None = None,
) -> StageResult:
    """The body of every stage flow. `finish`, when given, runs last as a task of its own (named after the
    function) inside the stage's MLflow run: registry work beyond registering `result.model_dir`."""
    params = validate_params(params_path)
    stages = pipeline_stages(REPO, params.model_dump(mode="json"))
    logged = stage_params(params, stages.get(stage, {}).get("params", []))
    with stage_run(REPO, stage, stages, logged, params.profile) as tracked:
        result = task(name=stage, cache_policy=NO_CACHE)(stage_fn)(params, FlowReporter(tracked))
        record_results(tracked, result, registered_model)
        if finish is not None:
            task(name=finish.__name__.replace("_", " "), cache_policy=NO_CACHE)(finish)(tracked, params, result)
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
    pipeline_run = os.environ.get(PIPELINE_FLOW_RUN_ENV)
    if pipeline_run:
        run_as_subflow(flow_fn, {"params": args.params}, pipeline_run)
    else:
        flow_fn(args.params)


def run_as_subflow(flow_fn: Flow, parameters: dict, pipeline_run: str):
    """Run the stage flow as a subflow run of the pipeline's flow run, although DVC started it in another
    process: link it the way Prefect links an in-process subflow, through a tracking task run (named after
    the stage) in the parent flow run that is the stage run's `parent_task_run_id` (the server then mirrors
    the stage run's state onto it). Also tagged `pipeline-run:<id>`. If the link cannot be made (e.g. the
    parent run is unknown to this API), the stage runs unlinked, with the tag, rather than not at all."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    tag = f"pipeline-run:{pipeline_run}"
    try:
        with get_client(sync_client=True) as client:
            tracking = client.create_task_run(
                task=Task(name=flow_fn.name, fn=flow_fn.fn), flow_run_id=UUID(pipeline_run),
                dynamic_key=uuid4().hex, name=flow_fn.name, state=Pending(),
            )
            flow_run = client.create_flow_run(
                flow_fn, parameters=flow_fn.serialize_parameters(parameters), parent_task_run_id=tracking.id,
                tags=[tag],
            )
    except Exception as e:  # noqa: BLE001 - linking is a convenience; the stage must still run
        print(f"warning: could not link to pipeline flow run {pipeline_run}: {e}; running unlinked", file=sys.stderr)
        with tags(tag):
            return flow_fn(**parameters)
    return run_flow(flow_fn, flow_run=flow_run, parameters=parameters)
