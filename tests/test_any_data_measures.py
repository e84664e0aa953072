"""The measures that work on any data (edge agreement, the loss at fixed draws, MMD, nearest train images,
spread over seeds) and the captioned grids every stage draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.diffusion.schedule import NoiseSchedule
from ldm.evaluation.distribution import (
    median_bandwidth,
    mmd_rbf,
    nearest_cosine,
    nearest_psnr,
    pair_spread,
    seed_spread,
)
from ldm.evaluation.edges import edge_agreement
from ldm.evaluation.grids import captioned_grid, upscale_factor
from ldm.models.text_encoder import TextEmbedding
from ldm.training.denoising import fixed_draw_loss
from tests.ci_stages import RecordingReporter


def square(size: int, lo: int, hi: int) -> torch.Tensor:
    """(1, 1, size, size): the one-pixel outline of the square [lo, hi]."""
    edges = torch.zeros(1, 1, size, size)
    edges[..., lo, lo : hi + 1] = edges[..., hi, lo : hi + 1] = 1
    edges[..., lo : hi + 1, lo] = edges[..., lo : hi + 1, hi] = 1
    return edges


def test_edge_agreement_counts_matches_within_the_tolerance():
    wanted = square(16, 4, 11)
    assert edge_agreement(wanted, wanted) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    shifted = wanted.roll(1, dims=3)  # every edge pixel one column over: within a pixel of the wanted ones
    assert edge_agreement(shifted, wanted)["f1"] == 1.0
    assert edge_agreement(shifted, wanted, tolerance=0)["f1"] < 0.6  # only the shared stretches of the rows
    inner = square(16, 6, 9)  # a smaller square two pixels inside: none of its 12 pixels is near the outline
    both = torch.clamp(wanted + inner, max=1)
    scores = edge_agreement(both, wanted)
    assert scores["recall"] == 1.0 and scores["precision"] == pytest.approx(28 / 40)
    assert scores["f1"] == pytest.approx(2 * (28 / 40) / (1 + 28 / 40))
    assert edge_agreement(torch.zeros_like(wanted), wanted) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        edge_agreement(wanted, wanted[..., :8])


def test_fixed_draw_loss_is_the_same_for_the_same_model_and_tells_a_better_one():
    schedule = NoiseSchedule(prediction_type="epsilon")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 4, 4, generator=generator)
    context = TextEmbedding(torch.zeros(6, 3, 8), torch.ones(6, 3, dtype=torch.bool))
    seen = []

    def zero(noisy, t, states, mask):  # predicts no noise: the loss is the noise's variance, about 1
        seen.append(t)
        return torch.zeros_like(noisy)

    def oracle(noisy, t, states, mask):  # eps from x_t and the true x0 (one batch of all rows, in order)
        a, s = schedule.alphas_cumprod[t].sqrt(), (1 - schedule.alphas_cumprod[t]).sqrt()
        return (noisy - a.view(-1, 1, 1, 1) * latents) / s.view(-1, 1, 1, 1)

    def loss(model, batch_size: int) -> float:
        batches = [(latents[i : i + batch_size], context[i : i + batch_size]) for i in range(0, 6, batch_size)]
        return fixed_draw_loss(model, schedule, batches, torch.device("cpu"), seed=3)

    first = loss(zero, 6)
    assert first == loss(zero, 6) and 0.5 < first < 1.5
    # The timesteps spread evenly over the schedule within a batch, offset by the rows before it.
    assert seen[0].tolist() == [0, 166, 333, 500, 666, 833]
    loss(zero, 3)
    assert [t.tolist() for t in seen[-2:]] == [[0, 333, 666], [3, 336, 669]]
    assert loss(oracle, 6) < 1e-6
    assert fixed_draw_loss(zero, schedule, [], torch.device("cpu"), seed=3) != fixed_draw_loss(
        zero, schedule, [], torch.device("cpu"), seed=3)  # NaN: no batch, no loss


def test_captioned_grid_upscales_small_images_and_writes_the_captions():
    rows = [torch.full((3, 3, 16, 16), -1.0), torch.full((3, 3, 16, 16), 1.0)]  # black, then white
    grid = captioned_grid(rows, ["a cat", "a dog", "a long caption " * 8], ["generated", "real"])
    assert upscale_factor(16, 16) == 8 and upscale_factor(200, 300) == 1 and upscale_factor(32, 64) == 4
    pixels = np.asarray(grid)
    width, height = grid.size
    assert width == 96 + 3 * (128 + 4) + 4
    # The first image, 8x: a 128 px black square from (100, 4); under both rows, dark caption text on white.
    assert (pixels[4:132, 100:228] == 0).all() and (pixels[136:264, 100:228] == 255).all()
    caption_band = pixels[268:, 100:]
    assert caption_band.min() < 128 and height > 268
    with pytest.raises(ValueError, match="captions"):
        captioned_grid(rows, ["one caption"])


def test_mmd_is_about_zero_for_two_samples_of_one_distribution_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=generator), torch.randn(200, 8, generator=generator)
    bandwidth = median_bandwidth(a)
    assert bandwidth == pytest.approx(4.0, rel=0.1)  # sqrt(2 * 8) for unit Gaussians
    same = mmd_rbf(a, b, bandwidth)
    shifted, far = mmd_rbf(a, b + 0.5, bandwidth), mmd_rbf(a, b + 2.0, bandwidth)
    assert abs(same) < 0.01 < shifted < far
    with pytest.raises(ValueError, match="at least two"):
        mmd_rbf(a[:1], b, bandwidth)


def test_nearest_psnr_finds_the_nearest_reference_and_copies_score_highest():
    generator = torch.Generator().manual_seed(0)
    references = torch.rand(50, 3, 8, 8, generator=generator) * 2 - 1
    queries = torch.cat([references[7:8], references[3:4] + 0.1, torch.rand(1, 3, 8, 8, generator=generator)])
    psnr, index = nearest_psnr(queries, references, chunk=2)
    brute = ((queries[:, None] - references[None]) ** 2).mean((2, 3, 4))
    assert index.tolist() == brute.argmin(1).tolist() and index[:2].tolist() == [7, 3]
    assert psnr[0] >= 99 and psnr[1] == pytest.approx(10 * np.log10(4 / 0.01), abs=0.01) and psnr[2] < 15
    assert nearest_cosine(queries.flatten(1), references.flatten(1))[0] == pytest.approx(1.0)


def test_seed_spread_is_zero_when_every_seed_gives_one_image():
    generator = torch.Generator().manual_seed(0)
    one_image = torch.randn(5, 1, 16, generator=generator).expand(5, 4, 16)
    assert seed_spread(one_image) == pytest.approx(0.0, abs=1e-6)
    different = torch.randn(5, 4, 16, generator=generator)
    assert seed_spread(different) == pytest.approx(1.0, abs=0.3)  # random directions: cosine about 0
    assert pair_spread(different[:, 0]) == pytest.approx(seed_spread(different[None, :, 0]))
    with pytest.raises(ValueError, match="seeds >= 2"):
        seed_spread(different[:, :1])


def test_the_retrieval_headline_scores_unseen_captions_and_is_capped_where_generated_beat_real():
    from stages.evaluate import retrieval_headline

    seen = torch.tensor([True, True, False, False, False])
    real = {"retrieval_top1": 0.2, "retrieval_top1_unseen": 0.3, "retrieval_chance": 0.2}
    # Copies of train images for seen captions make the all-prompts ratio 2.5; the unseen ones decide.
    modest = {"retrieval_top1": 0.5, "retrieval_relative_to_real": 2.5,
              "retrieval_top1_unseen": 0.15, "retrieval_unseen_relative_to_real": 0.5}
    log = RecordingReporter()
    assert retrieval_headline(modest, real, seen, log) == {
        "prompt_adherence": 0.5, "adherence_prompts": 3.0, "evaluator_prefers_generated": 0.0}
    assert log.lines == []
    fooled = modest | {"retrieval_top1_unseen": 0.6, "retrieval_unseen_relative_to_real": 2.0}
    headline = retrieval_headline(fooled, real, seen, log)
    assert headline["prompt_adherence"] == 1.0 and headline["evaluator_prefers_generated"] == 1.0
    assert "warning" in log.lines[0] and "capped at 1" in log.lines[0]
    # Every val caption is a train caption too: all prompts are scored.
    everything_seen = {k: v for k, v in real.items() if k != "retrieval_top1_unseen"}
    headline = retrieval_headline(modest, everything_seen, torch.ones(5, dtype=torch.bool), log)
    assert headline == {"prompt_adherence": 1.0, "adherence_prompts": 5.0, "evaluator_prefers_generated": 1.0}
