"""An attribute classifier for the shapes dataset: it reads which objects an image shows, to score prompt adherence.

A shapes image is a 3 x 3 grid of cells (`ldm.data.shapes.POSITIONS`) and each object fills one cell, so reading an
image is nine small classifications. For every cell the classifier predicts

    shape  over ("empty", *shapes)    the cell holds nothing, or an object of that shape
    color  over colors                trained only where the cell holds an object
    size   over sizes                 likewise

from a small CNN: stride-2 convolutions down to a few pixels per side, then one linear layer from the
flattened map to all 9 x (S + 1 + C + Z) logits. The map is flattened rather than pooled to 1 x 1 because
which cell an object is in is exactly the spatial layout that pooling would throw away.

It is trained on real images whose scenes are known, with augmentations that keep the labels (gaussian
noise, a slight blur, a small brightness shift; never a hue change, since the colour is a label), so that it
also reads the slightly soft and noisy images a diffusion model makes. Then:

    classifier = train_attribute_classifier(images, scenes, config, steps=1000, batch_size=128, lr=3e-3,
                                            seed=0, device="cpu")
    scene_accuracy(classifier, val_images, val_scenes)              # how well it reads real images
    adherence(classifier.read(generated), [parse_caption(p) for p in prompts])   # how well samples obey prompts
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from ldm.data.shapes import POSITIONS, Scene, ShapeObject
from ldm.errors import InputError
from ldm.models.modeling import ModelConfig, PretrainedModel

logger = logging.getLogger(__name__)

# The classifier's cells, row by row: the order of POSITIONS, whose (row, column) runs (0, 0), (0, 1), ...
CELLS: tuple[str, ...] = tuple(sorted(POSITIONS, key=POSITIONS.get))
EMPTY = 0  # the shape class of a cell with no object; shape i of the config is class i + 1
IGNORE = -100  # cross_entropy's default ignore_index: no colour or size target in an empty cell


class AttributeClassifierConfig(ModelConfig):
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]
    image_size: int
    channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 level each
    norm_num_groups: int = 8

    @model_validator(mode="after")
    def _check(self) -> AttributeClassifierConfig:
        for kind, names in (("shapes", self.shapes), ("colors", self.colors), ("sizes", self.sizes)):
            if not names:
                raise InputError(f"{kind} is empty; list the names the classifier should tell apart")
        if not self.channels:
            raise InputError("channels must list at least one level")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise InputError(f"channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if self.feature_size < 1:
            raise InputError(f"image_size={self.image_size} is too small")
        return self

    @property
    def feature_size(self) -> int:
        """Side of the CNN's last feature map: each stride-2, padding-1, 3 x 3 conv halves it, rounding up."""
        size = self.image_size
        for _ in self.channels:
            size = (size + 1) // 2
        return size


