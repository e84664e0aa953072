"""The attribute classifier: it learns to read shapes images, `read` names what is drawn, it saves and loads
exactly, and `adherence` scores a reading against a caption's scene by its documented definitions."""

import numpy as np
import pytest
import torch

from ldm.data.shapes import Scene, ShapeObject, ShapesConfig, generate, render
from ldm.evaluation.attributes import (
    AttributeClassifier,
    AttributeClassifierConfig,
    adherence,
    scene_accuracy,
    scene_targets,
    train_attribute_classifier,
)

# 16 px keeps training to seconds; two shapes that stay distinct at that size (a small object is ~4 px wide).
DATA = ShapesConfig(shapes=("square", "triangle"), image_size=16, two_object_fraction=0.5)
CONFIG = AttributeClassifierConfig(
    shapes=DATA.shapes, colors=DATA.colors, sizes=DATA.sizes, image_size=16, channels=(16, 32)
)


def to_tensor(images) -> torch.Tensor:  # PIL images -> (N, 3, H, W) in [-1, 1]
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def dataset(seed: int, count: int) -> tuple[torch.Tensor, list[Scene]]:
    pairs = [generate(DATA, seed, index) for index in range(count)]
    return to_tensor([image for image, _ in pairs]), [scene for _, scene in pairs]


@pytest.fixture(scope="module")
def val():
    return dataset(seed=1, count=300)


@pytest.fixture(scope="module")
def classifier():
    images, scenes = dataset(seed=0, count=1500)
    return train_attribute_classifier(images, scenes, CONFIG, steps=300, batch_size=64, lr=5e-3, seed=0, device="cpu")


def test_learns_to_read_held_out_images(classifier, val):
    images, scenes = val
    untrained = scene_accuracy(AttributeClassifier(CONFIG).eval(), images, scenes)
    trained = scene_accuracy(classifier, images, scenes)
    assert not classifier.training
    assert untrained["all"] < 0.05
    # Measured: color 0.99, shape 0.98, size 0.99, position 1.0, all 0.94.
    assert min(trained[key] for key in ("color", "shape", "size", "position")) > 0.93
    assert trained["all"] > 0.8


def test_read_names_the_rendered_objects(classifier):
    scenes = [
        Scene((ShapeObject("square", "red", "large", "top left"),), "white"),
        Scene((ShapeObject("triangle", "blue", "small", "center"),), "white"),
        Scene(
            (
                ShapeObject("triangle", "yellow", "large", "bottom right"),
                ShapeObject("square", "black", "small", "top right"),
            ),
            "white",
        ),
        Scene(
            (
                ShapeObject("square", "green", "small", "bottom left"),
                ShapeObject("triangle", "cyan", "large", "center"),
            ),
            "white",
        ),
    ]
    read = classifier.read(to_tensor([render(scene, 16) for scene in scenes]), batch_size=3)
    assert [set(objects) for objects in read] == [set(scene.objects) for scene in scenes]


def test_save_and_load_round_trip(classifier, val, tmp_path):
    classifier.save_pretrained(tmp_path)
    loaded = AttributeClassifier.from_pretrained(tmp_path)
    images = val[0][:16]
    assert loaded.config == classifier.config
    with torch.no_grad():
        expected, got = classifier(images), loaded(images)
    assert all(torch.equal(expected[head], got[head]) for head in ("shape", "color", "size"))


def test_rejects_images_of_another_size(classifier):
    with pytest.raises(ValueError, match="16x16"):
        classifier.read(torch.zeros(1, 3, 32, 32))


def test_targets_reject_names_the_config_lacks():
    scene = Scene((ShapeObject("circle", "red", "small", "center"),), "white")
    with pytest.raises(ValueError, match="circle"):
        scene_targets([scene], CONFIG)


RED_CIRCLE = ShapeObject("circle", "red", "small", "top left")
BLUE_SQUARE = ShapeObject("square", "blue", "large", "center")
ONE = Scene((RED_CIRCLE,), "white")
TWO = Scene((RED_CIRCLE, BLUE_SQUARE), "white")


def test_adherence_of_a_perfect_reading():
    scores = adherence([[RED_CIRCLE], [BLUE_SQUARE, RED_CIRCLE]], [ONE, TWO])
    for prefix in ("", "one_object_", "two_object_"):
        for key in ("color", "shape", "size", "position", "object", "count", "all"):
            assert scores[prefix + key] == 1.0
    assert (scores["images"], scores["one_object_images"], scores["two_object_images"]) == (2.0, 1.0, 1.0)


def test_adherence_wrong_color_in_one_of_two_objects():
    green_square = ShapeObject("square", "green", "large", "center")
    scores = adherence([[RED_CIRCLE, green_square]], [TWO])
    assert {k: scores[k] for k in ("color", "shape", "size", "position", "object", "count", "all")} == {
        "color": 0.5, "shape": 1.0, "size": 1.0, "position": 1.0, "object": 0.5, "count": 1.0, "all": 0.0,
    }


def test_adherence_extra_object_breaks_count_and_all():
    scores = adherence([[RED_CIRCLE, BLUE_SQUARE]], [ONE])
    assert (scores["object"], scores["count"], scores["all"]) == (1.0, 0.0, 0.0)
    assert "two_object_all" not in scores
    assert (scores["one_object_images"], scores["two_object_images"]) == (1.0, 0.0)


def test_adherence_object_in_the_wrong_cell_counts_its_attributes_wrong():
    moved = ShapeObject("square", "blue", "large", "bottom right")
    scores = adherence([[RED_CIRCLE, moved], []], [TWO, ONE])
    # Two images, three caption objects: only the red circle of the first image is found where it belongs.
    assert {k: scores[k] for k in ("color", "shape", "size", "position", "object", "count", "all")} == {
        "color": 1 / 3, "shape": 1 / 3, "size": 1 / 3, "position": 1 / 3, "object": 1 / 3, "count": 0.5, "all": 0.0,
    }


def test_adherence_mixed_batch_splits_by_object_count():
    large_red_circle = ShapeObject("circle", "red", "large", "top left")
    green_square = ShapeObject("square", "green", "large", "center")
    read = [
        [RED_CIRCLE],  # exact
        [RED_CIRCLE, BLUE_SQUARE],  # one object too many
        [RED_CIRCLE, green_square],  # wrong color
        [large_red_circle, BLUE_SQUARE],  # wrong size only: still all right
    ]
    scores = adherence(read, [ONE, ONE, TWO, TWO])
    assert scores == {
        "color": 5 / 6, "shape": 1.0, "size": 5 / 6, "position": 1.0, "object": 5 / 6, "count": 0.75, "all": 0.5,
        "one_object_color": 1.0, "one_object_shape": 1.0, "one_object_size": 1.0, "one_object_position": 1.0,
        "one_object_object": 1.0, "one_object_count": 0.5, "one_object_all": 0.5,
        "two_object_color": 0.75, "two_object_shape": 1.0, "two_object_size": 0.75, "two_object_position": 1.0,
        "two_object_object": 0.75, "two_object_count": 1.0, "two_object_all": 0.5,
        "images": 4.0, "one_object_images": 2.0, "two_object_images": 2.0,
    }


def test_adherence_needs_one_reading_per_scene():
    with pytest.raises(ValueError, match="one scene per image"):
        adherence([[RED_CIRCLE]], [ONE, TWO])
