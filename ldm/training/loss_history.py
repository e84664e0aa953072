"""The loss curve of a training loop: the means of its values over each `every` steps and at the last step.

    history = LossHistory(("loss",), every=10, max_steps=1000, device=device, rows=resumed_rows)
    for step in ...:
        row = history.add(step, loss.detach(), lr)   # the new row {"step", "loss", "lr"} at a logging step
    history.rows                                      # what a checkpoint keeps, so a resumed run continues it

The sums stay on the training device between logging steps, so a step costs no device-to-host copy.
"""

from __future__ import annotations

import torch


class LossHistory:
    def __init__(
        self, names: tuple[str, ...], every: int, max_steps: int, device: torch.device,
        rows: list[dict[str, float]] | None = None,
    ):
        self.names, self.every, self.max_steps = names, every, max_steps
        self.rows: list[dict[str, float]] = [] if rows is None else rows
        self._sums = torch.zeros(len(names), device=device)
        self._count = 0

    def add(self, step: int, values: torch.Tensor, lr: float) -> dict[str, float] | None:
        """Count this step's values (one per name, detached); at a logging step, append and return the row of
        their means since the previous one, with the step and the learning rate."""
        self._sums += values.reshape(-1)
        self._count += 1
        if step % self.every and step != self.max_steps:
            return None
        means = (self._sums / self._count).tolist()
        row = {"step": step, **dict(zip(self.names, means)), "lr": lr}
        self.rows.append(row)
        self._sums.zero_()
        self._count = 0
        return row

    @staticmethod
    def values(row: dict[str, float]) -> dict[str, float]:
        """A row without its step: what a step callback reports."""
        return {k: v for k, v in row.items() if k != "step"}
