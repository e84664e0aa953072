"""Text2Image end to end against the equivalent diffusers loop on the same converted weights."""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UNet2DConditionModel,
)

from ldm import Text2Image, TextEncoder, UNet
from ldm.diffusion.names import SAMPLERS
from ldm.diffusion.pipeline import InitLatents, denoise, rescale_guidance
from ldm.diffusion.schedule import NoiseSchedule
from ldm.interop.diffusers import from_diffusers, unet_config_to_diffusers, vae_config_to_diffusers
from ldm.models.controlnet import ControlNet
from ldm.models.presets import preset

SCHEDULERS = {
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,  # draws noise every step: tests the generator order
    "ddim": DDIMScheduler,
}
PROMPTS = ["a red circle at the top left", "a small blue square"]


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    p = preset("tiny")
    theirs_unet = UNet2DConditionModel.from_config(_public(unet_config_to_diffusers(p.unet))).eval()
    theirs_vae = AutoencoderKL.from_config(_public(vae_config_to_diffusers(p.vae))).eval()
    ours_unet = from_diffusers(unet_config_to_diffusers(p.unet), theirs_unet.state_dict())
    ours_vae = from_diffusers(vae_config_to_diffusers(p.vae), theirs_vae.state_dict())
    return ours_unet, ours_vae, theirs_unet, theirs_vae, TextEncoder.from_pretrained()


