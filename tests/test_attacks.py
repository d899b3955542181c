"""Training-time attacks: eps-ball, [0, 1], model state untouched, split BN equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dat.attacks as attacks_module
from dat.attacks import (
    eaeg,
    eval_logits,
    eval_mode,
    is_compiled,
    pgd,
    project,
    trades_kl,
    uses_cuda_graphs,
)
from dat.losses import cw_margin
from dat.models import bn_branch
from dat.spectral import decompose, mix_amplitude

EPS, ALPHA = 8 / 255, 2 / 255

ATTACKS = {
    "pgd": lambda m, x, y, **kw: pgd(m, x, y, EPS, ALPHA, steps=4, **kw),
    "pgd_cw": lambda m, x, y, **kw: pgd(m, x, y, EPS, ALPHA, steps=4, loss="cw", **kw),
    "pgd_smoothed": lambda m, x, y, **kw: pgd(m, x, y, EPS, ALPHA, steps=4,
                                              label_smoothing=0.5, **kw),
    "trades_kl": lambda m, x, y, **kw: trades_kl(m, x, EPS, ALPHA, steps=4, **kw),
    "eaeg": lambda m, x, y, **kw: eaeg(m, x, y, EPS, ALPHA, steps=4, beta=15.0,
                                       label_smoothing=0.5, **kw),
}


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("branch", [None, "aux"])
def test_attack_invariants(name: str, branch: str | None, make_warm_model, sample_batch):
    x, y = sample_batch
    model = make_warm_model(dual_bn=True).train()
    model.layer1.eval()  # a sub-module the user froze must stay frozen
    buffers = _buffers(model)
    x_adv = ATTACKS[name](model, x, y, branch=branch)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2  # it moved
    assert model.training and not model.layer1.training and model.layer2.training
    for k, v in _buffers(model).items():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert all(m.branch == "main" for m in model.modules() if hasattr(m, "branch"))


def test_pgd_raises_the_loss_it_ascends(make_warm_model, sample_batch) -> None:
    x, y = sample_batch
    model = make_warm_model().eval()
    noisy = (x + EPS * torch.randn_like(x).sign()).clamp(0, 1)  # same L-inf size, random
    with torch.no_grad():  # attacks must work inside no_grad (evaluation loops)
        ce = {k: F.cross_entropy(model(v), y, reduction="none") for k, v in
              {"clean": x, "noisy": noisy, "pgd": pgd(model, x, y, EPS, ALPHA, steps=5)}.items()}
        margins = {k: cw_margin(model(v), y) for k, v in
                   {"clean": x, "cw": pgd(model, x, y, EPS, ALPHA, steps=5, loss="cw")}.items()}
    assert (ce["pgd"] > ce["clean"]).all() and ce["pgd"].sum() > ce["noisy"].sum()
    assert (margins["cw"] > margins["clean"]).all()


def test_eval_mode_attack_keeps_eval_flag(make_warm_model, sample_batch) -> None:
    x, y = sample_batch
    model = make_warm_model().eval()
    eaeg(model, x, y, EPS, ALPHA, steps=2)
    assert not any(m.training for m in model.modules())


def test_zero_eps_returns_the_clean_image(make_tiny_model, sample_batch) -> None:
    x, y = sample_batch
    model = make_tiny_model()
    assert torch.equal(eaeg(model, x, y, eps=0.0, alpha=ALPHA, steps=2), x)
    assert torch.equal(pgd(model, x, y, eps=0.0, alpha=ALPHA, steps=2), x)


def test_project_clips_to_ball_and_range() -> None:
    x = torch.tensor([0.0, 0.5, 1.0])
    out = project(torch.tensor([-1.0, 0.9, 0.9]), x, 0.1)
    assert torch.allclose(out, torch.tensor([0.0, 0.6, 0.9]))


def test_pgd_equals_the_textbook_loop_bit_for_bit(make_warm_model, sample_batch) -> None:
    """The fused step (sign, add, clamp into a box computed once) gives exactly the
    iterates of ``project(x_adv + alpha * sign(grad), x, eps)``."""
    model = make_warm_model().eval()
    x, y = sample_batch
    start = torch.empty_like(x).uniform_(-EPS, EPS, generator=torch.Generator().manual_seed(0))
    ours = pgd(model, x, y, EPS, ALPHA, steps=5, start=start)
    x_adv = project(x + start, x, EPS)
    for _ in range(5):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project(x_adv.detach() + ALPHA * grad.sign(), x, EPS)
    assert torch.equal(ours, x_adv)
    assert (ours - x).abs().max() > EPS / 2  # it moved


def test_attacks_freeze_a_compiled_model_and_restore_every_flag(make_warm_model, sample_batch):
    """Inside the attack no parameter of a compiled model requires grad (its compiled
    backward would compute weight gradients otherwise); afterwards each flag is as the
    caller left it, also when the attack fails."""
    model = make_warm_model()
    x, y = sample_batch
    user_frozen = next(model.parameters())
    user_frozen.requires_grad_(False)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    assert is_compiled(compiled) and not is_compiled(model)
    seen = []
    compiled.register_forward_pre_hook(lambda m, i: seen.append(
        any(p.requires_grad for p in m.parameters())))
    pgd(compiled, x, y, EPS, ALPHA, steps=2)
    assert seen == [False, False]
    assert not user_frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not user_frozen)
    with pytest.raises(ValueError, match="batch_size"):
        pgd(compiled, x, y[:1], EPS, ALPHA, steps=2)  # fails inside the attack
    assert all(p.requires_grad for p in model.parameters() if p is not user_frozen)


@pytest.mark.parametrize("kwargs, expected", [
    ({}, False), ({"mode": "reduce-overhead"}, True), ({"mode": "max-autotune"}, True),
    ({"mode": "max-autotune-no-cudagraphs"}, False), ({"backend": "aot_eager"}, False),
    ({"backend": "cudagraphs"}, True), ({"options": {"triton.cudagraphs": True}}, True)])
def test_uses_cuda_graphs_reads_the_compile_mode(kwargs, expected):
    """Read from the (lazy, never run) compile wrapper, also of a sub-module; an eager
    model replays none."""
    net = nn.Sequential(nn.Linear(2, 2))
    assert uses_cuda_graphs(torch.compile(net, **kwargs)) is expected
    assert uses_cuda_graphs(nn.Sequential(torch.compile(net, **kwargs))) is expected
    assert not uses_cuda_graphs(net)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_eval_logits_of_a_cuda_graph_model_leave_no_pending_backward(
        make_warm_model, sample_batch, monkeypatch, cuda_graphs):
    """A compiled model's KL targets reuse the attack's graph (gradients on) unless the
    model replays CUDA graphs: there a forward whose backward never runs let the attack's
    replays overwrite its memory on an H100, so its targets run under no_grad, copied."""
    model = make_warm_model()
    x, _ = sample_batch
    compiled = torch.compile(model, backend="eager", dynamic=False)
    monkeypatch.setattr(attacks_module, "uses_cuda_graphs", lambda m: cuda_graphs)
    seen = []
    compiled.register_forward_hook(lambda m, i, out: seen.append(
        (torch.is_grad_enabled(), out.requires_grad)))
    logits = eval_logits(compiled, x)
    assert seen == [(not cuda_graphs, not cuda_graphs)]
    assert not logits.requires_grad and model.training  # detached; the mode is restored
    with torch.no_grad(), eval_mode(model):
        torch.testing.assert_close(logits, model(x))


def test_eager_attacks_under_autocast_cast_each_weight_once(make_warm_model, sample_batch):
    """An eager model keeps its parameters trainable in the attack, so autocast casts each
    weight to bf16 once per attack instead of once per step; no gradient reaches them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountCasts.n += func.overloadpacket.__name__ == "_to_copy"
            return func(*args, **(kwargs or {}))

    model = make_warm_model()
    x, y = sample_batch
    n_weights = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    with torch.autocast("cpu", dtype=torch.bfloat16), CountCasts():
        pgd(model, x, y, EPS, ALPHA, steps=6)
    # weights and biases once; the input and the logits (for the fp32 loss) at each step;
    # one for the [0, 1] range check before the attack (its finite flag)
    assert CountCasts.n <= 2 * n_weights + 2 * 6 + 1
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_eaeg_target_is_computed_once_from_the_clean_image(make_warm_model, sample_batch):
    x, y = sample_batch
    model = make_warm_model().eval()
    noise = torch.randn_like(x)
    with torch.no_grad():
        target = model(x)
    a = eaeg(model, x, y, EPS, ALPHA, steps=3, noise=noise)
    b = eaeg(model, x, y, EPS, ALPHA, steps=3, noise=noise, target_logits=target)
    assert torch.equal(a, b)


