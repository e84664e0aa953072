"""The built-in shapes dataset: deterministic, captions that parse back exactly, and pixels that show the caption."""

import itertools
import json

import numpy as np
import pytest

from ldm.data.images import to_png
from ldm.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesConfig,
    caption,
    generate,
    parse_caption,
    render,
)

EVERYTHING = ShapesConfig(
    shapes=SHAPES,
    colors=tuple(COLORS),
    sizes=tuple(SIZES),
    positions=tuple(POSITIONS),
    backgrounds=("white", "black", "gray", "yellow"),
    two_object_fraction=0.5,
)


def dataset(config, seed, count):
    return [generate(config, seed, index) for index in range(count)]


@pytest.fixture(scope="module")
def samples():
    return dataset(EVERYTHING, seed=3, count=400)


def test_same_seed_gives_identical_bytes_and_another_seed_differs():
    first = [(to_png(image), caption(scene)) for image, scene in dataset(EVERYTHING, 0, 40)]
    again = [(to_png(image), caption(scene)) for image, scene in dataset(EVERYTHING, 0, 40)]
    other = [(to_png(image), caption(scene)) for image, scene in dataset(EVERYTHING, 1, 40)]
    assert first == again
    assert sum(a != b for a, b in zip(first, other)) > 30


def test_an_image_depends_only_on_seed_and_index():
    forwards = [(to_png(image), scene) for image, scene in dataset(EVERYTHING, 5, 12)]
    backwards = [(to_png(image), scene) for image, scene in (generate(EVERYTHING, 5, i) for i in reversed(range(12)))]
    assert forwards == backwards[::-1]


def test_every_caption_parses_back_to_the_scene_drawn(samples):
    counts = {1: 0, 2: 0}
    for _, scene in samples:
        counts[len(scene.objects)] += 1
        assert parse_caption(caption(scene)) == scene
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert counts[1] > 100 and counts[2] > 100


def test_scenes_follow_the_rules(samples):
    for image, scene in samples:
        assert image.mode == "RGB" and image.size == (32, 32)
        assert all(o.color != scene.background for o in scene.objects)
        assert len({o.position for o in scene.objects}) == len(scene.objects)
    drawn = {attr: {getattr(o, attr) for _, s in samples for o in s.objects} for attr in ("shape", "color", "position")}
    assert drawn["shape"] == set(SHAPES)
    assert drawn["position"] == set(POSITIONS)
    assert drawn["color"] == set(COLORS)


def cell_of(x, y, size=32):
    return int(y * 3 // size), int(x * 3 // size)


def test_objects_are_drawn_in_their_cell_in_their_color(samples):
    for image, scene in samples:
        pixels = np.asarray(image)
        for color in {o.color for o in scene.objects}:
            ys, xs = np.nonzero((pixels == COLORS[color]).all(axis=-1))
            cells = {cell_of(x + 0.5, y + 0.5) for x, y in zip(xs, ys)}
            expected = {POSITIONS[o.position] for o in scene.objects if o.color == color}
            # Every exact-colour pixel is in a cell of an object of that colour, and each such object shows. Gray
            # (128) is also what antialiasing makes of a black-white edge: with both in the scene it may show there.
            if color == "gray" and {"black", "white"} <= {o.color for o in scene.objects} | {scene.background}:
                assert expected <= cells, caption(scene)
            else:
                assert cells == expected, caption(scene)


def centred_mask(shape, size):
    image = render(Scene((ShapeObject(shape, "black", size, "center"),), "white"), 32)
    return np.asarray(image)[..., 0] < 128


def test_shapes_stay_apart_and_sizes_differ_at_32_pixels():
    for size in SIZES:
        masks = {shape: centred_mask(shape, size) for shape in SHAPES}
        for a, b in itertools.combinations(SHAPES, 2):
            assert (masks[a] ^ masks[b]).sum() >= 3, f"{size} {a} and {b} rasterise almost alike"
    for shape in SHAPES:
        assert centred_mask(shape, "large").sum() > 1.4 * centred_mask(shape, "small").sum(), shape


def test_captions_read_naturally():
    two = Scene(
        (ShapeObject("circle", "red", "small", "top left"), ShapeObject("square", "blue", "large", "bottom right")),
        "white",
    )
    assert caption(two) == (
        "a small red circle at the top left and a large blue square at the bottom right on a white background"
    )
    one = Scene((ShapeObject("triangle", "green", "large", "center"),), "white")
    assert caption(one) == "a large green triangle in the center on a white background"
    side = Scene((ShapeObject("star", "pink", "small", "left"),), "orange")
    assert caption(side) == "a small pink star on the left on an orange background"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle",
        "a small red circle at the top left on a white background, please",
        "a small red circle in the top left on a white background",  # not the preposition written
        "an small red circle at the top left on a white background",
        "a small red blob at the top left on a white background",
        "a small red circle at the top left and a large blue square at the top left on a white background",
        "a small white circle at the top left on a white background",
    ],
)
def test_parse_caption_refuses_what_it_does_not_write(text):
    with pytest.raises(ValueError):
        parse_caption(text)


@pytest.mark.parametrize(
    ("field", "value", "listed"),
    [
        ("shapes", ("circle", "blob"), "hexagon"),
        ("colors", ("red", "teal"), "brown"),
        ("positions", ("center", "middle"), "bottom right"),
        ("backgrounds", ("mauve",), "white"),
        ("sizes", ("huge",), "small"),
    ],
)
def test_unknown_names_are_refused_with_the_supported_ones(field, value, listed):
    with pytest.raises(ValueError, match=rf"unknown {field} \['{value[-1]}'\].*{listed}"):
        ShapesConfig(**{field: value})


def test_impossible_configs_are_refused():
    with pytest.raises(ValueError, match="no object color"):
        ShapesConfig(colors=("white",), backgrounds=("white",))
    with pytest.raises(ValueError, match="at least two positions"):
        ShapesConfig(positions=("center",), two_object_fraction=0.5)
