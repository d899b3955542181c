"""Weight averaging for evaluation and selection: EMA (every step) or SWA (every epoch).

Both keep a copy of the model whose floating-point parameters *and* buffers (BN running
statistics) are averaged, so no extra BN-recalibration pass over the data is needed.
Integer buffers (``num_batches_tracked``) are copied. The update is one fused lerp::

    avg <- avg + w * (current - avg)      EMA: w = 1 - decay;  SWA: w = 1 / (n + 1)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverager", "create_averager"]


class WeightAverager:
    """An averaged copy of ``model``: ``kind="ema"`` updates per step, ``"swa"`` per epoch.

    ``decay`` is the EMA decay per step; with ``warmup`` the effective decay is
    ``min(decay, (1 + n) / (10 + n))`` after n updates, so a short run's EMA is not stuck
    near the random initialisation. SWA starts averaging at epoch ``swa_start``.
    """

    def __init__(self, model: nn.Module, kind: str, decay: float = 0.999,
                 swa_start: int = 0, warmup: bool = True) -> None:
        if kind not in ("ema", "swa"):
            raise ValueError(f"weight averaging {kind!r}; use 'ema' or 'swa'")
        self.kind, self.decay, self.swa_start, self.warmup = kind, decay, swa_start, warmup
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.n_averaged = 0

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        mine = list(self.module.parameters()) + list(self.module.buffers())
        theirs = list(model.parameters()) + list(model.buffers())
        floats = [(a, b) for a, b in zip(mine, theirs, strict=True) if a.is_floating_point()]
        others = [(a, b) for a, b in zip(mine, theirs, strict=True) if not a.is_floating_point()]
        return ([a for a, _ in floats], [b.detach() for _, b in floats],
                [a for a, _ in others], [b for _, b in others])

    @torch.no_grad()
    def _average(self, model: nn.Module, weight: float) -> None:
        avg, cur, avg_int, cur_int = self._pairs(model)
        torch._foreach_lerp_(avg, cur, weight)  # one fused kernel per dtype/device group
        if avg_int:
            torch._foreach_copy_(avg_int, cur_int)  # integer buffers (BN batch counts)
        self.n_averaged += 1

    def update_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (EMA averages here)."""
        if self.kind != "ema":
            return
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.n_averaged) / (10 + self.n_averaged))
        self._average(model, 1.0 if self.n_averaged == 0 else 1.0 - decay)

    def update_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called after every epoch ``epoch`` (0-based; SWA averages from ``swa_start``)."""
        if self.kind == "swa" and epoch + 1 > self.swa_start:
            self._average(model, 1.0 / (self.n_averaged + 1))

    @property
    def active(self) -> bool:
        """True once the average holds at least one model (before that, use the model)."""
        return self.n_averaged > 0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_averaged": self.n_averaged,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint averages with {state['kind']!r}, this run with "
                             f"{self.kind!r}; set train.weight_averaging={state['kind']}")
        self.module.load_state_dict(state["module"])
        self.n_averaged = int(state["n_averaged"])


def create_averager(model: nn.Module, kind: str, decay: float = 0.999, swa_start: int = 0,
                    warmup: bool = True) -> WeightAverager | None:
    """A :class:`WeightAverager`, or ``None`` for ``kind="none"``."""
    if kind == "none":
        return None
    return WeightAverager(model, kind, decay=decay, swa_start=swa_start, warmup=warmup)
