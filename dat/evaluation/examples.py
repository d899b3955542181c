"""The examples an evaluation attacks: (x, y) on the CPU from tensors or a loader, checked
([0, 1] float images, integer labels), and a class-stratified subset when asked for fewer."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import stratified_split
from .suite import EvaluationError

__all__ = ["collect_examples"]


def _as_xy(batch) -> tuple[Tensor, Tensor]:
    if hasattr(batch, "x_raw"):  # dat Batch: evaluate the un-augmented images
        return batch.x_raw, batch.y
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise EvaluationError(
        f"cannot read a batch of type {type(batch).__name__}; data must yield (x, y) pairs "
        "or dat Batch(x, x_raw, y), or be a tuple (x, y) of tensors")


def collect_examples(data, n_examples: int | None = None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` on the CPU from a tuple of tensors or an iterable of batches, validated.

    ``n_examples`` of a tuple ``(x, y)`` are a class-stratified subset in the original
    order (test sets are often sorted by class: the first N could be one class); of a
    loader, the first N it yields (shuffle it, or pass a tuple).
    """
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(
            data, torch.utils.data.IterableDataset):  # map-style: iterating gives samples
        raise EvaluationError(f"data is a {type(data).__name__} (single samples); pass "
                              "DataLoader(data, batch_size=500) or a tuple (x, y) of tensors")
    in_memory = isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0])
    if in_memory:
        xs, ys = [data[0]], [torch.as_tensor(data[1])]
    else:
        xs, ys, total = [], [], 0
        for batch in data:
            xb, yb = _as_xy(batch)
            xs.append(xb.detach().cpu())
            ys.append(torch.as_tensor(yb).cpu())
            total += len(xb)
            if n_examples and total >= n_examples:
                break
    if not xs or sum(len(t) for t in xs) == 0:
        raise EvaluationError("data holds no examples; pass a non-empty loader or (x, y)")
    x, y = torch.cat([t.detach().cpu() for t in xs]), torch.cat([t.cpu() for t in ys])
    _validate_examples(x, y)
    if n_examples and n_examples < len(x):
        keep = stratified_split(y, n_examples, seed=0)[1] if in_memory else slice(0, n_examples)
        x, y = x[keep], y[keep]
    return x.float().contiguous(), y.long()


def _validate_examples(x: Tensor, y: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise EvaluationError(f"images must be float (N, C, H, W), got {x.dtype} "
                              f"{tuple(x.shape)}; convert uint8 images with x.float() / 255")
    if len(x) != len(y) or y.dim() != 1 or y.is_floating_point():
        raise EvaluationError(f"labels must be integer (N,) matching the images; got "
                              f"{y.dtype} {tuple(y.shape)} for {len(x)} images")
    if int(y.min()) < 0:
        raise EvaluationError(f"labels must be class indices >= 0 (found {int(y.min())})")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise EvaluationError(
            f"images must lie in [0, 1] (found [{float(x.min()):.3f}, {float(x.max()):.3f}]); "
            "drop Normalize from the data pipeline: the model normalises inside")
