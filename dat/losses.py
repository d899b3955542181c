"""Loss terms of the adversarial-training methods (all on logits, mean over the batch)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["cw_margin", "js_divergence", "kl_divergence", "trades_loss"]


def kl_divergence(p_logits: Tensor, q_logits: Tensor, reduction: str = "mean") -> Tensor:
    """KL( softmax(p) || softmax(q) ) per sample, reduced by ``mean``, ``sum`` or ``none``.

    Computed in float32 from log-softmaxes, so it is exact zero for equal inputs and
    stable under bf16 autocast.
    """
    log_p = F.log_softmax(p_logits.float(), dim=1)
    log_q = F.log_softmax(q_logits.float(), dim=1)
    per_sample = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return _reduce(per_sample, reduction)


def js_divergence(a_logits: Tensor, b_logits: Tensor, reduction: str = "mean") -> Tensor:
    """Jensen-Shannon divergence of the softmaxes: (KL(p||m) + KL(q||m)) / 2, m = (p+q)/2."""
    p = F.softmax(a_logits.float(), dim=1)
    q = F.softmax(b_logits.float(), dim=1)
    log_m = ((p + q) / 2).clamp_min(1e-12).log()
    kl_pm = (p * (p.clamp_min(1e-12).log() - log_m)).sum(dim=1)
    kl_qm = (q * (q.clamp_min(1e-12).log() - log_m)).sum(dim=1)
    return _reduce((kl_pm + kl_qm) / 2, reduction)


def trades_loss(
    clean_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``CE(f(x), y) + beta * KL(p(x) || p(x'))``; returns (total, ce, kl).

    As in TRADES, p(x) is not detached: gradients flow through both KL arguments.
    """
    ce = F.cross_entropy(clean_logits.float(), y, label_smoothing=label_smoothing)
    kl = kl_divergence(clean_logits, adv_logits)
    return ce + beta * kl, ce, kl


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample Carlini-Wagner margin: largest wrong logit minus the true logit."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float("-inf"))  # (no one_hot: compiles on 2.11)
    return wrong.amax(dim=1) - true


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"unknown reduction {reduction!r}; use mean, sum or none")
