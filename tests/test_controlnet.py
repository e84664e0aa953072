"""ControlNet: the UNet's residual inputs, the zero-initialised copy, control maps, and training that learns and
resumes bit for bit."""

import dataclasses
import io

import numpy as np
import pytest
import torch

from ldm.data.control_maps import control_map, control_maps_from_pngs
from ldm.data.ingested import ShardWriter, content_id
from ldm.data.latent_cache import LatentBatch, LatentCache, vae_hash, write_latent_cache
from ldm.data.shapes import Scene, ShapeObject, ShapesConfig, caption, generate, render
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.controlnet import ControlNet, ControlNetConfig
from ldm.models.text_encoder import TextEncoder
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig
from ldm.training.controlnet import ControlNetTrainingConfig, batch_controls, train_controlnet

SIZE = 16  # pixels; the test VAE halves it to 8x8 latents
TWO_LEVELS = UNetConfig(
    block_out_channels=(16, 32), layers_per_block=1, attention_levels=(True, True), num_heads=2,
    cross_attention_dim=384, norm_num_groups=4, sample_size=8,
)
THREE_LEVELS = UNetConfig(
    block_out_channels=(8, 16, 16), layers_per_block=2, attention_levels=(False, True, False), num_heads=2,
    cross_attention_dim=12, norm_num_groups=4, sample_size=8,
)
V_PREDICTION = NoiseSchedule(prediction_type="v_prediction")
HP = ControlNetTrainingConfig(
    batch_size=8, max_steps=10, lr=1e-3, weight_decay=0.0, warmup_steps=2, grad_clip=1.0, caption_dropout=0.2,
    checkpoint_every=5, keep_checkpoints=2, log_every=5,
)


