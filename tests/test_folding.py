"""fold_batchnorm: conv -> BN pairs fold into one convolution with the same outputs and
input gradients, timm's BatchNormAct2d too (its activation kept); pairs that are not safe to
fold stay, each with its reason; untraceable models say so."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import dat
from dat.evaluation.prepare import fold_for_attacks
from dat.models.folding import (
    NO_CONV,
    NO_STATS,
    OTHER_CONV,
    REPEATED,
    SHARED,
    SUBCLASS,
    FoldError,
    fold_batchnorm,
    max_logit_gap,
)


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
    unfolded: dict[str, str] = {}
    folded, n = fold_batchnorm(model, unfolded=unfolded)
    assert 0 < n < _bn_count(model) and _bn_count(folded) == _bn_count(model) - n
    # a block's first BN reads the block input: BN before a convolution, or (first block)
    # the stem convolution's output, which the identity shortcut reads too
    assert len(unfolded) == _bn_count(model) - n and set(unfolded.values()) == {NO_CONV, SHARED}
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
    unfolded: dict[str, str] = {}
    folded, n = fold_batchnorm(model, unfolded=unfolded)
    assert n == 1 and _bn_count(folded) == 2
    assert unfolded == {"bn": SHARED, "bn2": REPEATED}
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


def _warm_timm(model: nn.Module, x: Tensor) -> nn.Module:
    """As :func:`_warm`, for every BN layer (timm's BatchNormAct2d, DualBatchNorm branches)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    with torch.no_grad():
        model.train()(x * 3 + 1)
    return model.eval()


def _conv_bn_act_pairs(model: nn.Module, x: Tensor) -> int:
    """BatchNormAct2d layers whose input is the very tensor an nn.Conv2d returned, counted
    by hooks on a forward (independently of the fx trace that fold_batchnorm uses)."""
    conv_outputs: set[int] = set()
    pairs = [0]
    hooks = [m.register_forward_hook(lambda mod, args, out: conv_outputs.add(id(out)))
             for m in model.modules() if type(m) is nn.Conv2d]
    hooks += [m.register_forward_pre_hook(
        lambda mod, args: pairs.__setitem__(0, pairs[0] + (id(args[0]) in conv_outputs)))
        for m in model.modules() if isinstance(m, BatchNormAct2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return pairs[0]


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_050", "regnetx_002"])
def test_timm_batchnormact_folds_and_keeps_its_activation(name, sample_batch):
    """BatchNormAct2d (BN, then drop, then act) folded nothing before: it is a BN subclass.
    Now its BN folds into the convolution and drop + act stay after it (float64: exact up
    to rounding; a lost activation would move the logits by far more)."""
    x = sample_batch[0][:4].double()
    model = _warm_timm(timm.create_model(name, num_classes=10).double(), x)
    pairs = _conv_bn_act_pairs(model, x)
    folded, n = fold_batchnorm(model)
    assert n == pairs == sum(isinstance(m, BatchNormAct2d) for m in model.modules()) > 0
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref, out = model(xa), folded(xb)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    (ga,) = torch.autograd.grad(ref.logsumexp(1).sum(), xa)
    (gb,) = torch.autograd.grad(out.logsumexp(1).sum(), xb)
    torch.testing.assert_close(gb, ga, rtol=1e-8, atol=1e-14)


def test_dual_bn_timm_model_folds_its_main_branch(sample_batch):
    x = sample_batch[0][:4].double()
    model = dat.models.create("timm/mobilenetv3_small_050", dual_bn=True).double()
    model = _warm_timm(model, x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dat.models.DualBatchNorm):
                m.aux.running_mean.add_(0.5)  # folding the aux branch would show
    folded, n = fold_batchnorm(model)
    assert n == sum(isinstance(m, dat.models.DualBatchNorm) for m in model.modules()) > 0
    with torch.no_grad(), dat.models.bn_branch(model, "main"):
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12)
    assert dat.models.has_dual_bn(model)  # the model itself is untouched


def test_a_norm_act_layer_whose_conv_output_is_read_twice_does_not_fold():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU)

        def forward(self, x: Tensor) -> Tensor:
            h = self.conv(x)
            return (self.bn(h) + h).flatten(1)  # the in-place ReLU must not reach h

    model = _warm_timm(Shared(), torch.rand(4, 3, 8, 8))
    unfolded: dict[str, str] = {}
    folded, n = fold_batchnorm(model, unfolded=unfolded)
    assert n == 0 and unfolded == {"bn": SHARED}


class _ScaledBN(nn.BatchNorm2d):
    """A BN subclass with its own forward that is not BN + drop + act."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


def test_the_nothing_folded_note_says_why():
    """It said "no convolution -> BatchNorm pair to fold" also for models full of them."""
    x = torch.rand(4, 3, 8, 8)
    model = _warm_timm(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), _ScaledBN(4),
                                     nn.Flatten()), x)
    unfolded: dict[str, str] = {}
    assert fold_batchnorm(model, unfolded=unfolded)[1] == 0
    assert unfolded == {"0": NO_CONV, "2": f"{SUBCLASS} (_ScaledBN)"}
    target, fold = fold_for_attacks(model, True, x, hooked=False)
    assert target is model and fold["folded"] == 0
    assert fold["note"] == (f"none of the model's 2 BatchNorm layers folds: 1 {NO_CONV}; "
                            f"1 {SUBCLASS} (_ScaledBN)")
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval()
    assert fold_for_attacks(no_bn, True, x, hooked=False)[1]["note"] == \
        "the model has no BatchNorm layer"


def test_a_model_in_train_mode_folds_into_its_eval_mode_function(sample_batch):
    """The copy folds eval-mode BN (running statistics), whatever mode the model is in,
    and leaves the model's own mode alone."""
    x, _ = sample_batch
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), x)
    model.train()
    folded, n = fold_batchnorm(model)
    assert n == 1 and not folded.training and model.training
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_bn_without_statistics_or_after_a_transposed_conv_does_not_fold(sample_batch):
    """BN without running statistics normalises by the batch's own, and a transposed
    convolution's weight is laid out the other way round: neither may fold."""
    x, _ = sample_batch
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                                nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), x)
    unfolded: dict[str, str] = {}
    folded, n = fold_batchnorm(model, unfolded=unfolded)
    assert n == 0 and unfolded == {"1": NO_STATS, "3": OTHER_CONV}
    assert max_logit_gap(model, folded, x) < 1e-6


