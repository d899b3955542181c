"""Two-branch BatchNorm: separate affine parameters and running statistics per branch.

DAT normalises clean/adversarial images with the ``main`` branch and recombined
images with the ``aux`` branch, because their statistics differ; evaluation and
export use ``main`` only. ``split`` routes the first half of a batch to ``main`` and
the second half to ``aux`` so that both branches run in one forward pass (exactly
equivalent to two passes, since BatchNorm statistics are per branch anyway).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BRANCHES",
    "DualBatchNorm",
    "bn_branch",
    "convert_dual_bn",
    "export_main_branch",
    "has_dual_bn",
    "set_bn_branch",
]

BRANCHES = ("main", "aux", "split")


class DualBatchNorm(nn.Module):
    """Wraps two copies of a BatchNorm layer; ``branch`` picks which one a forward uses."""

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.main = copy.deepcopy(bn)
        self.aux = copy.deepcopy(bn)
        self.branch = "main"
        self.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.branch == "main":
            return self.main(x)
        if self.branch == "aux":
            return self.aux(x)
        half = x.shape[0] // 2
        if x.shape[0] != 2 * half:
            raise ValueError(f"split BatchNorm needs an even batch, got {x.shape[0]}")
        first, second = x.split(half)  # one cat in backward (two slices would zero-fill twice)
        return torch.cat([self.main(first), self.aux(second)], dim=0)

    def extra_repr(self) -> str:
        return f"branch={self.branch!r}"


def _replace_bn(module: nn.Module) -> bool:
    replaced = False
    for name, child in module.named_children():
        if isinstance(child, DualBatchNorm):
            replaced = True
        elif isinstance(child, _BatchNorm):
            setattr(module, name, DualBatchNorm(child))
            replaced = True
        else:
            replaced = _replace_bn(child) or replaced
    return replaced


def convert_dual_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``model`` (in place) with a :class:`DualBatchNorm`.

    Both branches start as copies of the original layer (parameters, running statistics,
    ``training`` flag), so outputs are unchanged until the branches are trained apart.
    Returns ``model`` for chaining.
    """
    if isinstance(model, _BatchNorm):
        raise ValueError("convert_dual_bn expects a model that contains BatchNorm, not a bare BN")
    if not _replace_bn(model):
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer, so it cannot get two BN branches; "
            "use a model with BatchNorm, or train without split BN (method.split_bn=false)"
        )
    return model


def has_dual_bn(model: nn.Module) -> bool:
    """True when ``model`` contains at least one :class:`DualBatchNorm`."""
    return any(isinstance(m, DualBatchNorm) for m in model.modules())


def set_bn_branch(model: nn.Module, branch: str) -> str:
    """Route every :class:`DualBatchNorm` in ``model`` to ``branch``; return the previous one."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown BN branch {branch!r}; use one of {BRANCHES}")
    previous = "main"
    for m in model.modules():
        if isinstance(m, DualBatchNorm):
            previous = m.branch
            m.branch = branch
    return previous


@contextlib.contextmanager
def bn_branch(model: nn.Module, branch: str) -> Iterator[nn.Module]:
    """Context manager: forward passes inside use BN ``branch`` ("main", "aux" or "split")."""
    previous = set_bn_branch(model, branch)
    try:
        yield model
    finally:
        set_bn_branch(model, previous)


def _main_only(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, DualBatchNorm):
            setattr(module, name, copy.deepcopy(child.main))
        else:
            _main_only(child)


def export_main_branch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`DualBatchNorm` replaced by its main branch.

    The result is an ordinary single-BN module whose state dict loads with
    ``strict=True`` into the plain (unconverted) architecture.
    """
    plain = copy.deepcopy(model)
    if isinstance(plain, DualBatchNorm):
        return plain.main
    _main_only(plain)
    return plain
