"""Is model A really more robust than model B? A paired comparison of two evaluations.

Two evaluations of the same examples (``evaluate.py --out A`` and ``--out B`` on the same
data, split and ``--n-examples``) keep which points each attack broke, in
``progress.json``. On the same points the accuracies are paired, and McNemar's exact test
on the points where exactly one model is right says whether the gap can be chance: far
tighter than comparing two unpaired intervals.

    python -m dat.evaluation.compare RUN_A/test RUN_B/test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from torch import Tensor

from .progress import PROGRESS_FILE, unpack_mask
from .statistics import Z95
from .suite import EvaluationError

__all__ = ["compare", "compare_main", "format_comparison", "mcnemar_exact", "paired_interval"]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference", each of the ``only_a +
    only_b`` discordant points is equally likely to favour either model. Exact integer
    arithmetic, each binomial coefficient from the previous one."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def paired_interval(only_a: int, only_b: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% interval (percentage points) of accuracy(A) - accuracy(B) on ``n`` paired points:
    the adjusted Wald interval of Bonett and Price (2012), one pseudo-point added to each
    discordant cell. The plain Wald interval is too narrow with few discordant points (it
    is [0, 0] when there are none)."""
    p12, p21 = (only_a + 1) / (n + 2), (only_b + 1) / (n + 2)
    diff = p12 - p21
    half = z * math.sqrt(max(p12 + p21 - diff * diff, 0.0) / (n + 2))
    return (100.0 * max(diff - half, -1.0), 100.0 * min(diff + half, 1.0))


def _load(folder: str | Path) -> dict:
    path = Path(folder) / PROGRESS_FILE
    if Path(folder).is_file() and Path(folder).name == PROGRESS_FILE:
        path = Path(folder)
    try:
        saved = json.loads(path.read_text())
        _ = saved["fingerprint"]["examples"], saved["attacks"]  # both must be there
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvaluationError(f"{path} cannot be read ({type(err).__name__}); pass an "
                              "evaluation folder (evaluate.py --out, or RUN/test)") from None
    return saved


def _masks(saved: dict, n: int) -> dict[str, Tensor]:
    """Per-point correctness of clean and of every attack at the evaluation's radius."""
    masks = {"clean": unpack_mask(saved["fingerprint"]["clean_predictions"], n)}
    for label, entry in saved["attacks"].items():
        if "@" not in label and entry["n"] == n:  # not a sweep radius or a check
            masks[label] = unpack_mask(entry["mask"], n)
    return masks


def _row(name: str, a: Tensor, b: Tensor) -> dict:
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return {"attack": name, "a": 100.0 * int(a.sum()) / n, "b": 100.0 * int(b.sum()) / n,
            "difference": 100.0 * (only_a - only_b) / n,
            "ci95": list(paired_interval(only_a, only_b, n)),
            "only_a": only_a, "only_b": only_b, "p_value": mcnemar_exact(only_a, only_b)}


# evaluation settings besides the attacks' own; a difference in them is part of A - B
_SETTINGS = ("precision", "seed", "device", "channels_last", "fold_bn", "compile", "norm")
# what a fingerprint without the key means: it is stored only when not the default
_UNSTORED = {"compile": "off", "norm": "linf"}


