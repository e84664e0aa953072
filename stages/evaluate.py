"""DVC stage `evaluate`: does the trained model draw what its prompts say, and do its images look like the data?

reads:  paths.ingested (real train and val images), paths.latents (the captions' cached embeddings),
        paths.text2img; params seed, device, text_encoder, evaluate
writes: paths.eval/metrics.json             every number below (committed with dvc.lock; `dvc metrics show` it)
        paths.metrics/headline/evaluate.json   the DVC metric: headline adherence, Frechet ratio, copy rate
        paths.eval/plots/adherence.csv      one row per sampler: steps and its adherence (a DVC plot)
        paths.eval/plots/quality_per_compute.csv  adherence of every sampler at every step count (a DVC plot)
        paths.eval/plots/<sampler>-<steps>.png   generated images over the real val images of the same prompts,
                                                 each column captioned
        paths.eval/plots/nearest_train.png, diversity.png   memorisation and diversity, below

The prompts are the captions of the first `num_prompts` val rows (in a seeded order), so the generated set
has the data's mix of one- and two-object captions and a real image for each; each is drawn once per sampler
in `samplers` with seed `evaluate.seed + i`.

- Prompt adherence (data with shapes attributes): an attribute classifier trained here on the real train
  images (its accuracy on real val images is reported: the reading is only as good as it is) reads every
  generated image; `ldm.evaluation.attributes.adherence` compares that with the prompt's scene.
- For any data: a small image encoder trained contrastively against the frozen text encoder on the real
  train images (`ldm.evaluation.evaluator`) gives, in its feature space, an image-text score and caption
  retrieval top-1 among the prompts' distinct captions, and each number is put beside the same measurement
  of real images (`real`):
  - Fréchet distance and an unbiased RBF MMD (`ldm.evaluation.distribution`) of the generated images to a
    sample of real train images, beside the real val images' distance to the same sample (the floor a
    perfect model reaches): `frechet_ratio_to_floor` near 1 is as good as real; (`frechet_distance` is to
    the val images themselves, which share the generated images' captions);
  - memorisation (`evaluate.memorisation`): each generated image's nearest train image by pixels (PSNR) and
    by features, for seen and unseen captions apart; a copy is nearer than `copy_quantile` of the real val
    images come to theirs (so about 5% of real val images count as copies: the rate chance gives);
    `eval/plots/nearest_train.png` shows generated images over their nearest train images;
  - diversity (`evaluate.diversity`): one prompt's images over several seeds, their mean feature distance
    beside that of real images sharing a caption (or, on data whose captions do not repeat, of real val
    images of different captions: an upper bound); near 0 means the noise is ignored;
    `eval/plots/diversity.png` shows them.
  Inception FID through torchmetrics when its weights are on this machine; otherwise the log says why not.
- The VAE's reconstruction PSNR / SSIM on the val images.

`headline` holds the first sampler's numbers; `headline.prompt_adherence` is what picks the registry's
`champion`: on shapes data the attribute classifier's `all`; on other data caption retrieval top-1 of the
generated images over that of the real val images (1 is as good as real), for the val captions that no train
image has (`headline.adherence_prompts` of them; all val captions when each is also a train caption), capped
at 1 (`retrieval_headline` says why). An evaluator that retrieves the captions of generated images better than
those of real ones is not to be trusted: `headline.evaluator_prefers_generated` is then 1. The attribute
measurements (classifier, adherence, negative
prompt) need shapes data; on other data `attribute_measurements` says `not_shapes_data`, and quality per
compute measures the relative retrieval instead.

    python -m stages.evaluate [--params params.yaml]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ldm.data.buckets import Size
from ldm.data.ingested import IngestedImages
from ldm.data.latent_cache import LatentCache, LatentCacheError, TextTable, text_key
from ldm.data.shapes import Scene, parse_caption
from ldm.diffusion.pipeline import Text2Image
from ldm.errors import InputError
from ldm.evaluation.attributes import (
    AttributeClassifier,
    adherence,
    scene_accuracy,
)
from ldm.evaluation.distribution import (
    median_bandwidth,
    mmd_rbf,
    nearest_cosine,
    nearest_psnr,
    pair_spread,
    seed_spread,
)
from ldm.evaluation.evaluator import (
    ContrastiveEvaluator,
    ContrastiveEvaluatorConfig,
    frechet_distance,
    image_embeddings,
    image_text_score,
    inception_fid,
    retrieval_top1,
    train_contrastive_evaluator,
)
from ldm.evaluation.grids import at_own_shapes, captioned_grid
from ldm.evaluation.reconstruction import reconstruction_metrics
from ldm.models.text_encoder import TextEmbedding, TextEncoderNotFoundError
from ldm.training.checkpoint import atomic_directory
from stages.evaluation import RealImages, fit_attribute_classifier, generate
from stages.params import EvaluateParams, Params, resolve_device
from stages.reporting import (
    Reporter,
    StageResult,
    flatten,
    stage_main,
    write_csv,
    write_headline,
    write_json,
)

STAGE = "evaluate"


def open_text_table(directory: str, params: Params) -> TextTable:
    """The latent cache's caption embeddings, all kept decoded (evaluation reads the captions in any order)."""
    try:
        cache = LatentCache(directory)
        cache.check_compatible(text_encoder_name=params.text_encoder.name, text_max_length=params.text_encoder.max_length)
    except (FileNotFoundError, LatentCacheError) as e:
        raise InputError(f"{e} (to rebuild it: `dvc repro cache_latents`)") from None
    return cache.open_text(cache_groups=None)


