"""Wide ResNets (Zagoruyko & Komodakis 2016) in the pre-activation form used by AT papers."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize
from .registry import register

__all__ = ["WideResNet"]


class _WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal = in_planes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen; depth = 6n + 4."""

    def __init__(
        self,
        depth: int = 34,
        widen: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(mean, std, channels=in_chans)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, 1)
        self.block2 = self._stage(widths[1], widths[2], n, 2)
        self.block3 = self._stage(widths[2], widths[3], n, 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *[_WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
              for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@register("wrn28_10")
def wrn28_10(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-28-10 (36.5 M parameters)."""
    return WideResNet(28, 10, num_classes=num_classes, **kwargs)


@register("wrn34_10")
def wrn34_10(num_classes: int = 10, **kwargs) -> WideResNet:
    """WRN-34-10 (46.2 M parameters), the standard large CIFAR AT model."""
    return WideResNet(34, 10, num_classes=num_classes, **kwargs)
