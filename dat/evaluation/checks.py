"""Integrity checks: each returns pass / warn / fail (or skip) and one line of explanation.

In the spirit of AutoAttack's ``checks.py``: an evaluation is only as good as the
assumptions behind it (eval mode, untouched BN statistics, projections that hold,
logits that are deterministic logits with useful gradients), so every evaluation
verifies them and writes the verdicts into its report.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .suite import BoundsStats, format_eps

__all__ = [
    "Check",
    "ModeMonitor",
    "buffers_snapshot",
    "check_aa_gap",
    "check_above_chance",
    "check_autoattack_warnings",
    "check_bn_statistics",
    "check_bounds",
    "check_deterministic",
    "check_eps_zero",
    "check_eval_mode",
    "check_large_eps",
    "check_logits",
    "check_monotone",
    "check_pgd_cw_gap",
    "check_zero_gradients",
    "no_input_gradient",
    "overall_status",
]

STATUSES = ("skip", "pass", "warn", "fail")  # in order of severity
AA_SLACK = 0.3  # points: AA may exceed min(PGD-100, CW) by at most this much
AA_BELOW = 5.0  # points: AA below the strongest of FGSM/PGD/CW by more hints at masking
CW_GAP = 3.0  # points: PGD-20 above CW by more than this hints at gradient masking


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    message: str  # one line: what was found and why it matters

    def to_dict(self) -> dict:
        return asdict(self)


def overall_status(checks: list[Check]) -> str:
    """The most severe status among ``checks`` ("pass" when there are none)."""
    return max((c.status for c in checks), key=STATUSES.index, default="pass")


@dataclass
class ModeMonitor:
    """Records, on every module's forward, whether that module was in training mode
    (compiled and scripted modules: their flags, read from outside their code)."""

    forwards: int = 0
    training_forwards: int = 0

    def _read(self, modules: list[nn.Module]) -> None:
        """Count ``modules``' train/eval flags as one forward each."""
        self.forwards += len(modules)
        self.training_forwards += sum(m.training for m in modules)

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[ModeMonitor]:
        """Count the forwards of ``model``'s modules inside the block (nestable)."""
        def hook(module: nn.Module, _inputs) -> None:
            self._read([module])

        # No hook goes inside compiled or scripted code: TorchScript takes none, and
        # torch.compile traces a hook, guards on its counter and recompiles at every call
        # (then gives up at its recompile limit). A torch.compile wrapper's own hook runs
        # outside the compiled code, so it reads its inner modules' flags at each call;
        # modules compiled in place (module.compile()) and scripted ones are read at the
        # start and end of the block (their code cannot change the flags).
        dynamo = sys.modules.get("torch._dynamo.eval_frame")
        wrapper = dynamo.OptimizedModule if dynamo is not None else ()
        inside: set[int] = set()
        opaque: list[nn.Module] = []
        handles = []
        for m in model.modules():  # parents before their children
            if id(m) in inside:
                continue
            if isinstance(m, wrapper):
                inner = list(m._orig_mod.modules())
                inside.update(map(id, inner))
                handles.append(m.register_forward_pre_hook(
                    lambda _module, _inputs, inner=inner: self._read(inner)))
            elif (isinstance(m, torch.jit.ScriptModule)
                  or getattr(m, "_compiled_call_impl", None) is not None):
                inner = list(m.modules())
                inside.update(map(id, inner))
                opaque += inner
            else:
                handles.append(m.register_forward_pre_hook(hook))
        self._read(opaque)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._read(opaque)


def check_eval_mode(given_training: bool, monitor: ModeMonitor) -> Check:
    """Fail if any module ran in train mode during the evaluation; warn if handed in so."""
    if monitor.training_forwards:
        return Check("eval_mode", "fail",
                     f"{monitor.training_forwards} of {monitor.forwards} module forwards "
                     "ran in train mode during attacks; attacks must see the eval-mode model")
    if given_training:
        return Check("eval_mode", "warn",
                     "the model was handed over in train mode; it was evaluated in eval mode "
                     "and its flags restored; call model.eval() before evaluating yourself")
    return Check("eval_mode", "pass",
                 f"all {monitor.forwards} module forwards ran in eval mode")


