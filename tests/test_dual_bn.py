"""Two-branch BatchNorm: conversion, branch isolation, routing, split, export."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dat.models import (
    DualBatchNorm,
    bn_branch,
    convert_dual_bn,
    create,
    export_main_branch,
    fused_split,
    has_dual_bn,
    set_bn_branch,
)


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _branch_state(model: nn.Module, branch: str) -> dict[str, Tensor]:
    """Parameters and running statistics of one branch of every DualBatchNorm."""
    return {
        f"{name}.{k}": v.detach().clone()
        for name, m in model.named_modules() if isinstance(m, DualBatchNorm)
        for k, v in getattr(m, branch).state_dict().items()
    }


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _plain_bns(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorms not wrapped by a DualBatchNorm."""
    inside = {id(b) for m in model.modules() if isinstance(m, DualBatchNorm)
              for b in (m.main, m.aux)}
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in inside]


def _warm_plain(model: nn.Module, x: Tensor) -> nn.Module:
    """Give the running statistics non-default values (one train-mode pass)."""
    with torch.no_grad():
        model.train()(x)
    return model


def test_convert_replaces_every_bn_with_copies_of_it(make_warm_model) -> None:
    plain = make_warm_model()
    originals = {n: copy.deepcopy(m) for n, m in plain.named_modules() if isinstance(m, _BatchNorm)}
    dual = convert_dual_bn(copy.deepcopy(plain))
    duals = {n: m for n, m in dual.named_modules() if isinstance(m, DualBatchNorm)}
    assert duals.keys() == originals.keys()
    assert _plain_bns(dual) == []
    for name, m in duals.items():
        for branch in (m.main, m.aux):
            _assert_same(_state(branch), _state(originals[name]))
            assert branch.training == originals[name].training
        assert m.branch == "main"


def test_forward_in_one_branch_leaves_the_other_bit_identical(make_warm_model, sample_batch):
    model = make_warm_model(dual_bn=True).train()
    x, y = sample_batch
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for branch, other in (("main", "aux"), ("aux", "main")):
        before = _branch_state(model, other)
        touched = _branch_state(model, branch)
        with bn_branch(model, branch):
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _assert_same(_branch_state(model, other), before)
        changed = _branch_state(model, branch)
        assert any(not torch.equal(changed[k], touched[k]) for k in changed)


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.resnet18(num_classes=10),
    lambda: timm.create_model("resnet10t", num_classes=10),
], ids=["torchvision_resnet18", "timm_resnet10t"])
def test_conversion_keeps_outputs_identical(build, sample_batch) -> None:
    x, _ = sample_batch
    plain = _warm_plain(build(), x)
    dual = convert_dual_bn(copy.deepcopy(plain))
    with torch.no_grad():
        assert torch.equal(dual.eval()(x), plain.eval()(x))
        out_dual, out_plain = dual.train()(x[:8]), plain.train()(x[:8])
    assert torch.equal(out_dual, out_plain)
    # Train mode updated the main branch exactly like the plain BN, the aux branch not at all.
    plain_bns = [m for m in plain.modules() if isinstance(m, _BatchNorm)]
    dual_bns = [m for m in dual.modules() if isinstance(m, DualBatchNorm)]
    for p, d in zip(plain_bns, dual_bns, strict=True):
        assert torch.equal(p.running_mean, d.main.running_mean)
        assert not torch.equal(p.running_mean, d.aux.running_mean)


def test_export_main_branch(make_warm_model, sample_batch) -> None:
    x, _ = sample_batch
    dual = make_warm_model(dual_bn=True).eval()
    plain = export_main_branch(dual)
    assert not any(isinstance(m, DualBatchNorm) for m in plain.modules())
    assert any(isinstance(m, DualBatchNorm) for m in dual.modules())  # dual model untouched
    with torch.no_grad():
        main_out = dual(x)
        with bn_branch(dual, "aux"):
            aux_out = dual(x)
        assert torch.equal(plain.eval()(x), main_out)
        assert not torch.allclose(aux_out, main_out)
        fresh = create("resnet_tiny").eval()
        fresh.load_state_dict(plain.state_dict(), strict=True)
        assert torch.equal(fresh(x), main_out)


