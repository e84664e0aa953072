"""Our VAE and UNet against diffusers' AutoencoderKL / UNet2DConditionModel on converted weights."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm import VAE, UNet
from ldm.interop.diffusers import from_diffusers, to_diffusers
from ldm.models.presets import PRESETS, preset
from ldm.models.unet import UNetConfig
from ldm.models.vae import VAEConfig

UNET_CONFIGS = {
    "two-levels-attn-both": dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, cross_attention_dim=24,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
    ),
    "sd-like-three-levels": dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=2, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
    ),
    "linear-proj-deep-transformer-per-level-heads": dict(
        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=12,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, transformer_layers_per_block=2, norm_num_groups=4, in_channels=3, out_channels=5,
    ),
}

VAE_CONFIGS = {
    "f4": dict(block_out_channels=(8, 16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=4),
    "f8-two-layers-8-latents": dict(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, latent_channels=8, norm_num_groups=4
    ),
}


def _randomise(module: torch.nn.Module) -> None:
    """Random weights everywhere, so that no zero-initialised layer can hide a wiring mistake."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _diffusers_unet(kwargs) -> UNet2DConditionModel:
    model = UNet2DConditionModel(sample_size=8, **kwargs).eval()
    _randomise(model)
    return model


def _diffusers_vae(kwargs) -> AutoencoderKL:
    levels = len(kwargs["block_out_channels"])
    model = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels, **kwargs
    ).eval()
    _randomise(model)
    return model


def _convert(model) -> VAE | UNet:
    return from_diffusers({**model.config, "_class_name": type(model).__name__}, model.state_dict())


@pytest.mark.parametrize("name", UNET_CONFIGS)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@torch.no_grad()
def test_unet_matches_diffusers(name, masked):
    theirs = _diffusers_unet(UNET_CONFIGS[name])
    ours = _convert(theirs)
    cfg = theirs.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.in_channels, 8, 8, generator=gen)
    t = torch.tensor([0.0, 417.5, 999.0])
    context = torch.randn(3, 6, cfg.cross_attention_dim, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool) if masked else None
    expected = theirs(x, t, context, encoder_attention_mask=mask).sample
    actual = ours(x, t, context, mask)
    assert actual.shape == (3, cfg.out_channels, 8, 8)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    if masked:  # the mask must matter, or this test proves nothing about it
        assert (ours(x, t, context) - actual).abs().max() > 1e-3


@pytest.mark.parametrize("name", VAE_CONFIGS)
@torch.no_grad()
def test_vae_matches_diffusers(name):
    theirs = _diffusers_vae(VAE_CONFIGS[name])
    ours = _convert(theirs)
    f = 2 ** (len(VAE_CONFIGS[name]["block_out_channels"]) - 1)
    assert ours.downsampling_factor == f
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected, actual = theirs.encode(x).latent_dist, ours.encode(x)
    assert actual.mean.shape == (2, VAE_CONFIGS[name]["latent_channels"], 32 // f, 32 // f)
    torch.testing.assert_close(actual.mean, expected.mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(actual.logvar, expected.logvar, rtol=0, atol=1e-4)
    # Same generator, same draw: the posterior samples agree too.
    torch.testing.assert_close(
        actual.sample(torch.Generator().manual_seed(3)), expected.sample(torch.Generator().manual_seed(3)),
        rtol=0, atol=1e-4,
    )
    z = actual.mode()
    torch.testing.assert_close(ours.decode(z, clamp=False), theirs.decode(z).sample, rtol=0, atol=1e-4)
    image = ours.decode(z * 50)
    assert image.min() >= -1 and image.max() <= 1


@pytest.mark.parametrize("factory,configs", [(_diffusers_unet, UNET_CONFIGS), (_diffusers_vae, VAE_CONFIGS)])
def test_round_trip_to_diffusers_and_back_is_exact(factory, configs):
    for kwargs in configs.values():
        theirs = factory(kwargs)
        ours = _convert(theirs)
        config, state = to_diffusers(ours)
        assert set(state) == set(theirs.state_dict())
        for key, value in theirs.state_dict().items():
            assert torch.equal(state[key], value), key
        back = from_diffusers(config, state)
        assert back.config == ours.config
        for key, value in ours.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
        # The exported config builds the same architecture in diffusers.
        rebuilt = type(theirs).from_config({k: v for k, v in config.items() if not k.startswith("_")})
        assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("model_class,config", [(VAE, PRESETS["tiny"].vae), (UNet, PRESETS["tiny"].unet)])
def test_save_and_load_folder_is_exact_and_pickle_free(tmp_path, model_class, config):
    model = model_class(config)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = model_class.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    other = UNet if model_class is VAE else VAE
    with pytest.raises(ValueError, match=f"holds a '{model.kind}' model"):
        other.from_pretrained(tmp_path / "m")


def test_vae_scaling_factor_is_saved(tmp_path):
    config = PRESETS["tiny"].vae.model_copy(update={"scaling_factor": 0.5, "shift_factor": 0.8})
    VAE(config).save_pretrained(tmp_path)
    vae = VAE.from_pretrained(tmp_path)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.5, 0.8)
    z = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)
    torch.testing.assert_close(vae.scale_latents(z), (z - 0.8) * 0.5)


