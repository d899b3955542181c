"""fold_batchnorm: conv -> BN pairs fold into one convolution with the same outputs and
input gradients; pairs that are not safe to fold stay; untraceable models say so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dat
from dat.models.folding import FoldError, fold_batchnorm, max_logit_gap


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _warm(model: nn.Module, x: Tensor) -> nn.Module:
    """Running statistics far from (0, 1) and non-trivial affine parameters."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    with torch.no_grad():
        model.train()(x * 3 + 1)
    return model.eval()


def test_resnet_folds_every_bn_with_the_same_logits_and_input_gradient(sample_batch):
    x, y = sample_batch
    model = _warm(dat.models.create("resnet_tiny", num_classes=10, dual_bn=True), x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded, n = fold_batchnorm(model)
    assert n == sum(isinstance(m, dat.models.DualBatchNorm) for m in model.modules()) > 0
    assert _bn_count(folded) == 0 and not folded.training
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with dat.models.bn_branch(model, "main"):
        ref = model(xa)
    out = folded(xb)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    (ga,) = torch.autograd.grad(F.cross_entropy(ref, y), xa)
    (gb,) = torch.autograd.grad(F.cross_entropy(out, y), xb)
    assert torch.allclose(gb, ga, rtol=1e-3, atol=1e-7)
    # the model itself is untouched: same weights, branch, dual BN
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert dat.models.has_dual_bn(model)


def test_pre_activation_bn_does_not_fold(sample_batch):
    """In a WRN block BN precedes its convolution (zero padding would change under a
    fold); only the BN that reads a convolution's output folds."""
    x, _ = sample_batch
    model = _warm(dat.models.create("preact_resnet18", num_classes=10), x[:8])
    folded, n = fold_batchnorm(model)
    assert 0 < n < _bn_count(model) and _bn_count(folded) == _bn_count(model) - n
    assert max_logit_gap(model, folded, x) < 1e-5


class _Shared(nn.Module):
    """A convolution whose output is also read past the BN, and one called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.twice, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.single, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        h = self.bn(h) + h  # the raw conv output is read too: no fold
        h = self.bn2(self.twice(h)) + self.twice(h)  # the conv runs twice: no fold
        return self.bn3(self.single(h)).flatten(1)  # the one safe pair


def test_only_safe_pairs_fold(sample_batch):
    x, _ = sample_batch
    model = _warm(_Shared(), x)
    folded, n = fold_batchnorm(model)
    assert n == 1 and _bn_count(folded) == 2
    assert max_logit_gap(model, folded, x) < 1e-5


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        return h if h.mean() > 0 else -h  # control flow on values: fx cannot trace it


class _SwitchesToTrain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        self.bn.train()
        return self.bn(self.conv(x)).flatten(1)


@pytest.mark.parametrize("model, match", [(_DataDependent(), "does not trace"),
                                          (_SwitchesToTrain(), "train mode")])
def test_models_that_cannot_fold_raise_a_fold_error(model, match):
    with pytest.raises(FoldError, match=match):
        fold_batchnorm(model.eval())
    assert not model.bn.training  # a copy was traced, not the model