def caption_table(text: TextTable, captions: list[str]) -> tuple[TextEmbedding, torch.Tensor]:
    """The distinct captions' embeddings (K, S, D), read from the latent cache rather than encoded again,
    and each caption's row in them (N,)."""
    distinct = list(dict.fromkeys(captions))
    table = text.lookup(text.index_of([text_key(c) for c in distinct]))
    row = {caption: i for i, caption in enumerate(distinct)}
    return table, torch.tensor([row[c] for c in captions])


def fit_evaluator(
    params: Params, train: RealImages, text: TextTable, device: torch.device, log: Callable[[str], object]
) -> ContrastiveEvaluator:
    """The contrastive evaluator of every feature-space measure, trained on the real train images against their
    captions' cached embeddings (`text`)."""
    train_text, train_ids = caption_table(text, train.captions)
    return train_contrastive_evaluator(
        train.images, train_text, train_ids,
        ContrastiveEvaluatorConfig(image_size=params.image_size, text_dim=train_text.hidden_states.shape[-1]),
        steps=params.evaluate.evaluator_steps, seed=params.seed, device=device, log=log,
    )


def comparison_grid(generated: torch.Tensor, real: torch.Tensor, prompts: list[str], count: int,
                    sizes: list[Size] | None = None):
    """`count` generated images (top row) over the real val images of the same prompts (bottom row), each at its
    own shape (`sizes`, the real images' (width, height); None: as they are)."""
    shown = None if sizes is None else sizes[:count]
    return captioned_grid([at_own_shapes(generated[:count], shown), at_own_shapes(real[:count], shown)],
                          prompts[:count], ["generated", "real"])


QUALITY_PER_COMPUTE_CSV = "quality_per_compute.csv"


def quality_per_compute(
    pipeline: Text2Image, score: Callable[[torch.Tensor, int], float], prompts: list[str], sizes: list[Size],
    canvas: int, section: EvaluateParams, reporter: Reporter,
) -> tuple[dict, list[dict]]:
    """Adherence and seconds per image of every sampler at every step count, on the first prompts (each drawn
    at its size, measured on the canvas); `score(images, count)` is the adherence of the first `count` prompts'
    images.

    -> ({"<sampler>-<steps>": {"adherence", "seconds_per_image"}}, one CSV row per step count with a column
    of adherence and one of seconds per image per sampler: what `dvc plots show` draws as a line per sampler)
    """
    sweep = section.quality_per_compute
    prompts, sizes = prompts[: sweep.num_prompts], sizes[: sweep.num_prompts]
    measured, rows = {}, {steps: {"steps": steps} for steps in sweep.steps}
    for sampler in sweep.samplers:
        for steps in sweep.steps:
            key = f"{sampler}-{steps}"
            began = time.perf_counter()
            generated = generate(pipeline, prompts, sampler, steps, section.guidance_scale, section.seed,
                                 section.batch_size, reporter, f"{STAGE} quality per compute {key}", sizes=sizes,
                                 canvas=canvas)
            seconds = (time.perf_counter() - began) / len(prompts)
            all_right = score(generated, len(prompts))
            measured[key] = {"adherence": all_right, "seconds_per_image": seconds}
            rows[steps] |= {sampler: all_right, f"{sampler}_seconds_per_image": seconds}
        reporter.info(f"{STAGE}: {sampler}: adherence " + ", ".join(
            f"{measured[f'{sampler}-{s}']['adherence']:.1%} at {s} steps" for s in sweep.steps
        ))
    return measured, list(rows.values())


