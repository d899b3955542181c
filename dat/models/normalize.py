"""Per-channel mean/std normalisation kept inside the model (non-persistent buffers).

Models take images in [0, 1]; attacks and the eps-ball live in that space, so the
normalisation must be part of the network, never of the data pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Normalize"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what most timm and torchvision weights expect
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; buffers are not saved in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 channels: int | None = None) -> None:
        super().__init__()
        if channels is not None and not len(mean) == len(std) == channels:
            raise ValueError(
                f"in_chans={channels} but mean/std have {len(mean)}/{len(std)} values (the "
                f"CIFAR-10 defaults have 3); pass mean= and std= with {channels} value(s) for "
                "your images")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
