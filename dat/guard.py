"""Skip non-finite training steps without a host sync per step.

Before each step :meth:`StepGuard.snapshot` copies every parameter, buffer and optimiser
state tensor; after it :meth:`StepGuard.commit` computes a device-side flag
``ok = isfinite(loss) and isfinite(|grad|) and isfinite(|params|)`` and writes back
``torch.where(ok, new, old)``. On CUDA both go through one flat buffer per (device, dtype),
a handful of kernels per step instead of one per tensor, since a step there is
launch-bound; on a CPU, one kernel per tensor moves half the bytes.
A bad step therefore leaves the model, its BN statistics and the optimiser exactly as they
were, and nothing waits for the GPU: the trainer reads the counters only when it logs
(every ``perf.log_every`` steps), and stops once ``train.max_bad_steps`` consecutive steps
were bad.

Under torchrun, ``agree`` (:func:`dat.distributed.agree_all_ok`) makes the flag the AND
over ranks, so every rank keeps or rolls back the same steps and the replicas stay equal.

Optimiser state created *during* a bad step (e.g. SGD's momentum on the very first step)
is zeroed, which equals a fresh buffer for SGD without dampening. Tensors on another
device than the loss (e.g. Adam's CPU step counters) are not guarded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["StepGuard", "generator_warnings", "owned_modules_and_optimizers", "unique_objects"]


def owned_modules_and_optimizers(obj: object) -> tuple[list[nn.Module], list]:
    """Modules and optimisers held as attributes of ``obj`` (e.g. a method's generator)."""
    values = vars(obj).values() if hasattr(obj, "__dict__") else ()
    modules = [v for v in values if isinstance(v, nn.Module)]
    optimizers = [v for v in values if isinstance(v, torch.optim.Optimizer)]
    return modules, optimizers


def unique_objects(items: list) -> list:
    """``items`` without repeats (by identity, first occurrence kept)."""
    seen, out = set(), []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


class StepGuard:
    """Roll back any step whose loss, gradients or parameters are not finite."""

    def __init__(self, modules: list[nn.Module], optimizers: list, extra: object = None,
                 agree: Callable[[Tensor], Tensor] | None = None,
                 fused: bool | None = None) -> None:
        more_modules, more_optims = owned_modules_and_optimizers(extra)
        self.modules = unique_objects([*modules, *more_modules])
        self.optimizers = unique_objects([*optimizers, *more_optims])
        # fused: one flat buffer per (device, dtype), a few kernels in all; else one buffer
        # and one kernel per tensor, but half the memory traffic. None: fused on CUDA, where
        # launches cost more than bytes; per tensor on a CPU, where the reverse holds.
        self.fused = fused
        self._saved: list[tuple[list[Tensor], Tensor, bool]] = []  # (tensors, copy, flat?)
        self._saved_ids: set[int] = set()  # id() of every tensor in the snapshot
        self._buffers: dict[tuple, Tensor] = {}  # snapshot storage, reused between steps
        self.agree = agree  # ok on this rank -> ok on every rank (None: single process)
        self.consecutive: Tensor | None = None  # device-side counters, read when logging
        self.peak: Tensor | None = None
        self.recent: Tensor | None = None

    def _params(self) -> list[Tensor]:
        return unique_objects([p for m in self.modules for p in m.parameters()])

    def _tensors(self, params: list[Tensor] | None = None) -> list[Tensor]:
        params = self._params() if params is None else params
        found = [*params, *(b for m in self.modules for b in m.buffers())]
        for opt in self.optimizers:
            for state in opt.state.values():
                found += [v for v in state.values() if torch.is_tensor(v)]
        return unique_objects(found)

    def _buffer(self, key: tuple, like: Tensor, numel: int | None = None) -> Tensor:
        old = self._buffers.get(key)
        if numel is not None:  # a flat buffer
            if old is None or old.numel() != numel or old.dtype != like.dtype:
                old = self._buffers[key] = like.new_empty(numel)
        elif (old is None or old.shape != like.shape or old.dtype != like.dtype
              or old.device != like.device or old.stride() != like.stride()):
            old = self._buffers[key] = torch.empty_like(like)
        return old

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the current state (call right before the step)."""
        tensors = self._tensors()
        fused = self.fused if self.fused is not None else any(t.is_cuda for t in tensors)
        single = [t for t in tensors if not (fused and _is_dense(t))]
        self._saved = []
        if fused:
            for key, (group, flat) in _dense_groups([t for t in tensors if _is_dense(t)]).items():
                buffer = self._buffer(key, flat[0], sum(f.numel() for f in flat))
                torch.cat(flat, out=buffer)  # one copy for the whole group
                self._saved.append((group, buffer, True))
        copies = [self._buffer((id(t),), t) for t in single]
        if single:
            torch._foreach_copy_(copies, single)
        self._saved += [([t], c, False) for t, c in zip(single, copies, strict=True)]
        self._saved_ids = {id(t) for t in tensors}
        used = {id(copy) for _, copy, _ in self._saved}  # drop storage of tensors now gone
        self._buffers = {k: v for k, v in self._buffers.items() if id(v) in used}

    @torch.no_grad()
    def commit(self, loss: Tensor | None) -> Tensor:
        """Keep the step if everything is finite, else restore the snapshot; returns ok."""
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch._foreach_norm(params) + (torch._foreach_norm(grads) if grads else [])
        ok = torch.stack([n.float() for n in norms]).sum().isfinite()
        if loss is not None:
            ok = ok & loss.detach().float().isfinite().all().to(ok.device)
        if self.agree is not None:
            ok = self.agree(ok)
        for tensors, saved, flat_group in self._saved:
            if saved.device != ok.device:
                continue
            if not flat_group:
                torch.where(ok, tensors[0], saved, out=tensors[0])  # no host sync
                continue
            flat = [_memory_flat(t) for t in tensors]
            kept = torch.where(ok, torch.cat(flat), saved)
            torch._foreach_copy_(flat, list(kept.split([f.numel() for f in flat])))
        for t in self._tensors(params):  # state created during this step (SGD's first momentum)
            if id(t) not in self._saved_ids and t.device == ok.device:
                t.masked_fill_(~ok, 0)
        self._count(ok)
        return ok

    def _count(self, ok: Tensor) -> None:
        bad = (~ok).long()
        if self.consecutive is None:
            self.consecutive, self.peak, self.recent = bad.clone(), bad.clone(), bad.clone()
        else:
            self.consecutive = (self.consecutive + bad) * bad
            self.peak = torch.maximum(self.peak, self.consecutive)
            self.recent = self.recent + bad

    def counters(self, device: torch.device) -> list[Tensor]:
        """[longest run of consecutive bad steps, bad steps] since the last read (device).

        Reading resets both, so a streak longer than ``max_bad_steps`` that ended before
        the read is still seen, and counts are never reported twice.
        """
        if self.consecutive is None:
            return [torch.zeros((), device=device), torch.zeros((), device=device)]
        out = [self.peak.float(), self.recent.float()]
        self.peak, self.recent = self.consecutive.clone(), torch.zeros_like(self.recent)
        return out


def _memory_flat(t: Tensor) -> Tensor:
    """A 1-D view of ``t`` in memory order (``t`` must be dense, any layout)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _is_dense(t: Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(
        memory_format=torch.channels_last))


def _dense_groups(tensors: list[Tensor]) -> dict[tuple, tuple[list[Tensor], list[Tensor]]]:
    """Dense tensors grouped by (device, dtype), with their flat memory-order views."""
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for t in tensors:
        members, views = groups.setdefault((t.device, t.dtype), ([], []))
        members.append(t)
        views.append(_memory_flat(t))
    return groups


SATURATED_SHARE = 0.95  # of sigmoid outputs within 0.01 of 0 or 1
COLLAPSED_STD = 1e-3  # mean spread of the sigmoid output across a batch


def generator_warnings(means: dict[str, float]) -> list[str]:
    """Warnings for a saturated or collapsed AAG, from logged means (empty when healthy)."""
    found = []
    saturated, spread = means.get("gen_saturated"), means.get("gen_batch_std")
    if saturated is not None and saturated > SATURATED_SHARE:
        found.append(f"generator saturated: {saturated:.0%} of its sigmoid outputs are pinned "
                     "at 0 or 1, so it barely learns; lower method.generator.lr")
    if spread is not None and spread < COLLAPSED_STD:
        found.append(f"generator collapsed: its output varies by {spread:.1e} across the batch "
                     "(noise and logits no longer matter); lower method.generator.lr or restart")
    return found
