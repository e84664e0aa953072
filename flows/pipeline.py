"""The whole DVC pipeline as one Prefect flow: `python -m flows.pipeline [--set-param K=V ...] [TARGET ...]`,
or the deployment `flows.serve` registers, run from the Prefect UI.

DVC stays the source of truth: the flow runs `dvc repro` (or, with overrides, `dvc exp run --set-param`),
which decides what is stale, runs only those stages, one at a time in the DAG's order, each as its own
command (`python -m flows.<stage>`, a Prefect flow with its MLflow run), and updates `dvc.lock`.

Overrides (`set_params`) use `dvc exp run --set-param` syntax (`train_vae.max_steps=100`, `seed=1`). They
are checked against the params schema (`stages.params`) before DVC starts, so a misspelt key fails at once
with a message naming it, then written into params.yaml changing only their values (`apply_overrides`: the
rest of the file stays byte for byte as written), and `dvc exp run` runs the pipeline. It needs a git
repository with at least one commit; it records the run as a DVC experiment (`dvc exp show`) and LEAVES THE
OVERRIDES APPLIED in the workspace's params.yaml (and the results in the workspace, with dvc.lock updated):
`git diff params.yaml` shows exactly the overrides; `git checkout params.yaml` goes back.

Linking, through environment variables the flow sets for DVC's stage commands:
- `LDM_PIPELINE_FLOW_RUN_ID` (this flow run's id): each stage flow (`flows/stage_flow.py`) attaches its
  flow run to this one as a subflow run (a tracking task run named after the stage in this flow run, set as
  the stage run's parent task run, as Prefect does for an in-process subflow) and tags it
  `pipeline-run:<id>`.
- `LDM_MLFLOW_PARENT_RUN_ID` (the MLflow run "pipeline" this flow opens): each stage's MLflow run is its
  child (tag `mlflow.parentRunId`, `flows/tracking.py`).
Without a `PREFECT_API_URL`, the stages are pointed at this process's temporary Prefect server, so they
neither start their own nor lose the link.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Param
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from flows.servers import few_prefect_retries, require_servers
from flows.stage_flow import PIPELINE_FLOW_RUN_ENV  # "LDM_PIPELINE_FLOW_RUN_ID"
from flows.tracking import (
    EXPERIMENT,
    MLFLOW_PARENT_RUN_ENV,
    closing_run,
    generated_paths,
    git_commit,
    pipeline_experiment,
    pipeline_stages,
    tracking_client,
)
from ldm.models.modeling import atomic_path
from stages.params import DEFAULT_PARAMS_FILE, ParamsError, load_params

TAIL_LINES = 40  # DVC's last output lines, logged again as one error when a stage fails ...
ERROR_LINES = 8  # ... and the last of them in the exception (the flow run's state message)

RUNNING = re.compile(r"^Running stage '([^']+)'")
# A line of a stage flow's own Prefect console log ("12:00:00.123 | INFO    | Flow run 'x' - ..."): logged here
# at its level, without its second timestamp.
PREFECT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| (DEBUG|INFO|WARNING|ERROR|CRITICAL) *\| (.*)$")
FAILED = re.compile(r"failed to reproduce '([^']+)'")


class PipelineError(RuntimeError):
    """`dvc repro` / `dvc exp run` failed; the message names the stage and quotes DVC's last lines."""


