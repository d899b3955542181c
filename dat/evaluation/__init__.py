"""Evaluation users can trust: attack suite, integrity checks, diagnostics, reports.

``report = dat.evaluate(model, (x, y), attacks=["clean", "pgd20", "cw", "aa"])`` runs the
attacks on the points still classified correctly, checks the evaluation itself (eval
mode, BN statistics, projections, eps = 0, large eps, AA vs PGD/CW, logits, gradients)
and returns a report whose ``results`` are accuracies in percent.
"""

from .autoattack import AutoAttackResult, run_autoattack
from .checks import Check, overall_status
from .diagnostics import amplitude_phase_table, fourier_heatmap, swap_spectra
from .loading import load_checkpoint, load_entry_point
from .report import format_markdown, write_report
from .runner import (
    DEFAULT_SWEEP,
    EvaluationError,
    EvaluationInterrupted,
    collect_examples,
    evaluate,
)
from .suite import AttackSpec, make_attack

__all__ = [
    "DEFAULT_SWEEP",
    "AttackSpec",
    "AutoAttackResult",
    "Check",
    "EvaluationError",
    "EvaluationInterrupted",
    "amplitude_phase_table",
    "collect_examples",
    "evaluate",
    "format_markdown",
    "fourier_heatmap",
    "load_checkpoint",
    "load_entry_point",
    "make_attack",
    "overall_status",
    "run_autoattack",
    "swap_spectra",
    "write_report",
]
