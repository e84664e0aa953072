"""The built-in shapes dataset: one or two coloured shapes on a plain background, with a caption that states them.

The image is a 3 x 3 grid of cells; each object sits inside one cell (two objects never share one), so
every attribute in the caption can be checked on the pixels: the shape's colour is exact in its interior,
its position is its cell, its size is how much of the cell it fills.

    config = ShapesConfig(image_size=32, two_object_fraction=0.3)
    image, scene = generate(config, seed=0, index=7)     # the same (seed, index) always gives the same image
    caption(scene)   # "a small red circle at the top left and a large blue square at the bottom right on a
                     #  white background"
    parse_caption(caption(scene)) == scene               # True

Each image draws from its own random stream seeded by (seed, index), so any range of indices can be
generated on its own, in any order, in any number of processes.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ldm.errors import InputError

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (250, 220, 0),
    "purple": (140, 40, 190),
    "orange": (255, 140, 0),
    "cyan": (0, 210, 230),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "pink": (255, 130, 200),
    "brown": (120, 70, 20),
    "gray": (128, 128, 128),
}
# The object's extent as a fraction of its cell's side: (smallest, largest). The ranges leave a gap so
# that size stays readable from the pixels whatever the jitter.
SIZES: dict[str, tuple[float, float]] = {"small": (0.64, 0.72), "large": (0.9, 0.98)}
# (row, column) of each position's cell in the 3 x 3 grid.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
# "at the top left", "in the center", "on the left": what reads naturally for each position.
_PREPOSITIONS = {"center": "in", "left": "on", "right": "on"}

_GRID = 3


def _preposition(position: str) -> str:
    return _PREPOSITIONS.get(position, "at")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _check_names(kind: str, names, supported) -> None:
    unknown = [name for name in names if name not in supported]
    if unknown:
        raise InputError(f"unknown {kind} {unknown}; supported {kind}: {', '.join(supported)}")


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        _check_names("shapes", [self.shape], SHAPES)
        _check_names("colors", [self.color], COLORS)
        _check_names("sizes", [self.size], SIZES)
        _check_names("positions", [self.position], POSITIONS)


@dataclass(frozen=True)
class Scene:
    """What one image shows: its objects, in caption order, and the background colour."""

    objects: tuple[ShapeObject, ...]
    background: str

    def __post_init__(self) -> None:
        _check_names("colors", [self.background], COLORS)
        if not self.objects:
            raise InputError("a shapes scene needs at least one object")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise InputError(f"two objects share a position in {positions}; each object needs its own cell")
        hidden = [o.color for o in self.objects if o.color == self.background]
        if hidden:
            raise InputError(f"an object has the background's color {self.background!r} and would be invisible")

    def to_dict(self) -> dict:
        """JSON-able form, stored in the ingested dataset's `attributes` column."""
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position} for o in self.objects
            ],
            "background": self.background,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(tuple(ShapeObject(**o) for o in data["objects"]), data["background"])


