"""PGD adversarial training (Madry et al., ICLR 2018): minimise CE on PGD examples.

Also home of :class:`BaselineStep`, the small shared frame of the baseline methods
(PGD-AT, TRADES, MART): precision, the optimiser update and optional image keeping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import check_compile_mode, eval_logits, pgd
from .awp import AWP, check_awp_gamma
from .base import MethodStep, check_optimizer, train_mode

__all__ = ["BaselineStep", "PGDATStep", "accuracy", "check_attack_init"]


def check_attack_init(init: str) -> str:
    """``init`` if it names an attack start a baseline knows (uniform or gaussian)."""
    if init not in ("uniform", "gaussian"):
        raise ValueError(f"init={init!r}; use 'uniform' or 'gaussian'")
    return init


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Top-1 accuracy on the batch as a fraction in [0, 1] (detached 0-d, no host sync).

    Fractions, like DATStep's ``acc_clean`` / ``acc_adv``, so TensorBoard curves of all
    methods share one scale (validation and test numbers are reported in percent).
    """
    return (logits.detach().argmax(dim=1) == y).float().mean()


class BaselineStep(MethodStep):
    """Shared frame: an L-inf threat model, a classifier and its optimiser.

    ``autocast_dtype`` (None or ``torch.bfloat16``) runs model forwards and attacks under
    autocast; losses are computed in float32. With ``keep_images=n`` the first n clean and
    adversarial images of the last batch are kept for :meth:`last_images` (TB grids).
    ``compile_attacks`` runs each attack step as one compiled graph
    (:func:`dat.attacks.compiled_step`). ``awp_gamma`` > 0 adds adversarial weight
    perturbation (:class:`dat.methods.awp.AWP`) from epoch ``awp_warmup`` on: the
    adversarial examples come from the unperturbed model, the update is the method's loss
    at the perturbed weights (the AWP authors' AT-AWP / TRADES-AWP / MART-AWP).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, eps: float = 8 / 255,
        alpha: float = 2 / 255, steps: int = 10, label_smoothing: float = 0.0,
        autocast_dtype: torch.dtype | None = None, keep_images: int = 0,
        compile_attacks: str = "off", awp_gamma: float = 0.0, awp_warmup: int = 0,
    ) -> None:
        if eps > 1 or alpha > 1:
            raise ValueError(f"eps={eps:g} / alpha={alpha:g} look like 0-255 units; divide by 255")
        if awp_warmup < 0:
            raise ValueError(f"awp_warmup={awp_warmup} must be >= 0 (epochs before AWP starts)")
        check_awp_gamma(awp_gamma)
        check_optimizer(model, optimizer, type(self).__name__)
        self.model, self.optimizer = model, optimizer
        self.eps, self.alpha, self.steps = eps, alpha, steps  # L-inf, [0, 1] pixel scale
        self.label_smoothing = label_smoothing
        self.autocast_dtype = autocast_dtype
        check_compile_mode(compile_attacks)
        self.compile_attacks = compile_attacks  # dat.attacks.compiled_step's mode
        self.keep_images = keep_images
        self._images: dict[str, Tensor] = {}
        self.awp = AWP(model, awp_gamma) if awp_gamma > 0 else None
        self.awp_warmup, self.awp_on = awp_warmup, awp_gamma > 0 and awp_warmup <= 0

    def _autocast(self, x: Tensor) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def on_epoch_start(self, epoch: int) -> None:
        self.awp_on = self.awp is not None and epoch >= self.awp_warmup

    def _train_on(self, loss_of: Callable[[nn.Module], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """One optimiser step on ``loss_of(model)[0]``; returns ``loss_of(model)``.

        With AWP on, the loss (and the step's gradient) is taken at the weights AWP moved
        uphill of that same loss, and the move is undone after the optimiser step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        perturbed = (self.awp.perturbed(lambda m: loss_of(m)[0]) if self.awp_on
                     else contextlib.nullcontext())
        # train mode (sub-modules the user froze in eval mode stay so); flags restored after
        with train_mode(self.model), perturbed:
            out = loss_of(self.model)
            out[0].backward()
            self.optimizer.step()
        return out

    def _keep(self, **images: Tensor) -> None:
        if self.keep_images > 0:
            self._images = {k: v.detach()[: self.keep_images].float().clone()
                            for k, v in images.items()}

    def last_images(self) -> dict[str, Tensor] | None:
        """The last step's kept images (``keep_images`` each), or None when off."""
        return dict(self._images) if self.keep_images > 0 else None

    def __repr__(self) -> str:
        awp = f", awp_gamma={self.awp.gamma:g}" if self.awp is not None else ""
        return (f"{type(self).__name__}(eps={self.eps:.4g}, alpha={self.alpha:.4g}, "
                f"steps={self.steps}, label_smoothing={self.label_smoothing}{awp})")


class PGDATStep(BaselineStep):
    """Madry PGD-AT: ``x' = PGD-K(x)`` (CE ascent), then one SGD step on ``CE(f(x'), y)``.

    ``init="uniform"`` (Madry) starts from U(-eps, eps); ``"gaussian"`` from 0.001 N(0, I).
    Returns loss, clean accuracy (eval-mode forward, detached) and adversarial accuracy.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 init: str = "uniform", **kwargs) -> None:
        super().__init__(model, optimizer, **kwargs)
        self.init = check_attack_init(init)

    def run(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None) -> dict[str, Tensor]:
        start = 0.001 * torch.randn_like(x) if self.init == "gaussian" else None
        with self._autocast(x):
            x_adv = pgd(self.model, x, y, self.eps, self.alpha, self.steps, start=start,
                        label_smoothing=self.label_smoothing, compile_mode=self.compile_attacks,
                        check_range=False)  # (B, C, H, W); checked on the first batch
            # compiled model: through the attack's graph, not an inference graph of its own
            clean_logits = eval_logits(self.model, x, as_attack=self.compile_attacks == "off")

        def loss_of(model: nn.Module) -> tuple[Tensor, Tensor]:
            with self._autocast(x):
                logits = model(x_adv)
            return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), logits

        loss, logits = self._train_on(loss_of)
        self._keep(x=x, x_adv=x_adv)
        return {"loss": loss.detach(), "acc_clean": accuracy(clean_logits, y),
                "acc_adv": accuracy(logits, y)}