def test_bn_branch_routes_and_restores(make_warm_model, sample_batch) -> None:
    x, _ = sample_batch
    model = make_warm_model(dual_bn=True).eval()
    bns = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    with torch.no_grad():
        main_out = model(x)
        set_bn_branch(model, "split")
        with bn_branch(model, "aux") as routed:
            assert routed is model
            assert all(m.branch == "aux" for m in bns)
            assert "branch='aux'" in repr(bns[0])  # printed models show the routing
            aux_out = model(x)
        assert all(m.branch == "split" for m in bns)
        with pytest.raises(RuntimeError, match="boom"), bn_branch(model, "aux"):
            raise RuntimeError("boom")
        assert all(m.branch == "split" for m in bns)
        set_bn_branch(model, "main")
        assert torch.equal(model(x), main_out)
    assert not torch.allclose(aux_out, main_out)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_split_equals_running_the_halves_separately(mode, make_warm_model, sample_batch):
    x, _ = sample_batch
    x_hat = (x.flip(-1) * 0.7).contiguous()
    split_model = make_warm_model(dual_bn=True).train(mode == "train")
    ref_model = copy.deepcopy(split_model)
    with torch.no_grad(), bn_branch(split_model, "split"):
        both = split_model(torch.cat([x, x_hat]))
    with torch.no_grad():
        with bn_branch(ref_model, "main"):
            first = ref_model(x)
        with bn_branch(ref_model, "aux"):
            second = ref_model(x_hat)
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)
    for branch in ("main", "aux"):
        a, b = _branch_state(split_model, branch), _branch_state(ref_model, branch)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_split_needs_an_even_batch(make_tiny_model) -> None:
    model = make_tiny_model(dual_bn=True)
    with bn_branch(model, "split"), pytest.raises(ValueError, match="divisible by 2"):
        model(torch.rand(3, 3, 32, 32))
    with bn_branch(model, "split", pairs=2), pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(6, 3, 32, 32))
    with pytest.raises(ValueError, match="pairs=0"):
        set_bn_branch(model, "split", pairs=0)


def test_split_pairs_equal_one_split_pass_per_pair(make_warm_model, sample_batch) -> None:
    """Train mode, pairs=2: one pass over [a, a_hat, b, b_hat] gives the outputs, the
    running statistics and the weight gradients of a split pass over [a, a_hat] followed by
    one over [b, b_hat] (DAT's loss: clean pair, then adversarial pair)."""
    x, _ = sample_batch  # 16 images: four chunks of 4
    a, a_hat, b, b_hat = x.split(4)
    one = make_warm_model(dual_bn=True).train()
    two = copy.deepcopy(one)
    with bn_branch(one, "split", pairs=2):
        out = one(torch.cat([a, a_hat, b, b_hat]))
        assert all(m.pairs == 2 for m in one.modules() if isinstance(m, DualBatchNorm))
    assert all(m.pairs == 1 and m.branch == "main"
               for m in one.modules() if isinstance(m, DualBatchNorm))  # restored
    with bn_branch(two, "split"):
        ref = torch.cat([two(torch.cat([a, a_hat])), two(torch.cat([b, b_hat]))])
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(one.named_parameters(), two.parameters(), strict=True):
        # one weight-gradient sum over 4 chunks against two sums added: float rounding
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name
    for (name, u), v in zip(one.named_buffers(), two.buffers(), strict=True):
        assert torch.allclose(u.float(), v.float(), atol=1e-6), name


def test_unknown_branch_and_models_without_bn_give_clear_errors() -> None:
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match="has no BatchNorm layer") as info:
        convert_dual_bn(no_bn)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown BN branch"):
        set_bn_branch(create("resnet_tiny", dual_bn=True), "both")


