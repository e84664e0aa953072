"""Running a pipeline stage as a Prefect flow with its MLflow run: the part every stage flow shares.

A stage flow is: validate params (task) -> run the stage (task, progress and per-step metrics streamed to
the Prefect log and MLflow) -> record its results (task: metrics, artifacts, registered model).

Servers: a server the environment names that is down stops the stage before any work (flows/servers.py).
One that goes down once the stage runs costs it its tracking, never its work: MLflow calls wait in a queue
(flows/tracking.py StageRun), and Prefect, which records task runs without calling its server, fails only
when it reports the flow run's end; `main` then exits 0 with a warning, the stage's outputs being on disk.
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

from flows.servers import few_prefect_retries, no_answer, prefect_api_url, redacted, require_servers
from flows.tracking import StageRun, dotted_get, pipeline_stages, server_unavailable, stage_outputs, stage_run
from ldm.errors import InputError
from ldm.training.checkpoint import NonFiniteLoss, TrainingInterrupted
from ldm.training.distributed import launched_rank
from stages.params import DEFAULT_PARAMS_FILE, Params, ParamsError, load_params
from stages.reporting import ConsoleReporter, Reporter, StageResult, report_stopped_training, start_line

REPO = Path.cwd()  # DVC runs every stage command from the repository root

StageFn = Callable[[Params, Reporter], StageResult]
# Set by flows/pipeline.py for the stage commands DVC runs: the pipeline's flow run, which a stage's flow run
# then joins as a subflow run (run_as_subflow).
PIPELINE_FLOW_RUN_ENV = "LDM_PIPELINE_FLOW_RUN_ID"
# The stages whose work run_stage completed in this process, with their outputs: what lets `main` tell a
# finished stage whose flow run Prefect could not close (its server gone) from a failed one.
_finished_stages: dict[str, list[str]] = {}


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
        if self.tracked.log_image(name, image, step):
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
        if version is not None:  # else it waits for the MLflow server, and the stage's last warning says so
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
    get_run_logger().info(start_line(stage, params.device, params.threads))
    stages = pipeline_stages(REPO)
    logged = stage_params(params, stages[stage].params if stage in stages else [])
    with stage_run(REPO, stage, stages, logged, params.profile, warn=get_run_logger().warning) as tracked:
        result = task(name=stage, cache_policy=NO_CACHE)(stage_fn)(params, FlowReporter(tracked))
        record_results(tracked, result, registered_model)
        if finish is not None:
            name = finish.__name__.replace("_", " ")
            try:
                task(name=name, cache_policy=NO_CACHE)(finish)(tracked, params, result)
            except Exception as e:
                # Registry work on top of results the MLflow server has not taken: without the server it
                # cannot be done, and the stage's outputs are not to be lost for it.
                if not (tracked.unsent or server_unavailable(e)):
                    raise
                tracked.not_recorded(f"{name} (not done)")
    _finished_stages[stage] = stage_outputs(stages, stage)
    return result


def main(flow_fn: Callable[[str], StageResult], stage_main: Callable[[list[str]], int] | None = None) -> None:
    """`python -m flows.<stage> [--params PATH]`: a user mistake, or a server that is down, exits with one line,
    not a traceback.

    Under `torchrun` (stages that train data-parallel pass their `stage_main`), rank 0 runs the flow and its
    MLflow run; the other ranks run the stage alone, without Prefect or MLflow, and only train."""
    parser = argparse.ArgumentParser(description=f"Run the {flow_fn.__name__} stage as a Prefect flow.")
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args()
    if launched_rank() > 0:
        if stage_main is None:
            sys.exit(f"error: stage {flow_fn.name} does not train data-parallel; run it without torchrun")
        sys.exit(stage_main(["--params", args.params]))
    try:
        load_params(args.params)  # fail before Prefect and MLflow spend their start-up time
    except ParamsError as e:
        sys.exit(f"error: {e}")
    require_servers()
    pipeline_run = os.environ.get(PIPELINE_FLOW_RUN_ENV)
    try:
        with few_prefect_retries():
            if pipeline_run:
                run_as_subflow(flow_fn, {"params": args.params}, pipeline_run)
            else:
                flow_fn(args.params)
    except (TrainingInterrupted, NonFiniteLoss) as e:
        sys.exit(report_stopped_training(flow_fn.name, e))
    except InputError as e:
        print(f"{flow_fn.name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        _exit_if_only_prefect_was_lost()
        raise


def _exit_if_only_prefect_was_lost() -> None:
    """After a stage flow raised: when its stage had finished and the Prefect server no longer answers (the
    flow run's end could not be reported), say so and exit 0, so that DVC records the stage's outputs."""
    api = prefect_api_url()
    why = no_answer(api.rstrip("/") + "/health") if api and _finished_stages else None
    if why is None:
        return
    for stage, outputs in _finished_stages.items():
        print(
            f"warning: the Prefect server at {redacted(api)} stopped answering ({why}) while stage {stage} ran: "
            f"its work is done and its outputs are on disk ({', '.join(outputs)}), but Prefect could not "
            "record the flow run's end (it shows it Running) and has not got the log since the server went",
            file=sys.stderr,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal exit: Prefect's exit handlers would spend minutes trying to deliver the events and log
    # lines it queued to the dead server; nothing else is left to do (the MLflow run is closed).
    os._exit(0)


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
