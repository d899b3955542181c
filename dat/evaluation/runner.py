"""``evaluate``: clean accuracy, the attack suite, AutoAttack, a sweep, checks, a report.

Order, as in AutoAttack: find the clean-correct points, attack only those (in large
batches), combine per-example results into the worst case over all attacks, then
verify the evaluation itself (:mod:`dat.evaluation.checks`) and write the report.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attacks import DEFAULT_EPS, eager_module, eval_mode, frozen_parameters, is_compiled
from ..entry_points import exported_program, exported_program_message
from ..folder_lock import hold_folder
from ..models.dual_bn import bn_branch, has_dual_bn
from . import checks as C
from .autoattack import AutoAttackResult, autoattack_info, run_autoattack
from .examples import collect_examples
from .prepare import (
    FOLD_CHECK_EXAMPLES,
    FastForward,
    channels_last_failure,
    check_compile_mode,
    compile_errors,
    compile_for_attacks,
    fold_for_attacks,
    has_hooks,
    model_device,
    probe,
)
from .progress import AttackCache, fingerprint
from .statistics import per_class_accuracy, wilson_interval
from .suite import (
    BoundsStats,
    EvaluationError,
    attack_points,
    format_eps,
    make_attack,
    sweep_alpha,
    validate_attack_names,
)

__all__ = ["DEFAULT_SWEEP", "EvaluationError", "EvaluationInterrupted", "collect_examples",
           "evaluate"]

DEFAULT_SWEEP = (0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)  # L-inf radii, [0,1] scale
DEFAULT_SWEEP_L2 = (0, 0.125, 0.25, 0.5, 1.0, 2.0)  # L2 radii, [0, 1] pixel scale
SWEEP_STEPS = 20  # the sweep runs PGD-20
LARGE_EPS = 0.5  # L-inf radius at which any working attack reaches chance level
MODEL_CHECK_EXAMPLES = 256  # inputs for the determinism / logits / gradient checks


def _diagonal(image_shape: Sequence[int]) -> float:
    """The L2 distance from a black to a white image of ``image_shape``: sqrt(C*H*W)."""
    return math.sqrt(math.prod(image_shape))


def large_eps(norm: str, image_shape: Sequence[int]) -> float:
    """The radius at which any working attack reaches chance: 0.5 in L-inf, and in L2 the
    length of that step on every pixel, 0.5 * sqrt(C * H * W)."""
    if norm == "linf":
        return LARGE_EPS
    return LARGE_EPS * _diagonal(image_shape)


def _as_radius(value, norm: str, what: str = "eps"):
    """``value`` as a plain number: a one-element real tensor (``torch.tensor(0.5)``)
    becomes its float, as evaluate() took it before the L2 threat model; text, booleans
    and other types are refused in one line."""
    if (torch.is_tensor(value) and value.numel() == 1 and not value.dtype.is_complex
            and value.dtype != torch.bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        example = "0.5" if norm == "l2" else "8 / 255"
        raise EvaluationError(f"{what} must be a number such as {example}, got "
                              f"{type(value).__name__} {value!r:.40}")
    return value


def _check_l2_reach(eps: float, radii: Sequence[float] | None, image_shape) -> None:
    """Refuse L2 radii longer than the diagonal of the image cube, sqrt(C*H*W) (black to
    white): such a ball holds every image, and a radius that large is almost always a
    0-255 value (128 for 128/255 = 0.502)."""
    diagonal = _diagonal(image_shape)
    shape = "x".join(str(int(d)) for d in image_shape)
    for what, r in [("eps", eps), *(("sweep radius", v) for v in radii or ())]:
        if r > diagonal:
            raise EvaluationError(
                f"L2 {what} {r:g} exceeds {diagonal:.4g}, the distance from a black to a "
                f"white {shape} image (every image is inside); L2 radii are on the [0, 1] "
                f"pixel scale: {r:g}/255 is {r / 255:.4g}")


def _validate_args(attacks: Sequence[str], eps: float, batch_size: int, precision: str,
                   n_examples: int | None, compile_mode: str, norm: str) -> None:
    validate_attack_names(list(attacks))
    if norm not in DEFAULT_EPS:
        raise EvaluationError(f"norm={norm!r}: use linf or l2")
    if norm == "l2":
        if not 0 <= eps < float("inf"):  # also NaN
            raise EvaluationError(f"eps={eps:g} must be a finite L2 radius >= 0 ([0, 1] "
                                  "pixels; CIFAR-10's standard is 0.5)")
    elif not 0 <= eps <= 1:
        hint = f"; write {eps:g}/255" if eps > 1 else ""
        raise EvaluationError(f"eps={eps:g} must be in [0, 1] (pixel scale){hint}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size={batch_size} must be >= 1")
    if precision not in ("fp32", "bf16"):
        raise EvaluationError(f"precision={precision!r}; use fp32 or bf16")
    if n_examples is not None and n_examples < 1:
        raise EvaluationError(f"n_examples={n_examples} must be >= 1 (or None for all)")
    check_compile_mode(compile_mode)


def _checked_metadata(metadata: dict | None) -> dict | None:
    """``metadata`` as a plain dict, or a one-line error before anything runs (a value
    JSON cannot hold would otherwise fail only when the report is written)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise EvaluationError(f"metadata is a {type(metadata).__name__}; pass a dict such as "
                              "{'checkpoint': 'runs/x/best.pt'}")
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as err:
        raise EvaluationError(f"metadata must hold JSON values (str, numbers, lists, dicts): "
                              f"{err}") from None


