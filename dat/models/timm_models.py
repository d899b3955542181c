"""Any timm architecture behind the toolkit's interface: [0, 1] input, normalisation inside."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize

__all__ = ["TimmClassifier", "check_timm_name", "create_timm"]


class TimmClassifier(nn.Module):
    """A timm model preceded by :class:`Normalize`; the timm net is ``self.net``."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


def check_timm_name(name: str) -> None:
    """ValueError naming the fix when timm has no architecture ``name`` (no ``timm/``)."""
    import timm  # only when asked for: importing timm takes about a second

    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r}; pick a name from timm.list_models()")


def create_timm(
    name: str,
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    **kwargs,
) -> TimmClassifier:
    """Build ``timm.create_model(name)`` with random weights (no network access needed)."""
    import timm

    check_timm_name(name)
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"create('timm/{name}') builds random weights and never downloads; for pretrained "
            f"ones build net = timm.create_model('{name}', pretrained=True, num_classes=...) "
            "yourself and wrap it: dat.models.TimmClassifier(net, mean, std), with the mean "
            "and std the weights were trained with (ImageNet's for most)")
    Normalize(mean, std, channels=in_chans)  # fail before building the network
    net = timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
    )
    return TimmClassifier(net, mean, std)
