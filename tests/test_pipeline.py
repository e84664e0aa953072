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

from ldm import Text2Image, TextEncoder
from ldm.diffusers_interop import from_diffusers, unet_config_to_diffusers, vae_config_to_diffusers
from ldm.presets import preset
from ldm.schedule import NoiseSchedule

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


def test_pipeline_folder_round_trip(models, tmp_path):
    ours_unet, ours_vae, _, _, encoder = models
    pipe = Text2Image(
        vae=ours_vae, unet=ours_unet, text_encoder=encoder, sampler="euler_ancestral", spacing="trailing",
        schedule=NoiseSchedule(prediction_type="v_prediction"),
    )
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = Text2Image.from_pretrained(tmp_path / "pipe", text_encoder=encoder)
    assert (loaded.sampler, loaded.spacing, loaded.schedule.prediction_type) == ("euler_ancestral", "trailing", "v_prediction")
    assert torch.equal(loaded(PROMPTS[:1], steps=5, seed=3), pipe(PROMPTS[:1], steps=5, seed=3))


def test_compiled_pipeline_gives_the_eager_images(models):
    ours_unet, ours_vae, _, _, encoder = models
    eager = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder)
    fast = Text2Image(vae=ours_vae, unet=ours_unet, text_encoder=encoder, compile=True)
    torch.testing.assert_close(fast(PROMPTS, steps=4, seed=5), eager(PROMPTS, steps=4, seed=5), rtol=0, atol=1e-5)
