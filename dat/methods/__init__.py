"""Training methods as callable steps: PGD-AT, TRADES, MART and DAT.

``create(cfg, model, optimizer, ...)`` builds the step ``cfg.method.name`` names, so the
trainer never needs to know a method's internals.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config, ConfigError, MethodConfig, load_config
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

_BASELINES = ("pgd_at", "trades", "mart")  # each has a preset <name>_cifar10_resnet18
_COMPARED = ("beta", "label_smoothing", "attack.steps", "attack.init")  # DAT's differ


def _value(method: MethodConfig, key: str):
    owner, _, name = key.rpartition(".")
    return getattr(getattr(method, owner) if owner else method, name)


def baseline_settings_warning(cfg: Config) -> str | None:
    """What to tell a user who switched ``method.name`` to a baseline and kept DAT's
    defaults (label smoothing 0.5, beta 15, 5 Gaussian-start steps), or None; the paper's
    settings are read from the baseline's preset, so the two cannot drift apart."""
    name = cfg.method.name
    if name not in _BASELINES:
        return None
    paper, dat_default = load_config(f"{name}_cifar10_resnet18").method, MethodConfig()
    kept = [key for key in _COMPARED
            if _value(cfg.method, key) == _value(dat_default, key) != _value(paper, key)]
    if not kept:
        return None
    return (f"method.name={name} keeps DAT's defaults for "
            f"{', '.join(f'method.{k}={_value(cfg.method, k)}' for k in kept)}; the {name} "
            f"paper uses {', '.join(f'{k}={_value(paper, k)}' for k in kept)}: start from "
            f"--config {name}_cifar10_resnet18 for the paper's settings")


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
        return TRADESStep(model, optimizer, beta=m.beta, init=m.attack.init, **common)
    if m.name == "mart":
        return MARTStep(model, optimizer, beta=m.beta, init=m.attack.init, **common)
    raise ConfigError(f"method.name={m.name!r} is not valid; use pgd_at, trades, mart or dat")
