"""CIFAR-style ResNet-18 and PreAct-ResNet-18 (3x3 stem, no max-pool), as used in AT papers."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize
from .registry import register

__all__ = ["BasicBlock", "PreActBlock", "PreActResNet", "ResNet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _StagedResNet(nn.Module):
    """Shared frame: normalisation, 3x3 stride-1 stem, four stages of ``block``."""

    block: type[nn.Module] = BasicBlock

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: int = 64,
        in_chans: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, channels=in_chans)
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.in_planes = width
        self.layer1 = self._stage(width, blocks[0], 1)
        self.layer2 = self._stage(width * 2, blocks[1], 2)
        self.layer3 = self._stage(width * 4, blocks[2], 2)
        self.layer4 = self._stage(width * 8, blocks[3], 2)
        self.linear = nn.Linear(width * 8, num_classes)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(self.block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def _stages(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _head(self, x: Tensor) -> Tensor:
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResNet(_StagedResNet):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool, global average pool."""

    block = BasicBlock

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10,
                 width: int = 64, **kwargs) -> None:
        super().__init__(blocks, num_classes, width, **kwargs)
        self.bn1 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        return self._head(self._stages(out))


class PreActResNet(_StagedResNet):
    """Pre-activation ResNet (He et al. 2016) for small images."""

    block = PreActBlock

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10,
                 width: int = 64, **kwargs) -> None:
        super().__init__(blocks, num_classes, width, **kwargs)
        self.bn = nn.BatchNorm2d(width * 8)

    def forward(self, x: Tensor) -> Tensor:
        out = self._stages(self.conv1(self.normalize(x)))
        return self._head(F.relu(self.bn(out)))


@register("resnet18")
def resnet18(num_classes: int = 10, **kwargs) -> ResNet:
    """CIFAR ResNet-18 (11.2 M parameters at 10 classes)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, **kwargs)


@register("preact_resnet18")
def preact_resnet18(num_classes: int = 10, **kwargs) -> PreActResNet:
    """CIFAR PreAct-ResNet-18."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, **kwargs)


@register("resnet_tiny")
def resnet_tiny(num_classes: int = 10, **kwargs) -> ResNet:
    """A 4-stage ResNet with one block per stage and width 8: for tests and CPU quick runs."""
    kwargs.setdefault("width", 8)
    return ResNet((1, 1, 1, 1), num_classes=num_classes, **kwargs)


@register("resnet_small")
def resnet_small(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet with one block per stage and width 16: the CPU quickstart model."""
    kwargs.setdefault("width", 16)
    return ResNet((1, 1, 1, 1), num_classes=num_classes, **kwargs)
