"""Training-time inner maximisation: PGD (Madry), TRADES-KL and DAT's EAEG.

Every attack is L-inf in [0, 1] pixel space, runs the model in eval mode (a compiled
model also with its parameters frozen; both restored afterwards), never accumulates
parameter gradients, and
uses the BN branch the caller routes (``branch=...`` or an enclosing ``bn_branch``). Losses are
summed over the batch, so a sample's step does not depend on what else is in the
batch: attacking ``cat([x, x_hat])`` with split BN equals two separate attacks (bit for
bit on CPU and in fp64 on CUDA; with TF32/bf16 convolutions rounding flips the sign of
some small gradients, so the two differ in a fraction of pixels by multiples of alpha).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import cw_margin, kl_divergence
from .models.dual_bn import bn_branch

__all__ = ["eaeg", "eval_mode", "frozen_parameters", "is_compiled", "pgd", "project", "trades_kl"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block and restore every module's flag after.

    Flags are restored per module, so a sub-module the user froze in eval mode (e.g. a
    frozen BatchNorm) stays frozen after an attack.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters stop requiring gradients inside the block, and are restored after.

    An attack needs gradients w.r.t. its input only. Eager autograd skips weight gradients
    by itself, but a ``torch.compile``d model's backward graph computes them all: frozen,
    the compiled EAEG runs 27% faster on a CPU (``bench/compiled_attack.py``), with
    identical results. The attacks freeze compiled models only (see :func:`is_compiled`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a sub-module went through ``torch.compile``.

    Only then do the attacks freeze the parameters: an eager model keeps them trainable
    because autocast caches its low-precision weight copies for leaves that require grad,
    so a frozen eager model under bf16 would re-cast every weight at every attack step
    (110 extra kernels per ResNet-18 DAT step, ``bench/trainer_ops.py``).
    """
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # absent: nothing was compiled
    if dynamo is None:
        return False
    return any(isinstance(m, dynamo.OptimizedModule)
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _frozen_if_compiled(model: nn.Module):
    return frozen_parameters(model) if is_compiled(model) else contextlib.nullcontext(model)


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L-inf ball of radius ``eps`` around ``x`` and onto [0, 1]."""
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    return x_adv.clamp(0.0, 1.0)


def _branch(model: nn.Module, branch: str | None):
    return bn_branch(model, branch) if branch else contextlib.nullcontext()


def _ascend(model, x, x_adv, loss_fn, eps, alpha, steps, branch) -> Tensor:
    # The box of the projection, once: each step is then sign, add and clamp, three
    # kernels, with the same values as project() (min/max only select, and alpha * sign
    # is exact).
    low, high = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    # enable_grad: callers often attack inside torch.no_grad() (evaluation loops).
    with eval_mode(model), _branch(model, branch), _frozen_if_compiled(model), \
            torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            loss = loss_fn(model(x_adv))
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.clamp(x_adv.detach().add(grad.sign(), alpha=alpha), low, high)
    return x_adv.detach()


def _gaussian_start(x: Tensor, std: float, eps: float, noise: Tensor | None) -> Tensor:
    noise = torch.randn_like(x) if noise is None else noise
    # Projected too: 0.001 * N(0, I) can leave a small eps-ball (eps = 0 or 1/255).
    return project(x + std * noise, x, eps).detach()


def pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, alpha: float = 2 / 255,
    steps: int = 10, random_start: bool = True, loss: str = "ce",
    label_smoothing: float = 0.0, branch: str | None = None, start: Tensor | None = None,
) -> Tensor:
    """Madry et al. PGD: ascend CE (or the CW margin, ``loss="cw"``) from a uniform start.

    ``start`` overrides the random start (an initial perturbation in [-eps, eps]).
    """
    if loss not in ("ce", "cw"):
        raise ValueError(f"unknown PGD loss {loss!r}; use 'ce' or 'cw'")
    x = x.detach()
    if start is not None:
        x_adv = project(x + start, x, eps)
    elif random_start:
        x_adv = project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    else:
        x_adv = x.clone()

    def objective(logits: Tensor) -> Tensor:
        if loss == "cw":
            return cw_margin(logits, y).sum()
        return F.cross_entropy(logits.float(), y, reduction="sum",
                               label_smoothing=label_smoothing)

    return _ascend(model, x, x_adv, objective, eps, alpha, steps, branch)


def trades_kl(
    model: nn.Module, x: Tensor, eps: float = 8 / 255, alpha: float = 2 / 255,
    steps: int = 10, init_std: float = 0.001, target_logits: Tensor | None = None,
    branch: str | None = None, noise: Tensor | None = None,
) -> Tensor:
    """TRADES inner maximisation: ascend KL(p(x) || p(x')) from a 0.001 Gaussian start.

    The target p(x) is computed once (eval mode) unless ``target_logits`` is given.
    """
    return eaeg(model, x, None, eps, alpha, steps, beta=1.0, init_std=init_std,
                target_logits=target_logits, branch=branch, noise=noise)


def eaeg(
    model: nn.Module, x: Tensor, y: Tensor | None, eps: float = 8 / 255,
    alpha: float = 2 / 255, steps: int = 5, beta: float = 15.0,
    label_smoothing: float = 0.0, init_std: float = 0.001,
    target_logits: Tensor | None = None, branch: str | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """DAT's efficient adversarial example generation (EAEG).

    Ascends ``CE(f(x'), y) + beta * KL(p(x) || p(x'))`` for ``steps`` signed-gradient
    steps from ``x + init_std * N(0, I)``. The KL target p(x) does not change during
    the attack, so it is computed once (the published code recomputes it every step).
    With ``y=None`` the CE term is dropped (TRADES). ``noise`` injects the start draw.
    """
    x = x.detach()
    if target_logits is None:
        with torch.no_grad(), eval_mode(model), _branch(model, branch):
            target_logits = model(x)
    target_logits = target_logits.detach()

    def objective(logits: Tensor) -> Tensor:
        loss = beta * kl_divergence(target_logits, logits, reduction="sum")
        if y is not None:
            loss = loss + F.cross_entropy(logits.float(), y, reduction="sum",
                                          label_smoothing=label_smoothing)
        return loss

    x_adv = _gaussian_start(x, init_std, eps, noise)
    return _ascend(model, x, x_adv, objective, eps, alpha, steps, branch)
