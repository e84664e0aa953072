"""Edge agreement: how well an image's edges follow a given edge map, as a ControlNet conditioned on that map
should make them. Works on any data: it needs no labels, only the edge maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def edge_agreement(drawn: torch.Tensor, wanted: torch.Tensor, tolerance: int = 1) -> dict[str, float]:
    """Precision, recall and F1 of the edges `drawn` (N, 1, H, W, 1 on an edge) against the edges `wanted`,
    an edge pixel counting as matched when the other map has one within `tolerance` pixels (Chebyshev): Canny's
    one-pixel-wide edges move by a pixel between an image and a near copy of it. Pixels are pooled over all
    images (a micro average), so images with many edges weigh more. With no drawn edge, precision is 0."""
    if drawn.shape != wanted.shape or drawn.ndim != 4 or drawn.shape[1] != 1:
        raise ValueError(f"edge_agreement needs two (N, 1, H, W) maps of one shape, got {tuple(drawn.shape)} and "
                         f"{tuple(wanted.shape)}")
    drawn, wanted = (drawn > 0.5).float(), (wanted > 0.5).float()
    size = 2 * tolerance + 1

    def near(edges: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(edges, size, stride=1, padding=tolerance)

    drawn_count, wanted_count = drawn.sum().item(), wanted.sum().item()
    precision = (drawn * near(wanted)).sum().item() / drawn_count if drawn_count else 0.0
    recall = (wanted * near(drawn)).sum().item() / wanted_count if wanted_count else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
