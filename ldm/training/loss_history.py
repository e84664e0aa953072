"""The loss curve of a training loop: the means of its values over each `every` steps and at the last step.

    history = LossHistory(("loss",), every=10, max_steps=1000, device=device, rows=resumed_rows)
    for step in ...:
        history.add(loss.detach(), ok)            # ok: a 0-dim bool tensor, False for a skipped step
        row = history.row(step, lr, ok_on_host)   # at a logging step: the new row {"step", "loss", "lr"}
    history.rows                                  # what a checkpoint keeps, so a resumed run continues it

The sums and the count stay on the training device between logging steps, so a step costs no device-to-host
copy; a skipped step adds nothing.
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
        self._count = torch.zeros((), device=device)

    def add(self, values: torch.Tensor, ok: torch.Tensor) -> None:
        """Count this step's values (one per name, detached) unless `ok` is False."""
        self._sums += torch.where(ok, values.reshape(-1), 0.0)
        self._count += ok

    def row(self, step: int, lr: float, ok: bool) -> dict[str, float] | None:
        """At a logging step (every `every` steps and the last) whose own values counted (`ok`): append and
        return the row of the means since the previous row, with the step and the learning rate. A skipped
        logging step leaves its steps to the next row."""
        if (step % self.every and step != self.max_steps) or not ok:
            return None
        means = (self._sums / self._count).tolist()
        row = {"step": step, **dict(zip(self.names, means)), "lr": lr}
        self.rows.append(row)
        self._sums.zero_()
        self._count.zero_()
        return row

    @staticmethod
    def values(row: dict[str, float]) -> dict[str, float]:
        """A row without its step: what a step callback reports."""
        return {k: v for k, v in row.items() if k != "step"}
