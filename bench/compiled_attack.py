"""EAEG with and without frozen parameters, eager and under torch.compile.

    python bench/compiled_attack.py [--device cpu|cuda] [--model resnet_tiny] [--batch-size 32]
        [--bf16] [--step-mode default]

A compiled model's backward graph computes every weight gradient even when the attack asks
only for the input's; freezing the parameters (what dat's attacks do to a compiled model)
removes that work. An eager model gains nothing from it, so dat does not freeze one.
The last row compiles each whole attack step instead (``compile_mode``, what
``perf.compile_attacks`` does) and reports how many pixels differ from the eager attack's.
Prints ms per attack (median of 5 after 2 warm-ups) and checks the results are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import dat
from dat.attacks import eaeg, frozen_parameters
from dat.losses import kl_divergence


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    p.add_argument("--checkpoint", default=None,
                   help="attack this trained dat checkpoint instead of a fresh --model")
    p.add_argument("--step-mode", default="default",
                   help="compile mode of the compiled-step row (off: no such row)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cl = torch.channels_last
    if args.checkpoint:
        from dat.evaluation.loading import load_checkpoint

        model = load_checkpoint(args.checkpoint, args.device).model.train()
        model = model.to(memory_format=cl)
    else:
        model = dat.models.create(args.model, 10).to(args.device).to(memory_format=cl)
    if args.checkpoint:  # a trained model: real images, the bundled sample's test set
        from dat.config import DataConfig
        from dat.data import load_dataset

        x, y = load_dataset(DataConfig(name="cifar10-sample",
                                       test_subset=args.batch_size)).test.tensors()
        x, y = x.to(args.device).contiguous(memory_format=cl), y.to(args.device)
    else:
        x = torch.rand(args.batch_size, 3, 32, 32, device=args.device)
        x = x.contiguous(memory_format=cl)
        y = torch.randint(0, 10, (args.batch_size,), device=args.device)

    def attack(net, freeze: bool, step_mode: str = "off"):
        # dat's attacks freeze compiled models only; here both cases are forced
        torch.manual_seed(1)
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen_parameters(model) if freeze else _unfrozen(model))
            stack.enter_context(torch.autocast(args.device, torch.bfloat16, enabled=args.bf16))
            return eaeg(net, x, y, beta=15.0, label_smoothing=0.5, compile_mode=step_mode,
                        check_range=False)  # as the training steps call it: no sync

    def timed(net, freeze: bool, step_mode: str = "off") -> float:
        start = time.perf_counter()
        attack(net, freeze, step_mode)
        first = time.perf_counter() - start
        if step_mode != "off":
            print(f"compiled step ({step_mode}): first attack took {first:.1f} s")
        attack(net, freeze, step_mode)
        times = []
        for _ in range(5):
            if args.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            attack(net, freeze, step_mode)
            if args.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 1)

    compiled = torch.compile(model, dynamic=False)
    out = {"eager": timed(model, False), "eager frozen": timed(model, True),
           "compiled": timed(compiled, False), "compiled frozen": timed(compiled, True)}
    same = torch.equal(attack(model, False), attack(model, True))
    if args.step_mode != "off":
        out[f"compiled step ({args.step_mode})"] = timed(model, True, args.step_mode)
        compiled_adv, eager_adv = attack(model, True, args.step_mode), attack(model, False)
        differ = (compiled_adv != eager_adv).float().mean()
        with torch.no_grad():
            model.eval()
            target = model(x)
            reached = {k: float(kl_divergence(target, model(a), reduction="sum") * 15.0
                                + F.cross_entropy(model(a), y, reduction="sum",
                                                  label_smoothing=0.5)) / len(x)
                       for k, a in (("eager", eager_adv), ("compiled step", compiled_adv))}
            model.train()
        print(f"compiled step: {differ.item():.2%} of pixels differ from eager; EAEG "
              f"objective per image (fp32): eager {reached['eager']:.5f}, compiled "
              f"{reached['compiled step']:.5f}")
    print("bf16" if args.bf16 else "fp32", out, "eager results identical:", same)
    return out


@contextlib.contextmanager
def _unfrozen(model: torch.nn.Module):
    """Make frozen_parameters a no-op, so the attack runs with parameters requiring grad."""
    import dat.attacks as attacks

    original = attacks.frozen_parameters
    attacks.frozen_parameters = lambda m: contextlib.nullcontext(m)
    try:
        yield
    finally:
        attacks.frozen_parameters = original


if __name__ == "__main__":
    main()