class AttributeClassifier(PretrainedModel):
    kind = "attribute_classifier"
    config_class = AttributeClassifierConfig

    def __init__(self, config: AttributeClassifierConfig):
        super().__init__()
        self.config = config
        layers, in_channels = [], 3
        for channels in config.channels:
            # Kernel 3 at stride 2 still sees every pixel, so the first level reads outlines at full resolution.
            layers += [
                nn.Conv2d(in_channels, channels, 3, stride=2, padding=1),
                nn.GroupNorm(config.norm_num_groups, channels),
                nn.ReLU(),
            ]
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels * config.feature_size**2, len(CELLS) * self._per_cell())

    def _per_cell(self) -> int:
        c = self.config
        return len(c.shapes) + 1 + len(c.colors) + len(c.sizes)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> logits {"shape": (B, 9, S+1), "color": (B, 9, C), "size": (B, 9, Z)}."""
        c = self.config
        if images.shape[-2:] != (c.image_size, c.image_size):
            raise InputError(
                f"the classifier reads {c.image_size}x{c.image_size} images, got {tuple(images.shape[-2:])}; "
                "resize the images or train a classifier at their size"
            )
        logits = self.head(self.features(images).flatten(1)).view(len(images), len(CELLS), self._per_cell())
        shape, color, size = logits.split([len(c.shapes) + 1, len(c.colors), len(c.sizes)], dim=-1)
        return {"shape": shape, "color": color, "size": size}

    @torch.no_grad()
    def read(self, images: Tensor, batch_size: int = 256) -> list[list[ShapeObject]]:
        """The objects seen in each image (B, 3, H, W) in [-1, 1], in cell order: one list per image."""
        c = self.config
        device = next(self.parameters()).device
        read = []
        for batch in images.split(batch_size):
            logits = self(batch.to(device))
            # (B, 9) class indices per head
            shapes, colors, sizes = (logits[head].argmax(-1).tolist() for head in ("shape", "color", "size"))
            for shape_row, color_row, size_row in zip(shapes, colors, sizes):
                read.append([
                    ShapeObject(c.shapes[shape - 1], c.colors[color], c.sizes[size], cell)
                    for cell, shape, color, size in zip(CELLS, shape_row, color_row, size_row)
                    if shape != EMPTY
                ])
        return read


def scene_targets(scenes: list[Scene], config: AttributeClassifierConfig) -> Tensor:
    """Per-cell class targets (N, 9, 3) long: shape class (0 = empty), color and size (IGNORE where empty)."""
    index = {
        "shape": {name: i + 1 for i, name in enumerate(config.shapes)},
        "color": {name: i for i, name in enumerate(config.colors)},
        "size": {name: i for i, name in enumerate(config.sizes)},
    }
    targets = torch.full((len(scenes), len(CELLS), 3), IGNORE, dtype=torch.long)
    targets[..., 0] = EMPTY
    for n, scene in enumerate(scenes):
        for obj in scene.objects:
            values = {"shape": obj.shape, "color": obj.color, "size": obj.size}
            unknown = [f"{kind} {value!r}" for kind, value in values.items() if value not in index[kind]]
            if unknown:
                raise InputError(f"scene {n} has {', '.join(unknown)}, which the classifier's config does not list")
            targets[n, CELLS.index(obj.position)] = torch.tensor([index[kind][values[kind]] for kind in index])
    return targets


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Degrade a batch (B, 3, H, W) the way generated images are degraded, without changing what it shows.

    Per image: a blend towards a 3 x 3 blurred copy (weight up to 1), a brightness shift of up to 0.1
    added equally to all channels (so no hue change), and gaussian noise of std up to 0.1.
    """
    b = len(images)

    def uniform(high: float) -> Tensor:  # (B, 1, 1, 1) in [0, high)
        return high * torch.rand(b, 1, 1, 1, generator=generator, device=images.device)

    kernel = torch.tensor([1.0, 2.0, 1.0], device=images.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    # Replicate padding: zero padding would darken the border, which is white background.
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    weight = uniform(1.0)
    images = (1 - weight) * images + weight * blurred
    images = images + uniform(0.2) - 0.1
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    # Clamped as generated images are when decoded, so the classifier never meets values it will not see.
    return (images + uniform(0.1) * noise).clamp(-1, 1)


def train_attribute_classifier(
    images: Tensor,
    scenes: list[Scene],
    config: AttributeClassifierConfig,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | torch.device,
    log: Callable[[str], None] = logger.info,
) -> AttributeClassifier:
    """Train a classifier on real `images` (N, 3, H, W) in [-1, 1] showing `scenes`; returned in eval mode.

    AdamW with a one-cycle schedule (warmup, then cosine decay), random batches with augmentation; the
    loss is the sum of the three heads' cross-entropies, color and size counted only in occupied cells.
    """
    if len(images) != len(scenes):
        raise InputError(f"{len(images)} images but {len(scenes)} scenes; pass one scene per image")
    device = torch.device(device)
    # Weights are drawn on the CPU from the seed alone, so a seed gives the same start on any device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = AttributeClassifier(config)
    classifier.to(device).train()
    images, targets = images.to(device), scene_targets(scenes, config).to(device)  # (N, 3, H, W), (N, 9, 3)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator(device).manual_seed(seed)

    began, log_every = time.perf_counter(), max(1, steps // 10)
    for step in range(1, steps + 1):
        chosen = torch.randint(len(images), (batch_size,), generator=generator, device=device)
        logits = classifier(augment(images[chosen], generator))
        target = targets[chosen]  # (B, 9, 3)
        loss = sum(
            F.cross_entropy(logits[head].flatten(0, 1), target[..., k].flatten(), ignore_index=IGNORE)
            for k, head in enumerate(("shape", "color", "size"))
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            seconds = time.perf_counter() - began
            log(f"attribute classifier step {step}/{steps}: loss {loss.item():.4f} ({seconds:.0f}s)")
    return classifier.eval()


def scene_accuracy(classifier: AttributeClassifier, images: Tensor, scenes: list[Scene]) -> dict[str, float]:
    """How well the classifier reads real images (N, 3, H, W) in [-1, 1] whose `scenes` are known.

    color, shape, size: fraction of objects whose cell is read as an object with that attribute;
    position: fraction of objects whose cell is read as holding an object;
    all: fraction of images read exactly (every cell right, empty ones included, sizes included).
    """
    read = classifier.read(images)
    scores = adherence(read, scenes)
    exact = sum(set(objects) == set(scene.objects) for objects, scene in zip(read, scenes))
    return {key: scores[key] for key in ("color", "shape", "size", "position")} | {"all": exact / len(scenes)}


def _object_checks(read: list[ShapeObject], scene: Scene) -> list[dict[str, bool]]:
    """For each caption object: which of its attributes the object read in its cell has."""
    in_cell = {obj.position: obj for obj in read}
    checks = []
    for wanted in scene.objects:
        found = in_cell.get(wanted.position)
        check = {
            "position": found is not None,
            "color": found is not None and found.color == wanted.color,
            "shape": found is not None and found.shape == wanted.shape,
            "size": found is not None and found.size == wanted.size,
        }
        checks.append(check | {"object": check["position"] and check["color"] and check["shape"]})
    return checks


def _scores(read: list[list[ShapeObject]], scenes: list[Scene]) -> dict[str, float]:
    per_object: dict[str, list[bool]] = {key: [] for key in ("color", "shape", "size", "position", "object")}
    count, everything = [], []
    for objects, scene in zip(read, scenes):
        checks = _object_checks(objects, scene)
        for check in checks:
            for key, right in check.items():
                per_object[key].append(right)
        count.append(len(objects) == len(scene.objects))
        everything.append(count[-1] and all(check["object"] for check in checks))
    scores = {key: sum(rights) / len(rights) for key, rights in per_object.items()}
    return scores | {"count": sum(count) / len(count), "all": sum(everything) / len(everything)}


def adherence(read: list[list[ShapeObject]], scenes: list[Scene]) -> dict[str, float]:
    """Prompt adherence of generated images: what was `read` in each (classifier.read) against its prompt's scene.

    For each caption object o, with r the object read in o's cell (if any):
        position  an object was read in o's cell
        color     r has o's color (wrong when the cell was read empty); shape and size likewise
        object    color, shape and position all right
    and per image:
        count     as many objects were read as the caption states
        all       every caption object's `object` right and count right (size is not required)
    color, shape, size, position and object are fractions of caption objects; count and all fractions of
    images. The same keys prefixed "one_object_" and "two_object_" score the one- and two-object captions
    alone (present only when there are such captions); "images", "one_object_images" and
    "two_object_images" count the images.
    """
    if len(read) != len(scenes):
        raise InputError(f"{len(read)} read images but {len(scenes)} scenes; pass one scene per image")
    if not scenes:
        raise InputError("no images to score")
    scores = _scores(read, scenes)
    for count, prefix in ((1, "one_object_"), (2, "two_object_")):
        chosen = [(objects, scene) for objects, scene in zip(read, scenes) if len(scene.objects) == count]
        scores[f"{prefix}images"] = float(len(chosen))
        if chosen:
            group = _scores([objects for objects, _ in chosen], [scene for _, scene in chosen])
            scores |= {prefix + key: value for key, value in group.items()}
    return scores | {"images": float(len(scenes))}
