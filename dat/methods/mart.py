"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training.

    L = BCE(p(x'), y) + beta * mean_i[ KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i)) ]
    BCE(p, y) = -log p_y - log(1 - max_{k != y} p_k)

The KL term is weighted more on clean examples the model gets wrong (low p_y(x)), so
misclassified points are pushed harder towards robustness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import pgd
from ..losses import kl_divergence
from .pgd_at import BaselineStep, accuracy, check_attack_init

__all__ = ["MARTStep", "mart_loss"]

_TINY = 1e-12  # keeps log() finite when a probability is exactly 0 or 1


def mart_loss(clean_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float,
              label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """MART objective; returns (total, bce, weighted_kl), each a mean over the batch."""
    adv_probs = F.softmax(adv_logits.float(), dim=1)  # (B, K)
    ce = F.cross_entropy(adv_logits.float(), y, label_smoothing=label_smoothing)
    wrong = adv_probs.masked_fill(F.one_hot(y, adv_probs.shape[1]).bool(), -1.0)
    top_wrong = wrong.amax(dim=1)  # (B,) largest probability of a wrong class
    bce = ce - (1.0 - top_wrong + _TINY).log().mean()
    p_true = F.softmax(clean_logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)  # (B,)
    kl = kl_divergence(clean_logits, adv_logits, reduction="none")  # (B,)
    weighted_kl = (kl * (1.0 - p_true)).mean()
    return bce + beta * weighted_kl, bce, weighted_kl


class MARTStep(BaselineStep):
    """One MART step: PGD-K on CE (uniform start), then the MART loss in train mode.

    beta = 6 by default (the MART paper's CIFAR-10 setting). ``label_smoothing`` (0 in the
    preset) smooths the attack's CE and the loss's CE alike, as in PGD-AT.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 beta: float = 6.0, init: str = "uniform", **kwargs) -> None:
        super().__init__(model, optimizer, **kwargs)
        self.beta, self.init = beta, check_attack_init(init)

    def run(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None) -> dict[str, Tensor]:
        start = 0.001 * torch.randn_like(x) if self.init == "gaussian" else None
        with self._autocast(x):
            x_adv = pgd(self.model, x, y, self.eps, self.alpha, self.steps, start=start,
                        label_smoothing=self.label_smoothing,
                        compile_mode=self.compile_attacks, check_range=False)

        def loss_of(model: nn.Module) -> tuple[Tensor, ...]:
            with self._autocast(x):
                clean_logits, adv_logits = model(x), model(x_adv)
            return (*mart_loss(clean_logits, adv_logits, y, self.beta, self.label_smoothing),
                    clean_logits, adv_logits)

        loss, bce, kl, clean_logits, adv_logits = self._train_on(loss_of)
        self._keep(x=x, x_adv=x_adv)
        return {"loss": loss.detach(), "bce": bce.detach(), "kl": kl.detach(),
                "acc_clean": accuracy(clean_logits, y), "acc_adv": accuracy(adv_logits, y)}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", beta={self.beta})"
