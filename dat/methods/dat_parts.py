"""Pieces of a DAT step that stand on their own: the random draws, the gradient
reversal and the generator's health signals."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..mixing import partner_index

__all__ = ["DATDraws", "generator_health"]


@dataclass
class DATDraws:
    """Every random draw of one DAT step, so two implementations can share them."""

    noise_x: Tensor  # (B, C, H, W) attack start of x: N(0, I) (gaussian) or U(-1, 1) (uniform)
    noise_xh: Tensor  # (B, C, H, W) attack start of x_hat, same law
    z: Tensor  # (B, noise_dim) AAG noise, N(0, I)
    lam: Tensor  # (B,) mixing weight, U(0, mu)
    flip: Tensor  # (B,) bool, horizontal flip of x_hat
    offsets: Tensor  # (B, 2) int64 crop corner (dy, dx) in [0, 2 * padding]
    partner: Tensor  # (B,) int64 other image of the batch (amplitude_source=random_image)

    @classmethod
    def sample(cls, batch_size: int, image_shape: tuple[int, int, int], *,
               noise_dim: int = 100, mu: float = 1.0, padding: int = 3,
               init: str = "gaussian", device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> DATDraws:
        """Draw on ``device`` (with ``generator``, which must live there, if given)."""
        kw = dict(device=device, generator=generator)
        shape = (batch_size, *image_shape)
        if init == "gaussian":
            noise_x, noise_xh = torch.randn(shape, **kw), torch.randn(shape, **kw)
        else:
            noise_x, noise_xh = (torch.rand(shape, **kw) * 2 - 1 for _ in range(2))
        return cls(
            noise_x=noise_x, noise_xh=noise_xh, z=torch.randn(batch_size, noise_dim, **kw),
            lam=torch.rand(batch_size, **kw) * mu,
            flip=torch.rand(batch_size, **kw) < 0.5,
            offsets=torch.randint(0, 2 * padding + 1, (batch_size, 2), **kw),
            partner=partner_index(batch_size, generator, device),
        )

    def to(self, device: torch.device | str) -> DATDraws:
        return DATDraws(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def generator_health(unit: Tensor) -> dict[str, Tensor]:
    """Saturation and collapse signals of the AAG's sigmoid output ``unit`` (B, C, H, W//2+1).

    ``gen_saturated``: share of outputs pinned near 0 or 1 (sigmoid gradients vanish there).
    ``gen_batch_std``: spread across the batch (noise and logits); near 0 means every
    sample gets the same amplitude, i.e. the generator collapsed.
    """
    saturated = ((unit < 0.01) | (unit > 0.99)).float().mean()
    spread = unit.std(dim=0).mean() if len(unit) > 1 else unit.new_zeros(())
    return {"gen_saturated": saturated, "gen_batch_std": spread}


class _GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient backward: one backward trains both players."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad
