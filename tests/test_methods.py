"""Baseline methods (PGD-AT, TRADES, MART) and the method factory."""

from __future__ import annotations

import math

import pytest
import torch

from dat import methods
from dat.config import ConfigError, load_config
from dat.methods import MARTStep, PGDATStep, TRADESStep, create, needs_dual_bn
from dat.methods.mart import mart_loss
from dat.models import create as create_model

EPS = 8 / 255
BASELINES = {"pgd_at": PGDATStep, "trades": TRADESStep, "mart": MARTStep}


@pytest.fixture(scope="module")
def train_batch(sample_splits):
    """64 training images spread over all classes (the sample is stored sorted by label)."""
    return sample_splits.train.subset(torch.arange(64) * 62).tensors()


def _cfg(name: str, *extra: str):
    return load_config(None, [f"method.name={name}", "method.beta=6", "method.attack.steps=3",
                              "method.label_smoothing=0", "method.attack.init=uniform", *extra])


def _step(name: str, lr: float = 0.05, **kwargs):
    model = create_model("resnet_tiny", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    step = create(_cfg(name), model, optimizer, num_classes=10, image_shape=(3, 32, 32),
                  **kwargs)
    return step, model


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_a_few_steps_lower_the_loss_and_stay_in_the_eps_ball(name, train_batch) -> None:
    x, y = train_batch
    step, model = _step(name)
    step.keep_images = len(x)
    losses = []
    for _ in range(8):
        stats = step.run(x, y)
        assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
        assert {"loss", "acc_clean", "acc_adv"} <= stats.keys()
        assert 0 <= stats["acc_adv"] <= 1 and torch.isfinite(stats["loss"])
        x_adv = step.last_images()["x_adv"]
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() > EPS / 2  # the attack really moved the images
        losses.append(float(stats["loss"]))
    assert model.training  # the loss was computed in train mode and the flag stays
    assert losses[-1] < losses[0] - 0.3, losses  # measured drop: about 0.65 in 8 steps


def test_factory_passes_config_values(train_batch) -> None:
    for name, cls in BASELINES.items():
        step, _ = _step(name)
        assert type(step) is cls
        assert (step.eps, step.steps, step.label_smoothing) == (pytest.approx(EPS), 3, 0.0)
    assert _step("trades")[0].beta == 6.0 and _step("mart")[0].beta == 6.0
    assert _step("pgd_at")[0].init == "uniform"
    cfg = _cfg("pgd_at")
    cfg.method.name = "fgsm"  # bypasses validation on purpose
    with pytest.raises(ConfigError, match="method.name='fgsm'"):
        create(cfg, create_model("resnet_tiny"), None, num_classes=10, image_shape=(3, 32, 32))


def test_dat_dispatch_builds_a_dat_step_on_a_dual_bn_model() -> None:
    cfg = load_config(None, ["method.name=dat", "model.name=resnet_tiny"])
    assert needs_dual_bn(cfg)
    assert not needs_dual_bn(load_config(None, ["method.name=dat", "method.split_bn=false"]))
    assert not needs_dual_bn(_cfg("trades"))
    model = create_model("resnet_tiny", num_classes=10, dual_bn=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = create(cfg, model, optimizer, num_classes=10, image_shape=(3, 32, 32))
    assert type(step).__name__ == "DATStep" and isinstance(step, methods.MethodStep)


def test_mart_loss_matches_a_hand_computation() -> None:
    clean, adv, y, beta = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.5, 0.0]]), \
        torch.tensor([0]), 6.0
    e = [math.exp(v) for v in (1.0, 0.5, 0.0)]
    p_adv = [v / sum(e) for v in e]
    c = [math.exp(v) for v in (2.0, 0.0, 0.0)]
    p_clean = [v / sum(c) for v in c]
    bce = -math.log(p_adv[0]) - math.log(1 - p_adv[1])  # largest wrong class: 1
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_clean, p_adv, strict=True))
    expected = bce + beta * kl * (1 - p_clean[0])
    total, got_bce, got_kl = mart_loss(clean, adv, y, beta)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(got_bce) == pytest.approx(bce, rel=1e-5)
    assert float(got_kl) == pytest.approx(kl * (1 - p_clean[0]), rel=1e-5)


