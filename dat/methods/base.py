"""The interface every training method implements, so the trainer stays method-agnostic."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..attacks import (
    as_class_indices,
    check_unit_range,
    eager_module,
    eval_mode,
    explain_dtype_mismatch,
    train_mode,
)
from ..models.dual_bn import bn_branch, has_dual_bn

__all__ = ["MethodStep", "check_generator_optimizer", "check_optimizer", "train_mode"]


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None, who: str) -> None:
    """One-line ValueError when ``optimizer`` would leave trainable weights of ``model``
    untouched: most often it was built before ``convert_dual_bn`` replaced the BatchNorms,
    so it updates the old layers while the model's BN weights never train."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g
                                               for g in groups):
        return  # None, or a wrapper without torch's param_groups: nothing to compare
    held = {id(p) for group in groups for p in group["params"]}
    params = list(model.parameters())
    missing = [p for p in params if p.requires_grad and id(p) not in held]
    if not missing:
        return
    stale = len(held - {id(p) for p in params})
    why = (f" and holds {stale} tensors that are no longer in the model: it was built before "
           "the model's layers were replaced; build the optimizer after "
           "dat.models.convert_dual_bn(model)" if stale else
           "; pass them all (model.parameters()), or freeze the ones you mean to keep "
           "with p.requires_grad_(False)")
    raise ValueError(f"{who}: the optimizer misses {len(missing)} of the model's "
                     f"{sum(p.requires_grad for p in params)} trainable tensors{why}")


def check_generator_optimizer(generator: nn.Module, optimizer: torch.optim.Optimizer,
                              model_optimizer: torch.optim.Optimizer | None) -> None:
    """One-line ValueError when DATStep's generator optimiser cannot train the AAG: it misses
    the generator's trainable tensors (the AAG would never learn), or it is the model's
    optimiser (its step would move the model a second time per batch), or the model's
    optimiser also holds AAG tensors (with ``reversal`` the AAG would be stepped twice)."""
    if optimizer is model_optimizer:
        raise ValueError("DATStep: generator_optimizer is the model's optimizer; pass an "
                         "optimizer over generator.parameters() (or None for the published SGD)")
    gen_ids = {id(p) for p in generator.parameters()}
    groups = getattr(model_optimizer, "param_groups", None)
    if isinstance(groups, list) and any(id(p) in gen_ids for g in groups if isinstance(g, dict)
                                        for p in g.get("params", [])):
        raise ValueError("DATStep: the model's optimizer also holds the generator's parameters; "
                         "build it over model.parameters() only (the AAG has its own optimizer)")
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        return
    held = {id(p) for g in groups if isinstance(g, dict) for p in g.get("params", [])}
    missing = [p for p in generator.parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(f"DATStep: generator_optimizer misses {len(missing)} of the generator's "
                         f"{sum(p.requires_grad for p in generator.parameters())} trainable "
                         "tensors, so the AAG would not learn; build it over "
                         "generator.parameters() of the generator you pass")


class MethodStep:
    """One optimisation step of a training method: ``stats = step(x, y, x_raw=None)``.

    ``run`` does the work and returns detached 0-d tensors, so the trainer can log them
    every N steps without a host sync per step; ``__call__`` returns plain floats for
    users' own loops. ``state_dict`` holds everything besides the classifier and its
    optimiser that a resume needs (tensors and primitives only).
    """

    images_only = False  # True: batches must be (B, C, H, W) (the FFT needs 2-D images)

    def run(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def __call__(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None) -> dict[str, float]:
        y = as_class_indices(y)
        return self._checked_floats(lambda: self.run(x, y, x_raw), y, x, x_raw)

    def _checked_floats(self, step, y: Tensor, *images: Tensor | None) -> dict[str, float]:
        """``step()``'s stats as floats, after :meth:`check_first_batch` on ``images`` (and
        the batch size on every call: a last batch of 1 comes at an epoch's end)."""
        self._check_batch_shape(images[0])
        self.check_first_batch(*images, labels=y)
        stats = {k: float(v) for k, v in step().items()}
        self._range_checked = True  # after the first step that went through
        return stats

    def check_first_batch(self, *images: Tensor | None, labels: Tensor | None = None) -> None:
        """Refuse images outside [0, 1] (normalised or 0-255), and labels the model has no
        output for, until a first step has gone through: the checks wait for the device
        (and ask the model for its output count), so a user's loop pays for them once,
        and a refused batch changes no weight or BN statistic."""
        if getattr(self, "_range_checked", False):
            return
        for x in images:
            if torch.is_tensor(x) and x.is_floating_point():
                check_unit_range(x, type(self).__name__)
        if labels is not None and torch.is_tensor(images[0]):
            self._check_labels(images[0], labels)

    def _check_batch_shape(self, x: Tensor | None) -> None:
        """A batch: (B, C, H, W) for image-only steps, 2+ dims otherwise, and B >= 2 for a
        model with BatchNorm (no host sync: it runs on every call)."""
        if not torch.is_tensor(x):
            return
        if x.dim() != 4 and (self.images_only or x.dim() < 2):
            raise ValueError(f"{type(self).__name__} expects a batch of images (B, C, H, W), "
                             f"got shape {tuple(x.shape)}" + (
                                 " (an unbatched image? add the batch dimension with x[None])"
                                 if x.dim() == 3 else ""))
        model = getattr(self, "model", None)
        if len(x) >= 2 or model is None:
            return
        if getattr(self, "_has_bn", None) is None:
            self._has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
        if self._has_bn:
            raise ValueError(f"{type(self).__name__} got a batch of {len(x)} image(s); "
                             "BatchNorm statistics need batches of at least 2 images (one "
                             "image's are degenerate, and torch refuses them at 1x1 feature "
                             "maps): drop or merge a last batch of 1 "
                             "(DataLoader(..., drop_last=True))")

    def _check_labels(self, x: Tensor, y: Tensor) -> None:
        who = type(self).__name__
        if not torch.is_tensor(y) or y.is_floating_point() or y.dim() != 1 or len(y) != len(x):
            shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            unbatched = x.dim() == 3 and torch.is_tensor(y) and y.numel() == 1
            raise ValueError(f"{who} expects integer labels, one class index per image; got "
                             f"{getattr(y, 'dtype', '')} {shape} for {len(x)} images" + (
                                 " (an unbatched image? add the batch dimension with x[None])"
                                 if unbatched else ""))
        model = getattr(self, "model", None)
        if model is None or len(y) == 0:
            return
        model = eager_module(model)  # compiled: no extra graph for one image
        branch = bn_branch(model, "main") if has_dual_bn(model) else contextlib.nullcontext()
        with explain_dtype_mismatch(model, x, who), torch.no_grad(), eval_mode(model), branch:
            classes = model(x[:1]).shape[-1]
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise ValueError(f"{who}: labels range {low}..{high} but the model has {classes} "
                             f"outputs; labels must be class indices 0..{classes - 1}")

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for schedules inside a method (e.g. AWP warm-up)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but got keys {sorted(state)}")
