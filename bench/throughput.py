"""Training and evaluation throughput, fast paths against the plain reference, one table.

    python bench/throughput.py                       # CPU, tiny model (anyone, CI)
    python bench/throughput.py --device cuda          # GPU, ResNet-18 at CIFAR shapes
    python bench/throughput.py --device cuda --model wrn34_10 --batch-size 128

Every row runs in the same process on the same synthetic CIFAR-shaped batch already on
the device (data loading excluded, as in the anchor measurements), after warm-up
iterations, and reports the median time per iteration. ``ratio`` is images/s over the
reference DAT step's images/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from op_count import count_ops  # noqa: E402
from reference_dat import reference_dat_step  # noqa: E402

import dat  # noqa: E402
from dat.build import (  # noqa: E402
    compile_model,
    resolve_batched,
    resolve_channels_last,
    resolve_fused_split_bn,
)
from dat.config import CUDA_GRAPH_MODES  # noqa: E402
from dat.generator import AmplitudeGenerator  # noqa: E402
from dat.methods.dat import DATDraws, DATStep  # noqa: E402
from dat.methods.pgd_at import PGDATStep  # noqa: E402
from dat.methods.trades import TRADESStep  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Setup:
    """Fresh model/generator/optimisers per row, so rows do not share state."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        gen = torch.Generator().manual_seed(0)
        b = args.batch_size
        self.notes: list[str] = []
        self.x = torch.rand(b, 3, 32, 32, generator=gen).to(device)
        self.x_raw = torch.rand(b, 3, 32, 32, generator=gen).to(device)
        self.y = torch.randint(0, 10, (b,), generator=gen).to(device)

    def model(self, dual_bn: bool = True, channels_last: bool = False):
        torch.manual_seed(0)
        model = dat.models.create(self.args.model, 10, dual_bn=dual_bn).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return model, opt

    def generator(self):
        g = AmplitudeGenerator(num_classes=10, image_shape=(3, 32, 32)).to(self.device)
        opt = torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return g, opt

    def inputs(self, channels_last: bool):
        if not channels_last:
            return self.x, self.x_raw
        cl = torch.channels_last
        return self.x.contiguous(memory_format=cl), self.x_raw.contiguous(memory_format=cl)


def _reference_row(s: _Setup):
    model, opt = s.model()
    g, gopt = s.generator()
    draws = DATDraws.sample(len(s.x), (3, 32, 32), device=s.device)
    return lambda: reference_dat_step(model, g, opt, gopt, s.x, s.y, s.x_raw, draws)


def _fast_row(s: _Setup, *, bf16: bool, channels_last: bool, batched: bool, update: str,
              fused: bool = False, compile_mode: str = "off", guard: bool = False,
              compile_attacks: str = "off"):
    model, opt = s.model(channels_last=channels_last)
    g, gopt = s.generator()
    net = compile_model(model, compile_mode)
    step = DATStep(net, g, opt, gopt, batched=batched, generator_update=update,
                   autocast_dtype=torch.bfloat16 if bf16 else None, fused_split_bn=fused,
                   compile_attacks=compile_attacks)
    step.model = net
    x, x_raw = s.inputs(channels_last)
    if guard:  # the trainer's non-finite-step guard around each step
        from dat.guard import StepGuard

        step_guard = StepGuard([net], [opt], extra=step)

        def guarded():
            step_guard.snapshot()
            step_guard.commit(step.run(x, s.y, x_raw)["loss"])

        return guarded
    return lambda: step.run(x, s.y, x_raw)


def _compiled(s: _Setup, fn: Callable[[], object], mode: str,
              what: str = "compile") -> Callable[[], object]:
    """Run the first (compiling) call now and note how long it took."""
    start = time.perf_counter()
    fn()
    _sync(s.device)
    s.notes.append(f"{what}({mode}): first step took {time.perf_counter() - start:.1f} s")
    if mode in CUDA_GRAPH_MODES and what == "compile":  # as the trainer does
        def step():
            torch.compiler.cudagraph_mark_step_begin()
            return fn()

        return step
    return fn


