"""AutoAttack (standard, L-inf or L2) from the reference implementation, ``pyautoattack``.

torchattacks' ``AutoAttack`` runs 10-iteration APGD/FAB and other target counts, so
the number this toolkit calls "AA" always comes from ``pyautoattack`` (the reference
code on PyPI). pyautoattack 0.2.0 quirks handled here: keyword-only arguments, a device
that defaults to "cpu", ``run_standard_evaluation(x, y, batch_size=...)`` returning
``(x_adv, y_adv)``, and a ``.view`` on gradients that needs contiguous NCHW input.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .suite import BoundsStats

__all__ = ["AutoAttackResult", "autoattack_info", "run_autoattack"]

_LOGGER = "auto-attack"  # the logger pyautoattack reports its own checks to


@dataclass
class AutoAttackResult:
    correct: Tensor  # (N,) bool: still classified correctly after all four attacks
    breakdown: dict[str, float]  # percent robust after each attack, in AA's order
    warnings: list[str] = field(default_factory=list)  # pyautoattack's own check messages
    bounds: BoundsStats | None = None


STANDARD_TARGETS = 9  # target classes of APGD-T and FAB-T in the standard version


def _attacks_for(num_classes: int) -> list[str]:
    """The standard cascade; without APGD-T below 4 classes (its targeted DLR loss divides
    by the 3rd and 4th largest logits, and the reference code would index past the end)."""
    return ["apgd-ce", *(["apgd-t"] if num_classes >= 4 else []), "fab-t", "square"]


_AA_NORMS = {"linf": "Linf", "l2": "L2"}  # dat's names -> pyautoattack's


def autoattack_info(eps: float, seed: int, num_classes: int = 10, norm: str = "linf") -> dict:
    """Implementation, version and settings, for the report. Below 10 classes the targeted
    attacks use every other class as a target (the standard 9 do not exist)."""
    import pyautoattack

    info = {"implementation": "pyautoattack.AutoAttack (reference), version='standard'",
            "version": pyautoattack.__version__, "eps": eps, "norm": _AA_NORMS[norm],
            "seed": seed,
            "attacks": _attacks_for(num_classes)}
    if num_classes <= STANDARD_TARGETS:
        targets = num_classes - 1
        info["target_classes"] = targets
        info["adapted"] = (f"{num_classes} classes: {targets} target class"
                           f"{'es' if targets > 1 else ''} (standard: {STANDARD_TARGETS})"
                           + ("; no APGD-T (needs 4+ classes)" if num_classes < 4 else ""))
    return info


class _Capture(logging.Handler):
    """Collects the warnings pyautoattack logs (randomness, probabilities, zero gradients)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _attack_name(aa, attr: str) -> str:
    if attr == "apgd":
        return f"apgd-{aa.apgd.loss}"
    if attr == "apgd_targeted":
        return "apgd-t"
    if attr == "fab":
        return "fab-t" if aa.fab.targeted else "fab"
    return attr


def _count_flips(aa, model: nn.Module, counts: dict[str, int], bar) -> None:
    """Wrap this instance's attack objects so each perturb call counts the points it flips."""
    for attr in ("apgd", "apgd_targeted", "fab", "square"):
        attack = getattr(aa, attr)
        original = attack.perturb

        def counted(x, y, *args, _attr=attr, _original=original, **kwargs):
            x_adv = _original(x, y, *args, **kwargs)
            with torch.no_grad():
                flipped = int((model(x_adv).argmax(dim=1) != y).sum())
            name = _attack_name(aa, _attr)
            counts[name] = counts.get(name, 0) + flipped
            bar.set_postfix_str(name)
            bar.update(len(x))
            return x_adv

        attack.perturb = counted  # instance attribute: this AutoAttack object only


def _breakdown(counts: dict[str, int], order: list[str], n: int, robust: int) -> dict:
    clean = robust + sum(counts.values())
    out, left = {"clean": 100.0 * clean / n}, clean
    for name in order:
        if name in counts:
            left -= counts[name]
            out[name] = 100.0 * left / n
    return out


def run_autoattack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, batch_size: int,
    device: torch.device, seed: int = 0, progress: bool = True,
    attacked: Tensor | None = None, num_classes: int = 10, norm: str = "linf",
) -> AutoAttackResult:
    """Standard AutoAttack (``norm``: linf or l2) on all of ``x`` (its own clean filter and
    cascade).

    The model must already be in eval mode. Returns per-example correctness, the robust
    accuracy after each sub-attack and the warnings of AutoAttack's own checks.
    ``attacked`` (N,) bool: the points AA attacks (classified correctly); only they count
    in the bounds check (the others come back unchanged). None: every point.
    ``num_classes``: the model's output count; below 10 the cascade is fitted to it as
    :func:`autoattack_info` says (the reference code would crash there).
    """
    from pyautoattack import AutoAttack

    x = x.contiguous(memory_format=torch.contiguous_format)  # (N, C, H, W), NCHW only
    aa = AutoAttack(model, norm=_AA_NORMS[norm], eps=eps, version="standard", device=device,
                    seed=seed)
    if num_classes <= STANDARD_TARGETS:
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = num_classes - 1
        aa.attacks_to_run = _attacks_for(num_classes)
    counts: dict[str, int] = {}
    handler, logger = _Capture(), logging.getLogger(_LOGGER)
    logger.addHandler(handler)
    with tqdm(desc="aa", disable=not progress, leave=False, unit="pt") as bar, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _count_flips(aa, model, counts, bar)
        try:
            x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        finally:
            logger.removeHandler(handler)
    correct = (y_adv.cpu() == y.cpu())
    bounds = BoundsStats(eps, norm)
    keep = slice(None) if attacked is None else attacked.cpu()
    bounds.update(x_adv.cpu()[keep], x.cpu()[keep])
    messages = handler.messages + [str(w.message) for w in caught
                                   if "pyautoattack" in str(w.filename)]
    breakdown = _breakdown(counts, list(aa.attacks_to_run), len(y), int(correct.sum()))
    return AutoAttackResult(correct, breakdown, messages, bounds)