def test_loading_a_diffusers_folder_directly_points_to_the_converter(tmp_path):
    _diffusers_vae(VAE_CONFIGS["f4"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ldm convert from-diffusers"):
        VAE.from_pretrained(tmp_path)


def test_presets_parameter_counts_on_meta_device():
    with torch.device("meta"):
        sd_unet, sd_vae = UNet(preset("sd15").unet), VAE(preset("sd15").vae)
        cpu_vae = VAE(preset("cpu").vae)
    assert sd_unet.num_parameters() == 859_520_964
    assert sd_vae.num_parameters() == 83_653_863
    assert cpu_vae.downsampling_factor == 4
    assert preset("cpu").image_size // cpu_vae.downsampling_factor == preset("cpu").unet.sample_size == 8
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")


def test_posterior_statistics():
    from ldm.models.vae import DiagonalGaussian

    mean, logvar = torch.full((1, 2, 16, 16), 1.5), torch.full((1, 2, 16, 16), -1.0)
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(q.mode(), mean)
    draws = torch.stack([q.sample(torch.Generator().manual_seed(i)) for i in range(64)])
    assert abs(draws.mean().item() - 1.5) < 0.02
    assert abs(draws.var().item() - torch.exp(torch.tensor(-1.0)).item()) < 0.02
    expected_kl = 0.5 * (1.5**2 + torch.exp(torch.tensor(-1.0)) - 1 + 1.0) * 2 * 16 * 16
    torch.testing.assert_close(q.kl(), expected_kl.reshape(1))
    standard = DiagonalGaussian(torch.zeros(1, 4, 2, 2))
    assert standard.kl().item() == 0.0


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(block_out_channels=(30, 64), attention_levels=(True, True)), "not divisible by norm_num_groups"),
        (dict(attention_levels=(True,)), "attention_levels has 1 entries but block_out_channels has 4"),
        (dict(num_heads=3, block_out_channels=(32, 64), norm_num_groups=8, attention_levels=(True, True)), "num_heads=3"),
        (dict(unknown_knob=1), "unknown_knob"),
    ],
)
def test_bad_unet_config_is_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**bad)


def test_inexpressible_diffusers_config_is_refused_by_name():
    theirs = _diffusers_unet(UNET_CONFIGS["two-levels-attn-both"])
    config = {**theirs.config, "_class_name": "UNet2DConditionModel", "class_embed_type": "timestep"}
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        from_diffusers(config, theirs.state_dict())


def test_latent_size_must_fit_the_model():
    unet = UNet(PRESETS["tiny"].unet)
    with pytest.raises(ValueError, match="not a multiple"):
        unet(torch.randn(1, 4, 7, 7), 10, torch.randn(1, 3, 384))
    with pytest.raises(ValueError, match="not a multiple of the VAE factor"):
        VAE(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, sample_size=16)).encode(torch.randn(1, 3, 15, 15))