def run(params: Params, reporter: Reporter) -> StageResult:
    paths, section = params.paths, params.evaluate
    device = resolve_device(params.device)
    try:
        pipeline = Text2Image.from_pretrained(paths.text2img, device=device)
    except (FileNotFoundError, TextEncoderNotFoundError, ValueError) as e:
        raise InputError(f"{e} (to train the model: `dvc repro train_unet`)") from None
    image_size = params.image_size  # every image is measured on this square (aspect-ratio buckets squashed onto it)
    train = RealImages(paths.ingested, "train", section.max_train_images, params.seed, image_size)
    val = RealImages(paths.ingested, "val", section.num_prompts, section.seed, image_size)
    prompts = val.captions  # each drawn at its val image's size: the bucket mix of the real images
    seen = torch.tensor([p in train.all_captions for p in prompts], dtype=torch.bool)  # (N,) a train caption too
    metrics: dict = {"prompts": len(prompts), "prompts_unseen_in_training": (~seen).float().mean().item()}
    reporter.info(f"{STAGE}: {len(prompts)} val prompts, {len(train)} real train images to learn the evaluators from")

    metrics["vae"] = reconstruction_metrics(pipeline.vae, IngestedImages(paths.ingested, "val"), section.batch_size)

    scenes = _scenes(val, prompts)
    classifier = None
    if train.scenes is not None and scenes is not None:
        began = time.perf_counter()
        classifier = fit_attribute_classifier(
            train.images, train.scenes, val.scenes, section.classifier_steps, params.seed, device, reporter
        )
        accuracy = scene_accuracy(classifier, val.images.to(device), val.scenes)
        metrics["classifier"] = {**accuracy, "seconds": time.perf_counter() - began}
        reporter.info(f"{STAGE}: attribute classifier reads {accuracy['all']:.2%} of real val images exactly")
    else:
        reporter.info(f"{STAGE}: the data has no shapes attributes, so prompt adherence is not measured")

    began = time.perf_counter()
    text = open_text_table(paths.latents, params)
    evaluator = fit_evaluator(params, train, text, device, reporter.info)
    prompt_text, prompt_ids = caption_table(text, prompts)
    metrics["real"] = {
        "image_text_score": image_text_score(evaluator, val.images, prompt_text, prompt_ids),
        "retrieval_top1": retrieval_top1(evaluator, val.images, prompt_text, prompt_ids),
        "retrieval_chance": 1 / len(prompt_text),
        "evaluator_seconds": time.perf_counter() - began,
    }
    if classifier is None and (~seen).any():
        metrics["real"]["retrieval_top1_unseen"] = retrieval_top1(
            evaluator, val.images[~seen], prompt_text, prompt_ids[~seen]
        )
    # The floors. The generated images are drawn for the val captions, so they are set against an independent
    # sample of train images (as many as the val ones) exactly as the real val images are: the val images'
    # distance to that sample is what a perfect model would reach. (Against the val images themselves the
    # generated ones would have the advantage of sharing their captions.) The Fréchet distance shrinks with
    # the sample size, so only its ratio to the floor at the same size means something.
    val_features = image_embeddings(evaluator, val.images)
    train_features = image_embeddings(evaluator, train.images)
    reference, reference_features = train.images[: len(val)], train_features[: len(val)]
    bandwidth = median_bandwidth(reference_features)
    metrics["real"] |= {
        "frechet_distance_val_to_train": frechet_distance(evaluator, reference, val.images),
        "mmd_val_to_train": mmd_rbf(reference_features, val_features, bandwidth),
        "mmd_bandwidth": bandwidth,
    }

    metrics["samplers"], rows, grids, drawn = {}, [], {}, {}
    fid_skipped = None  # why Inception FID could not be measured: said in the log, kept out of the metrics
    for run_spec in section.samplers:
        key = f"{run_spec.sampler}-{run_spec.steps}"
        began = time.perf_counter()
        generated = generate(
            pipeline, prompts, run_spec.sampler, run_spec.steps, section.guidance_scale, section.seed,
            section.batch_size, reporter, f"{STAGE} {key}", sizes=val.sizes, canvas=image_size,
        )
        seconds = time.perf_counter() - began
        result = {
            "seconds_per_image": seconds / len(prompts),
            "frechet_distance": frechet_distance(evaluator, val.images, generated),
            "image_text_score": image_text_score(evaluator, generated, prompt_text, prompt_ids),
            "retrieval_top1": retrieval_top1(evaluator, generated, prompt_text, prompt_ids),
            "frechet_distance_to_train": frechet_distance(evaluator, reference, generated),
            "mmd_to_train": mmd_rbf(reference_features, image_embeddings(evaluator, generated), bandwidth),
        }
        result["frechet_ratio_to_floor"] = result["frechet_distance_to_train"] / max(
            metrics["real"]["frechet_distance_val_to_train"], 1e-12
        )
        drawn[key] = generated
        fid, skipped = inception_fid(val.images, generated)
        if fid is not None:
            result["inception_fid"] = fid
        else:
            fid_skipped = skipped
        if classifier is not None:
            result["adherence"] = adherence(classifier.read(generated.to(device)), scenes)
        else:
            result["retrieval_relative_to_real"] = relative_retrieval(
                result["retrieval_top1"], metrics["real"]["retrieval_top1"], metrics["real"]["retrieval_chance"]
            )
            if "retrieval_top1_unseen" in metrics["real"]:
                result["retrieval_top1_unseen"] = retrieval_top1(
                    evaluator, generated[~seen], prompt_text, prompt_ids[~seen]
                )
                result["retrieval_unseen_relative_to_real"] = relative_retrieval(
                    result["retrieval_top1_unseen"], metrics["real"]["retrieval_top1_unseen"],
                    metrics["real"]["retrieval_chance"],
                )
        metrics["samplers"][key] = result
        rows.append({"sampler": run_spec.sampler, "steps": run_spec.steps, **flatten(result.get("adherence", {}))})
        grids[key] = comparison_grid(generated, val.images, prompts, section.grid_images, val.sizes)
        reporter.info(f"{STAGE}: {key}: {_summary(result)}")
        reporter.metrics(flatten(result, f"{key}."))
    if fid_skipped is not None:
        reporter.info(f"{STAGE}: {fid_skipped}")

    if classifier is not None and section.negative_color is not None:
        metrics["negative_prompt"] = negative_prompt_effect(pipeline, classifier, prompts, scenes, section, reporter)
    if classifier is None:
        metrics["attribute_measurements"] = "not_shapes_data"

        def score(images: torch.Tensor, count: int) -> float:
            real = retrieval_top1(evaluator, val.images[:count], prompt_text, prompt_ids[:count])
            generated = retrieval_top1(evaluator, images, prompt_text, prompt_ids[:count])
            return relative_retrieval(generated, real, metrics["real"]["retrieval_chance"])
    else:
        def score(images: torch.Tensor, count: int) -> float:
            return adherence(classifier.read(images.to(device)), scenes[:count])["all"]
    compute_rows = []
    if section.quality_per_compute is not None:
        metrics["quality_per_compute"], compute_rows = quality_per_compute(
            pipeline, score, prompts, val.sizes, image_size, section, reporter
        )

    first_key = f"{section.samplers[0].sampler}-{section.samplers[0].steps}"
    pictures = {}
    if section.memorisation is not None:
        metrics["memorisation"], pictures["nearest_train.png"] = memorisation(
            pipeline, evaluator, train, train_features, val, val_features, prompts, seen, drawn[first_key], section,
            reporter,
        )
    if section.diversity is not None:
        metrics["diversity"], pictures["diversity.png"] = diversity(
            pipeline, evaluator, prompts, train, val, val_features, section, reporter
        )

    first = metrics["samplers"][first_key]
    if classifier is not None:
        metrics["headline"] = {"prompt_adherence": first["adherence"]["all"]} | {
            f"adherence_{k}": v for k, v in first["adherence"].items() if not k.endswith("images")
        }
    else:
        metrics["headline"] = retrieval_headline(first, metrics["real"], seen, reporter)

    metrics["headline"]["frechet_ratio_to_floor"] = first["frechet_ratio_to_floor"]
    if "memorisation" in metrics and metrics["memorisation"]["unseen"]["images"]:
        metrics["headline"]["copy_rate_unseen"] = metrics["memorisation"]["unseen"]["copy_rate_pixels"]
    if "diversity" in metrics:
        metrics["headline"]["diversity_ratio"] = metrics["diversity"]["ratio"]

    out = Path(paths.eval)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    with atomic_directory(out / "plots") as tmp:
        for name, picture in ({f"{key}.png": grid for key, grid in grids.items()} | pictures).items():
            picture.save(tmp / name, format="PNG")
        write_csv(tmp / "adherence.csv", rows, tuple(dict.fromkeys(k for row in rows for k in row)))
        # Declared as a plot, so written even when the sweep is off (params null): a header, no rows.
        write_csv(tmp / QUALITY_PER_COMPUTE_CSV, compute_rows, tuple(compute_rows[0]) if compute_rows else ("steps",))
    write_json(metrics_path, metrics)
    headline = metrics["headline"]
    write_headline(paths.metrics, STAGE, {
        "adherence": headline["prompt_adherence"], "fd_ratio": headline["frechet_ratio_to_floor"],
    } | ({"copies": headline["copy_rate_unseen"]} if "copy_rate_unseen" in headline else {}))
    numbers = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    return StageResult(metrics=numbers, artifacts=[metrics_path, out / "plots"])