def test_bf16_autocast_keeps_fp32_weights_and_finite_loss(train_batch) -> None:
    x, y = train_batch
    step, model = _step("pgd_at", autocast_dtype=torch.bfloat16)
    stats = step(x[:16], y[:16])
    assert math.isfinite(stats["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_eps_in_pixel_units_is_rejected() -> None:
    model = create_model("resnet_tiny")
    with pytest.raises(ValueError, match="0-255 units"):
        PGDATStep(model, torch.optim.SGD(model.parameters(), lr=0.1), eps=8)
    with pytest.raises(ValueError, match="0-255 units"):  # alpha=2 meant 2/255 too
        PGDATStep(model, torch.optim.SGD(model.parameters(), lr=0.1), alpha=2)


def _by_hand_awp_then_sgd(model, loss_of, gamma: float, lr: float,
                          weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """AWP written out from the paper, then one plain SGD step: the expected new weights.

    v_l = gamma * ||w_l|| * d_l / ||d_l|| with d = one SGD ascent step (lr 0.01) of a copy;
    the gradient is taken at w + v, and v is removed again after the step. As in the AWP
    authors' code the step is taken at w + v, so weight decay acts on w + v.
    """
    import copy

    proxy = copy.deepcopy(model)
    proxy.zero_grad()
    loss_of(proxy).backward()
    weights = dict(model.named_parameters())
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if p.dim() > 1:
                d = 0.01 * dict(proxy.named_parameters())[name].grad  # ascent direction
                p.add_(gamma * weights[name].norm() / d.norm() * d)
    moved.zero_grad()
    loss_of(moved).backward()
    return {name: (w - lr * (p.grad + weight_decay * p)).detach()
            for (name, w), p in zip(weights.items(), moved.parameters(), strict=True)}


def _method_loss(name: str, x, x_adv, y):
    import torch.nn.functional as F

    from dat.losses import trades_loss

    def loss_of(model):
        model.train()
        if name == "pgd_at":
            return F.cross_entropy(model(x_adv), y)
        if name == "trades":
            return trades_loss(model(x), model(x_adv), y, 6.0)[0]
        return mart_loss(model(x), model(x_adv), y, 6.0)[0]
    return loss_of


@pytest.mark.parametrize(("name", "init"), [("pgd_at", "uniform"), ("pgd_at", "gaussian"),
                                           ("trades", None), ("trades", "uniform"),
                                           ("mart", "uniform")])
def test_each_baseline_attacks_and_scores_as_its_paper_says(name, init, train_batch) -> None:
    """The step's x' is its paper's attack with every setting (steps, start, smoothing) and
    the same random draws, on the model before the step; its loss is the paper's loss at
    those weights in train mode: PGD-AT CE(f(x'), y), TRADES CE(f(x), y) + beta KL(p(x) ||
    p(x')), MART its BCE + beta weighted KL; smoothing in the attack's CE and the loss's."""
    import copy

    import torch.nn.functional as F

    from dat.attacks import pgd, trades_kl
    from dat.losses import trades_loss

    x, y = train_batch[0][:8], train_batch[1][:8]
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=10)
    before = copy.deepcopy(model)
    smoothing = 0.3
    kw = {"init": init} if init else {}
    kw.update({} if name == "pgd_at" else {"beta": 6.0})
    step = BASELINES[name](model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3,
                           label_smoothing=smoothing, keep_images=8, **kw)
    torch.manual_seed(1)
    stats = step.run(x, y)
    torch.manual_seed(1)  # the same draws, now by hand
    if name == "trades" and init == "uniform":  # eps * U(-1, 1), as PGD-AT's start
        want = trades_kl(before, x, EPS, 2 / 255, 3, init_std=EPS,
                         noise=torch.empty_like(x).uniform_(-1, 1))
    elif name == "trades":
        want = trades_kl(before, x, EPS, 2 / 255, 3)
    else:
        start = 0.001 * torch.randn_like(x) if init == "gaussian" else None
        want = pgd(before, x, y, EPS, 2 / 255, 3, start=start, label_smoothing=smoothing)
    assert torch.equal(step.last_images()["x_adv"], want)
    with torch.no_grad():
        clean, adv = before.train()(x), before(want)
    if name == "pgd_at":
        loss = F.cross_entropy(adv, y, label_smoothing=smoothing)
    elif name == "trades":
        loss = trades_loss(clean, adv, y, 6.0, label_smoothing=smoothing)[0]
    else:
        loss = mart_loss(clean, adv, y, 6.0, label_smoothing=smoothing)[0]
    assert float(stats["loss"]) == pytest.approx(float(loss), abs=1e-5)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_awp_step_is_sgd_at_the_perturbed_weights(name, train_batch) -> None:
    """Each baseline with AWP takes its gradient at w + v (v from the method's own loss on
    the step's adversarial images) and ends at w - lr * grad: no perturbation is left."""
    import copy

    x, y = train_batch[0][:16], train_batch[1][:16]
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=10)
    before = copy.deepcopy(model)
    step = BASELINES[name](model, torch.optim.SGD(model.parameters(), lr=0.5), steps=2,
                           awp_gamma=0.02, keep_images=16, **({} if name == "pgd_at"
                                                              else {"beta": 6.0}))
    assert step.awp_on and "awp_gamma=0.02" in repr(step)
    step.run(x, y)
    x_adv = step.last_images()["x_adv"]
    expected = _by_hand_awp_then_sgd(before, _method_loss(name, x, x_adv, y), 0.02, 0.5)
    plain = _by_hand_awp_then_sgd(before, _method_loss(name, x, x_adv, y), 0.0, 0.5)
    for key, w in model.named_parameters():
        torch.testing.assert_close(w.detach(), expected[key], rtol=1e-4, atol=1e-5)
    moved = max((expected[k] - plain[k]).abs().max() for k in expected)
    assert moved > 1e-3  # AWP changed this update measurably (not a no-op test)


def test_awp_step_decays_the_perturbed_weights_as_the_awp_authors_code(train_batch) -> None:
    """The optimiser steps at w + v and v is removed after it, so weight decay acts on w + v;
    stepping after the removal would decay w alone (lr * wd * v apart: a large weight decay
    makes that measurable here)."""
    import copy

    x, y = train_batch[0][:16], train_batch[1][:16]
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=10)
    before = copy.deepcopy(model)
    step = PGDATStep(model, torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.5),
                     steps=2, awp_gamma=0.05, keep_images=16)
    step.run(x, y)
    loss_of = _method_loss("pgd_at", x, step.last_images()["x_adv"], y)
    expected = _by_hand_awp_then_sgd(before, loss_of, 0.05, 0.5, weight_decay=0.5)
    for key, w in model.named_parameters():
        torch.testing.assert_close(w.detach(), expected[key], rtol=1e-4, atol=1e-5)
    no_decay = _by_hand_awp_then_sgd(before, loss_of, 0.05, 0.5)
    decay_on_w = {k: no_decay[k] - 0.5 * 0.5 * w.detach() for k, w in before.named_parameters()}
    assert max((expected[k] - decay_on_w[k]).abs().max() for k in expected) > 1e-3


