"""Amplitude/phase decomposition of images with the real 2-D DFT (per channel).

Images are real, so their spectra are conjugate-symmetric: working on the
non-redundant half (``rfft2``, last dim ``W//2+1``) halves the work and keeps
``irfft2`` outputs exactly real. FFTs always run in float32, even under autocast,
because bf16/fp16 spectra lose the low-amplitude high frequencies.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["decompose", "recombine", "mix_amplitude", "half_width", "spectrum_norm"]


def half_width(width: int) -> int:
    """Width of the non-redundant half spectrum of a real signal of ``width``."""
    return width // 2 + 1


def spectrum_norm(amplitude: Tensor, width: int) -> Tensor:
    """Per-example L2 norm (B,) of the full spectrum whose half (B, ..., W//2+1) is given.

    The half spectrum holds the columns 1..(W-1)//2 once for two conjugate columns of the
    full one, so they count twice (column 0, and column W/2 when W is even, once): for an
    image's amplitude this is ``fft2(x).abs()``'s norm.
    """
    weight = amplitude.new_full((amplitude.shape[-1],), 2.0)
    weight[0] = 1.0
    if width % 2 == 0:
        weight[-1] = 1.0
    return (amplitude.square() * weight).flatten(1).sum(dim=1).sqrt()


def decompose(x: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(amplitude, phase)`` of ``x`` (B, C, H, W); each (B, C, H, W//2+1), float32."""
    if x.dim() != 4:
        raise ValueError(f"decompose expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        spectrum = torch.fft.rfft2(x.float(), dim=(-2, -1))
        return spectrum.abs(), spectrum.angle()


def recombine(amplitude: Tensor, phase: Tensor, size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`decompose`: the real image (B, C, H, W) with this amplitude and phase.

    ``size`` is the spatial size (H, W) of the image; it is needed because W cannot be
    recovered from the half spectrum's width when W is odd.
    """
    if amplitude.shape != phase.shape:
        raise ValueError(
            f"amplitude {tuple(amplitude.shape)} and phase {tuple(phase.shape)} differ in shape"
        )
    height, width = size
    if amplitude.shape[-2] != height or amplitude.shape[-1] != half_width(width):
        raise ValueError(
            f"spectrum of shape {tuple(amplitude.shape[-2:])} does not match an image of size "
            f"{(height, width)}; expected ({height}, {half_width(width)})"
        )
    with torch.autocast(device_type=amplitude.device.type, enabled=False):
        spectrum = torch.polar(amplitude.float(), phase.float())
        return torch.fft.irfft2(spectrum, s=(height, width), dim=(-2, -1))


def mix_amplitude(
    x: Tensor, amplitude: Tensor, lam: Tensor | float, clip: bool = True
) -> Tensor:
    """Mix ``amplitude`` into the amplitude of ``x`` and keep the phase of ``x``.

    ``A_mix = lam * amplitude + (1 - lam) * A(x)``; the result is ``IDFT(A_mix, P(x))``,
    clipped to [0, 1] unless ``clip=False``. ``lam`` is a float or a per-sample tensor (B,).
    ``amplitude`` is a half spectrum (B, C, H, W//2+1) or broadcastable to it.
    """
    amp_x, pha_x = decompose(x)  # (B, C, H, W//2+1) each
    _check_broadcast(amplitude, amp_x.shape)
    lam_t = _lam_tensor(lam, x)  # () or (B, 1, 1, 1)
    mixed = lam_t * amplitude.float() + (1.0 - lam_t) * amp_x
    out = recombine(mixed, pha_x, size=(x.shape[-2], x.shape[-1]))
    # lam = 0 must give x exactly, not x up to FFT round-off.
    out = torch.where(lam_t == 0, x.float(), out)
    out = out.clamp(0.0, 1.0) if clip else out
    return out.to(x.dtype) if x.is_floating_point() else out


def _check_broadcast(amplitude: Tensor, spectrum_shape: torch.Size) -> None:
    """Fail with a readable message when ``amplitude`` cannot mix with the image's spectrum."""
    try:
        shape = torch.broadcast_shapes(amplitude.shape, spectrum_shape)
    except RuntimeError:
        shape = None
    if shape != spectrum_shape:
        raise ValueError(
            f"amplitude of shape {tuple(amplitude.shape)} does not fit the images' half "
            f"spectrum {tuple(spectrum_shape)}; pass (B, C, H, W//2+1) or a broadcastable shape"
        )


def _lam_tensor(lam: Tensor | float, x: Tensor) -> Tensor:
    """``lam`` as float32 on ``x``'s device: a scalar () or per-sample (B, 1, 1, 1)."""
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
    if lam_t.dim() == 0:
        return lam_t
    if lam_t.numel() != x.shape[0] or lam_t.dim() not in (1, 4):
        raise ValueError(
            f"lam of shape {tuple(lam_t.shape)} does not match a batch of {x.shape[0]}; "
            "pass a float, a (B,) tensor or a (B, 1, 1, 1) tensor"
        )
    return lam_t.reshape(-1, 1, 1, 1)