def _unet(config: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(config).eval()


def _inputs(config: UNetConfig, batch: int = 2, seed: int = 1, factor: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g)
    context = torch.randn(batch, 3, config.cross_attention_dim, generator=g)
    control = (torch.rand(batch, 1, config.sample_size * factor, config.sample_size * factor, generator=g) > 0.8)
    return x, torch.tensor([10, 700]), context, control.float()


def _skip_shapes(unet: UNet, x, t, context) -> list[tuple[int, ...]]:
    """The shapes of the UNet's skip tensors, in down-path order, read with forward hooks."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))]
    for level in unet.down_blocks:
        hooks.append(level.register_forward_hook(lambda m, i, out: shapes.extend(tuple(s.shape) for s in out[1])))
    with torch.no_grad():
        unet(x, t, context)
    for hook in hooks:
        hook.remove()
    return shapes


# ------------------------------------------------------------------------------------- UNet residual inputs


def test_zero_residuals_leave_the_unet_bitwise_unchanged_and_nonzero_ones_change_it():
    unet = _unet(TWO_LEVELS)
    x, t, context, _ = _inputs(TWO_LEVELS)
    shapes = _skip_shapes(unet, x, t, context)
    assert len(shapes) == 4  # conv_in, level 0: resnet + downsample, level 1: resnet
    with torch.no_grad():
        plain = unet(x, t, context)
        zeros = [torch.zeros(s) for s in shapes]
        with_zeros = unet(x, t, context, down_residuals=zeros, mid_residual=torch.zeros(2, 32, 4, 4))
        bumped_skip = unet(x, t, context, down_residuals=zeros[:-1] + [torch.ones(shapes[-1])])
        bumped_mid = unet(x, t, context, mid_residual=torch.ones(2, 32, 4, 4))
    assert torch.equal(with_zeros, plain)
    assert (bumped_skip - plain).abs().max() > 1e-3
    assert (bumped_mid - plain).abs().max() > 1e-3


def test_a_wrong_number_of_residuals_is_refused():
    unet = _unet(TWO_LEVELS)
    x, t, context, _ = _inputs(TWO_LEVELS)
    with pytest.raises(ValueError, match="got 3 down_residuals but this UNet has 4 skip tensors"):
        unet(x, t, context, down_residuals=[torch.zeros(1)] * 3)


# ---------------------------------------------------------------------------------------------- the model


def test_from_unet_copies_the_encoder_and_starts_with_zero_residuals():
    unet = _unet(TWO_LEVELS)
    controlnet = ControlNet.from_unet(unet, vae_downsampling_factor=2)
    assert controlnet.config.conditioning_embedding_channels == (16, 32)
    copied = {k: v for k, v in controlnet.state_dict().items() if not k.startswith("controlnet_")}
    theirs = unet.state_dict()
    assert len(copied) > 50 and all(torch.equal(v, theirs[k]) for k, v in copied.items())
    x, t, context, control = _inputs(TWO_LEVELS)
    with torch.no_grad():
        down, mid = controlnet(x, t, context, None, control)
        assert all(not r.any() for r in down) and not mid.any()
        assert torch.equal(unet(x, t, context, down_residuals=down, mid_residual=mid), unet(x, t, context))
    # The same seed gives the same conditioning embedding.
    again = ControlNet.from_unet(unet, vae_downsampling_factor=2)
    assert all(torch.equal(a, b) for a, b in zip(controlnet.parameters(), again.parameters()))


@pytest.mark.parametrize("config", [TWO_LEVELS, THREE_LEVELS], ids=["two-levels", "three-levels"])
def test_residuals_have_the_shapes_of_the_unet_skips(config):
    unet = _unet(config)
    controlnet = ControlNet.from_unet(unet, vae_downsampling_factor=4, conditioning_embedding_channels=(4, 8, 8))
    x, t, context, control = _inputs(config, factor=4)
    with torch.no_grad():
        down, mid = controlnet(x, t, context, None, control, scale=0.5)
    assert [tuple(r.shape) for r in down] == _skip_shapes(unet, x, t, context)
    side = config.sample_size // 2 ** (len(config.block_out_channels) - 1)
    assert tuple(mid.shape) == (2, config.block_out_channels[-1], side, side)


def test_gradient_reaches_the_zero_convs_at_once_and_the_conditioning_embedding_after_one_step():
    unet = _unet(TWO_LEVELS).requires_grad_(False)
    controlnet = ControlNet.from_unet(unet, vae_downsampling_factor=2)
    x, t, context, control = _inputs(TWO_LEVELS)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]

    def backward() -> None:
        controlnet.zero_grad()
        down, mid = controlnet(x, t, context, None, control)
        unet(x, t, context, down_residuals=down, mid_residual=mid).square().mean().backward()

    backward()
    assert all(conv.weight.grad.abs().max() > 0 for conv in zero_convs)  # zero weights, nonzero inputs
    # Everything behind the zero convs, the conditioning embedding's own zero conv included, waits for them to
    # move: the paper's first step changes only the zero convs.
    embedding = controlnet.controlnet_cond_embedding
    assert not embedding.conv_out.weight.grad.any() and not controlnet.conv_in.weight.grad.any()
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight -= 0.1 * conv.weight.grad
    backward()
    assert embedding.conv_out.weight.grad.abs().max() > 0 and controlnet.conv_in.weight.grad.abs().max() > 0
    assert not embedding.conv_in.weight.grad.any()  # one more zero layer to pass: it moves a step later still


def test_save_and_load_give_the_same_outputs(tmp_path):
    unet = _unet(TWO_LEVELS)
    controlnet = ControlNet.from_unet(unet, vae_downsampling_factor=2)
    with torch.no_grad():
        for p in controlnet.parameters():  # no zero layer may hide a weight that failed to load
            p.normal_(0, 0.05)
    controlnet.eval().save_pretrained(tmp_path / "cn")
    loaded = ControlNet.from_pretrained(tmp_path / "cn")
    assert loaded.config == controlnet.config
    x, t, context, control = _inputs(TWO_LEVELS)
    with torch.no_grad():
        down_a, mid_a = controlnet(x, t, context, None, control)
        down_b, mid_b = loaded(x, t, context, None, control)
    assert mid_a.abs().max() > 0 and torch.equal(mid_a, mid_b)
    assert all(torch.equal(a, b) for a, b in zip(down_a, down_b))
    with torch.no_grad():
        down_half, mid_half = loaded(x, t, context, None, control, scale=0.5)
    assert torch.equal(mid_half, mid_a * 0.5) and all(torch.equal(h, a * 0.5) for h, a in zip(down_half, down_a))


def test_config_and_forward_refuse_mismatched_sizes():
    with pytest.raises(ValueError, match="a VAE factor of 8 needs 3"):
        ControlNetConfig(unet=TWO_LEVELS, conditioning_embedding_channels=(16, 32, 64), vae_downsampling_factor=8)
    controlnet = ControlNet.from_unet(_unet(TWO_LEVELS), vae_downsampling_factor=2)
    x, t, context, _ = _inputs(TWO_LEVELS)
    with pytest.raises(ValueError, match=r"control has shape \(2, 1, 8, 8\).*\(2 or 1, 1, 16, 16\)"):
        controlnet(x, t, context, None, torch.zeros(2, 1, 8, 8))


# ------------------------------------------------------------------------------------------- control maps


def test_canny_marks_the_outline_and_nothing_in_flat_regions():
    image = render(Scene((ShapeObject("square", "blue", "large", "center"),), "white"), 32)
    edges = control_map("canny", image)
    assert edges.shape == (1, 32, 32) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    inside = (np.asarray(image) != 255).any(-1)  # the square's pixels, antialiased rim included
    rows, cols = np.nonzero(inside)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    e = edges[0].numpy()
    band = np.zeros_like(inside)
    band[top - 1 : bottom + 2, left - 1 : right + 2] = True
    band[top + 2 : bottom - 1, left + 2 : right - 1] = False  # the outline, two pixels wide either side
    assert e[band].sum() >= 2 * (bottom - top)  # most of the perimeter
    assert e[~band].sum() == 0  # the square's flat interior and the background
    # The dimmest outline (yellow on white) on the smallest images still gives edges at the defaults.
    ring = render(Scene((ShapeObject("ring", "yellow", "small", "center"),), "white"), 16)
    assert control_map("canny", ring).sum() >= 4


def test_control_maps_from_pngs_match_control_map_and_unknown_kinds_are_refused():
    images = [generate(ShapesConfig(image_size=SIZE), seed=0, index=i)[0] for i in range(3)]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    maps = control_maps_from_pngs("canny", pngs)
    assert maps.shape == (3, 1, SIZE, SIZE)
    assert all(torch.equal(maps[i], control_map("canny", image)) for i, image in enumerate(images))
    with pytest.raises(ValueError, match="unknown control map kind 'depth'; supported kinds: canny"):
        control_map("depth", images[0])


def test_flipped_rows_get_the_flipped_control():
    control = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    batch = LatentBatch(
        mean=torch.zeros(2, 4, 1, 1), logvar=torch.zeros(2, 4, 1, 1), text_index=torch.zeros(2, dtype=torch.long),
        flipped=torch.tensor([False, True]), text_key=["k", "k"], id=["a", "b"], caption=["", ""],
    )
    asked = []
    out = batch_controls(batch, lambda ids: asked.append(ids) or control)
    assert asked == [["a", "b"]]
    assert torch.equal(out[0], control[0]) and torch.equal(out[1], control[1].flip(-1))


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 rendered shapes (16 px), a tiny VAE (f=2: 4x8x8 latents), their latent cache (with flipped rows) and
    the PNG of each image id."""
    root = tmp_path_factory.mktemp("controlnet")
    rows = []
    for i in range(48):
        image, scene = generate(ShapesConfig(image_size=SIZE), seed=0, index=i)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png = buffer.getvalue()
        rows.append({
            "id": content_id(png), "image": png, "caption": caption(scene), "width": SIZE, "height": SIZE,
            "source": "shapes", "split": "val" if i % 8 == 7 else "train", "attributes": None,
        })
    (root / "ingested").mkdir()
    with ShardWriter(root / "ingested") as writer:
        for row in rows:
            writer.write(row)
    torch.manual_seed(0)
    VAE(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, sample_size=SIZE, layers_per_block=1)).save_pretrained(
        root / "vae"
    )
    write_latent_cache(
        root / "ingested", root / "latents", VAE.from_pretrained(root / "vae"), vae_hash(root / "vae"),
        TextEncoder.from_pretrained(), batch_size=16, flip=True, rows_per_group=8, rows_per_shard=32,
    )
    return root, {row["id"]: row["image"] for row in rows}


