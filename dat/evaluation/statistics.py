"""How far an accuracy measured on N examples can be trusted, and where it comes from.

Robust accuracy is often reported on a subset (AutoAttack on 1,000 images): on 1,000
examples a 50% accuracy has a 95% interval of about +-3 points, wider than many gaps
papers claim. The Wilson score interval stays inside [0, 100] and is sound near 0% and
100%, where the normal approximation is not. Per-class accuracy shows robustness that
hides in a few classes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["per_class_accuracy", "wilson_interval"]

Z95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval, in percent, of ``correct`` successes out of ``n``."""
    if n <= 0:
        return (0.0, 100.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def per_class_accuracy(mask: Tensor, y: Tensor, num_classes: int) -> list[float | None]:
    """Accuracy (%) per class of the points where ``mask`` is True; None for a class with
    no example."""
    total = torch.bincount(y, minlength=num_classes)[:num_classes]
    hits = torch.bincount(y[mask], minlength=num_classes)[:num_classes]
    return [100.0 * int(h) / int(t) if int(t) else None
            for h, t in zip(hits.tolist(), total.tolist(), strict=True)]
