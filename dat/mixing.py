"""Batch transforms for amplitude mix-up: AmplitudeMix and a drawn flip + crop.

``AmplitudeMix`` is the non-adversarial relative of DAT: each image keeps its phase and
takes ``lam * A(other) + (1 - lam) * A(x)`` as its amplitude, where ``other`` is another
image of the same batch. Phase carries most of the semantics, so labels stay unchanged.
It is used like ``torchvision.transforms.v2.MixUp``: on whole batches, after the loader.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .attacks import check_unit_range
from .spectral import decompose, mix_amplitude

__all__ = ["AmplitudeMix", "flip_crop", "partner_index"]


def partner_index(batch_size: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    """For each sample, the index (B,) of a *different* sample (a random cyclic shift)."""
    if batch_size < 2:
        return torch.zeros(batch_size, dtype=torch.int64, device=device)
    shift = torch.randint(1, batch_size, (1,), generator=generator, device=device)
    return (torch.arange(batch_size, device=device) + shift) % batch_size


def flip_crop(images: Tensor, flip: Tensor, offsets: Tensor, padding: int) -> Tensor:
    """Horizontal flip where ``flip`` (B,) is true, then a crop with zero ``padding``.

    ``offsets`` (B, 2) holds the crop's top-left corner (dy, dx) in the padded image,
    each in [0, 2 * padding]; (padding, padding) is the identity crop. Differentiable in
    ``images`` (pure indexing), so a generator's gradient flows through it.
    """
    b, c, h, w = images.shape  # (B, C, H, W)
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if padding <= 0:
        return images
    padded = F.pad(images, (padding,) * 4)  # (B, C, H + 2p, W + 2p)
    dev = images.device
    rows = (offsets[:, 0:1] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
    cols = (offsets[:, 1:2] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chans = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chans, rows, cols]


class AmplitudeMix:
    """Amplitude mix-up with another image of the batch; phase and label kept.

    Args:
        mu: ``lam ~ U(0, mu)`` per sample (mu = 1: anything from x itself to the full
            amplitude of the partner image).
        generator: optional ``torch.Generator`` (on the batch's device) for the draws.

    Example::

        mix = AmplitudeMix(mu=1.0)
        x_mixed = mix(x)            # (B, C, H, W) float in [0, 1]
        x_mixed, y = mix(x, y)      # labels returned unchanged
    """

    def __init__(self, mu: float = 1.0, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"AmplitudeMix(mu={mu}): mu must be in [0, 1]")
        self.mu, self.generator = float(mu), generator
        self._range_checked = False
        self._warned_single = False  # a batch of one: said once

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"AmplitudeMix expects a float (B, C, H, W) batch in [0, 1], got "
                             f"{x.dtype} of shape {tuple(x.shape)}; convert with x.float() / 255")
        if not self._range_checked:  # the first batch only: the check waits for the device
            check_unit_range(x, "AmplitudeMix")
            self._range_checked = True
        b = x.shape[0]
        if b == 1 and not self._warned_single:
            warnings.warn("AmplitudeMix got a batch of one image, which has no other image to "
                          "mix with, so it is returned unchanged; use batches of two or more "
                          "(DataLoader(drop_last=True) drops a last batch of one)", stacklevel=2)
            self._warned_single = True
        partner = partner_index(b, self.generator, x.device)  # (B,)
        lam = torch.rand(b, generator=self.generator, device=x.device) * self.mu  # (B,)
        amp, _ = decompose(x)  # (B, C, H, W//2+1)
        mixed = mix_amplitude(x, amp[partner], lam)
        return mixed if y is None else (mixed, y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mu={self.mu})"
