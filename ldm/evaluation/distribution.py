"""How generated images sit among real ones, on any data: a kernel MMD between two sets of embeddings, each
image's nearest training image (memorisation), and the spread of one prompt's images over seeds (diversity).

Each number means little alone; the evaluate stage reports it beside the same measurement of real images."""

from __future__ import annotations

import torch


def median_bandwidth(features: torch.Tensor) -> float:
    """The median pairwise distance of `features` (N, E): the RBF bandwidth at which the kernel neither
    saturates nor flattens on this data. Fix it from the real images, then compare every set with it."""
    distances = torch.cdist(features.double(), features.double())
    return distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)].median().item()


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """The unbiased estimate of the squared MMD between the sets `x` (N, E) and `y` (M, E) under the RBF kernel
    exp(-|a - b|^2 / (2 bandwidth^2)), as CMMD computes it on CLIP embeddings: without the biased estimate's
    diagonal terms, so small samples of one distribution give about 0 (either sign) rather than a positive
    offset that shrinks with the sample size, as the Fréchet distance's does."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"mmd_rbf needs at least two items per set, got {len(x)} and {len(y)}")
    x, y = x.double(), y.double()
    gamma = 1.0 / (2.0 * bandwidth**2)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).square())

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return (within_x + within_y - 2 * kxy.mean()).item()


@torch.no_grad()
def nearest_psnr(
    queries: torch.Tensor, references: torch.Tensor, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image (N, 3, H, W) in [-1, 1], the PSNR (dB, peak-to-peak 2) to its nearest reference
    image (M, 3, H, W) and that image's index: (N,) float, (N,) long. Nearest is the smallest mean squared
    error, found chunk by chunk so the (N, M) distance matrix never exists whole."""
    refs = references.flatten(1).float()
    ref_norms = refs.square().sum(1)
    best_mse, best_index = [], []
    for batch in queries.flatten(1).float().split(chunk):
        squared = batch.square().sum(1, keepdim=True) + ref_norms[None] - 2 * batch @ refs.T  # (b, M)
        mse, index = (squared.clamp(min=0) / refs.shape[1]).min(1)
        best_mse.append(mse)
        best_index.append(index)
    mse = torch.cat(best_mse)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10)), torch.cat(best_index)


def nearest_cosine(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each query embedding (N, E), the cosine similarity to its nearest reference embedding (M, E): (N,)."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    r = torch.nn.functional.normalize(references.float(), dim=1)
    return (q @ r.T).max(1).values


def seed_spread(features: torch.Tensor) -> float:
    """Mean pairwise cosine distance (1 - cosine) among the images of one prompt over seeds, averaged over the
    prompts: `features` (P, S, E), S >= 2 seeds per prompt. 0: every seed gives the same image."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"seed_spread needs (prompts, seeds >= 2, features), got {tuple(features.shape)}")
    unit = torch.nn.functional.normalize(features.float(), dim=2)
    cosines = unit @ unit.transpose(1, 2)  # (P, S, S)
    seeds = features.shape[1]
    off_diagonal = (cosines.sum((1, 2)) - cosines.diagonal(dim1=1, dim2=2).sum(1)) / (seeds * (seeds - 1))
    return (1 - off_diagonal).mean().item()


def pair_spread(features: torch.Tensor) -> float:
    """Mean pairwise cosine distance among all of `features` (N, E): the spread of a set of different images,
    the reference for `seed_spread`."""
    return seed_spread(features[None])