def _pct(mask: Tensor) -> float:
    return 100.0 * float(mask.sum()) / len(mask)


@contextlib.contextmanager
def _gradient_attack(name: str):
    """Turn autograd's error for a model whose output has no input gradient into one line."""
    try:
        yield
    except RuntimeError as err:
        if not C.no_input_gradient(err):
            raise
        raise EvaluationError(
            f"{name}: the model's output has no gradient with respect to its input (a detach, "
            "argmax or integer step in its forward), so gradient attacks cannot run and "
            "robust accuracy would be meaningless; make the forward differentiable, or "
            "evaluate with --attacks clean") from None


class _Run:
    """State of one evaluation: the model, the data and what has been measured so far."""

    def __init__(self, net, x, y, batch_size, device, seed, progress, norm="linf") -> None:
        self.net, self.x, self.y, self.norm = net, x, y, norm
        self.batch_size, self.device, self.seed, self.progress = batch_size, device, seed, progress
        self.cache: AttackCache | None = None  # finished attacks, saved (and reused)
        self.bounds: dict[str, BoundsStats] = {}
        self.info: dict[str, dict] = {}
        self.results: dict[str, float] = {}  # accuracy (%) of each finished attack
        self.masks: dict[str, Tensor] = {}  # per point: still correct after that attack
        self.worst: Tensor | None = None  # per point: correct after every attack run
        self.class_names: list[str] | None = None  # heads the per-class table
        self.compile_mode = "off"  # how the attacked forward was compiled
        self.metadata: dict | None = None  # what was evaluated, as the caller names it
        self.stage = "the clean forward"  # what runs now, for an interrupted report
        with torch.no_grad():
            logits = [net(xb.to(device)).cpu() for xb in x.split(batch_size)]  # (B, K) each
        self.num_classes = int(logits[0].shape[1])
        if int(y.max()) >= self.num_classes:
            raise EvaluationError(
                f"labels reach {int(y.max())} but the model outputs {self.num_classes} "
                f"classes; evaluate it on data with labels 0..{self.num_classes - 1} (or "
                "build the model with as many classes as the dataset has)")
        self.clean = torch.cat(logits).argmax(dim=1) == y  # (N,) bool

    def attack(self, name: str, eps: float, alpha: float | None = None,
               label: str | None = None, subset: int | None = None) -> Tensor:
        label = label or name
        n = len(self.x) if subset is None else min(subset, len(self.x))
        spec = make_attack(name, eps, alpha, self.norm)
        saved = self.cache.get(label, spec.info(), n) if self.cache is not None else None
        if saved is not None:
            self.bounds[label], self.info[label] = saved["bounds"], {**saved["info"],
                                                                     "reused": True}
            return saved["mask"]
        self.bounds[label] = BoundsStats(eps, self.norm)
        start = time.perf_counter()
        with _gradient_attack(label):
            mask = attack_points(spec, self.net, self.x[:n], self.y[:n], self.clean[:n],
                                 self.batch_size, self.device, self.seed, self.progress,
                                 self.bounds[label])
        self.info[label] = {**spec.info(), "batch_size": self.batch_size,
                            "seconds": round(time.perf_counter() - start, 3)}
        if self.cache is not None:
            self.cache.put(label, spec.info(), mask, self.bounds[label], self.info[label])
        return mask

    def autoattack(self, eps: float) -> AutoAttackResult:
        settings = autoattack_info(eps, self.seed, self.num_classes, self.norm)
        saved = (self.cache.get("aa", settings, len(self.x)) if self.cache is not None
                 else None)
        if saved is not None:
            self.bounds["aa"], self.info["aa"] = saved["bounds"], {**saved["info"],
                                                                   "reused": True}
            return AutoAttackResult(saved["mask"], saved["info"]["breakdown"],
                                    saved["extra"].get("warnings", []), saved["bounds"])
        start = time.perf_counter()
        with _gradient_attack("aa"):
            res = run_autoattack(self.net, self.x, self.y, eps, self.batch_size, self.device,
                                 self.seed, self.progress, attacked=self.clean,
                                 num_classes=self.num_classes, norm=self.norm)
        self.bounds["aa"] = res.bounds
        self.info["aa"] = {**settings, "breakdown": res.breakdown, "batch_size": self.batch_size,
                           "seconds": round(time.perf_counter() - start, 3)}
        if self.cache is not None:
            self.cache.put("aa", settings, res.correct, res.bounds, self.info["aa"],
                           extra={"warnings": res.warnings})
        return res