def compare(folder_a: str | Path, folder_b: str | Path) -> dict:
    """Paired comparison of two evaluations of the same examples, per attack both ran
    with the same settings, plus ``worst_case`` over those attacks."""
    a, b = _load(folder_a), _load(folder_b)
    if a["fingerprint"]["examples"] != b["fingerprint"]["examples"]:
        raise EvaluationError("the two evaluations used other examples; evaluate both on the "
                              "same data, --split and --n-examples")
    if a["fingerprint"] == b["fingerprint"]:  # deterministic: the numbers can only agree
        raise EvaluationError(
            "both folders evaluate the same model on the same examples with the same "
            "evaluation settings (any difference lies in the attacks' own, such as eps, which "
            "pairs no attack); pass the evaluations of two models")
    n = _count(a)
    masks_a, masks_b = _masks(a, n), _masks(b, n)
    common, skipped = [], []
    for k in list(masks_a) + [k for k in masks_b if k not in masks_a]:
        if k not in masks_b or k not in masks_a:
            skipped.append(f"{k} (only in {'A' if k in masks_a else 'B'})")
        elif k != "clean" and a["attacks"][k]["settings"] != b["attacks"][k]["settings"]:
            sa, sb = a["attacks"][k]["settings"], b["attacks"][k]["settings"]
            keys = sorted(key for key in set(sa) | set(sb) if sa.get(key) != sb.get(key))
            skipped.append(f"{k} (other {', '.join(keys)})")
        else:
            common.append(k)
    rows = [_row(k, masks_a[k], masks_b[k]) for k in common]
    attacks = [k for k in common if k != "clean"]
    if len(attacks) > 1:
        worst_a, worst_b = masks_a["clean"].clone(), masks_b["clean"].clone()
        for k in attacks:
            worst_a &= masks_a[k]
            worst_b &= masks_b[k]
        rows.append(_row(f"worst_case ({', '.join(attacks)})", worst_a, worst_b))
    said_a, said_b = ({k: f["fingerprint"].get(k, _UNSTORED.get(k)) for k in _SETTINGS}
                      for f in (a, b))
    differ = {k: [said_a[k], said_b[k]] for k in _SETTINGS if said_a[k] != said_b[k]}
    return {"n": n, "a": str(folder_a), "b": str(folder_b), "rows": rows,
            "not_compared": skipped, "settings_differ": differ}


def _count(saved: dict) -> int:
    """The number of examples (the packed clean bits are padded to a multiple of 8)."""
    if "n" in saved["fingerprint"]:
        return int(saved["fingerprint"]["n"])
    full = [e["n"] for label, e in saved["attacks"].items() if "@" not in label]
    if not full:  # a file written before the fingerprint held n, with checks only
        raise EvaluationError("this progress.json does not say how many examples it holds; "
                              "evaluate again to compare")
    return max(full)


def format_comparison(result: dict) -> str:
    """A Markdown table: accuracies, paired difference with its 95% interval, p-value."""
    lines = [f"A: {result['a']}", f"B: {result['b']}", f"{result['n']} paired examples", "",
             "| attack | A (%) | B (%) | A - B (points) | 95% interval | only A / only B "
             "right | McNemar p |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        low, high = r["ci95"]
        lines.append(f"| {r['attack']} | {r['a']:.2f} | {r['b']:.2f} | {r['difference']:+.2f} "
                     f"| {low:+.2f} to {high:+.2f} | {r['only_a']} / {r['only_b']} "
                     f"| {r['p_value']:.3g} |")
    if result["not_compared"]:
        lines += ["", "Not compared: " + ", ".join(result["not_compared"])]
    if result.get("settings_differ"):
        said = ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in result["settings_differ"].items())
        lines += ["", f"Note: the evaluations also differ in {said}; the differences above "
                      "include that."]
    return "\n".join(lines) + "\n"


def compare_main(argv: list[str] | None = None) -> int:
    """``python -m dat.evaluation.compare A B``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m dat.evaluation.compare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("a", help="evaluation folder of model A (holds progress.json)")
    parser.add_argument("b", help="evaluation folder of model B")
    parser.add_argument("--json", help="also write the comparison to this file")
    args = parser.parse_args(argv)
    try:
        result = compare(args.a, args.b)
    except (EvaluationError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_comparison(result), end="")  # shown even if the JSON cannot be written
    if args.json:
        from ..checkpoint import atomic_write_text

        try:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")  # makes folders
        except OSError as err:
            print(f"error: cannot write --json {args.json} ({err.strerror or err}); pass a "
                  "writable path", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
