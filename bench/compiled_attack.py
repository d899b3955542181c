"""EAEG with and without frozen parameters, eager and under torch.compile.

    python bench/compiled_attack.py [--device cpu|cuda] [--model resnet_tiny] [--batch-size 32]

A compiled model's backward graph computes every weight gradient even when the attack asks
only for the input's; freezing the parameters (what dat's attacks do to a compiled model)
removes that work. An eager model gains nothing from it, so dat does not freeze one.
Prints ms per attack (median of 5 after 2 warm-ups) and checks the results are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import dat
from dat.attacks import eaeg, frozen_parameters


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cl = torch.channels_last
    model = dat.models.create(args.model, 10).to(args.device).to(memory_format=cl)
    x = torch.rand(args.batch_size, 3, 32, 32, device=args.device).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)

    def attack(net, freeze: bool):
        # dat's attacks freeze compiled models only; here both cases are forced
        torch.manual_seed(1)
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen_parameters(model) if freeze else _unfrozen(model))
            return eaeg(net, x, y, beta=15.0, label_smoothing=0.5)

    def timed(net, freeze: bool) -> float:
        for _ in range(2):
            attack(net, freeze)
        times = []
        for _ in range(5):
            if args.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            attack(net, freeze)
            if args.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 1)

    compiled = torch.compile(model, dynamic=False)
    out = {"eager": timed(model, False), "eager frozen": timed(model, True),
           "compiled": timed(compiled, False), "compiled frozen": timed(compiled, True)}
    same = torch.equal(attack(model, False), attack(model, True))
    print(out, "eager results identical:", same)
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