def check_overrides(repo: Path, set_params: list[str]) -> None:
    """Apply the overrides to a copy of params.yaml the way `dvc exp run --set-param` will (DVC's own Hydra
    override parser) and validate the result with the params schema: raises ParamsError naming the key."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    by_file = to_path_overrides(set_params)
    others = sorted(set(by_file) - {DEFAULT_PARAMS_FILE})
    if others:
        raise ParamsError(f"--set-param: only {DEFAULT_PARAMS_FILE} overrides are supported, got file(s) {others}")
    for override in set_params:
        if "=" not in override and not override.startswith("~"):
            raise ParamsError(f"--set-param {override!r}: expected KEY=VALUE, e.g. train_vae.max_steps=100")
    source = repo / DEFAULT_PARAMS_FILE
    load_params(source)  # the file itself must be valid first
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / DEFAULT_PARAMS_FILE
        shutil.copy2(source, copy)
        # "++key=value" (set, adding the key if missing) so that an unknown key reaches the schema, which
        # names it; DVC itself then gets the plain overrides, all of them known keys.
        lenient = [o if o.startswith(("+", "~")) else f"++{o}" for o in by_file.get(DEFAULT_PARAMS_FILE, [])]
        try:
            apply_overrides(copy, lenient)
        except InvalidArgumentError as e:
            raise ParamsError(f"--set-param {set_params}: {e.__cause__ or e}") from None
        try:
            load_params(copy)
        except ParamsError as e:
            where = f"{DEFAULT_PARAMS_FILE} with --set-param {set_params}"
            raise ParamsError(str(e).replace(str(copy), where)) from None


def params_yaml() -> YAML:
    """A round-trip YAML that writes a params file back byte for byte as it was read: comments, flow-style
    lists, `null`, quoting and line lengths kept."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def apply_overrides(repo: Path, set_params: list[str]) -> None:
    """Write `dvc exp run --set-param` overrides (already checked by `check_overrides`) into params.yaml in
    place, changing only their values: DVC's own writer re-dumps the whole file (block-style lists, `null`
    left empty, long strings re-wrapped), which turned one changed seed into a 150-line diff."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    yaml, path = params_yaml(), repo / DEFAULT_PARAMS_FILE
    data = yaml.load(path.read_text())
    for override in OverridesParser.create().parse_overrides(set_params):
        *parents, leaf = override.key_or_group.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, CommentedMap())
        if override.is_delete():
            node.pop(leaf, None)
        else:
            node[leaf] = _styled(override.value(), block=isinstance(node.get(leaf), CommentedSeq)
                                 and not node[leaf].fa.flow_style())
    with atomic_path(path) as tmp, open(tmp, "w") as out:
        yaml.dump(data, out)


def _styled(value, block: bool = False):
    """An override's value as YAML nodes: lists and mappings inline (`[32, 64]`, as params.yaml writes them)
    unless the value they replace was a block list."""
    if isinstance(value, list):
        node = CommentedSeq(_styled(v) for v in value)
    elif isinstance(value, dict):
        node = CommentedMap((k, _styled(v)) for k, v in value.items())
    else:
        return value
    if not block:
        node.fa.set_flow_style()
    return node


def dvc_command(set_params: list[str] | None, targets: list[str] | None, force: bool) -> list[str]:
    """`dvc repro`, or `dvc exp run` when the run has overrides (which `apply_overrides` wrote beforehand)."""
    command = [sys.executable, "-m", "dvc"]
    command += ["exp", "run"] if set_params else ["repro"]
    if force:
        command.append("--force")
    return command + list(targets or [])


def stage_environment(flow_run_id: str, mlflow_run_id: str) -> dict[str, str]:
    """The environment of DVC and the stage commands it runs."""
    # PREFECT__* belong to this flow run's process (its run id, the runner's control channel): a stage
    # that inherited them would pose as this run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
    bin_dir = str(Path(sys.executable).parent)  # `python` and `dvc` of this environment, venv activated or not
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # stage output reaches this log as it happens
    env[PIPELINE_FLOW_RUN_ENV] = flow_run_id
    env[MLFLOW_PARENT_RUN_ENV] = mlflow_run_id
    if not env.get("PREFECT_API_URL"):
        # The temporary server of this process: the stages report to it instead of starting their own.
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            env["PREFECT_API_URL"] = str(client.api_url)
    return env


def has_commit(repo: Path) -> bool:
    """Whether `repo` is in a git repository with at least one commit (read with scmrepo, DVC's git layer)."""
    from scmrepo.exceptions import SCMError
    from scmrepo.git import Git

    try:
        scm = Git(str(repo))
    except SCMError:
        return False
    try:
        return not scm.no_commits
    finally:
        scm.close()


@task(name="validate overrides", cache_policy=NO_CACHE)
def validate_overrides(repo: str, set_params: list[str]) -> None:
    check_overrides(Path(repo), set_params)
    get_run_logger().info("overrides valid: %s", " ".join(set_params))


@task(name="apply overrides", cache_policy=NO_CACHE)
def write_overrides(repo: str, set_params: list[str]) -> None:
    apply_overrides(Path(repo), set_params)
    get_run_logger().info("overrides written into %s (only their values changed)", DEFAULT_PARAMS_FILE)


def _stop(process: subprocess.Popen, grace: float = 15) -> None:
    """Stop DVC and the stage it runs: their own process group, which a runner's or a terminal's signal does
    not reach. SIGTERM, not SIGINT (a process started in the background may ignore SIGINT): the stage's flow
    run is then marked crashed and its MLflow run failed, and DVC's lock dies with it. Whatever of the group
    is left after `grace` seconds is killed: all within the 30 s a Prefect runner gives a cancelled run."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()  # reap DVC, or its zombie would keep the group alive
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@task(name="dvc", cache_policy=NO_CACHE)
def run_dvc(repo: str, command: list[str], env: dict[str, str]) -> list[str]:
    """Run DVC, streaming its output (and its stages') into this log line by line; returns the stages run."""
    logger = get_run_logger()
    logger.info("$ %s  (in %s)", shlex.join(["dvc", *command[3:]]), repo)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    ran: list[str] = []
    process = subprocess.Popen(
        command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", bufsize=1, start_new_session=True,
    )
    try:
        for raw in process.stdout:
            line = raw.rstrip("\n").split("\r")[-1].rstrip()  # a progress bar's last redraw
            if not line:
                continue
            tail.append(line)
            if match := RUNNING.match(line):
                ran.append(match.group(1))
            if prefect_line := PREFECT_LINE.match(line):
                level, line = prefect_line.groups()
            else:
                level = "ERROR" if line.startswith("ERROR") else "WARNING" if line.startswith("WARNING") else "INFO"
            logger.log(getattr(logging, level), line)
        returncode = process.wait()
    finally:
        if process.poll() is None:  # this flow run was cancelled or crashed: stop DVC and its stage
            _stop(process)
        process.stdout.close()
    if returncode:
        output = "\n".join(tail)
        failed = FAILED.findall(output)
        stage = failed[-1] if failed else ran[-1] if ran else None
        what = f"stage {stage!r} failed" if stage else "DVC failed before running a stage"
        logger.error("%s (dvc exited with %d); DVC's output ends with:\n%s", what, returncode, output)
        short = "\n".join(list(tail)[-ERROR_LINES:])
        raise PipelineError(f"{what} (dvc exited with {returncode}); DVC's last lines:\n{short}")
    return ran


@contextmanager
def mlflow_parent_run(repo: Path, flow_run_id: str, set_params, targets, force: bool) -> Iterator[str]:
    """The MLflow run "pipeline" that the stages' runs nest under; FINISHED or FAILED with the flow."""
    client = tracking_client(repo)
    experiment_id = pipeline_experiment(client, repo)
    params = load_params(repo / DEFAULT_PARAMS_FILE)
    commit = git_commit(repo, generated_paths(pipeline_stages(repo)))
    tags = {
        "mlflow.runName": "pipeline", "mlflow.source.git.commit": commit, "git_commit": commit,
        "profile": params.profile, "prefect_flow_run_id": flow_run_id,
    }
    run = client.create_run(experiment_id, tags=tags, run_name="pipeline")
    run_id = run.info.run_id
    client.log_batch(run_id, params=[
        Param("set_params", " ".join(set_params or []) or "-"),
        Param("targets", " ".join(targets or []) or "(all)"),
        Param("force", str(force)),
    ])
    with closing_run(client, run_id, warn=get_run_logger().warning):
        yield run_id


@flow(name="pipeline")
def pipeline(
    set_params: list[str] | None = None,
    targets: list[str] | None = None,
    force: bool = False,
    repo: str | None = None,
) -> dict:
    """Reproduce the DVC pipeline (stale stages only): `dvc repro [targets]`, or with `set_params`
    (`dvc exp run --set-param` syntax, e.g. ["train_vae.max_steps=100", "seed=1"]) `dvc exp run`, which
    needs a git commit and leaves the overrides applied in params.yaml. `force` re-runs every stage of the
    targets; `repo` is the repository root (default: the working directory). Each stage DVC runs is a
    subflow run of this one, with its own logs; each MLflow stage run is a child of this run's MLflow run."""
    logger = get_run_logger()
    root = Path(repo or Path.cwd()).resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root} has no dvc.yaml: pass repo= the repository root")
    bad = [t for t in targets or [] if t.startswith("-")]
    if bad:
        raise ValueError(f"targets must be stage names or paths, got {bad}")
    if set_params:
        validate_overrides(str(root), set_params)
        if not has_commit(root):
            raise PipelineError(f"set_params runs `dvc exp run`, which needs a git commit in {root}: commit first")
        write_overrides(str(root), set_params)
    flow_run_id = str(get_run_context().flow_run.id)
    with mlflow_parent_run(root, flow_run_id, set_params, targets, force) as mlflow_run_id:
        logger.info("MLflow parent run %s (experiment %s)", mlflow_run_id, EXPERIMENT)
        env = stage_environment(flow_run_id, mlflow_run_id)
        ran = run_dvc(str(root), dvc_command(set_params, targets, force), env)
    logger.info("stages run: %s", ", ".join(ran) if ran else "none (everything up to date)")
    return {"stages_run": ran, "mlflow_run_id": mlflow_run_id}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the DVC pipeline (stale stages only) as one Prefect flow.")
    parser.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as `dvc exp run --set-param` (runs `dvc exp run`); repeatable")
    parser.add_argument("-f", "--force", action="store_true", help="re-run the stages even if nothing changed")
    parser.add_argument("--repo", default=".", help="repository root (default: the working directory)")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    # `kill` as Ctrl-C: unwind, so that DVC and its stage are stopped too (a Prefect runner's flow run process
    # gets the same from Prefect's own handler).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.set_param:
            check_overrides(repo, args.set_param)  # fail before Prefect and MLflow spend their start-up time
    except ParamsError as e:
        sys.exit(f"error: {e}")
    require_servers()
    try:
        with few_prefect_retries():
            pipeline(set_params=args.set_param or None, targets=args.targets or None, force=args.force, repo=str(repo))
    except (PipelineError, ParamsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
