"""Training methods as callable steps: PGD-AT, TRADES, MART and DAT.

``create(cfg, model, optimizer, ...)`` builds the step ``cfg.method.name`` names, so the
trainer never needs to know a method's internals.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config, ConfigError
from .base import MethodStep
from .dat import DATDraws, DATStep
from .dat_build import build_dat
from .mart import MARTStep
from .pgd_at import BaselineStep, PGDATStep
from .trades import TRADESStep

__all__ = [
    "BaselineStep",
    "DATDraws",
    "DATStep",
    "MARTStep",
    "MethodStep",
    "PGDATStep",
    "TRADESStep",
    "baseline_settings_warning",
    "build_dat",
    "create",
    "needs_dual_bn",
]

# each baseline's paper settings, as its preset sets them (dat/configs/<name>_cifar10_resnet18)
_PAPER_SETTINGS = {
    "pgd_at": {"label_smoothing": 0.0, "attack.steps": 10, "attack.init": "uniform"},
    "trades": {"beta": 6.0, "label_smoothing": 0.0, "attack.steps": 10,
               "attack.init": "gaussian"},
    "mart": {"beta": 6.0, "label_smoothing": 0.0, "attack.steps": 10, "attack.init": "uniform"},
}


def baseline_settings_warning(cfg: Config) -> str | None:
    """What to tell a user who switched ``method.name`` to a baseline and kept DAT's
    defaults (label smoothing 0.5, beta 15, 5 Gaussian-start steps), or None."""
    from ..config import MethodConfig

    paper = _PAPER_SETTINGS.get(cfg.method.name)
    if paper is None:
        return None
    dat_default, ours = MethodConfig(), cfg.method

    def value(method: MethodConfig, key: str):
        owner, _, name = key.rpartition(".")
        return getattr(getattr(method, owner) if owner else method, name)

    kept = [key for key in paper
            if value(ours, key) == value(dat_default, key) != paper[key]]
    if not kept:
        return None
    name = cfg.method.name
    return (f"method.name={name} keeps DAT's defaults for "
            f"{', '.join(f'method.{k}={value(ours, k)}' for k in kept)}; the {name} paper uses "
            f"{', '.join(f'{k}={paper[k]}' for k in kept)}: start from --config "
            f"{name}_cifar10_resnet18 for the paper's settings")


def needs_dual_bn(cfg: Config) -> bool:
    """True when the method routes recombined images through an auxiliary BN branch."""
    return cfg.method.name == "dat" and cfg.method.split_bn


def create(
    cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, *, num_classes: int,
    image_shape: tuple[int, int, int], train_images=None,
    autocast_dtype: torch.dtype | None = None,
) -> MethodStep:
    """The training step for ``cfg.method.name`` (pgd_at | trades | mart | dat).

    ``autocast_dtype`` (None = fp32) is passed to the baseline steps; DAT reads its own
    precision through ``build_dat`` where it supports it.
    """
    m = cfg.method
    if m.name == "dat":
        return build_dat(cfg, model, optimizer, num_classes=num_classes,
                         image_shape=image_shape, train_images=train_images)
    common = dict(eps=m.attack.eps, alpha=m.attack.alpha, steps=m.attack.steps,
                  label_smoothing=m.label_smoothing, autocast_dtype=autocast_dtype,
                  keep_images=8 if cfg.train.image_every > 0 else 0,
                  compile_attacks=cfg.perf.compile_attacks, awp_gamma=m.awp_gamma,
                  awp_warmup=m.awp_warmup)
    if m.name == "pgd_at":
        return PGDATStep(model, optimizer, init=m.attack.init, **common)
    if m.name == "trades":
        return TRADESStep(model, optimizer, beta=m.beta, **common)
    if m.name == "mart":
        return MARTStep(model, optimizer, beta=m.beta, init=m.attack.init, **common)
    raise ConfigError(f"method.name={m.name!r} is not valid; use pgd_at, trades, mart or dat")
