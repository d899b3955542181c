"""Reports a person reads: report.json, report.md, PNG plots, optional TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

from .suite import format_eps

__all__ = ["format_markdown", "heatmap_extent", "log_tensorboard", "threat_model_text",
           "write_report"]

_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def _norm(report: dict) -> str:
    return report.get("norm", "linf")  # reports written before the L2 threat model


def threat_model_text(report: dict) -> str:
    """``L-inf eps = 8/255`` or ``L2 eps = 0.5``: the threat model a report measured."""
    if _norm(report) == "l2":
        return f"L2 eps = {format_eps(report['eps'], 'l2')}"
    return f"L-inf eps = {format_eps(report['eps'])}"


def _results_table(report: dict) -> list[str]:
    lines = ["| attack | accuracy (%) | 95% interval | implementation | settings |",
             "|---|---:|---:|---|---|"]
    for name, acc in report["results"].items():
        low, high = report.get("ci95", {}).get(name, (None, None))
        interval = f"{low:.1f} - {high:.1f}" if low is not None else "-"
        info = report["attacks"].get(name, {})
        impl = f"{info['implementation']} {info['version']}" if info else "-"
        keys = ("norm", "steps", "alpha", "loss")
        settings = ", ".join(
            f"{k}={format_eps(info[k], info.get('norm', 'linf'))}" if k == "alpha"
            else f"{k}={info[k]}" for k in keys if k in info)
        if "adapted" in info:
            settings = ", ".join(filter(None, (settings, info["adapted"])))
        if name == "worst_case":
            impl, settings = "per example: any attack succeeds", ""
        lines.append(f"| {name} | {acc:.2f} | {interval} | {impl} | {settings} |")
    return lines


PER_CLASS_TABLE_MAX = 20  # classes shown in report.md (all of them are in report.json)


def _per_class_lines(report: dict) -> list[str]:
    per_class = report.get("per_class")
    if not per_class:
        return []
    k = report["num_classes"]
    if k > PER_CLASS_TABLE_MAX:
        return ["", f"Accuracy per class: {k} classes, in report.json (`per_class`)."]
    names = [n.replace("|", "\\|") for n in report.get("class_names") or map(str, range(k))]
    lines = ["", "## Accuracy per class (%)", "",
             "| attack | " + " | ".join(names) + " |",
             "|---|" + "---:|" * k]
    for name, accs in per_class.items():
        cells = " | ".join("-" if a is None else f"{a:.1f}" for a in accs)
        lines.append(f"| {name} | {cells} |")
    return lines


def _aa_lines(report: dict) -> list[str]:
    breakdown = report["attacks"].get("aa", {}).get("breakdown")
    if not breakdown:
        return []
    cells = " | ".join(f"{k} {v:.2f}" for k, v in breakdown.items())
    return ["", "AutoAttack (pyautoattack, standard), robust accuracy after each attack (%):",
            "", f"| {cells} |", "|" + "---|" * len(breakdown)]


def _sweep_lines(report: dict) -> list[str]:
    sweep = report.get("sweep")
    if not sweep:
        return []
    head = " | ".join(format_eps(e, sweep.get("norm", "linf")) for e in sweep["eps"])
    vals = " | ".join(f"{a:.2f}" for a in sweep["accuracy"])
    return ["", f"## Eps sweep ({sweep['attack']}, alpha = {sweep['alpha_rule']})", "",
            f"| eps | {head} |", "|---|" + "---:|" * len(sweep["eps"]), f"| acc (%) | {vals} |"]


def _diagnostic_lines(report: dict) -> list[str]:
    lines = []
    ap = report.get("amplitude_phase")
    if ap:
        eps = format_eps(ap["eps"], ap.get("norm", "linf"))
        lines += ["", f"## Amplitude / phase ({ap['attack']}, eps {eps})",
                  "", "| x | x' | x'_amp = IDFT(A(x'), P(x)) | x'_pha = IDFT(A(x), P(x')) |",
                  "|---:|---:|---:|---:|",
                  f"| {ap['clean']:.2f} | {ap['adversarial']:.2f} | "
                  f"{ap['adversarial_amplitude']:.2f} | {ap['adversarial_phase']:.2f} |"]
    hm = report.get("fourier_heatmap")
    if hm:
        lines += ["", f"Fourier heat map: L2 norm {hm['norm']} per channel, {hm['examples']} "
                  "examples, see fourier_heatmap.png."]
    return lines


def _fold_text(fold: dict | None) -> str:
    if not fold or (not fold.get("folded") and "note" not in fold):
        return ""
    if fold.get("folded"):
        return f", {fold['folded']} BatchNorm layers folded"
    return f", BatchNorm not folded ({fold['note']})"


def _plain_value(value) -> str:
    return f"`{value}`" if isinstance(value, str) else json.dumps(value)


def _compile_text(mode: str | None) -> str:
    return f", compiled ({mode})" if mode not in (None, "off") else ""


def format_markdown(report: dict) -> str:
    """The report as a Markdown page: results, AA breakdown, sweep, diagnostics, checks."""
    lines = ["# Robustness evaluation", "",
             f"{report['n']} examples, {threat_model_text(report)}, "
             f"precision {report['precision']}"
             f"{', channels_last' if report.get('channels_last') else ''}"
             f"{_fold_text(report.get('fold_bn'))}"
             f"{_compile_text(report.get('compile'))}, seed {report['seed']}, device "
             f"{report['device']}, {report['seconds']:.1f} s.", ""]
    if report.get("metadata"):
        lines += ["Evaluated: " + "; ".join(f"{k} {_plain_value(v)}"
                                            for k, v in report["metadata"].items()) + ".", ""]
    if report.get("interrupted"):
        lines += [f"**Partial report**: {report['interrupted']}.", ""]
    if report.get("reused"):
        lines += ["Reused from an earlier run on the same weights, examples and settings "
                  f"(progress.json): {', '.join(report['reused'])}.", ""]
    lines += _results_table(report)
    if report.get("ci95"):
        lines += ["", f"95% interval (Wilson score): where the accuracy on the whole data "
                  f"distribution lies, given {report['n']} examples."]
    lines += _aa_lines(report) + _per_class_lines(report) + _sweep_lines(report)
    lines += _diagnostic_lines(report)
    if report.get("checks"):
        lines += ["", f"## Integrity checks: {_MARK[report['checks_status']]}", "",
                  "| check | status | finding |", "|---|---|---|"]
        lines += [f"| {c['name']} | {_MARK[c['status']]} | {c['message']} |"
                  for c in report["checks"].values()]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    names, accs = list(report["results"]), list(report["results"].values())
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, accs, color="tab:blue")
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=threat_model_text(report))
    for i, a in enumerate(accs):
        ax.text(i, a + 1, f"{a:.1f}", ha="center", fontsize=8)
    files["attacks_png"] = _save(fig, out / "attacks.png", plt)
    if report.get("sweep"):
        s = report["sweep"]
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        linf = s.get("norm", "linf") == "linf"
        ax.plot([e * 255 if linf else e for e in s["eps"]], s["accuracy"], marker="o")
        ax.set(xlabel="eps (x/255)" if linf else "eps (L2)", ylabel="accuracy (%)",
               ylim=(0, 100),
               title=f"{s['attack']} accuracy vs eps")
        files["sweep_png"] = _save(fig, out / "accuracy_vs_eps.png", plt)
    if report.get("fourier_heatmap"):
        files["heatmap_png"] = _heatmap(report["fourier_heatmap"], out, plt)
    if report.get("amplitude_phase"):
        ap = report["amplitude_phase"]
        keys = ("clean", "adversarial", "adversarial_amplitude", "adversarial_phase")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar(["x", "x'", "x'_amp", "x'_pha"], [ap[k] for k in keys], color="tab:green")
        said = f", L2 eps {format_eps(ap['eps'], 'l2')}" if ap.get("norm") == "l2" else ""
        ax.set(ylabel="accuracy (%)", ylim=(0, 100),
               title=f"amplitude / phase ({ap['attack']}{said})")
        files["amplitude_phase_png"] = _save(fig, out / "amplitude_phase.png", plt)
    return files


def heatmap_extent(h: int, w: int) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) putting cell (i, j) of an h x w heat map at
    frequency (i - h // 2, j - w // 2), for odd sizes too."""
    return (-(w // 2) - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -(h // 2) - 0.5)


def _heatmap(hm: dict, out: Path, plt) -> str:
    err = hm["error_rate"]
    h, w = len(err), len(err[0])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(err, cmap="jet", vmin=0, vmax=100, extent=heatmap_extent(h, w))
    fig.colorbar(image, ax=ax, label="error rate (%)")
    ax.set(xlabel="frequency v", ylabel="frequency u",
           title=f"Fourier heat map (L2 norm {hm['norm']})")
    return _save(fig, out / "fourier_heatmap.png", plt)


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def log_tensorboard(report: dict, log_dir: str | Path, step: int = 0) -> None:
    """Write the report's accuracies as TensorBoard scalars under ``eval/`` (an L2
    evaluation's under ``eval_l2/``)."""
    from torch.utils.tensorboard import SummaryWriter

    l2 = "_l2" if _norm(report) == "l2" else ""  # eval_l2/pgd20: not the L-inf eval/pgd20
    with SummaryWriter(str(log_dir)) as writer:
        for name, acc in report["results"].items():
            writer.add_scalar(f"eval{l2}/{name}", acc, step)
        for name, acc in report["attacks"].get("aa", {}).get("breakdown", {}).items():
            writer.add_scalar(f"eval{l2}_aa/{name}", acc, step)
        if report.get("sweep"):
            linf = report["sweep"].get("norm", "linf") == "linf"
            for e, acc in zip(report["sweep"]["eps"], report["sweep"]["accuracy"], strict=True):
                tag = f"eps_{e * 255:.3g}_255" if linf else f"l2_eps_{e:.4g}"
                writer.add_scalar(f"eval_sweep/{tag}", acc, step)


def write_report(report: dict, out_dir: str | Path, tensorboard: bool = False) -> dict[str, str]:
    """Write report.json, report.md and PNG plots into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "report.json"), "markdown": str(out / "report.md")}
    files.update(_plots(report, out))
    if tensorboard:
        log_tensorboard(report, out / "tensorboard")
        files["tensorboard"] = str(out / "tensorboard")
    from ..checkpoint import atomic_write  # a second Ctrl-C leaves no half-written file

    page, data = format_markdown(report), json.dumps({**report, "files": files}, indent=2)
    atomic_write(out / "report.md", lambda f: f.write(page.encode()))
    atomic_write(out / "report.json", lambda f: f.write(data.encode()))
    return files