def retrieval_headline(first: dict, real: dict, seen: torch.Tensor, reporter: Reporter) -> dict[str, float]:
    """The headline adherence on data without shapes attributes: caption retrieval of the generated images
    relative to the real val images', over the val prompts whose captions no train image has (all prompts when
    every val caption is also a train caption). Unseen captions, because the evaluator learnt the train
    images: a model that redraws the train image of a seen caption is retrieved better than a real image is,
    for copying, not for following the caption. Capped at 1: an evaluator that rates generated images above
    real ones measures something other than adherence, and must not crown the registry's champion for it."""
    scope = "_unseen" if "retrieval_top1_unseen" in real else ""
    generated_top1, real_top1 = first[f"retrieval_top1{scope}"], real[f"retrieval_top1{scope}"]
    prefers = generated_top1 > real_top1
    if prefers:
        reporter.info(
            f"{STAGE}: warning: the evaluator retrieves the captions of generated images ({generated_top1:.2%}) "
            f"better than those of the real val images ({real_top1:.2%}){' for unseen captions' if scope else ''}: "
            "it rewards something other than matching the caption (often near-copies of training images); "
            "judge adherence by the grids. The headline adherence is capped at 1"
        )
    return {
        "prompt_adherence": min(first[f"retrieval{scope}_relative_to_real"], 1.0),
        "adherence_prompts": float((~seen).sum() if scope else len(seen)),
        "evaluator_prefers_generated": float(prefers),
    }


