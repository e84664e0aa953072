"""`dvc repro` on the ci profile, in a copy of this repo, against real Prefect and MLflow servers: its outputs,
its runs, its lineage, that it keeps the environment's secrets to itself, and that a training stage killed
under it loses nothing."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ruamel.yaml
import yaml
from mlflow import MlflowClient

from flows.tracking import dependency_hashes
from ldm.cli import main as cli_main
from stages.reporting import flatten
from tests.ci_stages import CI_PARAMS, copy_repo
from tests.servers import mlflow_server, prefect_client, prefect_server

REPO = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "train_vae", "cache_latents", "train_unet", "evaluate", "sample", "finetune_lora",
          "train_controlnet"]
STAGES_WITH_METRICS = ["ingest", "train_vae", "cache_latents", "train_unet", "finetune_lora", "train_controlnet"]
FAULTS = REPO / "tests" / "fault_injection"
# Credentials a user may well have in the environment; none may reach a log, a tag, a param or an output.
SECRET = "ldm-test-secret-5f1c9a"
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": SECRET, "MLFLOW_TRACKING_USERNAME": "ldm",
              "MLFLOW_TRACKING_PASSWORD": SECRET}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    repo = root / "repo"
    repo.mkdir()
    copy_repo(repo, CI_PARAMS)
    with prefect_server(root / "prefect") as prefect_env, mlflow_server(root / "mlflow") as mlflow_env:
        env = {
            **os.environ, **prefect_env, **mlflow_env,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(root / "dvc-site"), **SECRET_ENV,
        }
        outputs = []

        def repro(*targets: str, fault: str | None = None) -> subprocess.CompletedProcess:
            """`dvc repro [targets]`; `fault` injects LDM_FAULT (tests/fault_injection) into the stages it runs."""
            extra = {"PYTHONPATH": str(FAULTS), "LDM_FAULT": fault} if fault else {}
            done = subprocess.run(
                ["dvc", "repro", *targets], cwd=repo, env={**env, **extra}, capture_output=True, text=True, timeout=900
            )
            outputs.append(done.stdout + done.stderr)
            return done

        first = repro()
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        yield repo, prefect_env["PREFECT_API_URL"], MlflowClient(mlflow_env["MLFLOW_TRACKING_URI"]), repro, outputs


def test_outputs_and_lock(pipeline):
    repo, *_ = pipeline
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert list((repo / "data" / "ingested").glob("*.parquet"))
    assert (repo / "models" / "vae" / "model.safetensors").is_file()
    assert (repo / "data" / "latents" / "manifest.json").is_file()
    for stage in STAGES_WITH_METRICS:
        assert json.loads((repo / "metrics" / f"{stage}.json").read_text())
    assert {p.name for p in (repo / "models" / "text2img").iterdir()} == {"vae", "unet", "unet_raw", "pipeline.json"}
    evaluation = json.loads((repo / "eval" / "metrics.json").read_text())
    assert set(evaluation["samplers"]) == {"dpmpp_2m-5", "ddim-5"}
    assert 0.0 <= evaluation["headline"]["prompt_adherence"] <= 1.0
    assert set(evaluation["quality_per_compute"]) == {"dpmpp_2m-2", "dpmpp_2m-5", "ddim-2", "ddim-5"}
    with open(repo / "eval" / "plots" / "quality_per_compute.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["steps"] for row in rows] == ["2", "5"]
    assert {"dpmpp_2m", "ddim", "ddim_seconds_per_image"} <= set(rows[0])
    assert float(rows[1]["ddim"]) == evaluation["quality_per_compute"]["ddim-5"]["adherence"]
    drawn = json.loads((repo / "samples" / "prompts.json").read_text())
    assert [p["file"] for p in drawn["images"]] == ["000.png", "001.png"] and (repo / "samples" / "grid.png").is_file()
    assert drawn["evaluation_headline"] == evaluation["headline"]  # sample ran after evaluate, on its model
    assert {p.name for p in (repo / "models" / "lora").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    assert (repo / "models" / "controlnet" / "control.json").is_file()


def test_flow_runs_task_runs_and_logs_in_prefect(pipeline):
    _, api, *_ = pipeline
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    with prefect_client(api) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        by_name = {flows[r.flow_id]: r for r in client.read_flow_runs()}
        assert set(STAGES) <= set(by_name)
        for stage in STAGES:
            run = by_name[stage]
            assert run.state.is_completed()
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            task_names = {t.name.rsplit("-", 1)[0] for t in tasks}
            assert {"validate params", stage, "record results"} <= task_names, task_names
            assert all(t.state.is_completed() for t in tasks)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[by_name["train_vae"].id])))
    messages = [log.message for log in logs]
    assert any("train_vae: " in m and "%)" in m for m in messages), messages[:20]


def test_runs_tags_metrics_and_registry_in_mlflow(pipeline):
    repo, _, client, *_ = pipeline
    experiment = client.get_experiment_by_name("ldm-pipeline")
    runs = {r.data.tags["dvc_stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(STAGES)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == head
        assert run.data.tags["profile"] == "ci"
        assert run.data.tags["mlflow.source.name"] == lock[stage]["cmd"]  # the run page's Source
        for dep in lock[stage]["deps"]:
            assert run.data.tags[f"dvc_dep.{dep['path']}"] == dep["md5"], dep["path"]
    # The experiment opens in MLflow 3's model-training view; each run lists the data it read, by DVC's hash.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    ingested = next(out for out in lock["ingest"]["outs"] if out["path"] == "data/ingested")["md5"]
    counts = json.loads((repo / "metrics" / "ingest.json").read_text())
    rows = counts["train_rows"] + counts["val_rows"]
    for stage in ("train_vae", "cache_latents", "evaluate", "finetune_lora", "train_controlnet"):
        inputs = client.get_run(runs[stage].info.run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("ingested", ingested)], stage
        assert json.loads(inputs[0].dataset.profile) == {"rows": rows}
    source = client.get_run(runs["ingest"].info.run_id).inputs.dataset_inputs
    shapes = next(dep for dep in lock["ingest"]["deps"] if dep["path"] == "shapes")["md5"]
    assert [(i.dataset.name, i.dataset.digest) for i in source] == [("shapes", shapes)]
    train = runs["train_vae"]
    assert "train_vae.lr" in train.data.params
    assert len(client.get_metric_history(train.info.run_id, "loss")) >= 2
    assert train.data.metrics["val_psnr"] > 0
    assert runs["ingest"].data.metrics["accepted"] > 0
    versions = client.search_model_versions("name='ldm-vae'")
    assert [v.run_id for v in versions] == [train.info.run_id]
    # The VAE is the run's logged model (the run page's "Logged models"), holding the saved folder.
    [output] = client.get_run(train.info.run_id).outputs.model_outputs
    assert client.get_logged_model(output.model_id).name == "model"
    assert "config.json" in {Path(a.path).name for a in client.list_logged_model_artifacts(output.model_id)}
    unet_run = runs["train_unet"]
    assert [v.run_id for v in client.search_model_versions("name='ldm-unet'")] == [unet_run.info.run_id]
    for stage, model in (("finetune_lora", "ldm-lora"), ("train_controlnet", "ldm-controlnet")):
        assert [v.run_id for v in client.search_model_versions(f"name='{model}'")] == [runs[stage].info.run_id]
    assert len(client.get_metric_history(unet_run.info.run_id, "loss")) >= 2
    # The validation grid logged at step 15 and at the end (step 30).
    images = {a.path for a in client.list_artifacts(unet_run.info.run_id, "images")}
    assert any("validation+step+15+" in p for p in images), images


def test_every_model_version_carries_what_rebuilds_it(pipeline):
    """The git commit, the dvc.lock hashes of its stage's inputs and its params: `git checkout` + `dvc repro`."""
    repo, _, client, *_ = pipeline
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    # YAML 1.2, as DVC writes it: PyYAML would read a float like 1e-06 as a string.
    lock = ruamel.yaml.YAML(typ="safe").load((repo / "dvc.lock").read_text())["stages"]
    versions = [v for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'")]
    assert {v.name for v in versions} == {"ldm-vae", "ldm-unet", "ldm-text2img", "ldm-lora", "ldm-controlnet"}
    for version in versions:
        stage = lock[version.tags["dvc_stage"]]
        assert version.tags["git_commit"] == head, version.name
        for dep in stage["deps"]:
            assert version.tags[f"dvc_dep.{dep['path']}"] == dep["md5"], (version.name, dep["path"])
        # The tag holds the validated params, defaults filled in: all that params.yaml (and dvc.lock) says, and more.
        assert _holds(json.loads(version.tags["params"]), stage["params"]["params.yaml"]), version.name


def _holds(complete, written) -> bool:
    if isinstance(written, dict):
        return isinstance(complete, dict) and all(k in complete and _holds(complete[k], v) for k, v in written.items())
    return complete == written


def test_each_stage_flow_first_says_its_device_and_cpu_threads(pipeline):
    *_, outputs = pipeline
    log = outputs[0]  # the first `dvc repro`, every stage's flow run
    for stage in STAGES:
        began = log.index(f"for flow '{stage}'")
        first = next(line for line in log[began:].splitlines()[1:] if f" - {stage}: " in line)
        assert re.search(rf" - {stage}: device auto, \d+ CPU threads \(torch's choice", first), first


def test_no_secret_from_the_environment_reaches_logs_tags_params_or_outputs(pipeline):
    repo, api, client, _, outputs = pipeline
    experiment = client.get_experiment_by_name("ldm-pipeline")
    for run in client.search_runs([experiment.experiment_id]):
        assert SECRET not in json.dumps([run.data.params, run.data.tags]), run.data.tags["dvc_stage"]
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            assert SECRET not in json.dumps(version.tags), model.name
    logs = []
    with prefect_client(api) as prefect:
        while page := prefect.read_logs(offset=len(logs), limit=200):
            logs += [log.message for log in page]
    assert logs and not [m for m in logs if SECRET in m]
    assert not [o for o in outputs if SECRET in o]
    written = [p for d in ("metrics", "eval", "samples", "models", "plots") for p in (repo / d).rglob("*.json")]
    assert written and not [p for p in written if SECRET in p.read_text()]


def test_text2img_is_registered_and_the_evaluated_version_is_champion(pipeline):
    repo, _, client, *_ = pipeline
    (version,) = client.search_model_versions("name='ldm-text2img'")
    assert version.tags["dvc_stage"] == "train_unet"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    text2img_md5 = next(d["md5"] for d in lock["evaluate"]["deps"] if d["path"] == "models/text2img")
    assert version.tags["text2img_md5"] == text2img_md5
    evaluation = json.loads((repo / "eval" / "metrics.json").read_text())
    assert float(version.tags["prompt_adherence"]) == pytest.approx(evaluation["headline"]["prompt_adherence"], abs=1e-6)
    copies = evaluation["memorisation"]["seen"]["copy_rate_pixels"]
    assert float(version.tags["copy_rate_seen"]) == pytest.approx(copies, abs=1e-6)  # the champion's tie-break
    assert client.get_model_version_by_alias("ldm-text2img", "champion").version == version.version


def test_metrics_logged_to_mlflow_equal_the_metrics_files(pipeline):
    repo, _, client, *_ = pipeline
    experiment = client.get_experiment_by_name("ldm-pipeline")
    runs = {r.data.tags["dvc_stage"]: r for r in client.search_runs([experiment.experiment_id])}
    for stage in STAGES_WITH_METRICS:
        saved = flatten(json.loads((repo / "metrics" / f"{stage}.json").read_text()))
        numbers = {k: float(v) for k, v in saved.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numbers, stage
        logged = runs[stage].data.metrics
        assert {k: logged.get(k) for k in numbers} == numbers, stage


def test_dvc_lock_hashes_are_those_of_the_outputs_on_disk(pipeline):
    repo, *_ = pipeline
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    checked = 0
    for stage, entry in lock.items():
        for out in entry.get("outs", []):
            path = repo / out["path"]
            assert path.exists(), (stage, out["path"])
            if path.is_file():
                assert hashlib.md5(path.read_bytes()).hexdigest() == out["md5"], out["path"]
            else:  # a folder: DVC's .dir tree hash, computed with DVC's own code
                assert dependency_hashes(repo, [out["path"]])[out["path"]] == out["md5"], out["path"]
            checked += 1
    assert checked >= len(STAGES)


def test_the_registered_model_draws_the_images_of_the_models_folder(pipeline, tmp_path, monkeypatch, capsys):
    repo, _, client, *_ = pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    drawn = {}
    for model in (str(repo / "models" / "text2img"), "models:/ldm-text2img/latest", "models:/ldm-text2img@champion"):
        out = tmp_path / f"{len(drawn)}.png"
        assert cli_main(["sample", "a large red circle at the top left on a white background", "--model", model,
                         "--seed", "3", "--device", "cpu", "-o", str(out)]) == 0, model
        drawn[model] = out.read_bytes()
    capsys.readouterr()
    assert len(set(drawn.values())) == 1, "the registered model draws other images than models/text2img"


def test_second_repro_does_nothing(pipeline):
    _, _, client, repro, _ = pipeline
    experiment = client.get_experiment_by_name("ldm-pipeline")
    before = len(client.search_runs([experiment.experiment_id]))
    again = repro()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Data and pipelines are up to date" in again.stdout
    assert len(client.search_runs([experiment.experiment_id])) == before


def test_train_unet_killed_or_stopped_under_dvc_repro_resumes_to_the_same_model(pipeline):
    """SIGKILL while a checkpoint is being written, then SIGTERM: each `dvc repro` resumes from the last complete
    checkpoint, and the model it ends with is byte for byte the uninterrupted run's. (Runs last: it re-runs a stage.)"""
    repo, *_, repro, _ = pipeline
    model, checkpoints = repo / "models" / "text2img", repo / "checkpoints" / "unet"
    uninterrupted = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()}

    def locked_model() -> dict:
        outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train_unet"]["outs"]
        return next(out for out in outs if out["path"] == "models/text2img")

    lock_before = locked_model()
    shutil.rmtree(checkpoints)

    killed = repro("train_unet", fault="kill-in-checkpoint:20")
    assert killed.returncode != 0
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-000010"]
    assert not model.exists()

    stopped = repro("train_unet", fault="term:23")
    assert stopped.returncode != 0
    assert "stopped by SIGTERM after step 23" in stopped.stdout + stopped.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000020", "step-000023"]

    resumed = repro()
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming UNet training from" in resumed.stdout + resumed.stderr
    assert {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()} == uninterrupted
    assert locked_model() == lock_before  # so nothing downstream of it had to run again
