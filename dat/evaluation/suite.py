"""The attack suite: named attacks, run only on points still classified correctly.

Every attack maps ``(model, x, y) -> x_adv`` for images in [0, 1]. Under the L-inf
threat model FGSM and PGD come from torchattacks (the implementations most papers
report); CW-inf is PGD on the Carlini-Wagner margin (``dat.attacks.pgd(loss="cw")``),
because torchattacks' ``CW`` is the L2 attack. Under the L2 threat model the same names
run ``dat.attacks.pgd(norm="l2")``: FGSM becomes the one-step fast gradient method, PGD
and CW take steps of eps/4 (as 2/255 is a quarter of 8/255). AutoAttack lives in
:mod:`dat.evaluation.autoattack`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attacks import NORMS, pgd

__all__ = [
    "ALPHA",
    "AttackSpec",
    "BoundsStats",
    "CW_ALPHA",
    "CW_STEPS",
    "EvaluationError",
    "L2_ALPHA",
    "format_eps",
    "attack_points",
    "make_attack",
    "predict",
    "seed_everything",
    "sweep_alpha",
    "validate_attack_names",
]

ALPHA = 2 / 255  # L-inf step of FGSM-free attacks (PGD-N), [0, 1] scale
CW_STEPS = 100  # PGD steps on the CW margin, as the published DAT evaluation (eval.py)
CW_ALPHA = 2 / 255  # CW-inf step size (docs/method.md, section 14: every PGD-type attack, 2/255)
L2_ALPHA = 0.25  # L2 PGD and CW step, a fraction of eps (the L-inf 2/255 is 8/255 / 4)
BOUNDS_TOL = 1e-6  # float32 round-off allowed beyond eps and [0, 1]
L2_BOUNDS_TOL = 1e-5  # the same for an L2 radius, times (1 + eps)
_PGD_NAME = re.compile(r"^pgd([1-9]\d*)$")  # pgd0 would be a random start only
KNOWN = ("clean", "fgsm", "pgd20", "pgd100", "cw", "aa")


class EvaluationError(ValueError):
    """Bad input to an evaluation; the message names the fix."""


@dataclass
class AttackSpec:
    """One attack's settings and the function ``fn(model, x, y) -> x_adv`` running it."""

    name: str
    implementation: str
    version: str
    eps: float  # radius, [0, 1] pixel scale, in the norm of ``settings["norm"]`` (L-inf if absent)
    settings: dict = field(default_factory=dict)
    fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None

    def info(self) -> dict:
        """Settings for the report (no callables)."""
        return {"implementation": self.implementation, "version": self.version,
                "eps": self.eps, **self.settings}


@dataclass
class BoundsStats:
    """AutoAttack-style closing sanity line, accumulated over an attack's batches."""

    eps: float
    norm: str = "linf"  # the norm perturbations are measured in (linf or l2)
    count: int = 0
    max_perturbation: float = 0.0  # largest ||x_adv - x|| in that norm
    min_value: float = float("inf")
    max_value: float = float("-inf")
    nonfinite: int = 0  # examples with a NaN or inf
    outside: int = 0  # examples outside the eps-ball or [0, 1] (beyond BOUNDS_TOL)

    def update(self, x_adv: Tensor, x: Tensor) -> None:
        if len(x) == 0:
            return
        diff = (x_adv.float() - x.float()).flatten(1).abs()  # (B, C*H*W)
        size = diff.amax(1) if self.norm == "linf" else diff.norm(dim=1)  # (B,)
        flat = x_adv.float().flatten(1)
        finite = torch.isfinite(flat).all(dim=1)
        # an L2 norm sums the round-off of every pixel: a relative tolerance there
        tol = BOUNDS_TOL if self.norm == "linf" else L2_BOUNDS_TOL * (1 + self.eps)
        beyond = (size > self.eps + tol) | (flat.amin(1) < -BOUNDS_TOL) | (
            flat.amax(1) > 1 + BOUNDS_TOL)
        self.count += len(x)
        self.nonfinite += int((~finite).sum())
        self.outside += int((beyond & finite).sum())
        self.max_perturbation = max(self.max_perturbation, float(size.nan_to_num(0).max()))
        self.min_value = min(self.min_value, float(flat.nan_to_num(0).min()))
        self.max_value = max(self.max_value, float(flat.nan_to_num(0).max()))

    def to_dict(self) -> dict:
        """Plain values for report.json (value range None when nothing was attacked)."""
        out = {k: getattr(self, k) for k in
               ("eps", "norm", "count", "max_perturbation", "min_value", "max_value", "nonfinite",
                "outside")}
        if self.count == 0:
            out["min_value"] = out["max_value"] = None
        return out


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (attacks draw their random starts there)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def sweep_alpha(eps: float, steps: int, norm: str = "linf") -> float:
    """PGD step for radius ``eps``: 2/255, or 2.5 * eps / steps when that is larger.

    Keeps the standard 2/255 up to eps = 16/255 (20 steps) and still lets PGD cross the
    whole ball at large radii (Madry et al.'s 2.5 eps / steps rule). L2: eps/4 at every
    radius, as the suite's L2 PGD.
    """
    if norm == "l2":
        return L2_ALPHA * eps
    return max(ALPHA, 2.5 * eps / steps)