def buffers_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every buffer (BN running statistics and counters)."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().flatten().view(torch.uint8)


def check_bn_statistics(before: dict[str, Tensor], after: dict[str, Tensor]) -> Check:
    """Fail unless every buffer is bit-identical before and after the evaluation."""
    changed = [k for k in before if k not in after or not torch.equal(_bits(before[k]),
                                                                      _bits(after[k]))]
    if changed:
        return Check("bn_statistics", "fail",
                     f"{len(changed)} buffers changed during evaluation (e.g. {changed[0]}); "
                     "BN statistics were updated by attack forwards")
    return Check("bn_statistics", "pass", f"all {len(before)} buffers bit-identical after")


def check_bounds(stats: dict[str, BoundsStats]) -> Check:
    """Fail if any adversarial example left its eps-ball or [0, 1], or holds NaN/inf."""
    bad = {k: s for k, s in stats.items() if s.outside or s.nonfinite}
    if bad:
        name, s = next(iter(bad.items()))
        return Check("bounds", "fail",
                     f"{name}: {s.outside} examples outside the eps-ball/[0,1] and "
                     f"{s.nonfinite} non-finite (max perturbation {s.max_perturbation:.5f}, "
                     f"eps {s.eps:.5f}); the attack's projection is broken")
    if not stats:
        return Check("bounds", "skip", "no adversarial examples were generated")
    excess = max(s.max_perturbation - s.eps for s in stats.values())
    total = sum(s.count for s in stats.values())
    return Check("bounds", "pass",
                 f"{total} adversarial examples inside their eps-ball and [0,1], no NaN "
                 f"(max perturbation - eps = {excess:.1e})")


def check_eps_zero(clean: float, at_zero: float, n: int) -> Check:
    """Accuracy under an eps = 0 attack must equal clean accuracy exactly (on the same
    ``n`` examples, which may be the first part of the evaluation set)."""
    if at_zero != clean:
        return Check("eps_zero", "fail",
                     f"accuracy at eps=0 is {at_zero:.2f}% but clean is {clean:.2f}% on the "
                     f"first {n} examples; predictions differ between the clean and attack "
                     "paths")
    return Check("eps_zero", "pass",
                 f"eps=0 accuracy equals clean accuracy on the first {n} examples "
                 f"({clean:.2f}%)")


def check_above_chance(clean: float, num_classes: int, n: int) -> Check:
    """Warn when clean accuracy is not clearly (3 standard errors) above chance: a trained
    model that scores at chance usually expects other inputs (normalised images, another
    class order), and its robust accuracy would mean nothing."""
    chance = 100.0 / num_classes
    margin = 300.0 * ((1 / num_classes) * (1 - 1 / num_classes) / max(n, 1)) ** 0.5
    if clean <= chance + margin:
        return Check("above_chance", "warn",
                     f"clean accuracy {clean:.2f}% is within {margin:.1f} points of chance "
                     f"({chance:.2f}%, {n} examples): if the model is trained, it may expect "
                     "normalised inputs (dat feeds [0, 1] images: normalise inside the "
                     "model) or another class order")
    return Check("above_chance", "pass",
                 f"clean accuracy {clean:.2f}% is above chance ({chance:.2f}%)")


