"""Time to quality on the shapes default: how long each training recipe takes until its model draws one-object
captions right, by the evaluate stage's attribute classifier.

    python bench/time_to_quality.py                          # ours, ours with the flow objective, diffusers' recipe
    python bench/time_to_quality.py --recipes ours flow --check-every 100 --prompts 200

Recipes, each training the same UNet architecture from the same initial weights on the same train split:

  ours       the pipeline's train_unet, unchanged (`ldm.training.unet.train_unet` with params.yaml's
             train_unet): latent cache, v-prediction, fused AdamW at lr 2e-3 with warmup and cosine decay,
             caption dropout, EMA; sampled as saved with the model (DPM-Solver++, trailing spacing, guidance 2)
  flow       the same with `objective: flow` (rectified flow, logit-normal t); sampled with euler (20 steps)
             and heun (10 steps: 19 network calls)
  diffusers  what examples/text_to_image/train_text_to_image.py does with its defaults: diffusers'
             UNet2DConditionModel, the VAE and text encoder run on every batch, epsilon prediction under
             DDPMScheduler(), AdamW lr 1e-4 (betas 0.9/0.999, weight decay 1e-2, eps 1e-8), constant rate, grad
             norm clip 1, no EMA, no caption dropout; sampled with DPMSolverMultistepScheduler's defaults over
             that schedule at 20 steps and the StableDiffusionPipeline's guidance 7.5

The bar: all attributes right (shape, colour, size, position, nothing else) on `--bar` (95%) of the first
`--prompts` one-object val captions, every `--check-every` steps. Training wall time excludes the checks (ours
and flow are scored afterwards from checkpoints kept at every check); the diffusers recipe trains until it
crosses the bar or until `--cap` times ours' time to the bar (its whole run's, if it never crossed).

On any other data (`--judge frechet`), the curve is the Fréchet ratio to the real floor (the evaluate stage's
measure: 1 is as good as real) against training seconds, and the bar (`--bar`, default 1.5) is a ratio to fall to:

    python bench/time_to_quality.py --params tux.yaml --judge frechet --check-every 100 --prompts 200

Needs the DVC workspace's data (`dvc repro cache_latents` builds it): paths from params.yaml. Run it alone:
the times are wall times (ratios are what carry to another machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from safetensors.torch import load_file
from training_throughput import diffusers_twin

from ldm.data.ingested import IngestedImages
from ldm.data.order import EpochOrder
from ldm.data.shapes import Scene
from ldm.diffusion.pipeline import Text2Image
from ldm.evaluation.attributes import AttributeClassifier, adherence
from ldm.evaluation.evaluator import frechet_distance
from ldm.models.text_encoder import TextEmbedding, TextEncoder
from ldm.models.unet import UNet
from ldm.training.checkpoint import checkpoint_folder
from ldm.training.unet import train_unet
from stages.evaluate import fit_evaluator, open_text_table
from stages.evaluation import RealImages, fit_attribute_classifier, generate
from stages.params import Params, load_params
from stages.reporting import ConsoleReporter
from stages.train_unet import open_inputs, training_config, training_schedule, unet_config

CHECKPOINT_EMA = "modules/ema/module."  # where a train_unet checkpoint keeps the EMA weights (ldm.training.checkpoint)
DIFFUSERS_LR, DIFFUSERS_GUIDANCE = 1e-4, 7.5


@dataclass
class Curve:
    """A recipe's score at each checked step: (step, training seconds, {sampler: score}); adherence rises to
    its best, a Fréchet ratio falls to it (`higher_is_better`)."""

    recipe: str
    higher_is_better: bool = True
    points: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)

    def _key(self, score: float) -> float:
        return score if self.higher_is_better else -score

    def crossing(self, bar: float) -> tuple[int, float, str] | None:
        """The first (step, seconds, sampler) at which some sampler reaches the bar."""
        for step, seconds, scores in self.points:
            for sampler, score in scores.items():
                if self._key(score) >= self._key(bar):
                    return step, seconds, sampler
        return None

    def best(self) -> tuple[int, float, str, float]:
        step, seconds, scores = max(self.points, key=lambda p: max(map(self._key, p[2].values())))
        sampler = max(scores, key=lambda s: self._key(scores[s]))
        return step, seconds, sampler, scores[sampler]


class Judge:
    """Draws the bench prompts with a model and scores them with the attribute classifier."""

    measure, higher_is_better = "adherence", True

    def __init__(self, params: Params, prompts: int):
        section = params.evaluate
        train = RealImages(params.paths.ingested, "train", section.max_train_images, params.seed, params.image_size)
        val = RealImages(params.paths.ingested, "val", None, section.seed, params.image_size)
        if val.scenes is None:
            sys.exit("time_to_quality: the ingested data is not shapes data; run it on the default pipeline's data")
        chosen = [i for i, scene in enumerate(val.scenes) if len(scene.objects) == 1][:prompts]
        self.prompts = [val.captions[i] for i in chosen]
        self.scenes: list[Scene] = [val.scenes[i] for i in chosen]
        self.seed, self.batch_size = section.seed, section.batch_size
        self.classifier: AttributeClassifier = fit_attribute_classifier(
            train.images, train.scenes, self.scenes, section.classifier_steps, params.seed, torch.device("cpu"),
            ConsoleReporter(),
        )

    def score(self, images: torch.Tensor) -> float:
        return adherence(self.classifier.read(images), self.scenes)["all"]

    def ours(self, pipeline: Text2Image, sampler: str, steps: int) -> float:
        images = generate(pipeline, self.prompts, sampler, steps, pipeline.guidance_scale, self.seed, self.batch_size,
                          ConsoleReporter(), "time to quality")
        return self.score(images)


class FrechetJudge(Judge):
    """On any data: the Fréchet distance of images drawn for the val captions to a sample of train images, over
    the real val images' distance to that sample (the real floor; 1 is as good as real), in the feature space of
    the evaluate stage's contrastive evaluator, trained here as that stage trains it."""

    measure, higher_is_better = "Fréchet ratio to the real floor", False

    def __init__(self, params: Params, prompts: int):
        section = params.evaluate
        train = RealImages(params.paths.ingested, "train", section.max_train_images, params.seed, params.image_size)
        val = RealImages(params.paths.ingested, "val", prompts, section.seed, params.image_size)
        self.evaluator = fit_evaluator(
            params, train, open_text_table(params.paths.latents, params), torch.device("cpu"), print
        )
        self.prompts, self.seed, self.batch_size = val.captions, section.seed, section.batch_size
        self.reference = train.images[: len(val)]  # as the evaluate stage sets the floor
        self.floor = frechet_distance(self.evaluator, self.reference, val.images)

    def score(self, images: torch.Tensor) -> float:
        return frechet_distance(self.evaluator, self.reference, images) / self.floor