def memorisation(
    pipeline: Text2Image, evaluator, train: RealImages, train_features: torch.Tensor, val: RealImages,
    val_features: torch.Tensor, prompts: list[str], seen: torch.Tensor, generated: torch.Tensor,
    section: EvaluateParams, reporter: Reporter,
):
    """Each generated image's nearest train image, by pixels (PSNR) and by evaluator features (cosine), for
    seen captions (val prompts that are also train captions, and `seen_prompts` train captions drawn here) and
    unseen ones apart. A copy is an image nearer its nearest train image than `copy_quantile` of the real val
    images are to theirs: real val images are new draws of the data, so that is how near chance alone comes.
    -> (metrics, the picture of the nearest train images)"""
    knobs, first = section.memorisation, section.samplers[0]
    real_psnr, _ = nearest_psnr(val.images, train.images)
    real_cosine = nearest_cosine(val_features, train_features)
    psnr_bar = torch.quantile(real_psnr, knobs.copy_quantile).item()
    cosine_bar = torch.quantile(real_cosine, knobs.copy_quantile).item()
    seen_prompts = train.captions[: knobs.seen_prompts]
    drawn_seen = generate(pipeline, seen_prompts, first.sampler, first.steps, section.guidance_scale, section.seed,
                          section.batch_size, reporter, f"{STAGE} memorisation seen captions",
                          sizes=train.sizes[: knobs.seen_prompts], canvas=train.images.shape[-1])
    groups = {
        "seen": (torch.cat([generated[seen], drawn_seen]), [p for p, s in zip(prompts, seen) if s] + seen_prompts,
                 [z for z, s in zip(val.sizes, seen) if s] + train.sizes[: knobs.seen_prompts]),
        "unseen": (generated[~seen], [p for p, s in zip(prompts, seen) if not s],
                   [z for z, s in zip(val.sizes, seen) if not s]),
    }
    results: dict = {"thresholds": {"psnr": psnr_bar, "cosine": cosine_bar}}
    results["real_val"] = _nearness(real_psnr, real_cosine, psnr_bar, cosine_bar)
    shown: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    for name, (images, captions, sizes) in groups.items():
        if not len(images):
            results[name] = {"images": 0}
            continue
        psnr, index = nearest_psnr(images, train.images)
        results[name] = _nearness(psnr, nearest_cosine(image_embeddings(evaluator, images), train_features),
                                  psnr_bar, cosine_bar)
        count = min(4, len(images))
        nearest = index[:count].tolist()
        shown.append((at_own_shapes(images[:count], sizes[:count]),
                      at_own_shapes(train.images[nearest], [train.sizes[i] for i in nearest]),
                      [f"{p:.1f} dB, {name}: {c}" for c, p in zip(captions[:count], psnr[:count].tolist())]))
        reporter.info(
            f"{STAGE}: memorisation, {name} captions: {results[name]['copy_rate_pixels']:.0%} of {len(images)} images "
            f"are copies by pixels, {results[name]['copy_rate_features']:.0%} by features (real val images: "
            f"{results['real_val']['copy_rate_pixels']:.0%} and {results['real_val']['copy_rate_features']:.0%}); "
            f"median PSNR to the nearest train image {results[name]['nearest_psnr_median']:.1f} dB "
            f"(real val {results['real_val']['nearest_psnr_median']:.1f} dB)"
        )
    picture = captioned_grid(
        [torch.cat([g for g, _, _ in shown]), torch.cat([t for _, t, _ in shown])],
        [c for _, _, captions in shown for c in captions], ["generated", "nearest train image"],
    )
    return results, picture


