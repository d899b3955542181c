"""Loss terms against hand computations: KL, JS, TRADES, CW margin."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dat.losses import cw_margin, js_divergence, kl_divergence, trades_loss


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


P_LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
Q_LOGITS = [[0.3, 0.1, 2.0], [1.0, 1.0, 1.0]]


def test_kl_is_zero_for_equal_inputs() -> None:
    logits = torch.randn(8, 10) * 5
    assert torch.equal(kl_divergence(logits, logits.clone(), reduction="none"), torch.zeros(8))


def test_kl_matches_a_hand_computation() -> None:
    expected = [_kl(_softmax(p), _softmax(q)) for p, q in zip(P_LOGITS, Q_LOGITS, strict=True)]
    p, q = torch.tensor(P_LOGITS), torch.tensor(Q_LOGITS)
    per_sample = kl_divergence(p, q, reduction="none")
    assert torch.allclose(per_sample, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(kl_divergence(p, q), torch.tensor(sum(expected) / 2), atol=1e-6)
    assert torch.allclose(kl_divergence(p, q, reduction="sum"), torch.tensor(sum(expected)))
    torch_kl = F.kl_div(F.log_softmax(q, 1), F.log_softmax(p, 1), log_target=True,
                        reduction="batchmean")  # KL(p || q) in PyTorch's argument order
    assert torch.allclose(kl_divergence(p, q), torch_kl, atol=1e-6)
    assert (kl_divergence(torch.randn(64, 10), torch.randn(64, 10), reduction="none") >= 0).all()


def test_js_is_symmetric_bounded_and_matches_a_hand_computation() -> None:
    a, b = torch.randn(32, 10) * 3, torch.randn(32, 10) * 3
    assert torch.equal(js_divergence(a, b, reduction="none"), js_divergence(b, a, reduction="none"))
    values = js_divergence(a, b, reduction="none")
    assert (values >= 0).all() and (values <= math.log(2) + 1e-6).all()
    assert torch.allclose(js_divergence(a, a.clone(), reduction="none"), torch.zeros(32),
                          atol=1e-7)
    expected = []
    for p_row, q_row in zip(P_LOGITS, Q_LOGITS, strict=True):
        p, q = _softmax(p_row), _softmax(q_row)
        m = [(u + v) / 2 for u, v in zip(p, q, strict=True)]
        expected.append((_kl(p, m) + _kl(q, m)) / 2)
    got = js_divergence(torch.tensor(P_LOGITS), torch.tensor(Q_LOGITS), reduction="none")
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_js_is_finite_with_saturated_softmax() -> None:
    a = torch.tensor([[100.0, -100.0, 0.0]], requires_grad=True)
    b = torch.tensor([[-100.0, 100.0, 0.0]])
    value = js_divergence(a, b)
    value.backward()
    assert math.isclose(float(value.detach()), math.log(2), rel_tol=1e-5)
    assert torch.isfinite(a.grad).all()


def test_cw_margin_by_hand() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [5.0, -1.0, 4.5]])
    y = torch.tensor([0, 1, 0])
    # largest wrong logit minus the true logit: 3 - 1, 2 - 3, 4.5 - 5
    assert torch.allclose(cw_margin(logits, y), torch.tensor([2.0, -1.0, -0.5]))


def test_trades_loss_is_ce_plus_beta_kl_with_gradient_through_both() -> None:
    clean = torch.randn(6, 10, requires_grad=True)
    adv = torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    total, ce, kl = trades_loss(clean, adv, y, beta=6.0, label_smoothing=0.5)
    assert torch.allclose(ce, F.cross_entropy(clean, y, label_smoothing=0.5))
    assert torch.allclose(kl, kl_divergence(clean, adv))
    assert torch.allclose(total, ce + 6.0 * kl)
    (grad_total,) = torch.autograd.grad(total, clean)
    (grad_ce,) = torch.autograd.grad(F.cross_entropy(clean, y, label_smoothing=0.5), clean)
    assert not torch.allclose(grad_total, grad_ce)  # p(x) is not detached inside the KL


def test_losses_are_float32_for_bf16_logits() -> None:
    a, b = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16()
    assert kl_divergence(a, b).dtype == torch.float32
    assert js_divergence(a, b).dtype == torch.float32
    assert cw_margin(a, torch.zeros(4, dtype=torch.int64)).dtype == torch.float32


def test_unknown_reduction_is_rejected() -> None:
    with pytest.raises(ValueError, match="use mean, sum or none"):
        kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2), reduction="batchmean")


def test_kl_of_bf16_logits_is_computed_from_fp32_log_softmaxes() -> None:
    a, b = (torch.randn(8, 10) * 4).bfloat16(), (torch.randn(8, 10) * 4).bfloat16()
    want = kl_divergence(a.float(), b.float(), reduction="none")
    assert torch.equal(kl_divergence(a, b, reduction="none"), want)
    assert torch.equal(kl_divergence(b, a, reduction="none"),
                       kl_divergence(b.float(), a.float(), reduction="none"))


def test_js_is_finite_when_both_softmaxes_underflow_in_one_class() -> None:
    # class 2 has probability exactly 0 in float32 under both p and q
    a = torch.tensor([[100.0, -100.0, -1000.0]], requires_grad=True)
    b = torch.tensor([[-100.0, 100.0, -1000.0]])
    value = js_divergence(a, b)
    value.backward()
    assert math.isclose(float(value.detach()), math.log(2), rel_tol=1e-5)
    assert torch.isfinite(a.grad).all()


def test_cw_margin_with_all_negative_logits() -> None:
    logits = torch.tensor([[-1.0, -3.0, -2.0], [-5.0, -4.0, -6.0]])
    y = torch.tensor([0, 1])
    # the true logit is excluded from the max, even when every logit is below zero
    assert torch.allclose(cw_margin(logits, y), torch.tensor([-1.0, -1.0]))


def test_js_default_reduction_is_the_batch_mean() -> None:
    a, b = torch.randn(5, 10) * 2, torch.randn(5, 10) * 2
    per_sample = js_divergence(a, b, reduction="none")
    assert torch.allclose(js_divergence(a, b), per_sample.mean())
    assert torch.allclose(js_divergence(a, b, reduction="sum"), per_sample.sum())


def test_trades_loss_default_has_no_label_smoothing() -> None:
    clean, adv = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    total, ce, kl = trades_loss(clean, adv, y, beta=2.0)
    assert torch.allclose(ce, F.cross_entropy(clean, y))
    assert torch.allclose(total, ce + 2.0 * kl)
