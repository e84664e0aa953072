"""What negative prompts, img2img and inpainting do to real shapes samples, measured by the attribute classifier.

The model is the pipeline's own default text-to-image model, kept small in tests/fixtures/text2img (see its
README.md for where it comes from); the classifier learns from freshly generated shapes images.
"""

from __future__ import annotations

import pytest
import torch

from ldm.data.images import png_to_tensor, to_png
from ldm.data.shapes import POSITIONS, Scene, ShapeObject, ShapesConfig, caption, generate
from ldm.diffusion.pipeline import Text2Image
from ldm.evaluation.attributes import AttributeClassifierConfig, adherence, train_attribute_classifier
from tests.fixtures import TEXT2IMG

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "black")
POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right", "center")


def shapes_images(config: ShapesConfig, seed: int, count: int) -> tuple[torch.Tensor, list[Scene]]:
    """Generated images as the pipeline sees them (through PNG, in [-1, 1]) and their scenes."""
    pairs = [generate(config, seed, i) for i in range(count)]
    return torch.stack([png_to_tensor(to_png(image)) for image, _ in pairs]), [scene for _, scene in pairs]


@pytest.fixture(scope="module")
def pipeline() -> Text2Image:
    return Text2Image.from_pretrained(TEXT2IMG, device="cpu")


@pytest.fixture(scope="module")
def one_object() -> tuple[torch.Tensor, list[Scene]]:
    """Real one-object images the model never saw (another seed than the data's) to start from."""
    return shapes_images(ShapesConfig(two_object_fraction=0.0), seed=99, count=32)


@pytest.fixture(scope="module")
def classifier():
    images, scenes = shapes_images(ShapesConfig(two_object_fraction=0.5), seed=7, count=4000)
    config = AttributeClassifierConfig(shapes=("circle", "diamond", "square", "triangle"), colors=tuple(sorted(COLORS)),
                                       sizes=("large", "small"), image_size=images.shape[-1])
    model = train_attribute_classifier(images, scenes, config, steps=800, batch_size=128, lr=3e-3, seed=0, device="cpu")
    check, check_scenes = shapes_images(ShapesConfig(two_object_fraction=0.5), seed=8, count=200)
    assert adherence(model.read(check), check_scenes)["all"] >= 0.95  # the reading is only as good as this
    return model


def rate(read, condition) -> float:
    return sum(any(condition(o, i) for o in objects) for i, objects in enumerate(read)) / len(read)


def test_negative_prompt_lowers_the_rate_of_its_colour(pipeline, classifier):
    """Prompts that ask for a red object, drawn without and with "red" as the negative prompt. Guidance weighs
    the negative prompt: at the model's own guidance of 2 this model draws the red object regardless (100% ->
    100%), at 4 the rate falls to about 65%, at 7 to about 20%."""
    scenes = [Scene((ShapeObject(shape, "red", size, position),), "white")
              for shape in ("circle", "square") for size in ("small", "large") for position in POSITION_NAMES]
    prompts, seeds = [caption(s) for s in scenes], list(range(len(scenes)))

    def red_rate(negative_prompt: str | None) -> float:
        images = pipeline(prompts, seed=seeds, guidance_scale=7.0, negative_prompt=negative_prompt)
        return rate(classifier.read(images), lambda o, i: o.color == "red")

    plain, negative = red_rate(None), red_rate("red")
    print(f"red objects for {len(prompts)} red prompts at guidance 7: {plain:.2f} without, {negative:.2f} with "
          "negative prompt 'red'")
    assert plain >= 0.9
    assert negative <= 0.5


