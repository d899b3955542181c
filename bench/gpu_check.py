"""GPU checks for BENCHMARKS.md that need a trained model: run on a lent GPU.

    python bench/gpu_check.py --data .devdata/cifar10_25k.npz --out OUT_DIR

1. Same budget, same data order: train ResNet-18 with the plain reference DAT step and
   with the fast DATStep, then PGD-20 on held-out test images (robustness must match);
   ``--seeds N`` repeats both for N seeds and reports the means; ``--fast-precision``
   picks the fast run's autocast dtype (``auto``: bf16 on CUDA, fp32 elsewhere).
2. bf16 vs fp32 training attack: the EAEG objective reached on a fixed batch.
3. Peak memory of a fast DAT step for WRN-34-10 at batch 128.
The ``--data`` file has the layout of dat/assets/cifar10_sample.npz (scripts/make_sample.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from reference_dat import reference_dat_step  # noqa: E402

import dat  # noqa: E402
from dat.attacks import eaeg  # noqa: E402
from dat.data import augment_batch  # noqa: E402
from dat.datasets import _decode_jpegs  # noqa: E402
from dat.generator import AmplitudeGenerator  # noqa: E402
from dat.losses import kl_divergence  # noqa: E402
from dat.methods.dat import DATDraws, DATStep  # noqa: E402


def _load(path: str, device: torch.device):
    with np.load(path, allow_pickle=False) as f:
        out = {}
        for split in ("train", "test"):
            images = _decode_jpegs(f[f"{split}_jpeg"], f[f"{split}_offsets"])
            labels = torch.from_numpy(f[f"{split}_labels"])
            # the file is sorted by class: a fixed shuffle makes any prefix a fair subset
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
            out[split] = (images[order].to(device), labels[order].to(device))
    return out


def _fast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the fast run: ``auto`` = bf16 on CUDA, fp32 (None) elsewhere."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _train(kind: str, data, args, device, seed: int = 0) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(seed)
    model = dat.models.create(args.model, 10, dual_bn=True).to(device)
    gen = AmplitudeGenerator(num_classes=10, image_shape=(3, 32, 32)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gopt = torch.optim.SGD(gen.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    fast = kind == "fast"
    if fast and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step = DATStep(model, gen, opt, gopt, generator_update=args.fast_update,
                   autocast_dtype=_fast_dtype(args.fast_precision, device) if fast else None)
    images, labels = data["train"]
    images, labels = images[: args.train_n], labels[: args.train_n]
    g = torch.Generator().manual_seed(seed)
    total = args.epochs * (len(images) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=total, pct_start=0.25)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=g).to(device)
        for i in range(len(images) // args.batch_size):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x_raw = images[idx].float() / 255
            x = augment_batch(x_raw, 4, True, g)
            draws = DATDraws.sample(len(x), (3, 32, 32), device=device)
            if fast:
                step.run(x, labels[idx], x_raw, draws=draws)
            else:
                reference_dat_step(model, gen, opt, gopt, x, labels[idx], x_raw, draws)
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - start


def _robust_accuracy(model, data, n: int) -> dict:
    x, y = data["test"]
    x, y = x[:n].float() / 255, y[:n]
    report = dat.evaluate(model, (x, y), attacks=["clean", "pgd20"], progress=False,
                          checks=False)
    return report["results"]


def _attack_objective(model, x, y, bf16: bool) -> float:
    """EAEG objective (CE + 15 KL, label smoothing 0.5) at the attack's result."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(1)
        x_adv = eaeg(model, x, y, beta=15.0, label_smoothing=0.5, check_range=False)
    model.eval()
    with torch.no_grad():
        target, out = model(x), model(x_adv)
        loss = (F.cross_entropy(out, y, label_smoothing=0.5)
                + 15.0 * kl_divergence(target, out))
    return float(loss)


def _wrn_memory(device, batch: int) -> float:
    torch.cuda.reset_peak_memory_stats()
    model = dat.models.create("wrn34_10", 10, dual_bn=True).to(device)
    model = model.to(memory_format=torch.channels_last)
    gen = AmplitudeGenerator(num_classes=10, image_shape=(3, 32, 32)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = DATStep(model, gen, opt, None, generator_update="alternating",
                   autocast_dtype=torch.bfloat16)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(2):
        step.run(x, y, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--train-n", type=int, default=10240)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-n", type=int, default=1000)
    p.add_argument("--fast-update", default="alternating")
    p.add_argument("--fast-precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="fast run's autocast: auto = bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--seeds", type=int, default=1, help="repeat both runs with seeds 0..N-1")
    p.add_argument("--skip-wrn", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    data = _load(args.data, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args),
              "fast_autocast": "bf16" if _fast_dtype(args.fast_precision, device) else "fp32"}
    for seed in range(args.seeds):
        for kind in ("reference", "fast"):
            model, seconds = _train(kind, data, args, device, seed)
            res = {"seed": seed, "train_seconds": round(seconds, 1),
                   **_robust_accuracy(model, data, args.test_n)}
            result.setdefault(f"{kind}_runs", []).append(res)
            print(kind, res, flush=True)
            if kind == "fast" and seed == 0:
                x, y = data["test"]
                x, y = x[:256].float() / 255, y[:256]
                result["attack_objective"] = {"fp32": _attack_objective(model, x, y, False),
                                              "bf16": _attack_objective(model, x, y, True)}
                print("attack objective", result["attack_objective"], flush=True)
    for kind in ("reference", "fast"):  # mean over seeds
        runs = result[f"{kind}_runs"]
        result[kind] = {k: round(sum(r[k] for r in runs) / len(runs), 2)
                        for k in runs[0] if k != "seed"}
        print(kind, "mean over", len(runs), "seeds", result[kind], flush=True)
    if device.type == "cuda" and not args.skip_wrn:
        result["wrn34_10_b128_peak_gib"] = round(_wrn_memory(device, 128), 2)
        print("wrn34_10 peak GiB", result["wrn34_10_b128_peak_gib"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
