"""Which models' attack steps compile as one graph (``perf.compile_attacks``).

    python bench/compile_models.py [--models all] [--extra timm/resnet18]

For every registered model (and each ``--extra`` name), with two BN branches: a batched
EAEG (2B images, split BN, 2 steps) with ``compile_mode="default"`` through ``aot_eager``
(the eager ATen operations, no code generation), against the eager attack. Prints whether
it compiled as one graph per step and whether the images are bit-identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_count import compile_backend  # noqa: E402

import dat  # noqa: E402
from dat.attacks import compiled_step, eaeg  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="all", help="comma list, or all registered models")
    p.add_argument("--extra", default="timm/resnet18", help="comma list of further names")
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    names = dat.models.list_models() if args.models == "all" else args.models.split(",")
    names += [n for n in args.extra.split(",") if n]
    counter = CompileCounterWithBackend("aot_eager")
    out = {}
    with compile_backend(counter):
        for name in names:
            torch._dynamo.reset()
            compiled_step.cache_clear()
            counter.frame_count = 0
            torch.manual_seed(0)
            model = dat.models.create(name, 10, dual_bn=True)
            x = torch.rand(2 * args.batch_size, 3, 32, 32)
            y = torch.randint(0, 10, (2 * args.batch_size,))
            start = time.perf_counter()
            try:
                torch.manual_seed(1)
                compiled = eaeg(model, x, y, steps=2, branch="split", compile_mode="default")
            except Exception as err:  # noqa: BLE001 - reported per model
                out[name] = f"failed: {str(err).splitlines()[0][:200]}"
                print(f"{name}: {out[name]}", flush=True)
                continue
            torch.manual_seed(1)
            eager = eaeg(model, x, y, steps=2, branch="split")
            out[name] = (f"{counter.frame_count} graph, images "
                         f"{'bit-identical' if torch.equal(compiled, eager) else 'DIFFER'}, "
                         f"{time.perf_counter() - start:.1f} s")
            print(f"{name}: {out[name]}", flush=True)
    return out


if __name__ == "__main__":
    main()
