"""`dvc repro` on the ci profile, in a copy of this repo, against real Prefect and MLflow servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.servers import mlflow_server, prefect_server

REPO = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "train_vae", "cache_latents", "train_unet", "evaluate", "sample", "finetune_lora",
          "train_controlnet"]
STAGES_WITH_METRICS = ["ingest", "train_vae", "cache_latents", "train_unet", "finetune_lora", "train_controlnet"]


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    shutil.copy2(REPO / "configs" / "ci.yaml", dst / "params.yaml")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-qm", "ci profile"], cwd=dst, check=True)


def _prefect(api: str, route: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{api}/{route}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    repo = root / "repo"
    repo.mkdir()
    _copy_repo(repo)
    with prefect_server(root / "prefect") as prefect_env, mlflow_server(root / "mlflow") as mlflow_env:
        env = {
            **os.environ, **prefect_env, **mlflow_env,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
        }

        def repro():
            return subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)

        first = repro()
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        yield repo, prefect_env["PREFECT_API_URL"], MlflowClient(mlflow_env["MLFLOW_TRACKING_URI"]), repro


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
    prompts = json.loads((repo / "samples" / "prompts.json").read_text())["images"]
    assert [p["file"] for p in prompts] == ["000.png", "001.png"] and (repo / "samples" / "grid.png").is_file()
    assert {p.name for p in (repo / "models" / "lora").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    assert (repo / "models" / "controlnet" / "control.json").is_file()


def test_flow_runs_task_runs_and_logs_in_prefect(pipeline):
    _, api, *_ = pipeline
    flows = {f["id"]: f["name"] for f in _prefect(api, "flows/filter", {})}
    runs = _prefect(api, "flow_runs/filter", {})
    by_name = {flows[r["flow_id"]]: r for r in runs}
    assert set(STAGES) <= set(by_name)
    for stage in STAGES:
        run = by_name[stage]
        assert run["state"]["type"] == "COMPLETED"
        tasks = _prefect(api, "task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        task_names = {t["name"].rsplit("-", 1)[0] for t in tasks}
        assert {"validate params", stage, "record results"} <= task_names, task_names
        assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
    logs = _prefect(api, "logs/filter", {"logs": {"flow_run_id": {"any_": [by_name["train_vae"]["id"]]}}})
    messages = [log["message"] for log in logs]
    assert any("train_vae: " in m and "%)" in m for m in messages), messages[:20]


def test_runs_tags_metrics_and_registry_in_mlflow(pipeline):
    repo, _, client, _ = pipeline
    experiment = client.get_experiment_by_name("ldm-pipeline")
    runs = {r.data.tags["dvc_stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(STAGES)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == head
        assert run.data.tags["profile"] == "ci"
        for dep in lock[stage]["deps"]:
            assert run.data.tags[f"dvc_dep.{dep['path']}"] == dep["md5"], dep["path"]
    train = runs["train_vae"]
    assert "train_vae.lr" in train.data.params
    assert len(client.get_metric_history(train.info.run_id, "loss")) >= 2
    assert train.data.metrics["val_psnr"] > 0
    assert runs["ingest"].data.metrics["accepted"] > 0
    versions = client.search_model_versions("name='ldm-vae'")
    assert [v.run_id for v in versions] == [train.info.run_id]
    assert versions[0].tags["git_commit"] == head
    assert "config.json" in {Path(a.path).name for a in client.list_artifacts(train.info.run_id, "model")}
    unet_run = runs["train_unet"]
    assert [v.run_id for v in client.search_model_versions("name='ldm-unet'")] == [unet_run.info.run_id]
    for stage, model in (("finetune_lora", "ldm-lora"), ("train_controlnet", "ldm-controlnet")):
        assert [v.run_id for v in client.search_model_versions(f"name='{model}'")] == [runs[stage].info.run_id]
    assert len(client.get_metric_history(unet_run.info.run_id, "loss")) >= 2
    # The validation grid logged at step 15 and at the end (step 30).
    images = {a.path for a in client.list_artifacts(unet_run.info.run_id, "images")}
    assert any("validation+step+15+" in p for p in images), images


def test_text2img_is_registered_and_the_evaluated_version_is_champion(pipeline):
    repo, _, client, _ = pipeline
    (version,) = client.search_model_versions("name='ldm-text2img'")
    assert version.tags["dvc_stage"] == "train_unet"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    text2img_md5 = next(d["md5"] for d in lock["evaluate"]["deps"] if d["path"] == "models/text2img")
    assert version.tags["text2img_md5"] == text2img_md5
    evaluation = json.loads((repo / "eval" / "metrics.json").read_text())
    assert float(version.tags["prompt_adherence"]) == pytest.approx(evaluation["headline"]["prompt_adherence"], abs=1e-6)
    assert client.get_model_version_by_alias("ldm-text2img", "champion").version == version.version


def test_second_repro_does_nothing(pipeline):
    _, _, client, repro = pipeline
    experiment = client.get_experiment_by_name("ldm-pipeline")
    before = len(client.search_runs([experiment.experiment_id]))
    again = repro()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Data and pipelines are up to date" in again.stdout
    assert len(client.search_runs([experiment.experiment_id])) == before