def _run_attacks(run: _Run, attacks: Sequence[str], eps: float):
    """Run ``attacks`` in order; ``run.results`` grows as each one finishes."""
    aa_messages = None
    for name in attacks:
        run.stage = name
        if name == "clean":
            run.masks[name] = run.clean
        elif name == "aa":
            res = run.autoattack(eps)
            run.masks[name], aa_messages = res.correct, res.warnings
        else:
            run.masks[name] = run.attack(name, eps)
        run.results[name] = _pct(run.masks[name])
    _worst_case(run)
    return run.results, aa_messages


def _worst_case(run: _Run) -> None:
    """``worst_case``: a point counts as robust only if every attack run failed on it."""
    adversarial = [m for k, m in run.masks.items() if k != "clean"]
    if adversarial:
        run.worst = run.clean.clone()
        for m in adversarial:
            run.worst &= m
        run.results["worst_case"] = _pct(run.worst)


def _run_sweep(run: _Run, radii: Sequence[float]) -> dict:
    acc = []
    for e in radii:
        run.stage = f"the eps sweep (eps {format_eps(e, run.norm)})"
        mask = run.attack(f"pgd{SWEEP_STEPS}", e, sweep_alpha(e, SWEEP_STEPS, run.norm),
                          label=f"sweep@{format_eps(e, run.norm)}")
        acc.append(_pct(mask))
    rule = "max(2/255, 2.5*eps/steps)" if run.norm == "linf" else "eps/4"
    return {"attack": f"pgd{SWEEP_STEPS}", "alpha_rule": rule, "norm": run.norm,
            "eps": list(radii), "accuracy": acc}


