"""Multi-process training with torchrun: process groups, gradient averaging, SyncBN.

Every rank holds the classifier, the AAG and their optimisers; each trains on its own
shard of the data. They stay bit-identical because they start from rank 0's weights
(:func:`broadcast_module`) and every optimiser averages its gradients across ranks just
before it steps (:func:`sync_gradients`, an optimiser step pre-hook, one bucketed
all-reduce per step).

Why not ``DistributedDataParallel``: DDP averages a gradient when autograd *accumulates*
it into ``.grad``. A DAT step runs many forwards per backward (eval-mode attacks that
differentiate only the input, two BN branches, the AAG's recomputation), and the AAG's
published update takes its gradient with ``torch.autograd.grad`` and assigns it by hand,
which never triggers an accumulation hook: under DDP (or per-parameter post-accumulate
hooks) the generators would drift apart silently. Averaging right before
``optimizer.step()`` sees exactly the gradient the step uses, however it was produced.

BatchNorm statistics: by default each rank normalises with its own batch (as DDP does)
and the running statistics are averaged across ranks (:func:`average_buffers`) before
every validation and checkpoint. ``model.sync_bn=true`` normalises with the statistics
of the global batch instead (:func:`convert_sync_bn`: ``nn.SyncBatchNorm`` on CUDA, an
all-reduce BatchNorm elsewhere), for both DAT branches and the AAG's BatchNorm1d.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from .config import ConfigError
from .sync_bn import convert_sync_bn

__all__ = [
    "DistInfo",
    "agree_all_ok",
    "all_gather_objects",
    "all_reduce_sum",
    "average_buffers",
    "barrier",
    "broadcast_module",
    "cleanup_distributed",
    "convert_sync_bn",
    "init_distributed",
    "is_main_process",
    "prepare_modules",
    "rank_seed",
    "resume_position",
    "run_on_main",
    "sync_gradients",
]

DEFAULT_TIMEOUT_S = 1800  # per collective; override with the DAT_DIST_TIMEOUT env variable
_BUCKET_ELEMENTS = 8 * 2**20  # gradients all-reduced in flat buckets of at most 32 MB fp32


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` and its GPU on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``), if any.

    NCCL for CUDA, gloo otherwise; collectives time out after ``DAT_DIST_TIMEOUT``
    seconds (default 1800) instead of hanging. An already initialised group is reused.
    Without torchrun's variables this returns a single-process :class:`DistInfo`.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={world} but RANK/MASTER_ADDR are not set; launch with "
                          "torchrun --nproc_per_node=N train.py ...")
    timeout = datetime.timedelta(seconds=float(os.environ.get("DAT_DIST_TIMEOUT",
                                                              DEFAULT_TIMEOUT_S)))
    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs "
                              "are visible; use torchrun --nproc_per_node=<number of GPUs>")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def cleanup_distributed() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs: logging and checkpoints happen there."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in single-process runs)."""
    if _active():
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed per rank for draws that must differ (attack noise)."""
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % 2**62


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; every rank gets its result or raises its error."""
    if not _active():
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # handed to every rank, re-raised below
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in single-process runs)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (initial sync)."""
    if not _active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def average_buffers(module: nn.Module) -> None:
    """Average BN running statistics across ranks; other buffers get rank 0's values.

    Without SyncBN each rank's running statistics follow only its own shard; averaging
    makes validation, checkpoints and export use every rank's data.
    """
    if not _active():
        return
    stats = [b for m in module.modules() if isinstance(m, _BatchNorm)
             for b in (m.running_mean, m.running_var) if b is not None]
    ids = {id(b) for b in stats}
    with torch.no_grad():
        _all_reduce_mean(stats)
        for buffer in module.buffers():
            if id(buffer) not in ids:
                dist.broadcast(buffer.data, 0)


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a tensor over ranks (returns a copy); identity in single-process runs."""
    if _active():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def agree_all_ok(ok: Tensor) -> Tensor:
    """A 0-d bool that is True only if ``ok`` is True on every rank (device-side)."""
    if not _active():
        return ok
    bad = (~ok).float().reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    return bad[0] == 0


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    """In-place mean over ranks, in flat buckets per (device, dtype): few, large messages."""
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        bucket, size = [], 0
        for t in group:
            if bucket and size + t.numel() > _BUCKET_ELEMENTS:
                _reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket])  # (total numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    parts = flat.split([t.numel() for t in bucket])
    torch._foreach_copy_(bucket, [p.view_as(t) for p, t in zip(parts, bucket, strict=True)])


def sync_gradients(optimizer: torch.optim.Optimizer) -> RemovableHandle | None:
    """Average every gradient ``optimizer`` is about to use across ranks, before each step.

    Works however the gradient was made (``backward``, or ``autograd.grad`` assigned to
    ``.grad``). Every rank must call ``step()`` equally often with gradients on the same
    parameters, which every method step does by construction. Returns the hook handle
    (``handle.remove()`` undoes it), or None in single-process runs.
    """
    if not _active():
        return None

    def average(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"]
                 if p.grad is not None]
        with torch.no_grad():
            _all_reduce_mean(grads)

    return optimizer.register_step_pre_hook(average)


def resume_position(step: int, saved_global_batch: int, global_batch: int) -> tuple[int, str]:
    """Map a mid-epoch position (``step`` global batches done) to this run's global batch.

    Shards split one shared per-epoch order, so ``step`` batches of ``saved_global_batch``
    consumed the order's first ``step * saved_global_batch`` samples. If that is a whole
    number of new global batches the run continues right there; otherwise it restarts
    the epoch (its first samples are seen twice). Returns (new step, note; "" if exact).
    """
    if step == 0 or saved_global_batch == global_batch:
        return step, ""
    consumed = step * saved_global_batch
    if consumed % global_batch == 0:
        return consumed // global_batch, ""
    return 0, (f"the checkpoint stopped {consumed} images into the epoch with a global batch "
               f"of {saved_global_batch}; with a global batch of {global_batch} that is not "
               "a whole number of steps, so the epoch restarts from its first batch")


def prepare_modules(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer], *,
                    sync_bn: bool, device_type: str) -> None:
    """Make ranks train as one: SyncBN (in place), rank 0's weights, averaged gradients."""
    if not _active():
        return
    for module in modules:
        if sync_bn:
            convert_sync_bn(module, device_type)
        broadcast_module(module)
    for optimizer in optimizers:
        sync_gradients(optimizer)