@torch.no_grad()
def _diffusers_text2image(theirs_unet, theirs_vae, scheduler, context, steps, guidance, seed, shape):
    """What StableDiffusionPipeline does, spelled out, with the text mask passed to the UNet."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        out = theirs_unet(x, t, context.hidden_states, encoder_attention_mask=context.attention_mask).sample
        uncond, cond = out.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, generator=generator).prev_sample
    return theirs_vae.decode(latents / theirs_vae.config.scaling_factor).sample.clamp(-1, 1)


@pytest.mark.parametrize("sampler", SCHEDULERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_text2image_equals_diffusers_loop(models, sampler, prediction_type):
    ours_unet, ours_vae, theirs_unet, theirs_vae, encoder = models
    schedule = NoiseSchedule(prediction_type=prediction_type)
    pipe = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder, sampler=sampler, schedule=schedule)
    images = pipe(PROMPTS, negative_prompt="green", steps=12, guidance_scale=4.0, seed=7)
    assert images.shape == (2, 3, 16, 16)

    context = pipe.encode_prompts(PROMPTS, "green", guided=True)
    scheduler = SCHEDULERS[sampler](
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
        timestep_spacing="leading", **({"clip_sample": False} if sampler == "ddim" else {}),
    )
    expected = _diffusers_text2image(theirs_unet, theirs_vae, scheduler, context, 12, 4.0, 7, (2, 4, 8, 8))
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)


def test_seed_negative_prompt_and_guidance_change_the_image(models):
    ours_unet, ours_vae, _, _, encoder = models
    pipe = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder)
    base = pipe(PROMPTS[:1], steps=6, seed=1)
    assert torch.equal(base, pipe(PROMPTS[:1], steps=6, seed=1))
    for other in (
        pipe(PROMPTS[:1], steps=6, seed=2),
        pipe(PROMPTS[:1], negative_prompt="a red circle", steps=6, seed=1),
        pipe(PROMPTS[:1], steps=6, seed=1, guidance_scale=1.0),
    ):
        assert (other - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        pipe(PROMPTS[:1], negative_prompt=["a", "b"], steps=2)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder, sampler="plms")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_draws_another_image_for_another_seed(models, sampler):
    """A model that has not memorised its prompt (random weights here) gives each seed its own image on every
    sampling path, so identical images over seeds, as evaluate's diversity measures them, can only be the model's."""
    ours_unet, ours_vae, _, _, encoder = models
    pipe = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder, sampler=sampler)
    first, second = pipe(PROMPTS[:1] * 2, steps=4, seed=[1, 2])
    assert (first - second).abs().mean() > 1e-2
    other = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder,
                       sampler="dpmpp_2m" if sampler != "dpmpp_2m" else "euler_ancestral")
    assert (other(PROMPTS[:1], steps=4, seed=1)[0] - first).abs().mean() > 1e-4


def test_pipeline_folder_round_trip(models, tmp_path):
    ours_unet, ours_vae, _, _, encoder = models
    pipe = Text2Image(
        vae=ours_vae, unet=ours_unet, text_encoder=encoder, sampler="euler_ancestral", spacing="trailing",
        schedule=NoiseSchedule(prediction_type="v_prediction"),
    )
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = Text2Image.from_pretrained(tmp_path / "pipe", text_encoder=encoder)
    assert (loaded.sampler, loaded.spacing, loaded.schedule.prediction_type) == ("euler_ancestral", "trailing", "v_prediction")
    saved, back = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    # The loaded UNet runs channels-last (small latents), which rounds differently, not bitwise alike.
    assert loaded.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loaded(PROMPTS[:1], steps=5, seed=3), pipe(PROMPTS[:1], steps=5, seed=3), rtol=0, atol=1e-5)


def test_compiled_pipeline_gives_the_eager_images(models):
    ours_unet, ours_vae, _, _, encoder = models
    eager = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder)
    fast = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder, compile=True)
    torch.testing.assert_close(fast(PROMPTS, steps=4, seed=5), eager(PROMPTS, steps=4, seed=5), rtol=0, atol=1e-5)
    # Weight freezing was asked of that compile alone: the process's inductor settings are untouched.
    assert torch._inductor.config.freezing is False


def _image(seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_img2img_strength_zero_is_the_input_through_the_vae_and_one_is_text_to_image(models):
    ours_unet, ours_vae, _, _, encoder = models
    pipe = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder)
    image = _image(0)
    with torch.no_grad():
        through_vae = ours_vae.decode(ours_vae.encode(image).mode())
    kept = pipe(PROMPTS[:1], init_image=image, strength=0.0, steps=6, seed=1)
    torch.testing.assert_close(kept, through_vae, rtol=0, atol=1e-5)
    assert torch.equal(pipe(PROMPTS[:1], init_image=image, strength=1.0, steps=6, seed=1), pipe(PROMPTS[:1], steps=6, seed=1))
    # In between, the more of the schedule is re-run, the further the result moves from the input.
    moved = [(pipe(PROMPTS[:1], init_image=image, strength=s, steps=6, seed=1) - through_vae).abs().mean() for s in (0.3, 0.6)]
    assert 0 < moved[0] < moved[1]


def test_inpainting_keeps_the_latents_outside_the_mask(models):
    ours_unet, ours_vae, _, _, encoder = models
    pipe = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder)
    image, mask = _image(0), torch.zeros(1, 1, 16, 16)
    mask[..., :, 8:] = 1  # regenerate the right half
    # Everything masked is text-to-image; nothing masked is the input through the VAE.
    assert torch.equal(pipe(PROMPTS[:1], init_image=image, mask=torch.ones(1, 1, 16, 16), steps=6, seed=1),
                       pipe(PROMPTS[:1], steps=6, seed=1))
    torch.testing.assert_close(pipe(PROMPTS[:1], init_image=image, mask=torch.zeros(1, 1, 16, 16), steps=6, seed=1),
                               ours_vae.decode(ours_vae.encode(image).mode()), rtol=0, atol=1e-5)

    latents = pipe.vae.scale_latents(pipe.vae.encode(image).mode())
    latent_mask = torch.zeros(1, 1, 8, 8)
    latent_mask[..., 4:] = 1
    context = pipe.encode_prompts(PROMPTS[:1], None, guided=True)
    seen = []

    def unet(x, t, *args, **kwargs):
        seen.append(x[:1].clone())
        return ours_unet(x, t, *args, **kwargs)

    with torch.no_grad():
        out = denoise(unet, context, 4.0, (1, 4, 8, 8), pipe.schedule, steps=6, seed=1,
                      init=InitLatents(latents, 1.0, latent_mask))
    assert torch.equal(out[..., :4], latents[..., :4])
    assert (out[..., 4:] - latents[..., 4:]).abs().mean() > 0.1
    # The network sees the kept half as the input noised to each step's level: closer to it at each step.
    distances = [(x[..., :4] - latents[..., :4]).abs().mean() for x in seen]
    assert all(later < earlier for earlier, later in zip(distances, distances[1:]))


def test_guidance_rescale_matches_the_conditional_std():
    guided, cond = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8)
    rescaled = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    half = rescale_guidance(guided, cond, 0.5)
    torch.testing.assert_close(half, (guided + rescaled) / 2)


def test_guidance_rescale_changes_the_image_and_bad_conditioning_is_named(models):
    ours_unet, ours_vae, _, _, encoder = models
    pipe = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder)
    plain = pipe(PROMPTS[:1], steps=6, seed=1, guidance_scale=7.0)
    assert (pipe(PROMPTS[:1], steps=6, seed=1, guidance_scale=7.0, guidance_rescale=0.7) - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_rescale=2"):
        pipe(PROMPTS[:1], steps=2, guidance_rescale=2)
    with pytest.raises(ValueError, match="needs an input image"):
        pipe(PROMPTS[:1], steps=2, mask=torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="the input image is 8x8 but the output is 16x16"):
        pipe(PROMPTS[:1], steps=2, init_image=_image(0, 8), height=16, width=16)
    with pytest.raises(ValueError, match="a control image needs a ControlNet"):
        pipe(PROMPTS[:1], steps=2, control_image=torch.zeros(1, 1, 16, 16))


def test_controlnet_steers_the_pipeline_only_once_trained(models):
    ours_unet, ours_vae, _, _, encoder = models
    controlnet = ControlNet.from_unet(ours_unet, vae_downsampling_factor=ours_vae.downsampling_factor)
    pipe = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder, controlnet=controlnet)
    edges = torch.zeros(1, 1, 16, 16)
    edges[..., 4:12, 4] = edges[..., 4:12, 11] = 1
    base = pipe(PROMPTS, steps=4, seed=1)
    # Zero-initialised output convolutions: an untrained ControlNet changes nothing.
    assert torch.equal(pipe(PROMPTS, steps=4, seed=1, control_image=edges), base)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(std=0.1)
    steered = pipe(PROMPTS, steps=4, seed=1, control_image=edges)
    assert (steered - base).abs().mean() > 1e-3
    assert torch.equal(pipe(PROMPTS, steps=4, seed=1, control_image=edges, control_scale=0.0), base)
    with pytest.raises(ValueError, match="another architecture"):
        other = preset("tiny").unet.model_copy(update={"block_out_channels": (32, 64)})
        Text2Image(vae=ours_vae, unet=UNet(other), text_encoder=encoder, controlnet=controlnet)
