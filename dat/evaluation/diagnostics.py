"""Frequency diagnostics: the amplitude/phase table (DAT, Figure 2) and a Fourier heat map.

The amplitude/phase table asks which part of the spectrum an attack damages: for test
images x and adversarial x', it measures accuracy on x'_amp = IDFT(A(x'), P(x)) (only
the amplitude is adversarial) and x'_pha = IDFT(A(x), P(x')) (only the phase is).
Standard models do better on x'_amp; amplitude mix-up raises accuracy on x'_pha.

The Fourier heat map (Yin et al., NeurIPS 2019) shows the error rate under additive
single-frequency perturbations ``x + norm * r * U(u, v)``: U a real cosine Fourier basis
image of unit L2 norm, r a random sign per image and channel, result clipped to [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attacks import DEFAULT_EPS
from ..spectral import decompose, recombine
from .suite import make_attack, predict, seed_everything

__all__ = ["amplitude_phase_table", "fourier_basis", "fourier_heatmap", "swap_spectra"]


def swap_spectra(x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """``(x'_amp, x'_pha)``: adversarial amplitude + clean phase, clean amplitude +
    adversarial phase; both (B, C, H, W), clipped to [0, 1]."""
    amp, pha = decompose(x)  # (B, C, H, W//2+1) each
    amp_adv, pha_adv = decompose(x_adv)
    size = (x.shape[-2], x.shape[-1])
    x_amp = recombine(amp_adv, pha, size=size).clamp(0.0, 1.0)
    x_pha = recombine(amp, pha_adv, size=size).clamp(0.0, 1.0)
    return x_amp.to(x.dtype), x_pha.to(x.dtype)


def amplitude_phase_table(
    model: nn.Module, x: Tensor, y: Tensor, attack: str = "pgd20", eps: float | None = None,
    batch_size: int = 500, device: torch.device | str | None = None, seed: int = 0,
    progress: bool = True, norm: str = "linf",
) -> dict:
    """Accuracy (percent) on x, x', x'_amp and x'_pha for ``attack`` at radius ``eps``
    in ``norm`` (linf or l2; ``eps`` 8/255, or 0.5 under L2, unless given).

    Every example is attacked (not only the clean-correct ones), because x'_amp and
    x'_pha of a misclassified image can still be classified correctly. The model should
    be in eval mode (as inside :func:`dat.evaluate`).
    """
    if attack in ("clean", "aa"):
        raise ValueError(f"diagnostics need a per-batch attack (fgsm, pgd20, cw, ...), "
                         f"not {attack!r}")
    if eps is None:
        eps = DEFAULT_EPS.get(norm, DEFAULT_EPS["linf"])  # a bad norm: make_attack says so
    spec = make_attack(attack, eps, norm=norm)
    device = torch.device(device) if device is not None else x.device
    seed_everything(seed)
    counts = torch.zeros(4, dtype=torch.float64)  # correct on: x, x', x'_amp, x'_pha
    for xb, yb in tqdm(list(zip(x.split(batch_size), y.split(batch_size), strict=True)),
                       desc=f"amplitude/phase ({attack})", disable=not progress, leave=False):
        xb, yb = xb.to(device), yb.to(device)
        x_adv = spec.fn(model, xb, yb)
        x_amp, x_pha = swap_spectra(xb, x_adv)
        with torch.no_grad():
            for i, images in enumerate((xb, x_adv, x_amp, x_pha)):
                counts[i] += float((model(images).argmax(dim=1) == yb).sum())
    acc = (100.0 * counts / len(y)).tolist()
    return {"attack": attack, "eps": eps, "norm": norm, "n": len(y), "clean": acc[0],
            "adversarial": acc[1],
            "adversarial_amplitude": acc[2], "adversarial_phase": acc[3],
            "note": "adversarial_amplitude = IDFT(A(x'), P(x)); "
                    "adversarial_phase = IDFT(A(x), P(x')); both clipped to [0, 1]"}


def fourier_basis(u: Tensor, v: Tensor, height: int, width: int) -> Tensor:
    """Real Fourier basis images cos(2 pi (u h / H + v w / W)) of unit L2 norm: (K, H, W)."""
    h = torch.arange(height, dtype=torch.float64)[None, :, None]
    w = torch.arange(width, dtype=torch.float64)[None, None, :]
    u = u.to(torch.float64)[:, None, None]
    v = v.to(torch.float64)[:, None, None]
    basis = torch.cos(2 * math.pi * (u * h / height + v * w / width))  # (K, H, W)
    return (basis / basis.flatten(1).norm(dim=1)[:, None, None]).float()


def _error_rates(model, x, y, signs, basis, norm, batch_size, device) -> Tensor:
    """Error rate (K,) for each of K basis images added to every example."""
    k, n = len(basis), len(x)
    pert = norm * signs[None] * basis[:, None, None]  # (K, N, C, H, W)
    images = (x[None] + pert).clamp(0.0, 1.0).flatten(0, 1)  # (K*N, C, H, W)
    wrong = predict(model, images, batch_size, device) != y.repeat(k)
    return wrong.view(k, n).float().mean(dim=1)


def fourier_heatmap(
    model: nn.Module, x: Tensor, y: Tensor, norm: float = 4.0, batch_size: int = 500,
    device: torch.device | str | None = None, seed: int = 0, progress: bool = True,
) -> Tensor:
    """Error rate (percent) under single Fourier-basis perturbations: (H, W), centred.

    Cell (i, j) is frequency (i - H//2, j - W//2): low frequencies in the middle.
    ``norm`` is the L2 norm per channel (4.0 for 32x32 images, as in Yin et al.).
    Cosines at (u, v) and (-u, -v) are the same image, so only the half plane
    v in [0, W//2] is evaluated and mirrored.
    """
    if len(x) == 0:
        raise ValueError("the Fourier heat map needs at least one example; "
                         "pass heatmap_examples >= 1 (--heatmap-examples)")
    x, y = x.cpu(), y.cpu()
    n, c, height, width = x.shape
    gen = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (n, c, 1, 1), generator=gen) * 2 - 1).float()  # (N, C, 1, 1)
    uu, vv = torch.meshgrid(torch.arange(height), torch.arange(width // 2 + 1), indexing="ij")
    uu, vv = uu.flatten(), vv.flatten()  # (K,) with K = H * (W//2+1)
    per_group = max(1, batch_size // n)
    errors = torch.empty(len(uu))
    device = torch.device(device) if device is not None else x.device
    for start in tqdm(range(0, len(uu), per_group), desc="fourier heat map",
                      disable=not progress, leave=False):
        sl = slice(start, start + per_group)
        basis = fourier_basis(uu[sl], vv[sl], height, width)
        errors[sl] = _error_rates(model, x, y, signs, basis, norm, batch_size, device)
    full = torch.empty(height, width)
    full[uu, vv] = errors
    full[(-uu) % height, (-vv) % width] = errors  # mirror: cos(-t) = cos(t)
    return 100.0 * torch.fft.fftshift(full)