def _control_of(pngs: dict[str, bytes]):
    return lambda ids: control_maps_from_pngs("canny", [pngs[i] for i in ids])


def _train(data, checkpoint_dir, hp=HP, **kwargs):
    root, pngs = data
    unet = _unet(TWO_LEVELS)
    controlnet = ControlNet.from_unet(unet, vae_downsampling_factor=2)
    return train_controlnet(
        unet, controlnet, LatentCache(root / "latents"), _control_of(pngs), V_PREDICTION, hp, checkpoint_dir, 0, "cpu",
        **kwargs,
    )


@torch.no_grad()
def _val_losses(data, controlnet: ControlNet) -> tuple[float, float]:
    """MSE over the val split at fixed noise and timesteps: the frozen UNet alone, and with the ControlNet."""
    root, pngs = data
    cache, unet, schedule = LatentCache(root / "latents"), _unet(TWO_LEVELS), V_PREDICTION
    (batch,) = cache.iter_batches("val", 64)
    g = torch.Generator().manual_seed(0)
    latents = cache.scale_latents(batch.mean)
    t, noise = torch.randint(1000, (len(batch),), generator=g), torch.randn(latents.shape, generator=g)
    noisy, target = schedule.add_noise(latents, noise, t), schedule.training_target(latents, noise, t)
    text = cache.text.lookup(batch.text_index)
    context, mask = text.hidden_states, text.attention_mask
    down, mid = controlnet(noisy, t, context, mask, batch_controls(batch, _control_of(pngs)))
    controlled = unet(noisy, t, context, mask, down_residuals=down, mid_residual=mid)
    return (unet(noisy, t, context, mask) - target).square().mean().item(), (controlled - target).square().mean().item()


def test_training_lowers_the_loss_on_held_out_images(data, tmp_path):
    hp = dataclasses.replace(HP, max_steps=80, lr=3e-3, checkpoint_every=80, log_every=10)
    result = _train(data, tmp_path / "ck", hp)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 8 and (losses[-1] + losses[-2]) / 2 < 0.8 * losses[0], losses
    assert result.metrics["steps"] == 80 and result.metrics["train_loss_final"] == losses[-1]
    assert result.metrics["samples_per_second"] > 0
    alone, controlled = _val_losses(data, result.controlnet)
    assert controlled < 0.75 * alone, (alone, controlled)


class Interrupted(Exception):
    pass


def test_interrupted_and_resumed_training_is_bitwise_equal(data, tmp_path):
    straight = _train(data, tmp_path / "straight")

    def stop_at_5(step, total, values):
        if step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        _train(data, tmp_path / "resumed", on_step=stop_at_5)
    messages = []
    resumed = _train(data, tmp_path / "resumed", log=messages.append)
    assert any("resuming" in m and "step 5 of 10" in m for m in messages), messages
    a, b = straight.controlnet.state_dict(), resumed.controlnet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == straight.history