def test_awp_waits_for_its_warmup_epoch_and_comes_from_the_config(train_batch) -> None:
    import copy

    x, y = train_batch[0][:16], train_batch[1][:16]
    cfg = _cfg("trades", "method.awp_gamma=0.005", "method.awp_warmup=2")
    model = create_model("resnet_tiny", num_classes=10)
    step = create(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1),
                  num_classes=10, image_shape=(3, 32, 32))
    assert step.awp is not None and step.awp.gamma == 0.005 and not step.awp_on
    seen = []
    for epoch in range(4):
        step.on_epoch_start(epoch)
        seen.append(step.awp_on)
    assert seen == [False, False, True, True]
    step.on_epoch_start(0)  # off in warm-up: the same update as TRADES without AWP
    twin = copy.deepcopy(model)
    plain = TRADESStep(twin, torch.optim.SGD(twin.parameters(), lr=0.1), steps=3, beta=6.0,
                       init="uniform")  # as the config's method.attack.init
    torch.manual_seed(1)
    step.run(x, y)
    torch.manual_seed(1)
    plain.run(x, y)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="awp_warmup=-1 must be >= 0"):
        PGDATStep(model, None, awp_gamma=0.01, awp_warmup=-1)


@pytest.mark.parametrize("gamma", [-0.01, float("nan"), 1.0, 5.0])
def test_an_awp_gamma_outside_0_1_is_refused_not_ignored(gamma) -> None:
    """The Python API refuses what the config refuses: a negative or NaN gamma used to
    turn AWP off without a word, and gamma >= 1 moves each layer by its own norm."""
    from dat.methods import DATStep
    from dat.methods.awp import AWP

    model = create_model("resnet_tiny")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for build in (*BASELINES.values(), lambda m, o, **kw: DATStep(m, None, o, split_bn=False,
                                                                  recombined_branch=False, **kw)):
        with pytest.raises(ValueError, match=r"awp_gamma=.* must be in \[0, 1\)"):
            build(model, opt, awp_gamma=gamma)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        AWP(model, gamma)