def test_eaeg_split_equals_separate_main_and_aux_attacks(make_warm_model, sample_batch):
    x, y = sample_batch
    model = make_warm_model(dual_bn=True).train()
    amp_other, _ = decompose(x.roll(1, dims=0))
    x_hat = mix_amplitude(x, amp_other, torch.rand(len(x)))
    noise = torch.randn(2 * len(x), *x.shape[1:])  # same Gaussian start for both ways
    both = eaeg(model, torch.cat([x, x_hat]), torch.cat([y, y]), EPS, ALPHA, steps=5,
                beta=15.0, label_smoothing=0.5, branch="split", noise=noise)
    main = eaeg(model, x, y, EPS, ALPHA, steps=5, beta=15.0, label_smoothing=0.5,
                branch="main", noise=noise[: len(x)])
    aux = eaeg(model, x_hat, y, EPS, ALPHA, steps=5, beta=15.0, label_smoothing=0.5,
               branch="aux", noise=noise[len(x) :])
    separate = torch.cat([main, aux])
    # Batched and single convolutions may round differently; a flipped gradient sign
    # moves one pixel by 2 * alpha, so allow a handful of such pixels and nothing else.
    differs = (both - separate).abs() > 1e-6
    assert differs.float().mean() < 1e-3
    aux_with_main_bn = eaeg(model, x_hat, y, EPS, ALPHA, steps=5, beta=15.0,
                            label_smoothing=0.5, branch="main", noise=noise[len(x) :])
    assert ((aux_with_main_bn - aux).abs() > 1e-6).float().mean() > 0.05  # branches matter


