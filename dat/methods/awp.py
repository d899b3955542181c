"""Adversarial Weight Perturbation (AWP; Wu, Xia, Wang, NeurIPS 2020), for any method.

AWP flattens the robust loss landscape in weight space: before each training step it
moves every weight matrix a relative distance ``gamma`` (per layer, ||v_l|| = gamma *
||w_l||) in the direction that increases the method's loss, takes the optimiser step
from there, and then removes the perturbation. The direction comes from one SGD ascent
step of a proxy copy of the model.

Usage with any loss written as a function of the model::

    awp = AWP(model, gamma=0.005)
    with awp.perturbed(lambda m: loss_of(m)):   # perturb; removed on exit
        loss = loss_of(model)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["AWP", "check_awp_gamma"]

_TINY = 1e-20  # guards the relative scale against an all-zero ascent direction


def check_awp_gamma(gamma: float) -> None:
    """One-line ValueError unless 0 <= gamma < 1 (NaN included): a silently ignored or
    weight-sized perturbation is never meant."""
    if not 0 <= gamma < 1:
        raise ValueError(f"awp_gamma={gamma} must be in [0, 1): a fraction of each layer's "
                         "weight norm (AWP recipes: 0.005 or 0.01; 0 = off)")


class AWP:
    """Adversarial weight perturbation of ``model`` (weights with 2+ dims only).

    Args:
        model: the classifier being trained (perturbed in place, restored after).
        gamma: relative size of the perturbation per layer, in [0, 1) (paper: 0.005 for
            DAT/TRADES, 0.01 for PGD-AT).
        proxy_lr: learning rate of the proxy's ascent step (AWP reference code: 0.01).
    """

    def __init__(self, model: nn.Module, gamma: float = 0.005, proxy_lr: float = 0.01) -> None:
        check_awp_gamma(gamma)
        self.model, self.gamma = model, gamma
        self.proxy = copy.deepcopy(model)
        self.proxy_optimizer = torch.optim.SGD(self.proxy.parameters(), lr=proxy_lr)
        # (model weight, proxy weight) for every perturbed tensor, found once (a step uses
        # them three times): the weights of 2+ dims (conv / linear), as in the AWP authors'
        # code; not biases, BN, or a ViT's tokens
        self._perturbed = [(w, p) for (name, w), p in zip(
            model.named_parameters(), self.proxy.parameters(), strict=True)
            if w.dim() > 1 and "weight" in name]

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(model weight, proxy weight) for every perturbed tensor."""
        return self._perturbed

    def compute(self, loss_fn: Callable[[nn.Module], Tensor]) -> list[Tensor]:
        """The perturbation (one tensor per weight) that increases ``loss_fn(model)``."""
        self.proxy.load_state_dict(self.model.state_dict())
        for m, q in zip(self.model.modules(), self.proxy.modules(), strict=True):
            q.training = m.training  # per module: frozen BN layers stay frozen in the proxy
        loss = -loss_fn(self.proxy)  # descend on -loss = ascend on the loss
        self.proxy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.proxy_optimizer.step()  # where torchrun's hook averages the proxy's gradients
        deltas = []
        with torch.no_grad():
            for w, p in self._pairs():
                # The step moved p by -proxy_lr * grad (of -loss): use -grad itself, since
                # p - w loses most of its digits when the step is small next to the weight.
                up = torch.zeros_like(w) if p.grad is None else -p.grad
                deltas.append(self.gamma * up * (w.norm() / (up.norm() + _TINY)))
        return deltas

    @torch.no_grad()
    def _add(self, deltas: list[Tensor], sign: float) -> None:
        for (w, _), d in zip(self._pairs(), deltas, strict=True):
            w.add_(d, alpha=sign)

    @contextlib.contextmanager
    def perturbed(self, loss_fn: Callable[[nn.Module], Tensor]) -> Iterator[list[Tensor]]:
        """Perturb the model's weights inside the block; subtract the same step on exit."""
        deltas = self.compute(loss_fn) if self.gamma > 0 else []
        self._add(deltas, 1.0)
        try:
            yield deltas
        finally:
            self._add(deltas, -1.0)