def test_a_lazy_bn_is_converted_once_it_has_seen_a_batch() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Sequential(nn.LazyBatchNorm2d()))
    with pytest.raises(ValueError, match=r"2\.0 is a LazyBatchNorm2d that has not seen a batch"):
        convert_dual_bn(model)
    assert not has_dual_bn(model)  # the first BN was not converted either
    x = torch.rand(4, 3, 8, 8)
    before = model.eval()(x)
    convert_dual_bn(model)
    assert has_dual_bn(model) and torch.equal(model(x), before)


def test_converting_twice_is_a_no_op(make_tiny_model) -> None:
    model = make_tiny_model(dual_bn=True)
    keys = list(model.state_dict())
    assert list(convert_dual_bn(model).state_dict()) == keys
    assert any(k.endswith(".aux.running_mean") for k in keys)


def _warm_split_pair(make_warm_model, sample_batch, channels_last: bool):
    x, y = sample_batch
    model = make_warm_model(dual_bn=True).eval()
    x2 = torch.cat([x, (x.flip(-1) * 0.7)])  # second half: the aux branch's darker images
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
    return model, x2, torch.cat([y, y])


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_split_equals_split_bn_with_the_same_input_gradient(
        make_warm_model, sample_batch, channels_last):
    model, x2, y2 = _warm_split_pair(make_warm_model, sample_batch, channels_last)
    outs, grads = [], []
    for fused in (False, True):
        xin = x2.clone().requires_grad_(True)
        with bn_branch(model, "split"), fused_split(model, enabled=fused):
            logits = model(xin)
            (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y2), xin)
        outs.append(logits)
        grads.append(grad)
    assert torch.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-8)
    assert grads[1].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert all(m.fused is None for m in model.modules() if isinstance(m, DualBatchNorm))


def test_fused_split_in_bf16_is_as_close_to_fp32_as_split_bn(make_warm_model, sample_batch):
    """The fused map scales bf16 activations with float32 factors and rounds once, like
    BatchNorm: its bf16 logits are no further from the fp32 ones than split BN's."""
    model, x2, _ = _warm_split_pair(make_warm_model, sample_batch, True)
    with torch.no_grad(), bn_branch(model, "split"):
        exact = model(x2)
        errors = []
        for fused in (False, True):
            with fused_split(model, enabled=fused), torch.autocast("cpu", torch.bfloat16):
                out = model(x2)
            assert out.dtype == torch.bfloat16
            errors.append((out.float() - exact).abs().max().item())
    assert 0 < errors[1] <= 1.25 * errors[0] + 1e-6, errors


def test_fused_split_leaves_training_forwards_alone_and_restores(make_warm_model, sample_batch):
    """A train-mode forward inside the block still uses (and updates) the batch statistics,
    and the fused maps are dropped on exit, also when the block raises."""
    model, x2, _ = _warm_split_pair(make_warm_model, sample_batch, False)
    ref = copy.deepcopy(model).train()
    model.train()
    with pytest.raises(RuntimeError, match="boom"), bn_branch(model, "split"), \
            fused_split(model):
        assert all(m.fused is not None for m in model.modules() if isinstance(m, DualBatchNorm))
        out = model(x2)
        raise RuntimeError("boom")
    with bn_branch(ref, "split"):
        expected = ref(x2)
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values(), strict=True))
    assert all(m.fused is None for m in model.modules() if isinstance(m, DualBatchNorm))


def test_fused_split_handles_batchnorm1d_mixed_eps_and_layers_without_affine():
    torch.manual_seed(0)
    model = convert_dual_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                                          nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False)))
    with torch.no_grad():
        with bn_branch(model, "aux"):
            model.train()(torch.randn(32, 6) * 2 + 1)  # aux statistics differ from main
    model.eval()
    model[1].aux.eps = 1e-2  # layers with different eps take the per-layer path
    x = torch.randn(8, 6)
    with torch.no_grad(), bn_branch(model, "split"):
        plain = model(x)
        with fused_split(model):
            fused_flags = [m.fused is not None for m in model.modules()
                           if isinstance(m, DualBatchNorm)]
            fused = model(x)
    assert fused_flags == [True, False]  # affine=False keeps the plain path
    assert torch.allclose(fused, plain, atol=1e-6)


