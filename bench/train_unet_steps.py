"""Seconds per step of `train_unet` as the pipeline runs it (the training engine: EMA, LR schedule, clipping,
the non-finite flags), from this workspace's latent cache, for this checkout and optionally another one.

    git worktree add /tmp/before <commit>                 # the code to compare with
    python bench/train_unet_steps.py --other /tmp/before  # both, taking turns, `--repeats` runs each

Each run trains params.yaml's train_unet config for `--steps` steps from scratch, with no checkpoint or
validation inside the timed window; a step's time is the median interval between logged steps, per step, after the
first `--skip` logged intervals (allocator and thread-pool warm-up), at params.yaml's log_every (the host
reads the step's flags only at logged steps). Runs of the two checkouts alternate, so the noise
of a shared machine hits them alike; the ratio other / this is printed. Each checkout runs in its own
process with its own `ldm` and `stages`.

Needs the DVC workspace's data (`dvc repro cache_latents` builds it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run inside each checkout: its own train_unet on this workspace's cache; prints the step intervals as JSON.
_RUN = r"""
import json, sys, tempfile, time
from dataclasses import fields
checkout, workspace, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
# An editable install's finder would serve this workspace's modules to the other checkout's imports.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, checkout)
from stages.params import load_params
from stages.train_unet import unet_config
try:
    from ldm.data.latent_cache import LatentCache
    from ldm.diffusion.schedule import NoiseSchedule
    from ldm.training.unet import UNetTrainingConfig, train_unet
except ImportError:  # a checkout from before ldm/ was regrouped
    from ldm.latent_cache import LatentCache
    from ldm.schedule import NoiseSchedule
    from ldm.unet_training import UNetTrainingConfig, train_unet
params = load_params(f"{checkout}/params.yaml")
section = params.train_unet
cache = LatentCache(f"{workspace}/{params.paths.latents}")
names = {f.name for f in fields(UNetTrainingConfig)}
values = {k: v for k, v in section.model_dump().items() if k in names}
values.update(max_steps=steps, checkpoint_every=10**9, validate_every=10**9)
hp = UNetTrainingConfig(**values)
stamps = {}
def on_step(step, total, row):
    stamps[step] = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    train_unet(unet_config(params, cache), cache, NoiseSchedule(**section.schedule.model_dump()), hp, tmp,
               params.seed, "cpu", on_step=on_step)
logged = sorted(stamps)[:-1]  # the last interval holds the final checkpoint's save
print(json.dumps([(stamps[b] - stamps[a]) / (b - a) for a, b in zip(logged, logged[1:])]))
"""


def step_times(checkout: Path, steps: int) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(checkout), str(REPO), str(steps)], capture_output=True, text=True,
        check=True, cwd=checkout,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, help="another checkout of this repository to time the same way")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip", type=int, default=1, help="first logged intervals left out of the median")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checkouts = {"this checkout": REPO} | ({f"other ({args.other})": args.other} if args.other else {})
    medians: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(args.repeats):
        for name, checkout in checkouts.items():
            medians[name].append(statistics.median(step_times(checkout, args.steps)[args.skip :]))
    for name, values in medians.items():
        print(f"{name:60} {1000 * statistics.median(values):8.1f} ms/step  (runs: "
              f"{', '.join(f'{1000 * v:.1f}' for v in values)})")
    if args.other:
        this, other = (statistics.median(v) for v in medians.values())
        print(f"other / this: {other / this:.3f}")


if __name__ == "__main__":
    main()