def check_monotone(eps: list[float], acc: list[float], n: int, norm: str = "linf") -> Check:
    """Accuracy must not rise with eps; a rise of a couple of points' noise only warns.
    ``norm`` (linf or l2) says how the radius is written: ``8/255`` or ``0.5``."""
    rises = [(eps[i + 1], acc[i + 1] - acc[i]) for i in range(len(acc) - 1)
             if acc[i + 1] > acc[i]]
    if not rises:
        return Check("sweep_monotone", "pass", "accuracy non-increasing over the eps sweep")
    at, rise = max(rises, key=lambda r: r[1])
    noise = max(0.5, 200.0 / max(n, 1))  # points: two examples, or half a point
    status = "warn" if rise <= noise else "fail"
    return Check("sweep_monotone", status,
                 f"accuracy rises by {rise:.2f} points at eps={format_eps(at, norm)}; a larger "
                 "ball should never help the model (attack failing or gradient masking)")


def check_large_eps(acc: float, num_classes: int, n: int, radius: str = "eps=0.5") -> Check:
    """At eps = 0.5 (L-inf; ``radius`` names the one attacked, in L2 the same step on every
    pixel) almost any image is reachable: accuracy must be at or below chance, up to two
    examples' worth of the ``n`` attacked (with 200 classes one survivor of 100 is twice
    chance, and says nothing about the attack)."""
    chance = 100.0 / num_classes
    slack = 200.0 / max(n, 1)
    if acc > chance + slack:
        return Check("large_eps", "fail",
                     f"PGD at {radius} leaves {acc:.2f}% accuracy, above chance {chance:.2f}% "
                     f"+ {slack:.2g} (two of {n} examples); the attack cannot find "
                     "adversarial examples (masked gradients?)")
    return Check("large_eps", "pass", f"PGD at {radius} gives {acc:.2f}% <= chance "
                                      f"{chance:.2f}% + {slack:.2g} (two of {n} examples)")


def check_aa_gap(results: dict[str, float], n: int) -> Check:
    """AA must be at most min(PGD-100, CW) + 0.3 points (two examples' worth on small n:
    AA is not stronger than CW on every single example). A warning when AA lies more
    than 5 points (or two examples' worth) below the strongest PGD / CW run: in the
    paper DAT's PGD-20 exceeds its AA by 6.2 points and PGD-AT's by 3.7, and a sound
    margin-loss CW closes most of such a gap."""
    gradient = {k: v for k, v in results.items()  # multi-step: one FGSM step is weaker
                if k == "cw" or (k.startswith("pgd") and k[3:].isdigit())}
    if "aa" not in results or not gradient:
        return Check("aa_vs_pgd", "skip", "needs aa together with pgd<N> or cw")
    aa, said = results["aa"], []
    others = {k: results[k] for k in ("pgd100", "cw") if k in results}
    if others:
        bound, slack = min(others.values()), max(AA_SLACK, 200.0 / max(n, 1))
        if aa > bound + slack:
            return Check("aa_vs_pgd", "fail",
                         f"AA {aa:.2f}% exceeds min({', '.join(others)}) {bound:.2f}% by more "
                         f"than {slack:.2g} points; the AA run is unreliable")
        said.append(f"AA {aa:.2f}% <= min({', '.join(others)}) + {slack:.2g}")
    best = min(gradient, key=gradient.get)
    below, limit = gradient[best] - aa, max(AA_BELOW, 200.0 / max(n, 1))
    if below > limit:
        return Check("aa_vs_pgd", "warn",
                     f"AA {aa:.2f}% is {below:.2f} points below the strongest gradient attack "
                     f"({best} {gradient[best]:.2f}%; > {limit:.2g}): its gradients look "
                     "masked, so PGD/CW overstate robustness; report AA")
    said.append(f"AA {below:.2f} points below {best} (<= {limit:.2g})")
    return Check("aa_vs_pgd", "pass", "; ".join(said))


