"""TRADES (Zhang et al., ICML 2019): CE on clean images + beta * KL(p(x) || p(x'))."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attacks import trades_kl
from ..losses import trades_loss
from .pgd_at import BaselineStep, accuracy, check_attack_init

__all__ = ["TRADESStep"]


class TRADESStep(BaselineStep):
    """One TRADES step.

    Inner maximisation: K signed-gradient steps on KL(p(x) || p(x')) from
    ``x + 0.001 N(0, I)`` (``init="gaussian"``, the paper's) or ``x + eps U(-1, 1)``
    (``"uniform"``), in eval mode, target computed once. Outer loss (train mode, two
    separate forwards as in the paper so BN sees clean and adversarial batches apart):
    ``CE(f(x), y) + beta * KL(p(x) || p(x'))`` with p(x) not detached. beta = 6 by default.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 beta: float = 6.0, init: str = "gaussian", **kwargs) -> None:
        super().__init__(model, optimizer, **kwargs)
        self.beta, self.init = beta, check_attack_init(init)

    def run(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None) -> dict[str, Tensor]:
        uniform = self.init == "uniform"  # else trades_kl draws its 0.001 N(0, I) itself
        noise = torch.empty_like(x).uniform_(-1, 1) if uniform else None
        with self._autocast(x):
            x_adv = trades_kl(self.model, x, self.eps, self.alpha, self.steps,
                              init_std=self.eps if uniform else 0.001, noise=noise,
                              compile_mode=self.compile_attacks,
                              check_range=False)  # (B, C, H, W); checked on the first batch

        def loss_of(model: nn.Module) -> tuple[Tensor, ...]:
            with self._autocast(x):
                clean_logits, adv_logits = model(x), model(x_adv)
            return (*trades_loss(clean_logits, adv_logits, y, self.beta,
                                 label_smoothing=self.label_smoothing), clean_logits, adv_logits)

        loss, ce, kl, clean_logits, adv_logits = self._train_on(loss_of)
        self._keep(x=x, x_adv=x_adv)
        return {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(),
                "acc_clean": accuracy(clean_logits, y), "acc_adv": accuracy(adv_logits, y)}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", beta={self.beta})"