def _cudagraph_skips() -> int:
    """Compiled graphs that inductor ran without CUDA graphs so far (reduce-overhead)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))


def _baseline_row(s: _Setup, cls, *, bf16: bool, channels_last: bool,
                  compile_attacks: str = "off", **kw):
    model, opt = s.model(dual_bn=False, channels_last=channels_last)
    step = cls(model, opt, steps=10, autocast_dtype=torch.bfloat16 if bf16 else None,
               compile_attacks=compile_attacks, **kw)
    x, _ = s.inputs(channels_last)
    return lambda: step.run(x, s.y)


def _plain_row(s: _Setup, *, bf16: bool, channels_last: bool):
    model, opt = s.model(dual_bn=False, channels_last=channels_last)
    x, _ = s.inputs(channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), s.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _pgd20_eval_row(s: _Setup, *, bf16: bool, channels_last: bool, fold: bool, n: int,
                    compile_mode: str = "off"):
    """The evaluation suite's PGD-20 through dat.evaluate's forward wrapper, on the
    BN-folded copy of the model when ``fold``, compiled as ``dat.evaluate(compile_mode=)``
    does (parameters frozen; the first, compiling call is timed and noted)."""
    from dat.evaluation.prepare import FastForward, compile_for_attacks
    from dat.evaluation.suite import make_attack
    from dat.models.folding import fold_batchnorm

    model, _ = s.model(dual_bn=False)
    model = fold_batchnorm(model)[0] if fold else model.eval()
    net = compile_for_attacks(FastForward(model, bf16, channels_last).eval(), compile_mode)
    if compile_mode != "off":
        model.requires_grad_(False)  # this row's own model: nothing to restore
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=gen).to(s.device)
    y = torch.randint(0, 10, (n,), generator=gen).to(s.device)
    attack = make_attack("pgd20", 8 / 255)
    bs = s.args.eval_batch_size

    def run():
        for xb, yb in zip(x.split(bs), y.split(bs), strict=True):
            attack.fn(net, xb, yb)

    if compile_mode != "off":
        return _compiled(s, run, compile_mode, f"pgd20_eval {'bf16' if bf16 else 'fp32'} compile")
    return run


def _autoattack_row(s: _Setup, n: int, checkpoint: str | None):
    """Reference AutoAttack (standard) on the first ``n`` sample test images.

    AutoAttack attacks only clean-correct points and stops on each as soon as one attack
    succeeds, so its time depends on the model: pass ``--aa-checkpoint`` (a trained,
    robust model) for a meaningful figure; without it an untrained model is used.
    """
    from dat.config import DataConfig
    from dat.data import load_dataset
    from dat.evaluation.loading import load_checkpoint

    if checkpoint:
        model = load_checkpoint(checkpoint, s.device).model
    else:
        model, _ = s.model(dual_bn=False)
    model.eval()
    x, y = load_dataset(DataConfig(name="cifar10-sample", test_subset=n)).test.tensors()
    x, y = x.to(s.device), y.to(s.device)

    def run():
        report = dat.evaluate(model, (x, y), attacks=["clean", "aa"], checks=False,
                              progress=False, batch_size=s.args.eval_batch_size)
        s.aa_note = (f"AA on {n} sample test images: clean {report['results']['clean']:.1f}%,"
                     f" AA {report['results']['aa']:.1f}%")

    return run


def _measure(name: str, fn: Callable[[], object], is_eval: bool, args: argparse.Namespace,
             device: torch.device) -> dict:
    warmup = 0 if name.startswith("autoattack") else 1
    seconds = _time(fn, device, warmup if is_eval else args.warmup, 1 if is_eval else args.iters)
    images = args.eval_examples if is_eval else args.batch_size
    if name.startswith("autoattack"):
        images = args.aa_examples
    ips = images / seconds
    row = {"ms_per_iter": round(seconds * 1000, 2), "img_per_s": round(ips, 1),
           "epoch_s_50k": round(50000 / ips, 1), "seconds": round(seconds, 3)}
    if args.count_ops and not is_eval and "compile" not in name:
        row["ops_per_iter"] = count_ops(fn)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="DAT throughput benchmark")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="default: resnet18 (cuda), resnet_tiny (cpu)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--eval-batch-size", type=int, default=None)
    parser.add_argument("--eval-examples", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", default="", help="comma list of torch.compile modes "
                        "(default, reduce-overhead, max-autotune): one fast_dat row each")
    parser.add_argument("--compile-attacks", default="",
                        help="comma list of modes for dat.attacks.compiled_step (default, "
                        "reduce-overhead, max-autotune): fast_dat and pgd_at10 rows with each "
                        "training-attack step as one compiled graph")
    parser.add_argument("--eval-compile", default="",
                        help="comma list of dat.evaluate compile modes (default, "
                        "max-autotune-no-cudagraphs): pgd20_eval fp32 and bf16 rows with each")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count the ATen operations (kernels) of one training step")
    parser.add_argument("--rows", default="all", help="comma list of row-name prefixes")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--defaults", choices=["cpu", "cuda"], default=None,
                        help="whose perf.*=auto defaults the rows start from (default: the "
                        "device's); --defaults cuda on a CPU counts the GPU step's operations")
    parser.add_argument("--aa-examples", type=int, default=None,
                        help="AutoAttack row: sample test images (default 1000 cuda, 20 cpu)")
    parser.add_argument("--aa-checkpoint", default=None,
                        help="AutoAttack row: a trained dat checkpoint (default: untrained)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu")
    args.model = args.model or ("resnet18" if cuda else "resnet_tiny")
    args.batch_size = args.batch_size or (128 if cuda else 32)
    args.eval_batch_size = args.eval_batch_size or (1000 if cuda else 100)
    args.eval_examples = args.eval_examples or (10000 if cuda else 200)
    args.aa_examples = args.aa_examples or (1000 if cuda else 20)
    args.iters = args.iters or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    s = _Setup(args, device)
    # The fast path's defaults on this device (perf.* = auto), then each piece flipped.
    auto = torch.device(args.defaults or args.device)  # whose auto defaults
    fast = dict(bf16=auto.type == "cuda", channels_last=resolve_channels_last("auto", auto),
                batched=resolve_batched("auto", auto),
                fused=resolve_fused_split_bn("auto", auto))
    pieces = [("bf16", "bf16"), ("channels_last", "channels_last"),
              ("batched", "batched branches")]
    if fast["batched"]:  # fused split BN acts on the batched attack only
        pieces.append(("fused", "fused split BN"))
    flip = {k: ("no " if fast[k] else "") + label for k, label in pieces}
    base = dict(bf16=fast["bf16"], channels_last=fast["channels_last"])
    rows: dict[str, Callable] = {
        "reference_dat (published procedure, fp32)": lambda: _reference_row(s),
        "fast_dat reversal (all fast paths)": lambda: _fast_row(s, update="reversal", **fast),
        "fast_dat alternating": lambda: _fast_row(s, update="alternating", **fast),
    }
    rows["fast_dat reversal + step guard (trainer)"] = (
        lambda: _fast_row(s, update="reversal", guard=True, **fast))
    for key, label in flip.items():
        rows[f"fast_dat reversal, {label}"] = (
            lambda key=key: _fast_row(s, update="reversal", **{**fast, key: not fast[key]}))
    rows.update({
        "pgd_at10": lambda: _baseline_row(s, PGDATStep, **base),
        "trades10": lambda: _baseline_row(s, TRADESStep, **base),
        "plain_step (fwd+bwd+SGD)": lambda: _plain_row(s, **base),
    })
    for mode in filter(None, args.compile.split(",")):
        rows[f"fast_dat reversal + compile({mode})"] = (
            lambda mode=mode: _compiled(s, _fast_row(s, update="reversal", compile_mode=mode,
                                                     **fast), mode))
    model_modes = set(filter(None, args.compile.split(",")))
    for mode in filter(None, args.compile_attacks.split(",")):
        if mode in model_modes:  # both: the model's train-mode passes and the attacks
            rows[f"fast_dat reversal + compile({mode}) + compile_attacks({mode})"] = (
                lambda mode=mode: _compiled(s, _fast_row(
                    s, update="reversal", compile_mode=mode, compile_attacks=mode, **fast),
                    mode))
        rows[f"fast_dat reversal + compile_attacks({mode})"] = (
            lambda mode=mode: _compiled(s, _fast_row(s, update="reversal",
                                                     compile_attacks=mode, **fast), mode,
                              "fast_dat compile_attacks"))
        rows[f"pgd_at10 + compile_attacks({mode})"] = (
            lambda mode=mode: _compiled(s, _baseline_row(s, PGDATStep, compile_attacks=mode,
                                                         **base), mode,
                              "pgd_at10 compile_attacks"))
    # dat.evaluate's defaults: channels_last and BN folding on for CPU and CUDA
    ev = dict(channels_last=auto.type in ("cpu", "cuda"), fold=auto.type in ("cpu", "cuda"),
              n=args.eval_examples)
    cl_label = "no channels_last" if ev["channels_last"] else "channels_last"
    fold_label = "BN not folded" if ev["fold"] else "BN folded"
    eval_rows = {
        "pgd20_eval fp32": lambda: _pgd20_eval_row(s, bf16=False, **ev),
        f"pgd20_eval fp32, {cl_label}": lambda: _pgd20_eval_row(
            s, bf16=False, **{**ev, "channels_last": not ev["channels_last"]}),
        f"pgd20_eval fp32, {fold_label}": lambda: _pgd20_eval_row(
            s, bf16=False, **{**ev, "fold": not ev["fold"]}),
        "pgd20_eval bf16": lambda: _pgd20_eval_row(s, bf16=True, **ev),
        **{f"pgd20_eval {p} + compile({mode})": (
            lambda p=p, mode=mode: _pgd20_eval_row(s, bf16=p == "bf16", compile_mode=mode, **ev))
           for mode in filter(None, args.eval_compile.split(",")) for p in ("fp32", "bf16")},
        "autoattack (standard, pyautoattack)":
            lambda: _autoattack_row(s, args.aa_examples, args.aa_checkpoint),
    }
    wanted = args.rows.split(",") if args.rows != "all" else None
    table = {}
    for name, build in {**rows, **eval_rows}.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        skips = _cudagraph_skips()
        try:  # one failing row (e.g. a compile mode this machine lacks) must not end the run
            table[name] = _measure(name, build(), name in eval_rows, args, device)
            if any(m in name for m in CUDA_GRAPH_MODES) and device.type == "cuda":  # taken?
                s.notes.append(f"{name}: {_cudagraph_skips() - skips} graph(s) ran without "
                               "CUDA graphs (TORCH_LOGS=cudagraphs says why)")
            print(f"  measured {name}: {table[name]['img_per_s']:.1f} img/s", file=sys.stderr,
                  flush=True)
        except Exception as err:  # noqa: BLE001 - reported in the table instead
            table[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            print(f"  FAILED {name}: {table[name]['error']}", file=sys.stderr, flush=True)
    ref = next((v for k, v in table.items() if k.startswith("reference_dat") and "error" not in v),
               None)
    for name, row in table.items():  # training rows only: evaluation has no reference
        if "error" not in row:
            row["ratio_vs_reference"] = round(row["img_per_s"] / ref["img_per_s"], 2) \
                if ref and name not in eval_rows else None
    _print_table(table, args, device)
    for note in s.notes + ([s.aa_note] if getattr(s, "aa_note", None) else []):
        print(note)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__, "model": args.model, "batch_size": args.batch_size,
                "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                "notes": s.notes}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
    return table


def _print_table(table: dict, args: argparse.Namespace, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads")
    print(f"\n{name}, torch {torch.__version__}, model {args.model}, batch {args.batch_size}, "
          f"eval batch {args.eval_batch_size} x {args.eval_examples} images")
    w = max([44, *map(len, table)])
    print(f"| {'row':<{w}} | {'ms/iter':>9} | {'img/s':>9} | {'s/50k ep':>8} | {'x ref':>6} | "
          f"{'ops/iter':>8} |")
    print(f"|{'-' * (w + 2)}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 10}|")
    for row, v in table.items():
        if "error" in v:
            print(f"| {row:<{w}} | failed: {v['error']} |")
            continue
        ratio = "" if v["ratio_vs_reference"] is None else f"{v['ratio_vs_reference']:.2f}"
        print(f"| {row:<{w}} | {v['ms_per_iter']:>9.1f} | {v['img_per_s']:>9.1f} | "
              f"{v['epoch_s_50k']:>8.1f} | {ratio:>6} | {v.get('ops_per_iter', ''):>8} |")


if __name__ == "__main__":
    main()