def _attack_checks(run: _Run, sweep: dict | None, check_examples: int) -> list[C.Check]:
    """PGD at eps = 0 reproduces clean accuracy; PGD at a radius that reaches almost any
    image (:func:`large_eps`) reaches chance."""
    if sweep is not None and 0 in sweep["eps"]:
        zero = C.check_eps_zero(_pct(run.clean), sweep["accuracy"][sweep["eps"].index(0)],
                                len(run.clean))
    else:
        at_zero = run.attack(f"pgd{SWEEP_STEPS}", 0.0, label="check@eps=0", subset=check_examples)
        zero = C.check_eps_zero(_pct(run.clean[:len(at_zero)]), _pct(at_zero), len(at_zero))
    radius = large_eps(run.norm, run.x.shape[1:])
    label = f"eps={format_eps(radius, run.norm) if run.norm == 'l2' else LARGE_EPS}"
    big = run.attack(f"pgd{SWEEP_STEPS}", radius, sweep_alpha(radius, SWEEP_STEPS, run.norm),
                     label=f"check@{label}", subset=check_examples)
    said = label if run.norm == "linf" else f"L2 {label} (0.5 on every pixel)"
    return [zero, C.check_large_eps(_pct(big), run.num_classes, len(big), said)]


def _sanity_checks(run: _Run, results: dict, sweep: dict | None, aa_messages,
                   check_examples: int) -> list[C.Check]:
    xs = run.x[:MODEL_CHECK_EXAMPLES].to(run.device)
    ys = run.y[:MODEL_CHECK_EXAMPLES].to(run.device)
    found = [C.check_above_chance(_pct(run.clean), run.num_classes, len(run.clean)),
             C.check_deterministic(run.net, xs), C.check_logits(run.net, xs),
             C.check_zero_gradients(run.net, xs, ys)]
    if found[-1].message == C.NO_INPUT_GRADIENT:
        blind = "the model has no input gradient (zero_gradients): no attack can run"
        found += [C.Check("eps_zero", "skip", blind), C.Check("large_eps", "skip", blind)]
    else:
        found += _attack_checks(run, sweep, check_examples)
    if sweep is not None:
        found.append(C.check_monotone(sweep["eps"], sweep["accuracy"], len(run.y),
                                       run.norm))
    else:
        found.append(C.Check("sweep_monotone", "skip", "no eps sweep was run (sweep=True)"))
    found += [C.check_aa_gap(results, len(run.y)),
              C.check_pgd_cw_gap(results, len(run.y)), C.check_autoattack_warnings(aa_messages)]
    return found


def _spread(run: _Run) -> dict:
    """95% intervals and per-class accuracy of every result, from the per-point masks."""
    masks = dict(run.masks)
    if run.worst is not None:
        masks["worst_case"] = run.worst
    n = len(run.y)
    return {"ci95": {k: list(wilson_interval(int(m.sum()), n)) for k, m in masks.items()},
            "per_class": {k: per_class_accuracy(m, run.y, run.num_classes)
                          for k, m in masks.items()}}


def _summary(run: _Run, eps: float, precision: str, channels_last: bool, fold: dict) -> dict:
    """Settings and per-attack details for the report."""
    return {**_spread(run), "class_names": run.class_names,
            "n": len(run.y), "norm": run.norm, "eps": eps,
            "eps_255": eps * 255 if run.norm == "linf" else None, "num_classes": run.num_classes,
            "precision": precision, "channels_last": channels_last, "fold_bn": fold,
            "compile": run.compile_mode, "seed": run.seed, "metadata": run.metadata,
            "device": str(run.device), "attacks": run.info,
            "reused": list(run.cache.reused) if run.cache is not None else [],
            "bounds": {k: b.to_dict() for k, b in run.bounds.items()}}


