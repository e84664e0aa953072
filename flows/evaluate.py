"""The `evaluate` DVC stage as a Prefect flow (`python -m flows.evaluate`); the work is in `stages/evaluate.py`.

After the stage, the `ldm-text2img` versions of the evaluated model folder (found by the DVC hash that
train_unet tagged them with) get its prompt adherence and its copy rate for seen captions as tags, and the
alias `champion` moves to the version with the highest adherence of all evaluated versions; of versions with
equal adherence, the one that copies fewest train images. (On data without shapes attributes the headline
adherence is capped at 1, and models that copy their train images reach that cap: see stages/evaluate.py.)
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
COPY_RATE_TAG = "copy_rate_seen"
COPY_RATE_METRIC = "memorisation.seen.copy_rate_pixels"
CHAMPION = "champion"


def champion_of(versions: list) -> object:
    """The version with the highest adherence tag; among equals, the lowest copy rate (a version without one ranks
    below those with one), then the newest."""
    def rank(version) -> tuple[float, float, int]:
        copies = float(version.tags[COPY_RATE_TAG]) if COPY_RATE_TAG in version.tags else 1.0
        return float(version.tags[ADHERENCE_TAG]), -copies, int(version.version)

    return max((v for v in versions if ADHERENCE_TAG in v.tags), key=rank)


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
    copies = result.metrics.get(COPY_RATE_METRIC)
    for version in evaluated:
        client.set_model_version_tag(MODEL_NAME, version.version, ADHERENCE_TAG, f"{score:.6f}")
        version.tags[ADHERENCE_TAG] = f"{score:.6f}"
        if copies is not None:
            client.set_model_version_tag(MODEL_NAME, version.version, COPY_RATE_TAG, f"{copies:.6f}")
            version.tags[COPY_RATE_TAG] = f"{copies:.6f}"
        client.set_model_version_tag(MODEL_NAME, version.version, "evaluate_run_id", tracked.run_id)
    best = champion_of(versions)
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, best.version)
    logger.info("%s@%s is version %s (%s %s); this model scored %.4f", MODEL_NAME, CHAMPION, best.version,
                ADHERENCE_TAG, best.tags[ADHERENCE_TAG], score)


@flow(name="evaluate")
def evaluate(params: str = "params.yaml"):
    return run_stage("evaluate", stage.run, params, finish=crown_champion)


if __name__ == "__main__":
    main(evaluate)
