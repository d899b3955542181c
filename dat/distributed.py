"""Multi-process training with torchrun: process groups, gradient averaging, SyncBN.

The classifier and the generator are kept identical on every rank by averaging each
gradient across ranks as soon as backward has accumulated it (a post-accumulate-grad
hook), instead of wrapping them in ``DistributedDataParallel``: a DAT step runs many
forward passes (attacks, two BN branches, the generator's recomputation) per backward,
and attack passes differentiate only the input, which DDP's reducer does not expect.
With the same initial weights (broadcast from rank 0), the same averaged gradients and
the same optimiser, every rank then holds bit-identical parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "broadcast_buffers",
    "broadcast_module",
    "convert_sync_bn",
    "init_distributed",
    "is_main_process",
    "sync_gradients",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``), if any.

    NCCL for CUDA, gloo for CPU. Without torchrun's variables this is a no-op that
    returns a single-process :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs: logging and checkpoints happen there."""
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (initial sync)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BN running statistics) to every rank, as DDP does."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src)


def sync_gradients(module: nn.Module) -> list:
    """Average every parameter's gradient across ranks right after backward fills it.

    Returns the hook handles (``handle.remove()`` undoes it). Every rank must run the
    same sequence of backward passes, which a DAT/PGD/TRADES step does by construction.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return []
    world = dist.get_world_size()

    def average(param: Tensor) -> None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world)

    return [p.register_post_accumulate_grad_hook(average)
            for p in module.parameters() if p.requires_grad]


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a tensor over ranks (in place copy); identity in single-process runs."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class _GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span every rank's batch (any device, gloo too).

    ``torch.nn.SyncBatchNorm`` only runs on accelerators; this one all-reduces the
    per-channel sum, sum of squares and count with autograd-aware collectives, so the
    gradient also flows through the other ranks' contributions, as in SyncBatchNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(
                    self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        shape = [1, c] + [1] * (x.dim() - 2)
        out = (xf - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")


def _to_global_bn(bn: _BatchNorm) -> _GlobalBatchNorm:
    new = _GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                           bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    return new.to(next(iter(bn.state_dict().values())).device)


def _replace(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, _GlobalBatchNorm):
            setattr(module, name, _to_global_bn(child))
        else:
            _replace(child)


def convert_sync_bn(module: nn.Module, device_type: str) -> nn.Module:
    """Synchronise every BatchNorm (both DAT branches included) across ranks.

    CUDA uses ``torch.nn.SyncBatchNorm``; other devices use an all-reduce BatchNorm
    with the same semantics (needed for CPU/gloo runs and tests).
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    _replace(module)
    return module