def _nearness(psnr: torch.Tensor, cosine: torch.Tensor, psnr_bar: float, cosine_bar: float) -> dict[str, float]:
    return {
        "images": len(psnr),
        "copy_rate_pixels": (psnr >= psnr_bar).float().mean().item(),
        "copy_rate_features": (cosine >= cosine_bar).float().mean().item(),
        "nearest_psnr_median": psnr.median().item(),
        "nearest_cosine_median": cosine.median().item(),
    }


def diversity(
    pipeline: Text2Image, evaluator, prompts: list[str], train: RealImages, val: RealImages,
    val_features: torch.Tensor, section: EvaluateParams, reporter: Reporter,
):
    """The first prompts drawn with several seeds: the mean feature distance between one prompt's images (0: the
    model ignores its noise, as a memorised one does), beside the same for real images of one caption (pairs of
    train images sharing a caption) when the data has enough such pairs, or else beside the distance between
    real val images of different captions (an upper bound: one caption's images vary less than the data).
    -> (metrics, the picture: one column per prompt, one row per seed)"""
    knobs, first = section.diversity, section.samplers[0]
    chosen = prompts[: knobs.prompts]
    images = generate(pipeline, chosen * knobs.seeds, first.sampler, first.steps, section.guidance_scale,
                      section.seed, section.batch_size, reporter, f"{STAGE} diversity",
                      sizes=val.sizes[: len(chosen)] * knobs.seeds, canvas=val.images.shape[-1])
    features = image_embeddings(evaluator, images).view(knobs.seeds, len(chosen), -1).transpose(0, 1)
    spread = seed_spread(features)
    pairs = same_caption_pairs(train.captions, knobs.prompts)
    unrelated = pair_spread(val_features)
    if len(pairs) == knobs.prompts:
        pair_images = train.images[torch.tensor(pairs).flatten()]
        real, reference = seed_spread(image_embeddings(evaluator, pair_images).view(len(pairs), 2, -1)), "same_caption"
    else:
        real, reference = unrelated, "different_captions"
    results = {"prompts": len(chosen), "seeds": knobs.seeds, "seed_spread": spread, "real_spread": real,
               "real_reference": reference, "ratio": spread / real if real > 0 else 0.0,
               # Near 1: one prompt's images differ as much as real images of unrelated captions do, so the
               # prompt hardly narrows what is drawn.
               "real_spread_different_captions": unrelated,
               "ratio_to_different_captions": spread / unrelated if unrelated > 0 else 0.0}
    reporter.info(
        f"{STAGE}: diversity: one prompt's images over {knobs.seeds} seeds are {spread:.3f} apart (cosine distance), "
        f"real images of {reference.replace('_', ' ')} {real:.3f}: ratio {results['ratio']:.2f}; "
        f"real images of different captions {unrelated:.3f}: ratio {results['ratio_to_different_captions']:.2f}"
    )
    shown = min(8, len(chosen))
    rows = [at_own_shapes(images[s * len(chosen) : s * len(chosen) + shown], val.sizes[:shown])
            for s in range(knobs.seeds)]
    return results, captioned_grid(rows, chosen[:shown], [f"seed {s + 1}" for s in range(knobs.seeds)])


