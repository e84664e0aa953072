"""The `evaluate` DVC stage as a Prefect flow (`python -m flows.evaluate`); the work is in `stages/evaluate.py`.

After the stage, the `ldm-text2img` versions of the evaluated model folder (found by the DVC hash that
train_unet tagged them with) get its prompt adherence as a tag, and the alias `champion` moves to the version
with the highest adherence of all evaluated versions.
"""

from prefect import flow, get_run_logger

from flows.stage_flow import main, run_stage
from flows.text2img_model import MODEL_NAME
from flows.tracking import StageRun
from flows.train_unet import MODEL_HASH_TAG
from stages import evaluate as stage
from stages.params import Params
from stages.reporting import StageResult

ADHERENCE_TAG = "prompt_adherence"
CHAMPION = "champion"


def crown_champion(tracked: StageRun, params: Params, result: StageResult) -> None:
    logger = get_run_logger()
    client = tracked.client
    md5 = tracked.tags.get(f"dvc_dep.{params.paths.text2img}")
    score = result.metrics.get(f"headline.{ADHERENCE_TAG}")
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    evaluated = [v for v in versions if md5 is not None and v.tags.get(MODEL_HASH_TAG) == md5]
    if not evaluated or score is None:
        logger.warning("no %s version of this model (%s %s) to rank; run train_unet through its flow", MODEL_NAME,
                       MODEL_HASH_TAG, md5)
        return
    for version in evaluated:
        client.set_model_version_tag(MODEL_NAME, version.version, ADHERENCE_TAG, f"{score:.6f}")
        client.set_model_version_tag(MODEL_NAME, version.version, "evaluate_run_id", tracked.run_id)
        version.tags[ADHERENCE_TAG] = f"{score:.6f}"
    ranked = [v for v in versions if ADHERENCE_TAG in v.tags]
    best = max(ranked, key=lambda v: (float(v.tags[ADHERENCE_TAG]), int(v.version)))
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, best.version)
    logger.info("%s@%s is version %s (%s %s); this model scored %.4f", MODEL_NAME, CHAMPION, best.version,
                ADHERENCE_TAG, best.tags[ADHERENCE_TAG], score)


@flow(name="evaluate")
def evaluate(params: str = "params.yaml"):
    return run_stage("evaluate", stage.run, params, finish=crown_champion)


if __name__ == "__main__":
    main(evaluate)