def test_unknown_pgd_loss_is_rejected(make_tiny_model, sample_batch) -> None:
    x, y = sample_batch
    with pytest.raises(ValueError, match="unknown PGD loss"):
        pgd(make_tiny_model(), x, y, loss="dlr")


def test_eval_mode_context_restores_flags_after_errors(make_tiny_model) -> None:
    model = make_tiny_model().train()
    model.bn1.eval()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError
    assert model.training and not model.bn1.training and model.layer1.training


def _linear_model(weight: Tensor) -> nn.Module:
    """f(x) = W x on the flattened image, float64, no bias: its input gradients are known."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model = model.double()
    with torch.no_grad():
        model[1].weight.copy_(weight)
    return model


def _linear_case(seed: int, scale: float, classes: int = 4):
    gen = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(classes, 12, generator=gen, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(6, 1, 3, 4, generator=gen, dtype=torch.float64)  # (6, 1, 3, 4)
    y = torch.randint(0, classes, (6,), generator=gen)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return w, x, y, noise


def _step_by_hand(x_adv: Tensor, x: Tensor, grad: Tensor, eps: float, alpha: float) -> Tensor:
    x_adv = x_adv + alpha * grad.sign()
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


@pytest.mark.parametrize("labels", [True, False])
def test_eaeg_and_trades_kl_follow_the_closed_form_gradient(labels: bool) -> None:
    """METHOD.md section 3 on f(x) = W x: the input gradient of
    CE(f(x'), y) + beta * KL(p(x) || p(x')) is W^T [(q - t) + beta (q - p)] with
    q = softmax(f(x')), t the smoothed one-hot label and p = softmax(f(x)) fixed;
    trades_kl ascends the KL term alone. Four classes and a large ball, so p(x') moves far
    from p(x): the direction of the KL and a stray CE term both change some signs."""
    w, x, y, noise = _linear_case(seed=0, scale=1.0)
    model = _linear_model(w)
    eps, alpha, steps, beta, smoothing, std = 0.3, 0.05, 6, 15.0, 0.5, 0.01
    if labels:
        got = eaeg(model, x, y, eps, alpha, steps, beta=beta, label_smoothing=smoothing,
                   init_std=std, noise=noise)
    else:
        got = trades_kl(model, x, eps, alpha, steps, init_std=std, noise=noise)
    p = torch.softmax(x.flatten(1) @ w.T, dim=1)  # (6, 4), computed once
    t = F.one_hot(y, 4) * (1 - smoothing) + smoothing / 4
    want = torch.min(torch.max(x + std * noise, x - eps), x + eps).clamp(0, 1)
    for _ in range(steps):
        q = torch.softmax(want.flatten(1) @ w.T, dim=1)
        dz = beta * (q - p) + ((q - t) if labels else 0.0)
        want = _step_by_hand(want, x, (dz @ w).view_as(x), eps, alpha)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert (got - x).abs().max() > eps / 2  # it moved


def test_cw_pgd_ascends_the_margin_not_cross_entropy() -> None:
    """CW-inf (METHOD.md section 7) is PGD on max_{j != y} z_j - z_y: on f(x) = W x its
    input gradient is w_j* - w_y for the largest wrong logit j*. With four classes this
    differs from the cross-entropy direction, so a CW attack that runs CE fails here."""
    w, x, y, _ = _linear_case(seed=1, scale=0.3)  # no class dominates: CE and margin differ
    model = _linear_model(w)
    eps, alpha, steps = 0.1, 0.02, 3
    got = pgd(model, x, y, eps, alpha, steps, random_start=False, loss="cw")
    want = x.clone()
    for _ in range(steps):
        logits = want.flatten(1) @ w.T
        wrong = logits.scatter(1, y[:, None], float("-inf")).argmax(dim=1)
        want = _step_by_hand(want, x, (w[wrong] - w[y]).view_as(x), eps, alpha)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not torch.equal(got, pgd(model, x, y, eps, alpha, steps, random_start=False))


def test_pgd_random_start_is_uniform_over_the_whole_eps_ball() -> None:
    """Madry's start is x + U(-eps, eps) (steps = 0 returns it): both signs, the whole
    radius, centred; random_start=False starts at x itself."""
    model = _linear_model(torch.zeros(3, 3 * 16 * 16, dtype=torch.float64))
    x = torch.full((4, 3, 16, 16), 0.5, dtype=torch.float64)  # far from 0 and 1
    y = torch.zeros(4, dtype=torch.int64)
    delta = pgd(model, x, y, EPS, ALPHA, steps=0) - x  # (4, 3, 16, 16): 3072 draws
    assert delta.abs().max() <= EPS + 1e-12
    assert delta.min() < -0.95 * EPS and delta.max() > 0.95 * EPS
    assert abs(delta.mean().item()) < 0.05 * EPS
    assert delta.std().item() == pytest.approx(EPS / 3**0.5, rel=0.05)  # U(-eps, eps)
    assert torch.equal(pgd(model, x, y, EPS, ALPHA, steps=0, random_start=False), x)


def test_eaeg_kl_target_uses_the_branch_being_attacked(make_warm_model, sample_batch) -> None:
    """METHOD.md section 3: the attack of x_hat runs in the auxiliary branch, and so does
    its KL target p(x_hat) (the warm model's branches differ)."""
    x, y = sample_batch
    model = make_warm_model(dual_bn=True).eval()
    noise = torch.randn_like(x)
    with torch.no_grad():
        with bn_branch(model, "aux"):
            target_aux = model(x)
        target_main = model(x)
    kw = dict(steps=3, beta=15.0, noise=noise, branch="aux")
    got = eaeg(model, x, y, EPS, ALPHA, **kw)
    assert torch.equal(got, eaeg(model, x, y, EPS, ALPHA, target_logits=target_aux, **kw))
    assert not torch.equal(got, eaeg(model, x, y, EPS, ALPHA, target_logits=target_main, **kw))


def test_eaeg_start_is_projected_into_a_ball_smaller_than_its_noise(make_tiny_model,
                                                                    sample_batch) -> None:
    """The 0.001 * N(0, I) start can leave a tiny eps-ball: it is projected even when no
    step follows (steps=0), and eps=0 returns x itself."""
    x, y = sample_batch
    model = make_tiny_model()
    noise = torch.randn_like(x)
    eps = 0.0005  # below 0.001 * |noise| for most pixels
    start = eaeg(model, x, y, eps=eps, alpha=ALPHA, steps=0, noise=noise)
    assert (start - x).abs().max() <= eps + 1e-7 and start.min() >= 0 and start.max() <= 1
    assert torch.equal(trades_kl(model, x, eps=0.0, steps=0, noise=noise), x)
