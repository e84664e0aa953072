"""Training-readiness: the tiny UNet, trained the way the pipeline will train it, overfits one batch."""

import torch

from ldm import UNet
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.presets import preset


def test_tiny_unet_overfits_one_batch():
    torch.manual_seed(0)
    config = preset("tiny").unet
    unet = UNet(config).train()
    schedule = NoiseSchedule(prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, config.in_channels, config.sample_size, config.sample_size, generator=gen)
    context = torch.randn(8, 5, config.cross_attention_dim, generator=gen)
    # One fixed noise draw and timestep per example: the loss can then go (near) zero only by learning.
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, schedule.num_train_timesteps, (8,), generator=gen)
    x_t, target = schedule.add_noise(x0, noise, t), schedule.training_target(x0, noise, t)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)

    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(unet(x_t, t, context), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-10:]) < losses[0] / 10, (losses[0], losses[-10:])