def format_eps(eps: float, norm: str = "linf") -> str:
    """A radius as reports write it: ``8/255`` (L-inf) or ``0.5`` (L2)."""
    return f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.4g}"


def validate_attack_names(names: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError naming the valid choices when an attack name is unknown."""
    for name in names:
        if name not in KNOWN and not _PGD_NAME.match(name):
            raise EvaluationError(
                f"unknown attack {name!r}; use any of {', '.join(KNOWN)} or pgd<N> with "
                "N >= 1 (e.g. pgd50)"
            )


def _dat_version() -> str:
    import dat  # resolved at call time: dat/__init__ imports this module

    return dat.__version__


def _torchattacks_version() -> str:
    import torchattacks

    return torchattacks.__version__


def _fgsm(eps: float) -> AttackSpec:
    import torchattacks

    def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return torchattacks.FGSM(model, eps=eps)(x, y)

    return AttackSpec("fgsm", "torchattacks.FGSM", _torchattacks_version(), eps,
                      {"steps": 1, "alpha": eps, "loss": "ce"}, run)


def _pgd(name: str, eps: float, steps: int, alpha: float) -> AttackSpec:
    import torchattacks

    def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        return attack(x, y)

    return AttackSpec(name, "torchattacks.PGD", _torchattacks_version(), eps,
                      {"steps": steps, "alpha": alpha, "random_start": "uniform",
                       "loss": "ce"}, run)


def _cw(eps: float) -> AttackSpec:
    def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, eps=eps, alpha=CW_ALPHA, steps=CW_STEPS, loss="cw",
                   check_range=False)  # the evaluation checked the examples

    return AttackSpec("cw", "dat.attacks.pgd(loss='cw')", _dat_version(), eps,
                      {"steps": CW_STEPS, "alpha": CW_ALPHA, "random_start": "uniform",
                       "loss": "cw margin (max wrong logit - true logit)"}, run)


def _l2(name: str, eps: float, steps: int, alpha: float, loss: str, start: bool,
        what: str) -> AttackSpec:
    def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=start,
                   loss=loss, norm="l2", check_range=False)  # the evaluation checked them

    loss_text = "cw margin (max wrong logit - true logit)" if loss == "cw" else "ce"
    call = "dat.attacks.pgd(norm='l2', loss='cw')" if loss == "cw" else \
        "dat.attacks.pgd(norm='l2')"
    return AttackSpec(name, call, _dat_version(), eps,
                      {"norm": "l2", "method": what, "steps": steps, "alpha": alpha,
                       "random_start": "uniform radius, Gaussian direction" if start else "none",
                       "loss": loss_text}, run)


def make_attack(name: str, eps: float, alpha: float | None = None,
                norm: str = "linf") -> AttackSpec:
    """The attack called ``name`` (fgsm, pgd<N>, cw) at radius ``eps`` in ``norm``.

    ``alpha`` overrides the PGD step (default 2/255; eps/4 under L2).
    """
    validate_attack_names([name])
    if norm not in NORMS:
        raise EvaluationError(f"norm={norm!r}: use linf or l2")
    if norm == "l2":
        step = L2_ALPHA * eps if alpha is None else alpha
        if name == "fgsm":
            return _l2(name, eps, 1, eps, "ce", False, "fast gradient method (L2)")
        if name == "cw":
            return _l2(name, eps, CW_STEPS, step, "cw", True, "PGD on the CW margin (L2)")
        match = _PGD_NAME.match(name)
        if match:
            return _l2(name, eps, int(match.group(1)), step, "ce", True, "PGD (L2)")
    elif name == "fgsm":
        return _fgsm(eps)
    if name == "cw":
        return _cw(eps)
    match = _PGD_NAME.match(name)
    if match:
        return _pgd(name, eps, int(match.group(1)), ALPHA if alpha is None else alpha)
    raise ValueError(f"{name!r} is not a per-batch attack; clean and aa are run by evaluate()")


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Predicted labels (N,) on the CPU, computed in batches of ``batch_size`` on ``device``."""
    preds = [model(xb.to(device)).argmax(dim=1).cpu() for xb in x.split(batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def attack_points(
    spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor, correct: Tensor,
    batch_size: int, device: torch.device, seed: int = 0, progress: bool = True,
    bounds: BoundsStats | None = None,
) -> Tensor:
    """Per-example correctness (N,) after ``spec`` attacks the points where ``correct``.

    Points already misclassified stay misclassified and cost nothing; the rest run in
    batches of ``batch_size``. The generator is re-seeded with ``seed`` first, so each
    attack is reproducible on its own, whatever ran before it.
    """
    still = correct.clone()
    index = correct.nonzero().flatten()  # (M,)
    if len(index) == 0:  # nothing to attack: the model never sees an empty batch
        return still
    seed_everything(seed)
    for chunk in tqdm(index.split(batch_size), desc=spec.name, disable=not progress,
                      leave=False):
        xb, yb = x[chunk].to(device), y[chunk].to(device)
        x_adv = spec.fn(model, xb, yb)
        if bounds is not None:
            bounds.update(x_adv, xb)
        with torch.no_grad():
            still[chunk] = (model(x_adv).argmax(dim=1) == yb).cpu()
    return still