def test_awp_moves_conv_and_linear_weights_only_not_a_vits_tokens() -> None:
    """As in the AWP authors' code: 'weight' tensors of 2+ dims (a ViT's cls_token and
    pos_embed are parameters of 2+ dims too, and stay put)."""
    from dat.methods.awp import AWP

    model = create_model("timm/vit_tiny_patch16_224", num_classes=10, img_size=32)
    names = [n for n, w in model.named_parameters()
             if any(w is pw for pw, _ in AWP(model, 0.01)._pairs())]
    assert names and all("weight" in n for n in names)
    assert not any("cls_token" in n or "pos_embed" in n for n in names)
    assert any(n.endswith("patch_embed.proj.weight") for n in names)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_bn_layers_frozen_by_the_user_stay_frozen(name, train_batch) -> None:
    """BN layers the user put in eval mode keep their running statistics and their flag
    (with AWP too, whose proxy copies every module's flag); a model handed in in eval mode
    comes back in eval mode. The baselines used to call model.train() and leave it so."""
    x, y = train_batch[0][:16], train_batch[1][:16]
    for awp in (0.0, 0.01):
        model = create_model("resnet_tiny", num_classes=10)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.eval()
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        BASELINES[name](model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2,
                        awp_gamma=awp)(x, y)
        assert model.training and not any(m.training for m in bns)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model = create_model("resnet_tiny", num_classes=10).eval()
    BASELINES[name](model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)(x, y)
    assert not model.training