def check_pgd_cw_gap(results: dict[str, float], n: int) -> Check:
    """Warn when the strongest PGD run (pgd20, pgd100, any pgd<N>) beats CW by more than 3
    points, or two examples' worth on small n (label-smoothing masking signature)."""
    pgd = {k: v for k, v in results.items() if re.fullmatch(r"pgd[1-9]\d*", k)}
    if not pgd or "cw" not in results:
        return Check("pgd_vs_cw", "skip", "needs a PGD run (pgd20, pgd<N>) and cw")
    name = min(pgd, key=pgd.get)  # the strongest: any PGD near CW clears the signature
    label = f"PGD-{name[3:]}"
    gap, limit = pgd[name] - results["cw"], max(CW_GAP, 200.0 / max(n, 1))
    if gap > limit:
        return Check("pgd_vs_cw", "warn",
                     f"{label} exceeds CW by {gap:.2f} points (> {limit:.2g}): cross-entropy "
                     "attacks look masked (label smoothing?); trust CW and AA")
    return Check("pgd_vs_cw", "pass", f"{label} - CW = {gap:.2f} points (<= {limit:.2g})")


@torch.no_grad()
def check_deterministic(model: nn.Module, x: Tensor, repeats: int = 3) -> Check:
    """Fail when the same input gives different logits (a randomised defence)."""
    outs = [model(x).float() for _ in range(repeats)]
    outs = [o / (o.norm(dim=1, keepdim=True) + 1e-10) for o in outs]
    diff = max(float((o - outs[0]).norm(dim=1).max()) for o in outs[1:])
    if diff > 1e-4:
        return Check("deterministic", "fail",
                     f"logits change between identical forwards (max normalised diff "
                     f"{diff:.2e}); randomised models need EOT attacks (AA version='rand')")
    return Check("deterministic", "pass", f"logits repeat exactly enough (diff {diff:.1e})")


@torch.no_grad()
def check_logits(model: nn.Module, x: Tensor) -> Check:
    """Fail when the model outputs probabilities (in [0, 1], rows summing to 1)."""
    out = model(x).float()
    tol = 1e-2  # bf16 softmax rows sum to 1 only within ~2e-3; real logits are never this
    if out.min() > -tol and out.max() < 1 + tol and ((out.sum(1) - 1).abs() < tol).all():
        return Check("logits", "fail",
                     "the outputs look like probabilities (rows in [0,1] summing to 1); "
                     "remove the final softmax: attacks need logits")
    return Check("logits", "pass", f"outputs are logits ({out.shape[1]} classes)")


NO_INPUT_GRADIENT = ("the loss has no gradient with respect to the input at all (a detach, "
                     "argmax or integer step in the forward): gradient attacks are blind")


def no_input_gradient(err: RuntimeError) -> bool:
    """Whether autograd raised ``err`` because the output does not depend on the input."""
    return any(sign in str(err) for sign in ("does not require grad", "does not have a grad_fn",
                                             "not have been used in the graph"))


def check_zero_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Check:
    """Warn when some inputs get an exactly zero loss gradient; fail when most do."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), y, reduction="sum")
    try:
        (grad,) = torch.autograd.grad(loss, x)
    except RuntimeError as err:
        if not no_input_gradient(err):
            raise
        return Check("zero_gradients", "fail", NO_INPUT_GRADIENT)
    zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
    if zero == 0:
        return Check("zero_gradients", "pass", f"all {len(x)} inputs have non-zero gradients")
    status = "fail" if 2 * zero > len(x) else "warn"
    return Check("zero_gradients", status,
                 f"{zero} of {len(x)} inputs have exactly zero input gradient; gradient "
                 "attacks cannot move them (masked or saturated gradients)")


def check_autoattack_warnings(messages: list[str] | None) -> Check:
    """AutoAttack's own checks, as logged by pyautoattack while it ran."""
    if messages is None:
        return Check("autoattack_checks", "skip", "AutoAttack was not run")
    if messages:
        return Check("autoattack_checks", "warn",
                     f"pyautoattack reported: {messages[0]}" + (
                         f" (+{len(messages) - 1} more)" if len(messages) > 1 else ""))
    return Check("autoattack_checks", "pass", "pyautoattack's own checks raised nothing")