def trained_curve(recipe: str, params: Params, judge: Judge, check_every: int, workdir: Path) -> Curve:
    """Train with the pipeline's own train_unet, keeping a checkpoint at every check, then score each."""
    section = params.train_unet
    if recipe == "flow":
        section = section.model_copy(update={"objective": "flow"})
    cache, vae = open_inputs(params)
    config = unet_config(params, cache)
    schedule = training_schedule(section, config.sample_size)
    hp = training_config(section.model_copy(update={
        "checkpoint_every": check_every, "keep_checkpoints": section.max_steps // check_every + 1,
        "validate_every": section.max_steps,
    }))
    began, seconds_at = time.perf_counter(), {}

    def on_step(step: int, max_steps: int, values: dict[str, float]) -> None:
        seconds_at[step] = time.perf_counter() - began

    checkpoints = workdir / recipe
    train_unet(config, cache, schedule, hp, checkpoints, params.seed, "cpu", on_step=on_step)
    samplers = {"ours": [("dpmpp_2m", 20)], "flow": [("euler", 20), ("heun", 10)]}[recipe]
    text_encoder = TextEncoder.from_pretrained(params.text_encoder.name, max_length=params.text_encoder.max_length)
    curve = Curve(recipe, judge.higher_is_better)
    for step in range(check_every, section.max_steps + 1, check_every):
        weights = load_file(checkpoint_folder(checkpoints, step) / "tensors.safetensors")
        ema = UNet(config)
        ema.load_state_dict({k.removeprefix(CHECKPOINT_EMA): v for k, v in weights.items() if k.startswith(CHECKPOINT_EMA)})
        pipeline = Text2Image(vae, ema.eval(), text_encoder, schedule=schedule, sampler=samplers[0][0],
                              spacing=section.sampling.spacing, guidance_scale=section.sampling.guidance_scale)
        scores = {f"{s}-{n}": judge.ours(pipeline, s, n) for s, n in samplers}
        curve.points.append((step, seconds_at[step], scores))
        print(f"{recipe}: step {step}, {seconds_at[step]:.0f} s: "
              + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
    return curve


class DiffusersRecipe:
    """train_text_to_image.py's loop at its defaults, on the ingested train images and their captions."""

    def __init__(self, params: Params, judge: Judge):
        cache, self.vae = open_inputs(params)
        self.vae.eval().requires_grad_(False)
        config = unet_config(params, cache)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)  # train_unet's initial weights
            self.unet = diffusers_twin(UNet(config))
        self.text_encoder = TextEncoder.from_pretrained(params.text_encoder.name,
                                                        max_length=params.text_encoder.max_length)
        self.images = IngestedImages(params.paths.ingested, "train")
        self.noise_scheduler = DDPMScheduler()
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=DIFFUSERS_LR, betas=(0.9, 0.999),
                                           weight_decay=1e-2, eps=1e-8)
        self.generator = torch.Generator().manual_seed(params.seed)
        self.order = EpochOrder(len(self.images), params.train_unet.batch_size, self.generator)
        self.judge = judge

    def step(self) -> None:
        indices = self.order.next_batch()
        with torch.no_grad():
            pixels = torch.stack([self.images[i] for i in indices])
            latents = self.vae.scale_latents(self.vae.encode(pixels).sample(self.generator))
            context = self.text_encoder.encode([self.images.captions[i] for i in indices])
        noise = torch.randn(latents.shape, generator=self.generator)
        t = torch.randint(self.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=self.generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        mask = None if context.attention_mask.all() else context.attention_mask
        prediction = self.unet(noisy, t, context.hidden_states, encoder_attention_mask=mask).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()

    @torch.no_grad()
    def score(self) -> float:
        """The bench prompts drawn as StableDiffusionPipeline draws them: DPMSolverMultistepScheduler from the
        training scheduler's config, 20 steps, guidance 7.5 against the empty prompt, seed per prompt."""
        self.unet.eval()
        scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        images = []
        prompts, seed = self.judge.prompts, self.judge.seed
        for start in range(0, len(prompts), self.judge.batch_size):
            chunk = prompts[start : start + self.judge.batch_size]
            cond = self.text_encoder.encode(chunk)
            context = TextEmbedding.cat([TextEmbedding.cat([self.text_encoder.empty_embedding] * len(chunk)), cond])
            mask = None if context.attention_mask.all() else context.attention_mask
            latents = torch.stack([
                torch.randn((self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size),
                            generator=torch.Generator().manual_seed(seed + start + i)) for i in range(len(chunk))
            ]) * scheduler.init_noise_sigma
            scheduler.set_timesteps(20)
            for t in scheduler.timesteps:
                doubled = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                uncond, cond_out = self.unet(doubled, t, context.hidden_states, encoder_attention_mask=mask).sample.chunk(2)
                latents = scheduler.step(uncond + DIFFUSERS_GUIDANCE * (cond_out - uncond), t, latents).prev_sample
            images.append(self.vae.decode(self.vae.unscale_latents(latents)))
        self.unet.train()
        return self.judge.score(torch.cat(images))


def diffusers_curve(params: Params, judge: Judge, check_every: int, bar: float, budget: float) -> Curve:
    recipe, curve, seconds, step = DiffusersRecipe(params, judge), Curve("diffusers", judge.higher_is_better), 0.0, 0
    while seconds < budget:
        began = time.perf_counter()
        for _ in range(check_every):
            recipe.step()
        seconds += time.perf_counter() - began
        step += check_every
        score = recipe.score()
        curve.points.append((step, seconds, {"dpmpp_2m-20": score}))
        print(f"diffusers: step {step}, {seconds:.0f} s: dpmpp_2m-20 {score:.4g}", flush=True)
        if curve.crossing(bar):
            break
    return curve


def report(curves: list[Curve], bar: float, measure: str) -> None:
    print(f"\n{measure} against training seconds\n\n| recipe | step | seconds | " + " | ".join(
        dict.fromkeys(k for c in curves for _, _, scores in c.points for k in scores)) + " |")
    for curve in curves:
        for step, seconds, scores in curve.points:
            print(f"| {curve.recipe} | {step} | {seconds:.0f} | " + " | ".join(f"{v:.4g}" for v in scores.values()))
    print(f"\n| recipe | time to {bar:.4g} (steps) | best reached (steps, sampler) | time over ours |")
    print("|---|---|---|---|")
    ours = curves[0].crossing(bar) if curves[0].recipe == "ours" else None
    for curve in curves:
        crossed = curve.crossing(bar)
        step, seconds, sampler, score = curve.best()
        when = f"{crossed[1]:.0f} s ({crossed[0]}, {crossed[2]})" if crossed else f"not within {curve.points[-1][1]:.0f} s"
        ratio = f"{crossed[1] / ours[1]:.2f}x" if crossed and ours else ("> cap" if ours else "")
        print(f"| {curve.recipe} | {when} | {score:.4g} at {seconds:.0f} s ({step}, {sampler}) | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--recipes", nargs="+", choices=["ours", "flow", "diffusers"],
                        default=["ours", "flow", "diffusers"])
    parser.add_argument("--check-every", type=int, default=100, help="steps between adherence checks")
    parser.add_argument("--prompts", type=int, default=200, help="val captions drawn and scored at each check")
    parser.add_argument("--judge", choices=["adherence", "frechet"], default="adherence",
                        help="adherence: shapes data's attribute classifier (one-object captions); frechet: any "
                             "data, the Fréchet ratio to the real floor over the first --prompts val captions")
    parser.add_argument("--bar", type=float, default=None, help="default: 0.95 adherence, 1.5 Fréchet ratio")
    parser.add_argument("--cap", type=float, default=4.0, help="the diffusers recipe's time limit, over ours'")
    args = parser.parse_args()
    params = load_params(args.params)
    judge = (Judge if args.judge == "adherence" else FrechetJudge)(params, args.prompts)
    bar = args.bar if args.bar is not None else 0.95 if args.judge == "adherence" else 1.5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {judge.measure}, bar {bar:.4g}, on "
          f"{len(judge.prompts)} val captions, checked every {args.check_every} steps", flush=True)
    curves = []
    with tempfile.TemporaryDirectory() as workdir:
        for recipe in [r for r in ("ours", "flow") if r in args.recipes]:
            curves.append(trained_curve(recipe, params, judge, args.check_every, Path(workdir)))
    if "diffusers" in args.recipes:
        reference = curves[0] if curves else None
        crossed = reference.crossing(bar) if reference else None
        ours_time = crossed[1] if crossed else reference.points[-1][1] if reference else 600.0
        curves.append(diffusers_curve(params, judge, args.check_every, bar, args.cap * ours_time))
    report(curves, bar, judge.measure)


if __name__ == "__main__":
    main()