@dataclass(frozen=True)
class ShapesConfig:
    """Which attributes the generator draws from, and the image size; unknown names raise ValueError."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "black")
    sizes: tuple[str, ...] = ("small", "large")
    positions: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
    backgrounds: tuple[str, ...] = ("white",)
    two_object_fraction: float = 0.0
    image_size: int = 32

    def __post_init__(self) -> None:
        for kind, names, supported in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, COLORS),
            ("sizes", self.sizes, SIZES),
            ("positions", self.positions, POSITIONS),
            ("backgrounds", self.backgrounds, COLORS),
        ):
            if not names:
                raise InputError(f"{kind} is empty; list at least one of: {', '.join(supported)}")
            _check_names(kind, names, supported)
        for background in self.backgrounds:
            if not set(self.colors) - {background}:
                raise InputError(
                    f"background {background!r} leaves no object color (colors={list(self.colors)}); "
                    "add a color that differs from every background"
                )
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise InputError(f"two_object_fraction must be in [0, 1], got {self.two_object_fraction}")
        if self.two_object_fraction > 0 and len(self.positions) < 2:
            raise InputError(
                f"two_object_fraction={self.two_object_fraction} needs at least two positions, got "
                f"{list(self.positions)}; add a position or set two_object_fraction to 0"
            )
        if self.image_size < 2 * _GRID:
            raise InputError(f"image_size={self.image_size} is too small for a {_GRID}x{_GRID} grid; use 8 or more")


def _pick(rng: random.Random, options):
    # Only rng.random() is guaranteed by Python to give the same stream across versions for a given
    # seed; choice() and friends may change, which would silently change the dataset.
    return options[int(rng.random() * len(options))]


def _rng(seed: int, index: int) -> random.Random:
    # The string is the built-in dataset's identity: another string (even a renamed module) draws other images,
    # so the committed metrics would no longer be of this data.
    return random.Random(f"ldm.data.shapes:{seed}:{index}")


def sample_scene(config: ShapesConfig, rng: random.Random) -> Scene:
    """Draw a scene's attributes from `rng`: one or two objects, in distinct cells, none in the background's colour."""
    count = 2 if rng.random() < config.two_object_fraction else 1
    background = _pick(rng, config.backgrounds)
    colors = [c for c in config.colors if c != background]
    free = list(config.positions)
    objects = []
    for _ in range(count):
        position = free.pop(int(rng.random() * len(free)))
        objects.append(ShapeObject(_pick(rng, config.shapes), _pick(rng, colors), _pick(rng, config.sizes), position))
    return Scene(tuple(objects), background)


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` centred on (x, y) inside a box of half-side r."""
    if shape == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if shape == "hexagon":
        # Flattened to 3/4 as tall as wide: a regular hexagon a few pixels wide rasterises like a circle.
        squash = 0.75 / math.sin(math.pi / 3)
        return [(x + r * math.cos(k * math.pi / 3), y + squash * r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "star":
        # Fat points (inner radius 0.5) stay visible at a few pixels; the lowest points reach only
        # cos(36 deg) of r, so the star is lowered to sit centred in its box.
        y += r * (1 - math.cos(math.pi / 5)) / 2
        points = []
        for k in range(10):
            radius, angle = (r if k % 2 == 0 else 0.5 * r), k * math.pi / 5
            points.append((x + radius * math.sin(angle), y - radius * math.cos(angle)))
        return points
    if shape == "cross":
        t = 0.3 * r  # half the arm's width
        return [
            (x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t), (x + t, y + t),
            (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t), (x - r, y - t), (x - t, y - t),
        ]
    raise InputError(f"no outline for shape {shape!r}")


def render(scene: Scene, image_size: int, rng: random.Random | None = None) -> Image.Image:
    """Draw `scene` as an RGB image_size x image_size image.

    With `rng`, each object's size and its place inside its cell vary a little (drawn from rng);
    without, every object is centred in its cell at the middle of its size range.
    """
    # Drawn larger and box-filtered down: edges are antialiased while fully covered pixels keep the
    # exact named colour (an average of identical values), which makes colours checkable on the pixels.
    scale = max(1, min(4, 256 // image_size))
    side = image_size * scale
    cell = side / _GRID
    canvas = Image.new("RGB", (side, side), COLORS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        low, high = SIZES[obj.size]
        fraction = low + (high - low) * (rng.random() if rng else 0.5)
        r = fraction * cell / 2
        slack = cell / 2 - r
        dx, dy = ((rng.random() * 2 - 1) * slack, (rng.random() * 2 - 1) * slack) if rng else (0.0, 0.0)
        row, col = POSITIONS[obj.position]
        x, y = (col + 0.5) * cell + dx, (row + 0.5) * cell + dy
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        elif obj.shape == "ring":
            draw.ellipse((x - r, y - r, x + r, y + r), outline=color, width=max(1, round(0.42 * r)))
        else:
            draw.polygon(_outline(obj.shape, x, y, r), fill=color)
    return canvas.reduce(scale) if scale > 1 else canvas


def generate(config: ShapesConfig, seed: int, index: int) -> tuple[Image.Image, Scene]:
    """Image number `index` of the dataset with this config and seed, and what it shows."""
    rng = _rng(seed, index)
    scene = sample_scene(config, rng)
    return render(scene, config.image_size, rng), scene


def caption(scene: Scene) -> str:
    parts = [
        f"{_article(o.size)} {o.size} {o.color} {o.shape} {_preposition(o.position)} the {o.position}"
        for o in scene.objects
    ]
    return f"{' and '.join(parts)} on {_article(scene.background)} {scene.background} background"


def caption_without_positions(scene: Scene) -> str:
    """The caption with the objects' positions left out ("a large red circle on a white background"): a prompt
    that leaves the layout to something else, such as a ControlNet's edge map."""
    parts = [f"{_article(o.size)} {o.size} {o.color} {o.shape}" for o in scene.objects]
    return f"{' and '.join(parts)} on {_article(scene.background)} {scene.background} background"


def _alternatives(names) -> str:
    # Longest first, so "top left" is tried before "top".
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_SCENE_RE = re.compile(rf"(?P<objects>.+) on an? (?P<background>{_alternatives(COLORS)}) background")
_OBJECT_RE = re.compile(
    rf"an? (?P<size>{_alternatives(SIZES)}) (?P<color>{_alternatives(COLORS)}) (?P<shape>{_alternatives(SHAPES)})"
    rf" (?:at|in|on) the (?P<position>{_alternatives(POSITIONS)})"
)


def parse_caption(text: str) -> Scene:
    """The scene a shapes caption states; ValueError when `text` is not a caption this module writes."""
    example = "e.g. 'a small red circle at the top left on a white background'"
    match = _SCENE_RE.fullmatch(text)
    if match is None:
        raise InputError(f"cannot parse shapes caption {text!r}: expected a caption like {example}")
    objects = []
    for part in match["objects"].split(" and "):
        found = _OBJECT_RE.fullmatch(part)
        if found is None:
            raise InputError(
                f"cannot parse the object {part!r} of shapes caption {text!r}: expected '<a|an> <size> <color> "
                f"<shape> <at|in|on> the <position>', {example}"
            )
        objects.append(ShapeObject(found["shape"], found["color"], found["size"], found["position"]))
    scene = Scene(tuple(objects), match["background"])
    if caption(scene) != text:
        raise InputError(
            f"shapes caption {text!r} is not in canonical form (articles or prepositions differ); "
            f"it would be written {caption(scene)!r}"
        )
    return scene
