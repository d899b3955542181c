"""The interface every training method implements, so the trainer stays method-agnostic."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..attacks import check_unit_range

__all__ = ["MethodStep"]


class MethodStep:
    """One optimisation step of a training method: ``stats = step(x, y, x_raw=None)``.

    ``run`` does the work and returns detached 0-d tensors, so the trainer can log them
    every N steps without a host sync per step; ``__call__`` returns plain floats for
    users' own loops. ``state_dict`` holds everything besides the classifier and its
    optimiser that a resume needs (tensors and primitives only).
    """

    def run(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def __call__(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None) -> dict[str, float]:
        return self._checked_floats(lambda: self.run(x, y, x_raw), x, x_raw)

    def _checked_floats(self, step, *images: Tensor | None) -> dict[str, float]:
        """``step()``'s stats as floats, after :meth:`check_first_batch` on ``images``."""
        self.check_first_batch(*images)
        stats = {k: float(v) for k, v in step().items()}
        self._range_checked = True  # after the first step that went through
        return stats

    def check_first_batch(self, *images: Tensor | None) -> None:
        """Refuse images outside [0, 1] (normalised or 0-255) until a first step has gone
        through: the check waits for the device, so a user's loop pays for it once."""
        if getattr(self, "_range_checked", False):
            return
        for x in images:
            if torch.is_tensor(x) and x.is_floating_point():
                check_unit_range(x, type(self).__name__)

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for schedules inside a method (e.g. AWP warm-up)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but got keys {sorted(state)}")
