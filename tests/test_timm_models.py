"""timm models through the split-BN paths: fused split BN under in-place activations and
on BatchNormAct2d (its activation after the fused map), SyncBN keeping BatchNormAct2d's
activation, checkpoints of models with a submodule named ``main``, and gradient
checkpointing refused under split BN."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import Tensor, nn

import dat
from dat.evaluation.loading import load_checkpoint
from dat.evaluation.weights import needs_two_branches
from dat.models import DualBatchNorm, bn_branch, convert_dual_bn, fused_split
from dat.sync_bn import convert_sync_bn


def _distinct_aux(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DualBatchNorm):
                m.aux.running_mean.add_(0.1)
                m.aux.weight.mul_(1.3)
    return model


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_split_bn_takes_an_inplace_relu_and_keeps_the_input_gradient(channels_last):
    """timm's resnet applies nn.ReLU(inplace=True) to the BN output: the fused map's output
    must not be a view (autograd refused it), and the gradient must equal the unfused one."""
    torch.manual_seed(0)
    model = _distinct_aux(dat.models.create("timm/resnet10t", dual_bn=True).double().eval())
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    for fused in (False, True):
        z = x.clone().requires_grad_(True)
        with fused_split(model, enabled=fused), bn_branch(model, "split"):
            (grad,) = torch.autograd.grad(model(z).logsumexp(1).sum(), z)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def _split_outputs_and_grads(model: nn.Module, x: Tensor) -> list[tuple[Tensor, Tensor, int]]:
    """(logits, input gradient, fused layers) under split BN, unfused then fused."""
    results = []
    for fused in (False, True):
        z = x.clone().requires_grad_(True)
        with fused_split(model, enabled=fused), bn_branch(model, "split"):
            n = sum(m.fused is not None for m in model.modules() if isinstance(m, DualBatchNorm))
            out = model(z)
            (grad,) = torch.autograd.grad(out.logsumexp(1).sum(), z)
        results.append((out, grad, n))
    return results


def _warm_dual(model: nn.Module, x: Tensor) -> nn.Module:
    """Running statistics away from (0, 1), and an aux branch unlike the main one."""
    with torch.no_grad():
        model.train()(x * 3 + 1)
        with bn_branch(model, "aux"):
            model(x * 2)
    return model.eval()


def test_fused_split_runs_batchnormact_as_the_map_then_its_activation():
    """BatchNormAct2d kept the three-kernel split path: fused_split gave timm's efficientnet,
    mobilenetv3, regnet ... no speed-up. Now its layers fuse, the activation (in place here)
    runs after the map, and logits and input gradients equal the unfused ones (float64)."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    model = _warm_dual(dat.models.create("timm/mobilenetv3_small_050", dual_bn=True).double(), x)
    acts = [m.main.act for m in model.modules() if isinstance(m, DualBatchNorm)]
    assert any(getattr(a, "inplace", False) for a in acts)  # ReLU(inplace=True) among them
    (out0, grad0, n0), (out1, grad1, n1) = _split_outputs_and_grads(model, x)
    assert n0 == 0 and n1 == len(acts) > 0
    torch.testing.assert_close(out1, out0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad1, grad0, rtol=1e-10, atol=1e-14)


class _NormActNet(nn.Module):
    """conv -> BatchNormAct2d(ReLU in place) -> conv -> BatchNormAct2d(no act) -> in-place
    ReLU -> conv -> ``last`` (a BatchNormAct2d the test configures)."""

    def __init__(self, last: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), BatchNormAct2d(4, apply_act=False)
        self.relu = nn.ReLU(inplace=True)
        self.conv3, self.last = nn.Conv2d(4, 3, 1), last

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        return self.last(self.conv3(h)).mean((2, 3))


