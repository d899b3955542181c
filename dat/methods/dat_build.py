"""``build_dat``: the :class:`DATStep` (with its AAG and AAG optimiser) a config describes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config, ConfigError
from ..generator import AmplitudeGenerator, mean_amplitude
from .dat import DATStep

__all__ = ["build_dat"]


def _mean_amplitude_of(train_images, limit: int = 10_000) -> Tensor:
    """Mean amplitude of up to ``limit`` evenly spaced training images (decoded on demand)."""
    if train_images is None:
        raise ConfigError("method.generator.amplitude_scale=dataset needs the training images "
                          "(build_dat(..., train_images=splits.train)); or use official")
    if isinstance(train_images, Tensor):
        return mean_amplitude(train_images)
    n = len(train_images)
    index = torch.linspace(0, n - 1, min(n, limit)).round().long().unique()
    return mean_amplitude(train_images.subset(index).materialize().images)


def build_dat(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, *,
              num_classes: int, image_shape: tuple[int, int, int],
              train_images: Any = None) -> DATStep:
    """The :class:`DATStep` that ``cfg.method`` describes (with its AAG and AAG optimiser).

    ``train_images`` (an ImageSet or a uint8 tensor) is needed only for
    ``method.generator.amplitude_scale=dataset``.
    """
    # dat.build imports dat.methods: import at call time
    from ..build import resolve_batched, resolve_fused_split_bn, resolve_precision

    m, g = cfg.method, cfg.method.generator
    device = next(model.parameters()).device
    generator = generator_opt = None
    if m.recombined_branch and m.amplitude_source == "generator":
        mean_amp = _mean_amplitude_of(train_images) if g.amplitude_scale == "dataset" else None
        generator = AmplitudeGenerator(num_classes, image_shape, g.noise_dim, g.hidden,
                                       g.amplitude_scale, mean_amp).to(device)
        generator_opt = torch.optim.SGD(generator.parameters(), lr=g.lr, momentum=g.momentum,
                                        weight_decay=g.weight_decay)
    return DATStep(
        model, generator, optimizer, generator_opt, beta=m.beta, omega=m.omega,
        label_smoothing=m.label_smoothing, eps=m.attack.eps, alpha=m.attack.alpha,
        steps=m.attack.steps, attack_init=m.attack.init, mu=m.mu, mix=m.mix,
        amplitude_source=m.amplitude_source, split_bn=m.split_bn,
        second_attack=m.second_attack, recombined_branch=m.recombined_branch, outer=m.outer,
        recombined_padding=m.recombined_padding, generator_update=m.generator_update,
        awp_gamma=m.awp_gamma, awp_warmup=m.awp_warmup,
        batched=resolve_batched(cfg.perf.batched_branches, device),
        fused_split_bn=resolve_fused_split_bn(cfg.perf.fused_split_bn, device),
        autocast_dtype=resolve_precision(cfg.perf.precision, device),
        keep_images=8 if cfg.train.image_every > 0 else 0,
        compile_attacks=cfg.perf.compile_attacks,
    )