def foreground(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] on a white background -> (N, H, W) bool: the pixels that are not near white."""
    return (images.min(dim=1).values < 0.5)


def test_img2img_keeps_the_layout_and_follows_the_prompt(pipeline, classifier, one_object):
    """The prompt asks for the input's object in another colour. The layout (the object's pixels: its exact
    size, jitter and outline) is measured as the intersection over union of the foreground with the input's:
    at middling strengths it stays while the colour follows the prompt; at strength 1 the input is ignored
    and only the prompt's cell is shared."""
    images, scenes = one_object
    recoloured = [Scene((ShapeObject(o.shape, COLORS[(COLORS.index(o.color) + 1 + i % 3) % 8], o.size, o.position),),
                        s.background) for i, s in enumerate(scenes) for o in s.objects]
    prompts, seeds = [caption(s) for s in recoloured], list(range(len(scenes)))
    layout, colour = {}, {}
    for strength in (0.3, 0.5, 0.7, 1.0):
        out = pipeline(prompts, init_image=images, strength=strength, seed=seeds)
        a, b = foreground(out), foreground(images)
        layout[strength] = ((a & b).sum(dim=(1, 2)) / (a | b).sum(dim=(1, 2)).clamp(min=1)).mean().item()
        colour[strength] = rate(classifier.read(out), lambda o, i: o.color == recoloured[i].objects[0].color)
    print(f"img2img at strengths {list(layout)}: foreground IoU with the input {list(layout.values())}, prompt's "
          f"colour {list(colour.values())}")
    # Measured: IoU 0.90 / 0.86 / 0.79 / 0.74 at strengths 0.3 / 0.5 / 0.7 / 1; colour 0.91 / 1 / 1 / 1.
    assert layout[0.3] >= 0.85 and layout[0.5] >= layout[1.0] + 0.08
    assert layout[0.3] > layout[0.5] > layout[0.7] > layout[1.0]
    assert colour[0.3] < colour[0.5] and colour[0.5] >= 0.9


def test_inpainting_keeps_the_outside_and_draws_the_prompt_inside(pipeline, classifier, one_object):
    images, scenes = one_object
    size, cells = images.shape[-1], 3
    masks, targets = [], []
    for i, scene in enumerate(scenes):
        free = [p for p in POSITION_NAMES if p != scene.objects[0].position][i % 4]
        row, column = POSITIONS[free]
        mask = torch.zeros(1, size, size)
        top, left = round(row * size / cells), round(column * size / cells)
        mask[:, top:round((row + 1) * size / cells), left:round((column + 1) * size / cells)] = 1
        masks.append(mask)
        targets.append(Scene((ShapeObject(("circle", "square")[i % 2], COLORS[i % 8], "large", free),), "white"))
    masks = torch.stack(masks)
    out = torch.cat([
        pipeline(caption(t), init_image=images[i:i + 1], mask=masks[i:i + 1], seed=i) for i, t in enumerate(targets)
    ])
    read = classifier.read(out)
    drawn = rate(read, lambda o, i: (o.position, o.color, o.shape) == (targets[i].objects[0].position,
                                                                       targets[i].objects[0].color,
                                                                       targets[i].objects[0].shape))
    kept = rate(read, lambda o, i: (o.position, o.color, o.shape) == (scenes[i].objects[0].position,
                                                                      scenes[i].objects[0].color,
                                                                      scenes[i].objects[0].shape))
    outside = 1 - masks
    error = ((out - images).abs() * outside).sum() / (3 * outside.sum())
    with torch.no_grad():
        through_vae = pipeline.vae.decode(pipeline.vae.encode(images).mode())
    vae_error = ((through_vae - images).abs() * outside).sum() / (3 * outside.sum())
    print(f"inpainting: prompt's object drawn in the mask {drawn:.2f}, input's object kept {kept:.2f}; outside the "
          f"mask mean |error| {error:.4f} (the VAE round trip alone: {vae_error:.4f})")
    # Measured: drawn 1.00, kept 0.97; outside error 0.0097 against the VAE round trip's 0.0055 (the
    # decoder's receptive field reaches over the mask's edge).
    assert drawn >= 0.8 and kept >= 0.9
    assert error <= 2 * vae_error + 0.005