def same_caption_pairs(captions: list[str], limit: int) -> list[tuple[int, int]]:
    """Up to `limit` pairs of indices of two images with one caption, one pair per caption, in order."""
    first: dict[str, int | None] = {}
    pairs = []
    for i, caption in enumerate(captions):
        if caption not in first:
            first[caption] = i
        elif first[caption] is not None:
            pairs.append((first[caption], i))
            first[caption] = None
            if len(pairs) == limit:
                break
    return pairs


def relative_retrieval(generated: float, real: float, chance: float) -> float:
    """Caption retrieval of generated images over that of the real images of the same prompts; the real one
    floored at `chance`, so an evaluator no better than chance cannot inflate the ratio."""
    return generated / max(real, chance)


def negative_prompt_effect(
    pipeline: Text2Image, classifier: AttributeClassifier, prompts: list[str], scenes: list[Scene],
    section: EvaluateParams, reporter: Reporter,
) -> dict[str, float]:
    """How often an object of `negative_color` is drawn for the prompts that ask for one, without and with that
    colour as the negative prompt (which guidance then steers away from)."""
    color = section.negative_color
    asking = [p for p, s in zip(prompts, scenes) if any(o.color == color for o in s.objects)]
    if not asking:
        reporter.info(f"{STAGE}: no prompt asks for {color}, so the negative prompt's effect is not measured")
        return {}
    sampler = section.samplers[0]
    rates = {}
    for key, negative in (("without", None), ("with", color)):
        images = generate(
            pipeline, asking, sampler.sampler, sampler.steps, section.guidance_scale, section.seed, section.batch_size,
            reporter, f"{STAGE} negative prompt {key}", negative_prompt=negative,
        )
        read = classifier.read(images)
        rates[f"{color}_rate_{key}_negative"] = sum(any(o.color == color for o in r) for r in read) / len(read)
    rates["prompts"] = float(len(asking))
    reporter.info(
        f"{STAGE}: negative prompt {color!r}: {color} objects in {rates[f'{color}_rate_without_negative']:.2%} of "
        f"the images of {len(asking)} prompts asking for one, {rates[f'{color}_rate_with_negative']:.2%} with it"
    )
    return rates


def _scenes(val: RealImages, prompts: list[str]) -> list[Scene] | None:
    if val.scenes is None:
        return None
    try:
        return [parse_caption(p) for p in prompts]
    except ValueError:
        return None


def _summary(result: dict) -> str:
    parts = [f"FD {result['frechet_distance']:.3f}", f"retrieval {result['retrieval_top1']:.2%}"]
    if "adherence" in result:
        a = result["adherence"]
        parts.insert(0, f"adherence all {a['all']:.2%} (one object {a.get('one_object_all', float('nan')):.2%}, "
                        f"two objects {a.get('two_object_all', float('nan')):.2%})")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        STAGE, "Measure prompt adherence and image quality of the trained model.", run,
        lambda r: ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items() if k.startswith("headline.")) or "done",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