def test_a_baseline_on_dat_defaults_is_warned_towards_its_preset() -> None:
    """method.name=trades on the defaults trains TRADES with DAT's smoothing, beta and
    5-step attack: say so, naming the preset with the paper's settings."""
    from dat.config import load_config
    from dat.methods import baseline_settings_warning

    message = baseline_settings_warning(load_config(None, ["method.name=trades"]))
    assert message == (
        "method.name=trades keeps DAT's defaults for method.beta=15.0, "
        "method.label_smoothing=0.5, method.attack.steps=5; the trades paper uses beta=6.0, "
        "label_smoothing=0.0, attack.steps=10: start from --config trades_cifar10_resnet18 "
        "for the paper's settings")
    kept = baseline_settings_warning(load_config(None, ["method.name=mart", "method.beta=6",
                                                        "method.label_smoothing=0"]))
    assert "method.attack.steps=5, method.attack.init=gaussian;" in kept and "beta" not in kept
    for preset in ("pgd_at_cifar10_resnet18", "trades_cifar10_resnet18", "mart_cifar10_resnet18",
                   "pgd_at_awp_cifar10_resnet18", "trades_awp_cifar10_resnet18",
                   "dat_cifar10_resnet18", "aag_trades"):
        assert baseline_settings_warning(load_config(preset, [])) is None, preset
    assert baseline_settings_warning(load_config(None, [
        "method.name=pgd_at", "method.attack.steps=3", "method.attack.init=uniform",
        "method.label_smoothing=0.1"])) is None  # the user's own choices: nothing to say


def test_trades_refuses_an_unknown_start() -> None:
    model = create_model("resnet_tiny", num_classes=10)
    with pytest.raises(ValueError, match="init='zeros'; use 'uniform' or 'gaussian'"):
        TRADESStep(model, torch.optim.SGD(model.parameters(), lr=0.1), init="zeros")