def evaluate(
    model: nn.Module, data, attacks: Sequence[str] = ("clean", "pgd20"),
    eps: float | None = None,
    n_examples: int | None = None, batch_size: int = 500, precision: str = "fp32",
    checks: bool = True, progress: bool = True, seed: int = 0, out_dir: str | Path | None = None,
    sweep: bool | Iterable[float] | None = None, diagnostics: str | bool | None = None,
    heatmap: bool = False, heatmap_norm: float = 4.0, heatmap_examples: int = 256,
    check_examples: int = 500, tensorboard: bool = False, channels_last: bool | None = None,
    fold_bn: bool | None = None, resume: bool | str = False,
    class_names: Sequence[str] | None = None, compile_mode: str = "off",
    metadata: dict | None = None, norm: str = "linf",
) -> dict:
    """Evaluate ``model`` (a module mapping [0, 1] images to logits) against ``attacks``.

    ``data``: an iterable of (x, y) / dat ``Batch`` or a tuple (x, y), x in [0, 1].
    ``attacks``: any of clean, fgsm, pgd20, pgd100, pgd<N>, cw, aa, at radius ``eps``.
    ``norm``: the threat model, linf (default; ``eps`` 8/255 unless given) or l2 (``eps``
    0.5 unless given; fgsm is then the fast gradient method, pgd<N> and cw take eps/4
    steps, aa is AutoAttack's L2 version).
    ``sweep``: True for PGD-20 at eps 0, 1, 2, 4, 8, 16 /255 (L2: 0, 0.125, 0.25, 0.5, 1,
    2), or a list of radii.
    ``diagnostics``: an attack name (True = pgd20) for the amplitude/phase table;
    ``heatmap``: the Fourier heat map. Returns the report; ``report["results"][name]`` is
    accuracy in percent. Dual-BN models are evaluated on their main branch, in eval mode.
    ``channels_last``: feed the model channels_last images (None: on for CPU and CUDA,
    where it is measured faster, except for models whose channels_last CPU backward
    crashes torch, :func:`dat.build.cpu_channels_last_crashes`; off elsewhere). Attacks
    always run on NCHW tensors.
    ``fold_bn``: attack a copy with each eval-mode BN folded into the convolution before
    it (:func:`dat.models.folding.fold_batchnorm`; None: on for CPU and CUDA, where it is
    measured faster on most models, BENCHMARKS.md). The copy must match the model's logits on the
    first examples, else the model is attacked as given; ``report["fold_bn"]`` says which
    ran and why.
    Ctrl-C during the attacks raises :class:`EvaluationInterrupted`, whose ``report`` holds
    the attacks that finished (also written to ``out_dir``).
    With ``out_dir``, each finished attack is saved at once to ``out_dir/progress.json``;
    ``resume=True`` reuses those that ran on the same weights, examples and settings
    (:mod:`dat.evaluation.progress`) and runs only the rest; a file of another evaluation is
    an error (``"auto"``: it is ignored instead).
    ``class_names`` label the per-class accuracy (``report["per_class"]``).
    ``compile_mode``: run the attacked forward (folded, wrapped) under ``torch.compile``:
    off, default or max-autotune-no-cudagraphs; its parameters are frozen meanwhile.
    ``metadata``: what was evaluated (checkpoint, weights, data...), JSON values, copied
    into ``report["metadata"]`` and the Markdown page; evaluate.py fills it in.
    """
    attacks = list(attacks)
    norm = norm.lower() if isinstance(norm, str) else norm  # "L2", "Linf" as papers write them
    eps = DEFAULT_EPS.get(norm, 0.0) if eps is None else _as_radius(eps, norm)
    _validate_args(attacks, eps, batch_size, precision, n_examples, compile_mode, norm)
    metadata = _checked_metadata(metadata)
    if compile_mode != "off" and is_compiled(model):
        raise EvaluationError("the model is already compiled; evaluate it with "
                              "compile_mode='off' (--compile off), or pass the plain model")
    if exported_program(model):  # its eval() raises NotImplementedError
        raise EvaluationError(exported_program_message("the model is"))
    default_radii = DEFAULT_SWEEP if norm == "linf" else DEFAULT_SWEEP_L2
    radii = list(default_radii) if sweep is True else (list(sweep) if sweep else None)
    radii = [_as_radius(r, norm, "a sweep radius") for r in radii] if radii else radii
    if radii and norm == "linf" and not all(0 <= r <= 1 for r in radii):  # also NaN
        raise EvaluationError(f"sweep radii {radii} must lie in [0, 1] (pixel scale), e.g. "
                              "[0, 2/255, 8/255]")
    if radii and norm == "l2" and not all(0 <= r < float("inf") for r in radii):
        raise EvaluationError(f"sweep radii {radii} must be finite L2 radii >= 0, e.g. "
                              "[0, 0.25, 0.5, 1]")
    if heatmap and heatmap_examples < 1:
        raise EvaluationError(f"heatmap_examples={heatmap_examples} must be >= 1")
    if heatmap and not 0 < heatmap_norm < float("inf"):  # also NaN
        raise EvaluationError(f"heatmap_norm={heatmap_norm} must be a finite L2 norm > 0 "
                              "(per channel, [0, 1] pixels; e.g. 4.0)")
    if diagnostics not in (None, False, True):  # refused now, not after every attack ran
        validate_attack_names([diagnostics])
        if diagnostics in ("clean", "aa"):
            raise EvaluationError(f"diagnostics need a per-batch attack (fgsm, pgd20, cw, ...), "
                                  f"not {diagnostics!r}")
    if resume is True and out_dir is None:
        raise EvaluationError("resume=True needs out_dir, the folder whose progress.json holds "
                              "the finished attacks")
    # one evaluation at a time per folder: a second would overwrite progress.json
    held = (hold_folder(out_dir, "wait for it to finish, or pass another out_dir (--out)")
            if out_dir is not None else contextlib.nullcontext())
    with held:
        x, y = collect_examples(data, n_examples)
        if norm == "l2":
            _check_l2_reach(eps, radii, x.shape[1:])
        device = model_device(model)
        chosen_layout = channels_last is not None
        measured = device.type in ("cpu", "cuda")  # where both are timed faster
        if channels_last is None:  # except where torch's CPU backward crashes
            from ..build import cpu_channels_last_crashes

            channels_last = measured and not (device.type == "cpu"
                                              and cpu_channels_last_crashes(model))
        channels_last = bool(channels_last)
        fold_bn = measured if fold_bn is None else bool(fold_bn)
        given_training, before, monitor = model.training, C.buffers_snapshot(model), C.ModeMonitor()
        hooked = has_hooks(model)  # before the monitor adds its own
        branch = bn_branch(model, "main") if has_dual_bn(model) else contextlib.nullcontext()
        start = time.perf_counter()
        # A compiled model's parameters are frozen throughout, as dat's own attacks freeze
        # them: torchattacks, AutoAttack, dat's CW and the gradient check then share one
        # graph, whose backward computes no weight gradients.
        frozen = frozen_parameters(model) if is_compiled(model) else contextlib.nullcontext()
        with eval_mode(model), branch, frozen, contextlib.ExitStack() as stack:
            with monitor.watch(model):
                probe(eager_module(model), x[:2].to(device))  # compiled: no graph for it
            # unwatched: a folded copy made while the monitor's hooks are on would keep them
            target, fold = fold_for_attacks(model, fold_bn, x[:FOLD_CHECK_EXAMPLES].to(device),
                                            hooked)
            failure = (channels_last_failure(eager_module(target), x[:2].to(device))
                       if channels_last else None)
            if failure and chosen_layout:
                raise EvaluationError(
                    f"the model fails on channels_last images ({failure}); evaluate it with "
                    "channels_last=False (--channels-last off)")
            channels_last = channels_last and failure is None  # auto: NCHW for this model
            # built inside eval_mode: a wrapper left in train mode would make torchattacks
            # "restore" train mode on the whole model after its first attack
            fast = precision == "bf16" or channels_last
            net = (FastForward(target, precision == "bf16", channels_last).eval() if fast
                   else target)
            if compile_mode != "off":
                stack.enter_context(frozen_parameters(target))
                net = compile_for_attacks(net, compile_mode)
            # watched through net, whose modules are the attacked ones (model's own, or
            # the folded copy's): a monitor hook inside compiled code would recompile it
            # at every call
            stack.enter_context(monitor.watch(net))
            stack.enter_context(compile_errors(compile_mode))
            run = _Run(net, x, y, batch_size, device, seed, progress, norm)
            run.compile_mode, run.metadata = compile_mode, metadata
            if class_names is not None:
                if len(class_names) != run.num_classes:
                    raise EvaluationError(
                        f"{len(class_names)} class_names for a model with {run.num_classes} "
                        "outputs; pass one name per output (or none)")
                run.class_names = [str(c) for c in class_names]
            if out_dir is not None:
                run.cache = AttackCache(out_dir, fingerprint(
                    model, x, y, run.clean, seed=seed, precision=precision,
                    device=device.type, channels_last=channels_last, fold_bn=fold["folded"],
                    **({"compile": compile_mode} if compile_mode != "off" else {}),
                    **({"norm": norm} if norm != "linf" else {})), resume)
            try:
                results, aa_messages = _run_attacks(run, attacks, eps)
                swept = _run_sweep(run, radii) if radii else None
                run.stage = "the integrity checks"
                found = (_sanity_checks(run, results, swept, aa_messages, check_examples)
                         if checks else [])
                run.stage = "the diagnostics"
                diag = _diagnostics(run, eps, diagnostics, heatmap, heatmap_norm,
                                    heatmap_examples)
            except KeyboardInterrupt:
                raise EvaluationInterrupted(_interrupted_report(
                    run, eps, precision, channels_last, fold, start, out_dir,
                    tensorboard)) from None
        if checks:
            found = [C.check_eval_mode(given_training, monitor),
                     C.check_bn_statistics(before, C.buffers_snapshot(model)),
                     C.check_bounds(run.bounds)] + found
        report = {"results": results, **_summary(run, eps, precision, channels_last, fold),
                  "sweep": swept,
                  "checks": {c.name: c.to_dict() for c in found},
                  "checks_status": C.overall_status(found) if checks else "skip",
                  **diag, "seconds": round(time.perf_counter() - start, 3)}
        if out_dir is not None:
            from .report import write_report

            report["files"] = write_report(report, out_dir, tensorboard=tensorboard)
        return report


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during an evaluation's attacks. ``report`` holds the attacks that finished
    (``report["interrupted"]`` says where it stopped; no integrity check ran); with
    ``out_dir`` it is written there too."""

    def __init__(self, report: dict) -> None:
        super().__init__(report["interrupted"])
        self.report = report


def _interrupted_report(run: _Run, eps: float, precision: str, channels_last: bool,
                        fold: dict, start: float, out_dir, tensorboard: bool) -> dict:
    """The report of the attacks that finished before a Ctrl-C, written to ``out_dir``."""
    if "worst_case" not in run.results:  # over the attacks that finished
        _worst_case(run)
    report = {"results": dict(run.results),
              **_summary(run, eps, precision, channels_last, fold), "sweep": None,
              "checks": {}, "checks_status": "skip",
              "interrupted": f"interrupted during {run.stage}; the results are the attacks "
                             "that finished, and no integrity check ran",
              "seconds": round(time.perf_counter() - start, 3)}
    if out_dir is not None and run.results:
        from .report import write_report

        report["files"] = write_report(report, out_dir, tensorboard=tensorboard)
    return report


def _diagnostics(run: _Run, eps: float, attack, heatmap: bool, norm: float,
                 examples: int) -> dict:
    out = {}
    if attack:
        from .diagnostics import amplitude_phase_table

        name = "pgd20" if attack is True else attack
        out["amplitude_phase"] = amplitude_phase_table(
            run.net, run.x, run.y, attack=name, eps=eps, batch_size=run.batch_size,
            device=run.device, seed=run.seed, progress=run.progress, norm=run.norm)
    if heatmap:
        from .diagnostics import fourier_heatmap

        err = fourier_heatmap(run.net, run.x[:examples], run.y[:examples], norm=norm,
                              batch_size=run.batch_size, device=run.device, seed=run.seed,
                              progress=run.progress)
        out["fourier_heatmap"] = {"norm": norm, "examples": min(examples, len(run.x)),
                                  "error_rate": err.tolist()}
    return out