class _Fixed(nn.Module):
    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: Tensor) -> Tensor:
        return self.logits


def test_max_logit_gap_is_the_largest_absolute_difference_relative_to_the_logits():
    """A fold whose logits are too low (negative difference) is as wrong as one too high,
    and the gap is relative to the largest logit, as FOLD_TOLERANCE is."""
    ref = torch.tensor([[10.0, -4.0], [2.0, 0.5]])
    x = torch.zeros(2, 1)
    assert max_logit_gap(_Fixed(ref), _Fixed(ref - torch.tensor([[0.0, 0.0], [0.5, 0.0]])),
                         x) == pytest.approx(0.05)
    assert max_logit_gap(_Fixed(ref), _Fixed(ref + 1.0), x) == pytest.approx(0.1)


def test_a_fold_with_nan_logits_is_not_used(sample_batch, monkeypatch):
    """NaN fails every comparison: a gap check written as gap > tolerance would let it in."""
    import dat.evaluation.prepare as prepare

    def broken(model, **kwargs):
        folded, n = fold_batchnorm(model, **kwargs)
        with torch.no_grad():
            next(folded.parameters()).fill_(float("nan"))
        return folded, n

    monkeypatch.setattr(prepare, "fold_batchnorm", broken)
    x, _ = sample_batch
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), x)
    target, fold = fold_for_attacks(model, True, x, hooked=False)
    assert target is model and fold["folded"] == 0 and "nan" in fold["note"]