def test_fused_split_is_batchnorm_with_its_eps():
    """Each half is (h - running_mean) / sqrt(running_var + eps) * weight + bias: with a
    large eps, shared by every layer, a fused map that forgot it would be far off."""
    torch.manual_seed(0)
    model = convert_dual_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=0.5)))
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 4, 4))
        with bn_branch(model, "aux"):
            model(torch.randn(16, 3, 4, 4) * 2 + 1)  # aux statistics differ from main
        for bn in (model[1].main, model[1].aux):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    model.eval()
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        h = model[0](x)
        want = torch.cat([
            (part - bn.running_mean[:, None, None]) / (bn.running_var + 0.5).sqrt()[:, None, None]
            * bn.weight[:, None, None] + bn.bias[:, None, None]
            for part, bn in zip(h.chunk(2), (model[1].main, model[1].aux), strict=True)])
        with bn_branch(model, "split"), fused_split(model):
            assert model[1].fused is not None
            fused = model(x)
    assert torch.allclose(fused, want, atol=1e-5)


def test_an_aux_branch_on_a_single_bn_model_is_refused() -> None:
    """It used to run the only BN set silently, so an 'aux' attack was a main one."""
    plain = create("resnet_tiny")
    for branch in ("aux", "split"):
        with pytest.raises(ValueError, match="convert_dual_bn"):
            with bn_branch(plain, branch):
                pass
    with bn_branch(plain, "main"):  # main is every model's only branch
        pass


class _BatchNormReLU(nn.BatchNorm2d):
    """A BN subclass with its own forward, as timm's BatchNormAct2d (BN, then activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_fused_split_leaves_bn_subclasses_with_their_own_forward_alone():
    """Fusing BN + activation into the affine map dropped the activation (timm models:
    efficientnet_b0's outputs moved by 2.1 under perf.fused_split_bn=on)."""
    torch.manual_seed(0)
    model = convert_dual_bn(nn.Sequential(nn.Conv2d(3, 4, 3), _BatchNormReLU(4),
                                          nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2)))
    with torch.no_grad(), bn_branch(model, "aux"):
        model.train()(torch.randn(16, 3, 8, 8))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), bn_branch(model, "split"):
        plain = model(x)
        with fused_split(model):
            flags = [m.fused is not None for m in model.modules() if isinstance(m, DualBatchNorm)]
            fused = model(x)
    assert flags == [False, True]
    assert torch.allclose(fused, plain, atol=1e-6)


def test_fused_split_on_a_timm_model_with_batchnorm_act_equals_split_bn():
    torch.manual_seed(0)
    model = convert_dual_bn(timm.create_model("mobilenetv3_small_050", num_classes=3)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad(), bn_branch(model, "split"):
        plain = model(x)
        with fused_split(model):
            fused = model(x)
    assert torch.allclose(fused, plain, atol=1e-5)


def test_nested_bn_branch_restores_the_outer_split_with_its_pairs(make_tiny_model) -> None:
    """An inner bn_branch hands back the outer routing whole: branch and pair count."""
    model = make_tiny_model(dual_bn=True)
    bns = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    with bn_branch(model, "split", pairs=2):
        with bn_branch(model, "aux"):
            assert all(m.branch == "aux" for m in bns)
        assert all(m.branch == "split" and m.pairs == 2 for m in bns)
    assert all(m.branch == "main" and m.pairs == 1 for m in bns)


def test_converting_a_model_in_eval_mode_keeps_every_module_in_eval_mode(make_tiny_model):
    model = convert_dual_bn(make_tiny_model().eval())
    assert has_dual_bn(model) and not any(m.training for m in model.modules())
    model = convert_dual_bn(make_tiny_model().train())
    assert all(m.training for m in model.modules())
