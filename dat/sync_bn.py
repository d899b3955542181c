"""BatchNorm synchronised across torchrun ranks, for both DAT branches and the AAG.

``nn.SyncBatchNorm`` only runs on accelerators, so CPU/gloo runs (and the tests) use an
all-reduce BatchNorm with the same semantics; CUDA uses ``nn.SyncBatchNorm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .models.dual_bn import norm_act_tail

__all__ = ["convert_sync_bn"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients:
    each rank's sample statistics feed every rank's loss."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span every rank's batch (gloo and CPU too).

    ``nn.SyncBatchNorm`` only runs on accelerators. This layer all-reduces the count and
    sum, then the centred sum of squares (two passes: numerically stable), with
    autograd-aware collectives, so gradients flow through the other ranks' samples too.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        dims, c = [0, *range(2, x.dim())], x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x if x.dtype == torch.float64 else x.float()  # (B, C, ...) stats in fp32+
        count = torch.full((1,), x.numel() // c, dtype=xf.dtype, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([count, xf.sum(dims)]))  # (1 + C,)
        n, mean = totals[0], totals[1:] / totals[0]
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n  # (C,) biased, as in BN
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        out = centred / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(
            self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")


class _GlobalBatchNormAct(_GlobalBatchNorm):
    """:class:`_GlobalBatchNorm` followed by the ``drop`` and ``act`` of a timm
    ``BatchNormAct2d`` (whose forward is BatchNorm, then drop, then the activation)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _norm_act_tail(bn: _BatchNorm) -> tuple[nn.Module, nn.Module] | None:
    """(drop, act) of a timm-style BatchNorm + activation layer; None for a plain BN.

    A BN subclass with its own forward that is not of that form cannot be synchronised
    without losing what its forward adds, so it is refused in one line."""
    if type(bn).forward is _BatchNorm.forward or isinstance(bn, (_GlobalBatchNorm,
                                                                  nn.SyncBatchNorm)):
        return None
    tail = norm_act_tail(bn)
    if tail is not None:
        return tail
    raise ValueError(f"model.sync_bn cannot synchronise {type(bn).__name__}: its forward does "
                     "more than BatchNorm and would be lost; train with model.sync_bn=false")


def _to_global_bn(bn: _BatchNorm) -> _GlobalBatchNorm:
    """The same layer as a :class:`_GlobalBatchNorm`, sharing its parameters and buffers
    (so optimisers built before the conversion keep working); a timm ``BatchNormAct2d``
    keeps its activation."""
    tail = _norm_act_tail(bn)
    new = (_GlobalBatchNorm if tail is None else _GlobalBatchNormAct)(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if tail is not None:
        new.drop, new.act = tail
    for name, param in bn.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buffer in bn.named_buffers(recurse=False):
        setattr(new, name, buffer)
    new.train(bn.training)
    return new


def _replace_bn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, _GlobalBatchNorm):
            setattr(module, name, _to_global_bn(child))
        else:
            _replace_bn(child)


def convert_sync_bn(module: nn.Module, device_type: str) -> nn.Module:
    """Synchronise every BatchNorm inside ``module`` across ranks, in place.

    Covers both branches of every DualBatchNorm and the AAG's BatchNorm1d. CUDA uses
    ``nn.SyncBatchNorm``; other devices an all-reduce BatchNorm with the same semantics.
    Parameters and buffers are shared with the old layers, so optimisers stay valid.
    """
    if isinstance(module, _BatchNorm):
        raise ValueError("convert_sync_bn converts the BatchNorm layers inside a model; "
                         "pass the model, not a bare BatchNorm")
    tails = [_norm_act_tail(m) for m in module.modules() if isinstance(m, _BatchNorm)]
    if device_type == "cuda":
        if any(t is not None for t in tails):  # torch's converter would drop the activations
            from timm.layers import convert_sync_batchnorm

            return convert_sync_batchnorm(module)
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    _replace_bn(module)
    return module
