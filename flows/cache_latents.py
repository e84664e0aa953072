"""The `cache_latents` DVC stage as a Prefect flow (`python -m flows.cache_latents`); the work is in `stages/cache_latents.py`."""

from prefect import flow

from flows.stage_flow import main, run_stage
from stages import cache_latents as stage


@flow(name="cache_latents")
def cache_latents(params: str = "params.yaml"):
    return run_stage("cache_latents", stage.run, params)


if __name__ == "__main__":
    main(cache_latents)
