"""UNet training from the latent cache: the loss it minimises, that it learns, that it resumes bit for bit, and
the `train_unet` stage's outputs."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from ldm.data.latent_cache import LatentCache, vae_hash, write_latent_cache
from ldm.data.order import CacheOrder
from ldm.diffusion.pipeline import Text2Image
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.text_encoder import TextEncoder
from ldm.models.unet import UNetConfig
from ldm.models.vae import VAE, VAEConfig
from ldm.training.denoising import loss_weights
from ldm.training.unet import UNetTrainingConfig, train_unet, val_loss_rising
from stages import train_unet as stage
from stages.params import Params
from tests.ci_stages import RecordingReporter
from tests.test_latent_cache import write_ingested

SIZE = 16
CONFIG = UNetConfig(
    block_out_channels=(16, 32), layers_per_block=1, attention_levels=(True, True), num_heads=2,
    cross_attention_dim=384, norm_num_groups=4, sample_size=8,
)
HP = UNetTrainingConfig(
    batch_size=8, grad_accumulation=1, max_steps=20, lr=2e-3, weight_decay=0.0, warmup_steps=2, grad_clip=1.0,
    ema_decay=0.9, caption_dropout=0.1, min_snr_gamma=None, noise_offset=0.0, precision="fp32", checkpoint_every=10,
    keep_checkpoints=2, log_every=5, validate_every=10,
)


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.from_pretrained()


@pytest.fixture(scope="module")
def data(tmp_path_factory, encoder):
    """An ingested set of 48 random images, a tiny VAE (f=2: 8x8x4 latents) and the cache built from them."""
    root = tmp_path_factory.mktemp("unet_training")
    write_ingested(root / "ingested", images=48, size=SIZE)
    torch.manual_seed(0)
    VAE(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, sample_size=SIZE, layers_per_block=1)).save_pretrained(
        root / "vae"
    )
    vae = VAE.from_pretrained(root / "vae")
    write_latent_cache(root / "ingested", root / "latents", vae, vae_hash(root / "vae"), encoder, batch_size=16,
                       rows_per_group=8, rows_per_shard=32)
    return root


def test_min_snr_weights_match_their_definition():
    t = torch.tensor([0, 100, 500, 999])
    for prediction_type, to_x0 in (("epsilon", lambda snr: snr), ("v_prediction", lambda snr: snr + 1),
                                   ("sample", lambda snr: torch.ones_like(snr))):
        schedule = NoiseSchedule(prediction_type=prediction_type)
        snr = schedule.snr(t).float()
        expected = torch.minimum(snr, torch.tensor(5.0)) / to_x0(snr)
        torch.testing.assert_close(loss_weights(schedule, t, 5.0), expected)
        assert torch.equal(loss_weights(schedule, t, None), torch.ones(4))
    # Low-noise steps (high SNR) are the ones turned down; the noisiest keep full weight under eps.
    eps = loss_weights(NoiseSchedule(), t, 5.0)
    assert eps[0] < 0.01 and eps[-1] == 1.0


def test_cache_order_resumes_the_same_stream(data):
    cache = LatentCache(data / "latents")
    straight = CacheOrder(cache, 8, data_seed=5)
    ids = [straight.next_batch().id for _ in range(9)]  # crosses an epoch boundary (rows // 8 batches each)
    resumed = CacheOrder(cache, 8, data_seed=5)
    for _ in range(4):
        resumed.next_batch()
    state = json.loads(json.dumps(resumed.state_dict()))
    again = CacheOrder(cache, 8, data_seed=5)
    again.load_state_dict(state)
    assert [again.next_batch().id for _ in range(5)] == ids[4:]
    assert len({tuple(i) for i in ids}) > 1


def test_loss_falls_and_the_ema_differs_from_the_raw_weights(data):
    cache = LatentCache(data / "latents")
    hp = dataclasses.replace(HP, max_steps=60, warmup_steps=5, checkpoint_every=60)
    result = train_unet(CONFIG, cache, NoiseSchedule(prediction_type="v_prediction"), hp, data / "ck-learn", 0, "cpu")
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.metrics["val_loss"] < losses[0]
    raw, ema = result.unet.state_dict(), result.ema.state_dict()
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)


class Interrupted(Exception):
    pass


def test_interrupted_and_resumed_training_is_bitwise_equal(data, tmp_path):
    cache = LatentCache(data / "latents")
    schedule = NoiseSchedule(prediction_type="v_prediction")
    hp = dataclasses.replace(HP, grad_accumulation=2, min_snr_gamma=5.0, noise_offset=0.05)
    straight = train_unet(CONFIG, cache, schedule, hp, tmp_path / "straight", 3, "cpu")

    def stop_at_10(step, total, values):
        if step == 10:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_unet(CONFIG, cache, schedule, hp, tmp_path / "resumed", 3, "cpu", on_step=stop_at_10)
    messages = []
    resumed = train_unet(CONFIG, cache, schedule, hp, tmp_path / "resumed", 3, "cpu", log=messages.append)
    assert any("resuming" in m and "step 10 of 20" in m for m in messages), messages
    for a, b in ((straight.unet, resumed.unet), (straight.ema, resumed.ema)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed.history == straight.history


def test_a_mismatched_unet_is_refused_with_the_fix(data):
    cache = LatentCache(data / "latents")
    wrong = CONFIG.model_copy(update={"cross_attention_dim": 768})
    with pytest.raises(ValueError, match="set cross_attention_dim to 384"):
        train_unet(wrong, cache, NoiseSchedule(), HP, data / "ck-wrong", 0, "cpu")


def test_stage_writes_a_loadable_text_to_image_model(data, tmp_path):
    params = Params(
        image_size=SIZE, device="cpu",
        paths={
            "latents": str(data / "latents"), "vae": str(data / "vae"), "text2img": str(tmp_path / "text2img"),
            "unet_checkpoints": str(tmp_path / "ck"), "metrics": str(tmp_path / "metrics"),
            "plots": str(tmp_path / "plots"),
        },
        train_vae={"model": {"block_out_channels": [8, 16], "norm_num_groups": 4}},
        train_unet={
            "model": {"block_out_channels": [16, 32], "num_heads": 2, "norm_num_groups": 4},
            "batch_size": 8, "max_steps": 10, "warmup_steps": 2, "checkpoint_every": 5, "log_every": 5,
            "validate_every": 5, "validation_prompts": 3, "validation_seeds": [0, 1],
            "sampling": {"steps": 3},
        },
    )
    reporter = RecordingReporter()
    result = stage.run(params, reporter)

    model_dir = tmp_path / "text2img"
    assert result.model_dir == model_dir / "unet"
    pipeline = Text2Image.from_pretrained(model_dir)
    assert pipeline.schedule.prediction_type == "v_prediction" and pipeline.spacing == "trailing"
    raw = Text2Image.from_pretrained(model_dir, text_encoder=pipeline.text_encoder, raw_weights=True)
    assert any(not torch.equal(a, b) for a, b in zip(pipeline.unet.parameters(), raw.unet.parameters()))
    images = pipeline(["a red circle"], steps=2, seed=0)
    assert images.shape == (1, 3, SIZE, SIZE)
    assert json.loads((tmp_path / "metrics/train_unet.json").read_text()) == result.metrics
    assert (tmp_path / "plots/train_unet/loss.csv").read_text().splitlines()[0] == "step,loss,lr"
    # One grid at step 5 and one at the end: 3 prompts across, 2 seeds down, shown at 8x and captioned.
    assert [(n, s) for n, _, s in reporter.images] == [("validation", 5), ("validation", 10)]
    width, height = Image.open(tmp_path / "plots/train_unet/validation.png").size
    assert width == 96 + 3 * (128 + 4) + 4 and height > 2 * (128 + 4) + 4
    # The val loss at fixed draws, at each validation: a DVC plot, an MLflow curve, and the final metric.
    curve = (tmp_path / "plots/train_unet/val_loss.csv").read_text().splitlines()
    assert curve[0] == "step,val_loss" and [line.split(",")[0] for line in curve[1:]] == ["5", "10"]
    assert float(curve[-1].split(",")[1]) == result.metrics["val_loss"]
    assert [(step, list(values)) for step, values in reporter.step_metrics if "val_loss_by_step" in values] == [
        (5, ["val_loss_by_step"]), (10, ["val_loss_by_step"])
    ]
    assert result.metrics["val_loss_best"] <= result.metrics["val_loss"] and result.metrics["val_loss_rising"] in (0, 1)
    assert reporter.steps == [5, 5, 10, 10]


def test_a_val_loss_rising_while_the_train_loss_falls_is_flagged():
    history = [{"step": s, "loss": loss} for s, loss in ((100, 0.5), (200, 0.3), (300, 0.2), (400, 0.1))]
    falling = [{"step": 200, "val_loss": 0.40}, {"step": 400, "val_loss": 0.39}]
    assert val_loss_rising(falling, history) is None
    within_tolerance = [{"step": 200, "val_loss": 0.40}, {"step": 400, "val_loss": 0.405}]
    assert val_loss_rising(within_tolerance, history) is None
    rising = [{"step": 100, "val_loss": 0.45}, {"step": 200, "val_loss": 0.40}, {"step": 400, "val_loss": 0.50}]
    warning = val_loss_rising(rising, history)
    assert "rose from 0.4000 at step 200 to 0.5000 at step 400" in warning and "0.3000 to 0.1000" in warning
    assert "Fewer steps (about 200 here)" in warning
    both_rising = [{"step": 200, "val_loss": 0.40}, {"step": 400, "val_loss": 0.50}]
    assert val_loss_rising(both_rising, [{"step": 200, "loss": 0.2}, {"step": 400, "loss": 0.3}]) is None
