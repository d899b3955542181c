"""DAT's formulas against numbers worked out by hand (python floats) on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dat.attacks import eaeg
from dat.losses import js_divergence, kl_divergence, trades_loss
from dat.methods.dat import DATStep
from dat.spectral import decompose, mix_amplitude

LN3 = math.log(3.0)
P = [0.25, 0.75]  # softmax([0, ln 3])
U = [0.5, 0.5]  # softmax([0, 0])


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _ce(target, q):
    return -sum(t * math.log(b) for t, b in zip(target, q, strict=True))


def _js(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return (_kl(p, m) + _kl(q, m)) / 2


T_SMOOTH = [0.25, 0.75]  # label 1 with label smoothing 0.5 over 2 classes


def _logits(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_kl_and_js_by_hand():
    p_logits, u_logits = _logits([0.0, LN3]), _logits([0.0, 0.0])
    assert kl_divergence(p_logits, u_logits).item() == pytest.approx(_kl(P, U), abs=1e-6)
    assert _kl(P, U) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    js = js_divergence(p_logits, u_logits).item()
    assert js == pytest.approx(_js(P, U), abs=1e-6)
    assert js == pytest.approx(js_divergence(u_logits, p_logits).item(), abs=1e-7)  # symmetric
    assert js_divergence(p_logits, p_logits).item() == 0.0  # zero for equal inputs
    far = js_divergence(_logits([0.0, 40.0]), _logits([40.0, 0.0])).item()
    assert far == pytest.approx(math.log(2), abs=1e-6)  # upper bound ln 2 for disjoint


def test_l_at_by_hand():
    """L_AT = CE(f(x), y) + beta * KL(p(x) || p(x')), label smoothing 0.5, beta 15."""
    y = torch.tensor([1])
    total, ce, kl = trades_loss(_logits([0.0, LN3]), _logits([0.0, 0.0]), y, beta=15.0,
                                label_smoothing=0.5)
    assert ce.item() == pytest.approx(_ce(T_SMOOTH, P), abs=1e-6)
    assert kl.item() == pytest.approx(_kl(P, U), abs=1e-6)
    assert total.item() == pytest.approx(_ce(T_SMOOTH, P) + 15 * _kl(P, U), abs=1e-5)


def test_l_dat_by_hand():
    """L_DAT = (L_AT(x) + L_AT(x_hat)) / 2 + omega * JS(f(x), f(x_hat)); the 'model' is
    the identity, so each 1x1 two-channel image is its own logits."""
    model = nn.Flatten()
    dummy = nn.Parameter(torch.zeros(1))
    step = DATStep(model, None, torch.optim.SGD([dummy], lr=0.1), split_bn=False,
                   amplitude_source="random_image", batched=False)

    def img(a, b):
        return torch.tensor([a, b]).view(1, 2, 1, 1)

    y = torch.tensor([1])
    loss, parts = step.loss(img(0.0, LN3), img(0.0, 0.0), img(0.0, 0.0), img(0.0, LN3), y)
    l_x = _ce(T_SMOOTH, P) + 15 * _kl(P, U)
    l_xh = _ce(T_SMOOTH, U) + 15 * _kl(U, P)
    want = (l_x + l_xh) / 2 + 2 * _js(P, U)
    assert parts["js"].item() == pytest.approx(_js(P, U), abs=1e-6)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert want == pytest.approx(2.755283, abs=1e-5)  # the same sum, done on paper


@pytest.mark.parametrize("outer", ["pgd_at", "trades"])
def test_l_dat_of_the_outer_variants_by_hand(outer):
    """AAG + PGD-AT: (CE(f(x'), y) + CE(f(x_hat'), y)) / 2 + omega * JS(f(x), f(x_hat));
    AAG + TRADES: L_DAT with TRADES' beta. Identity 'model' as in test_l_dat_by_hand."""
    model = nn.Flatten()
    dummy = nn.Parameter(torch.zeros(1))
    step = DATStep(model, None, torch.optim.SGD([dummy], lr=0.1), split_bn=False,
                   amplitude_source="random_image", batched=False, outer=outer, beta=6.0,
                   label_smoothing=0.5)

    def img(a, b):
        return torch.tensor([a, b]).view(1, 2, 1, 1)

    y = torch.tensor([1])
    r = [0.75, 0.25]  # softmax([0, -ln 3])
    # f(x) = P, f(x') = U, f(x_hat) = r, f(x_hat') = P: no two roles give the same loss
    loss, _ = step.loss(img(0.0, LN3), img(0.0, 0.0), img(0.0, -LN3), img(0.0, LN3), y)
    if outer == "pgd_at":
        want = (_ce(T_SMOOTH, U) + _ce(T_SMOOTH, P)) / 2 + 2 * _js(P, r)
    else:
        want = (_ce(T_SMOOTH, P) + 6 * _kl(P, U) + _ce(T_SMOOTH, r) + 6 * _kl(r, P)) / 2 \
            + 2 * _js(P, r)
    assert loss.item() == pytest.approx(want, abs=1e-5)


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("beta", [0.0, 15.0])
def test_eaeg_step_follows_the_hand_gradient(beta):
    """One EAEG step on a linear 2-pixel, 2-class model: x1 = x0 + alpha * sign(grad) with
    grad = W^T [(q - t) + beta (q - p)], p = softmax(W x) fixed, q = softmax(W x0)."""
    w = [[1.0, -2.0], [0.5, 1.0]]
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(w))
    x = torch.tensor([0.3, 0.6]).view(1, 1, 1, 2)
    noise = torch.tensor([4.0, -4.0]).view(1, 1, 1, 2)
    x_adv = eaeg(model, x, torch.tensor([1]), eps=0.1, alpha=0.02, steps=1, beta=beta,
                 label_smoothing=0.5, init_std=0.01, noise=noise)

    def logits(v):
        return [w[0][0] * v[0] + w[0][1] * v[1], w[1][0] * v[0] + w[1][1] * v[1]]

    x0 = [0.34, 0.56]
    p, q = _softmax(logits([0.3, 0.6])), _softmax(logits(x0))
    dz = [(q[i] - T_SMOOTH[i]) + beta * (q[i] - p[i]) for i in range(2)]
    grad = [w[0][j] * dz[0] + w[1][j] * dz[1] for j in range(2)]
    want = [x0[j] + 0.02 * math.copysign(1.0, grad[j]) for j in range(2)]
    assert x_adv.flatten().tolist() == pytest.approx(want, abs=1e-6)
    # the KL term (beta = 15) reverses the CE-only direction here: [0.36, 0.54] vs [0.32, 0.58]
    assert want == pytest.approx([0.36, 0.54] if beta else [0.32, 0.58])


def test_mix_by_hand_on_a_two_pixel_image():
    """x = [0.2, 0.6]: spectrum [0.8, -0.4], so A = [0.8, 0.4], P = [0, pi]."""
    x = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2)
    amp_g = torch.tensor([1.0, 0.2]).view(1, 1, 1, 2)
    # lam = 1: spectrum [1.0, -0.2] -> pixels [(1.0 - 0.2) / 2, (1.0 + 0.2) / 2]
    assert mix_amplitude(x, amp_g, 1.0).flatten().tolist() == pytest.approx([0.4, 0.6], abs=1e-6)
    # lam = 0.5: A_mix = [0.9, 0.3] -> spectrum [0.9, -0.3] -> [0.3, 0.6]
    assert mix_amplitude(x, amp_g, 0.5).flatten().tolist() == pytest.approx([0.3, 0.6], abs=1e-6)
    assert torch.equal(mix_amplitude(x, amp_g, 0.0), x)  # lam = 0 gives x exactly


def test_mix_lam_one_takes_the_amplitude_and_keeps_the_phase():
    gen = torch.Generator().manual_seed(0)
    x, other = torch.rand(2, 2, 3, 8, 7, generator=gen)  # odd width on purpose
    amp_o, _ = decompose(other)
    out = mix_amplitude(x, amp_o, 1.0, clip=False)
    amp_out, pha_out = decompose(out)
    _, pha_x = decompose(x)
    assert torch.allclose(amp_out, amp_o, atol=1e-4)
    keep = amp_o > 1e-3  # phase is defined where the amplitude is not ~0
    diff = torch.remainder(pha_out - pha_x + math.pi, 2 * math.pi) - math.pi
    assert diff[keep].abs().max() < 1e-3
    lam = torch.tensor([0.0, 1.0])
    both = mix_amplitude(x, amp_o, lam, clip=False)  # per-sample lam
    assert torch.equal(both[0], x[0]) and torch.allclose(both[1], out[1], atol=1e-6)