def test_mart_loss_weights_each_example_by_its_own_clean_miss_and_averages_the_batch() -> None:
    """The MART loss written out per example on a batch of 4 (the one-example hand check
    above cannot tell a per-example weight from a batch-wide one, nor a mean from a sum):
    values, and gradients, which flow through the weight (1 - p_y(x)) as in the paper's code."""
    torch.manual_seed(0)
    clean = (3 * torch.randn(4, 5)).requires_grad_()
    adv = (3 * torch.randn(4, 5)).requires_grad_()
    y, beta = torch.tensor([0, 3, 1, 4]), 2.5

    def by_hand(clean, adv):
        rows = []
        for i, k in enumerate(y.tolist()):
            p_adv, p_clean = adv[i].softmax(0), clean[i].softmax(0)
            top_wrong = torch.cat([p_adv[:k], p_adv[k + 1:]]).max()
            bce = -p_adv[k].log() - (1 - top_wrong).log()
            kl = (p_clean * (p_clean.log() - p_adv.log())).sum()
            rows.append(torch.stack([bce, kl * (1 - p_clean[k])]))
        bce, weighted_kl = torch.stack(rows).mean(0)
        return bce + beta * weighted_kl, bce, weighted_kl

    got, want = mart_loss(clean, adv, y, beta), by_hand(clean, adv)
    for g, w in zip(got, want, strict=True):
        assert float(g.detach()) == pytest.approx(float(w.detach()), rel=1e-5)
    for g, w in zip(torch.autograd.grad(got[0], (clean, adv)),
                    torch.autograd.grad(want[0], (clean, adv)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_non_default_settings_reach_the_attack_the_loss_and_every_stat(name, train_batch) -> None:
    """eps, alpha, beta and the gaussian start away from the defaults (the paper test above
    uses eps 8/255, alpha 2/255, beta 6: a hard-coded default passes it); every returned
    stat recomputed by hand; BN statistics moved by the loss's train-mode forwards only
    (PGD-AT's clean accuracy is an eval-mode forward)."""
    import copy

    import torch.nn.functional as F

    from dat.attacks import pgd, trades_kl

    x, y = train_batch[0][::4], train_batch[1][::4]  # 16 images, labels 0..9
    torch.manual_seed(0)  # measured: clean and adversarial accuracies differ, not all 0
    model = create_model("resnet_tiny", num_classes=10)
    before = copy.deepcopy(model)
    eps, alpha, beta = 12 / 255, 4 / 255, 2.5
    step = BASELINES[name](model, torch.optim.SGD(model.parameters(), lr=0.1), eps=eps,
                           alpha=alpha, steps=3, init="gaussian", keep_images=16,
                           **({} if name == "pgd_at" else {"beta": beta}))
    torch.manual_seed(1)
    stats = step.run(x, y)
    torch.manual_seed(1)  # the same 0.001 N(0, I) start, now by hand
    if name == "trades":
        want = trades_kl(before, x, eps, alpha, 3)
    else:
        want = pgd(before, x, y, eps, alpha, 3, start=0.001 * torch.randn_like(x))
    assert torch.equal(step.last_images()["x_adv"], want)

    def acc(logits):
        return float((logits.argmax(1) == y).float().sum()) / len(y)

    with torch.no_grad():
        if name == "pgd_at":
            clean = before.eval()(x)
            adv = before.train()(want)
            expected = {"loss": float(F.cross_entropy(adv, y))}
        else:
            clean, adv = before.train()(x), before(want)
            if name == "trades":
                ce = F.cross_entropy(clean, y)
                kl = (clean.softmax(1) * (clean.log_softmax(1) - adv.log_softmax(1))).sum(1).mean()
                expected = {"loss": float(ce + beta * kl), "ce": float(ce), "kl": float(kl)}
            else:  # mart_loss itself is checked against the paper's formula above
                total, bce, kl = mart_loss(clean, adv, y, beta)
                expected = {"loss": float(total), "bce": float(bce), "kl": float(kl)}
    expected.update(acc_clean=acc(clean), acc_adv=acc(adv))
    # two equal accuracies could not tell clean logits from adversarial ones in the stats
    assert expected["acc_clean"] != expected["acc_adv"], "pick another seed for this test"
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert float(stats[key]) == pytest.approx(value, abs=1e-5), key
    for key, value in before.state_dict().items():  # before: its own train forwards above
        if "running" in key or "num_batches" in key:
            assert torch.equal(model.state_dict()[key], value), key


def test_each_step_starts_from_zeroed_gradients(train_batch) -> None:
    """A step's update is its own batch's gradient: the same step run twice from the same
    state leaves the same .grad (without zero_grad the second would hold twice as much)."""
    import copy

    x, y = train_batch[0][:8], train_batch[1][:8]
    model = create_model("resnet_tiny", num_classes=10)
    step = PGDATStep(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    state, grads = copy.deepcopy(model.state_dict()), []
    for _ in range(2):
        model.load_state_dict(state)  # weights and BN statistics (not .grad)
        torch.manual_seed(0)
        step.run(x, y)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_awp_is_taken_afresh_at_each_steps_weights_and_in_train_mode(train_batch) -> None:
    """AWP's proxy copies the model's current weights and train flags at every step: the
    second step's update (proxy re-synced, its gradients zeroed) and that of a model handed
    in in eval mode (trained in train mode, its proxy too) are SGD at w + v, as by hand."""
    import copy

    x, y = train_batch[0][:16], train_batch[1][:16]
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=10).eval()
    step = TRADESStep(model, torch.optim.SGD(model.parameters(), lr=0.5), steps=2, beta=6.0,
                      awp_gamma=0.02, keep_images=16)
    for _ in range(2):
        before = copy.deepcopy(model)
        step.run(x, y)
        loss_of = _method_loss("trades", x, step.last_images()["x_adv"], y)
        expected = _by_hand_awp_then_sgd(before, loss_of, 0.02, 0.5)
        for key, w in model.named_parameters():
            torch.testing.assert_close(w.detach(), expected[key], rtol=1e-4, atol=1e-5)
    assert not model.training


def test_a_baseline_has_no_state_and_refuses_one() -> None:
    model = create_model("resnet_tiny", num_classes=10)
    step = PGDATStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert step.state_dict() == {}
    step.load_state_dict({})
    with pytest.raises(ValueError, match=r"PGDATStep has no state but got keys \['awp'\]"):
        step.load_state_dict({"awp": 1})
