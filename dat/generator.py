"""The Adversarial Amplitude Generator (AAG): noise + logits -> a half amplitude spectrum.

The AAG is an MLP (docs/method.md, section 4) trained to MAXIMISE the DAT loss, so the
amplitudes it produces are the ones the classifier currently handles worst. It outputs
only the non-redundant half spectrum (C, H, W//2+1) because images are real.

Two amplitude scales:
- ``official``: the sigmoid output as is, values in (0, 1). Mixed with raw |FFT| values
  (DC up to H*W) this is, to first order, a random darkening (docs/method.md, section 4).
- ``dataset``: the sigmoid output times twice the training set's mean amplitude
  spectrum, so generated amplitudes live at natural-image scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .spectral import decompose, half_width

__all__ = ["AmplitudeGenerator", "mean_amplitude"]

SCALES = ("official", "dataset")


@torch.no_grad()
def mean_amplitude(images: Tensor, batch_size: int = 1000) -> Tensor:
    """Mean amplitude spectrum per channel and frequency, (C, H, W//2+1), float32.

    ``images`` is (N, C, H, W), uint8 in [0, 255] or float in [0, 1]; it is processed in
    batches of ``batch_size`` so a whole dataset fits in memory as uint8.
    """
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"mean_amplitude expects a non-empty (N, C, H, W) batch, got "
                         f"shape {tuple(images.shape)}")
    total = None
    for chunk in images.split(batch_size):
        chunk = chunk.float().div(255) if chunk.dtype == torch.uint8 else chunk.float()
        amp, _ = decompose(chunk)  # (b, C, H, W//2+1)
        part = amp.double().sum(dim=0)
        total = part if total is None else total + part
    return (total / len(images)).float()


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """Linear -> LeakyReLU(0.2), with BatchNorm1d after the 2nd and later hidden layers,
    initialised as the published code does."""
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i > 0:  # the published MLP has no BN after its first layer
            layers.append(nn.BatchNorm1d(b))  # normal eps (the published 0.8 is a slip)
        layers.append(nn.LeakyReLU(0.2))
    layers.append(nn.Linear(dims[-1], out_dim))
    for layer in layers:  # the published initialisation: Xavier-normal weights, zero biases
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class AmplitudeGenerator(nn.Module):
    """AAG: ``G(logits)`` -> non-negative half amplitude spectra (B, C, H, W//2+1).

    Args:
        num_classes: width of the logits it is conditioned on.
        image_shape: (C, H, W) of the images; H and W may be odd.
        noise_dim: size of the Gaussian noise input z (paper: 100).
        hidden: widths of the hidden layers (paper: 128, 256, 512, 1024).
        amplitude_scale: ``official`` or ``dataset`` (see the module docstring).
        mean_amp: (C, H, W//2+1) mean amplitude (:func:`mean_amplitude`), required for
            ``dataset``; it is stored in the state dict.

    Example::

        G = AmplitudeGenerator(10, (3, 32, 32))
        amp = G(logits)            # samples z ~ N(0, I)
        amp = G(logits, z=z)       # z: (B, 100)
    """

    def __init__(
        self, num_classes: int, image_shape: Sequence[int] = (3, 32, 32),
        noise_dim: int = 100, hidden: Sequence[int] = (128, 256, 512, 1024),
        amplitude_scale: str = "official", mean_amp: Tensor | None = None,
    ) -> None:
        super().__init__()
        if amplitude_scale not in SCALES:
            raise ValueError(f"amplitude_scale={amplitude_scale!r}; use one of {SCALES}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        c, h, w = (int(v) for v in image_shape)
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.image_shape = (c, h, w)
        self.spectrum_shape = (c, h, half_width(w))
        self.amplitude_scale = amplitude_scale
        out_dim = c * h * half_width(w)
        self.net = _mlp(noise_dim + num_classes, list(hidden), out_dim)
        self.register_buffer("scale", torch.ones(self.spectrum_shape))  # (C, H, W//2+1)
        if amplitude_scale == "dataset":
            if mean_amp is None:
                raise ValueError("amplitude_scale='dataset' needs mean_amp: pass "
                                 "dat.generator.mean_amplitude(train_images)")
            self.set_mean_amplitude(mean_amp)

    @torch.no_grad()
    def set_mean_amplitude(self, mean_amp: Tensor) -> None:
        """Use ``2 * mean_amp`` (C, H, W//2+1) as the scale of the sigmoid output."""
        if tuple(mean_amp.shape) != self.spectrum_shape:
            raise ValueError(f"mean_amp has shape {tuple(mean_amp.shape)}, expected "
                             f"{self.spectrum_shape} (C, H, W//2+1)")
        self.scale.copy_(2.0 * mean_amp.to(self.scale))

    def unit(self, logits: Tensor, z: Tensor | None = None) -> Tensor:
        """The sigmoid output in (0, 1), before scaling: (B, C, H, W//2+1)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"G expects logits of shape (B, {self.num_classes}), "
                             f"got {tuple(logits.shape)}")
        device = self.scale.device
        if z is None:
            z = torch.randn(len(logits), self.noise_dim, device=device)
        elif tuple(z.shape) != (len(logits), self.noise_dim):
            raise ValueError(f"z must be (B, {self.noise_dim}), got {tuple(z.shape)}")
        # The MLP is small: run it in its own precision (fp32 unless converted) even under
        # autocast, because its output feeds the FFT.
        with torch.autocast(device_type=device.type, enabled=False):
            h = torch.cat([z, logits.detach()], dim=1).to(self.scale.dtype)  # (B, noise + classes)
            out = torch.sigmoid(self.net(h))
        return out.view(len(logits), *self.spectrum_shape)

    def forward(self, logits: Tensor, z: Tensor | None = None) -> Tensor:
        """Amplitudes (B, C, H, W//2+1) >= 0 for ``logits`` (B, num_classes)."""
        return self.unit(logits, z) * self.scale

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, noise_dim={self.noise_dim}, "
                f"amplitude_scale={self.amplitude_scale!r}")