@pytest.mark.parametrize("last, fuses", [
    (BatchNormAct2d(3, act_layer=nn.SiLU), True),
    (BatchNormAct2d(3, drop_layer=nn.Dropout), False),  # drop must be an Identity
    (BatchNormAct2d(3, act_layer=nn.PReLU), False),  # the branches' slopes could differ
])
def test_fused_split_takes_batchnormact_only_when_one_activation_serves_both_halves(last, fuses):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    model = _warm_dual(convert_dual_bn(_NormActNet(last)).double(), x)
    (out0, grad0, _), (out1, grad1, n1) = _split_outputs_and_grads(model, x)
    assert n1 == (3 if fuses else 2)
    torch.testing.assert_close(out1, out0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad1, grad0, rtol=1e-10, atol=1e-14)


def test_fused_split_leaves_train_mode_batchnormact_forwards_alone():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    model = _warm_dual(convert_dual_bn(_NormActNet(BatchNormAct2d(3))), x)
    reference = copy.deepcopy(model).train()
    model.train()
    with bn_branch(model, "split"), bn_branch(reference, "split"), fused_split(model):
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values(), strict=True))


def test_sync_bn_keeps_the_activation_of_timm_batchnormact():
    torch.manual_seed(0)
    model = dat.models.create("timm/mobilenetv3_small_050", dual_bn=True)
    x = torch.rand(4, 3, 32, 32)
    expected_eval = model.eval()(x)
    expected_train = copy.deepcopy(model).train()(x)
    before = [id(p) for p in model.parameters()]
    convert_sync_bn(model, "cpu")
    assert [id(p) for p in model.parameters()] == before
    torch.testing.assert_close(model.eval()(x), expected_eval)
    torch.testing.assert_close(model.train()(x), expected_train)


def test_sync_bn_on_cuda_converts_batchnormact_with_its_activation():
    """The CUDA path (nn.SyncBatchNorm) built on the CPU, without running it."""
    from timm.layers import SyncBatchNormAct

    model = dat.models.create("timm/mobilenetv3_small_050", dual_bn=True)
    acts = [type(m.main.act) for m in model.modules() if isinstance(m, DualBatchNorm)]
    model = convert_sync_bn(model, "cuda")
    converted = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    assert all(isinstance(m.main, SyncBatchNormAct) for m in converted)
    assert [type(m.main.act) for m in converted] == acts


def test_sync_bn_refuses_a_bn_subclass_whose_forward_it_cannot_keep():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="model.sync_bn=false"):
        convert_sync_bn(nn.Sequential(nn.Conv2d(3, 4, 3), Scaled(4)), "cpu")


def _save(tmp_path, model):
    cfg = dat.load_config("quickstart", ["model.name=timm/efficientvit_b0",
                                         "method.name=pgd_at"])
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": dat.config.config_to_dict(cfg),
                "num_classes": 10}, path)
    return path


@pytest.mark.parametrize("dual", [False, True])
def test_checkpoint_of_a_model_with_a_submodule_named_main_loads(tmp_path, dual):
    """timm's efficientvit_b0 has ``...res0.main...`` keys: not a DualBatchNorm."""
    model = dat.models.create("timm/efficientvit_b0", dual_bn=dual)
    loaded = load_checkpoint(_save(tmp_path, model))
    assert loaded.dual_bn is dual


def test_weights_with_a_submodule_named_main_are_not_taken_for_two_branches():
    single = dat.models.create("timm/efficientvit_b0")
    dual = dat.models.create("timm/efficientvit_b0", dual_bn=True)
    assert not needs_two_branches(dat.models.create("timm/efficientvit_b0"),
                                   single.state_dict())
    assert needs_two_branches(dat.models.create("timm/efficientvit_b0"), dual.state_dict())


def test_dat_step_refuses_gradient_checkpointing_with_split_bn():
    model = dat.models.create("timm/resnet10t", dual_bn=True)
    model.net.set_grad_checkpointing(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = dat.AmplitudeGenerator(10, (3, 32, 32))
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        dat.DATStep(model, generator, optimizer)
    model.net.set_grad_checkpointing(False)
    step = dat.DATStep(model, generator, optimizer, steps=1)
    model.net.set_grad_checkpointing(True)  # switched on after the step was built
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        step(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
