"""Launches per fast DAT step if every compiled graph replays as one CUDA graph.

    python bench/graph_launches.py [--model resnet18] [--batch-size 4]

``perf.compile=reduce-overhead`` (the model) and ``perf.compile_attacks=reduce-overhead``
(each attack step) turn parts of the launch-bound batch-128 step into CUDA graph replays.
This counts, on any device, what the step would launch then: every ATen operation that
runs outside a compiled graph (views and allocations excluded, as in ``op_count.py``),
plus one per graph call (forward or backward). The graphs run through ``aot_eager`` (the
same ATen operations, no code generation), in CUDA's configuration: bf16 autocast,
channels_last, the batched 2B attack with split BN, reversal, SGD's multi-tensor
(foreach) update as on CUDA. A CUDA graph replay also
copies its non-static inputs, a few small kernels per call, which this does not count.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode_temporarily

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attack_ops import cuda_config_step  # noqa: E402
from op_count import _NO_KERNEL, compile_backend  # noqa: E402

from dat.attacks import compiled_step  # noqa: E402


class _Launches(TorchDispatchMode):
    """Counts operations outside graphs; a graph call counts once (``graph_call``)."""

    def __init__(self) -> None:
        super().__init__()
        self.eager = self.graphs = 0
        self.inside = 0
        self.names: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and not func.is_view and \
                func.overloadpacket.__name__ not in _NO_KERNEL:
            self.eager += 1
            self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


_ACTIVE: list[_Launches] = []


def _as_one_launch(gm: torch.fx.GraphModule, _example_inputs):
    """An aot_autograd compiler: the graph runs its ATen ops, counted as one launch."""
    def run(*args):
        counter = _ACTIVE[-1] if _ACTIVE else None
        if counter is None:
            return gm(*args)
        counter.graphs += 1
        counter.inside += 1
        try:
            return gm(*args)
        finally:
            counter.inside -= 1

    return make_boxed_func(run)


_BACKEND = aot_autograd(fw_compiler=_as_one_launch, bw_compiler=_as_one_launch)


def _outside_the_counter(fn):
    """torch.compile refuses to run under a dispatch mode: enter compiled code without it
    (its graphs count themselves in ``_as_one_launch``)."""
    def call(*args, **kwargs):
        if not _ACTIVE:
            return fn(*args, **kwargs)
        with _pop_mode_temporarily():
            return fn(*args, **kwargs)

    return call


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--top", type=int, default=0,
                   help="also list the N most frequent operations left outside the graphs")
    args = p.parse_args(argv)
    def outside(compiled):
        if isinstance(compiled, torch.nn.Module):  # an OptimizedModule: wrap its forward
            compiled.forward = _outside_the_counter(compiled.forward)
            return compiled
        return _outside_the_counter(compiled)

    out = {}
    with compile_backend(_BACKEND, wrap=outside):  # what dat compiles, counted
        for model_mode, attack_mode in (("off", "off"), ("off", "reduce-overhead"),
                                        ("reduce-overhead", "off"),
                                        ("reduce-overhead", "reduce-overhead")):
            torch._dynamo.reset()
            compiled_step.cache_clear()
            _, step, x, y = cuda_config_step(args.model, args.batch_size, foreach=True,
                                             compile_mode=model_mode,
                                             compile_attacks=attack_mode)
            for _ in range(2):  # compiles, then runs once compiled
                step.run(x, y)
            counter = _Launches()
            _ACTIVE.append(counter)
            try:
                with counter:
                    step.run(x, y)
            finally:
                _ACTIVE.pop()
            name = f"perf.compile={model_mode}, perf.compile_attacks={attack_mode}"
            out[name] = {"eager_ops": counter.eager, "graph_calls": counter.graphs,
                         "launches": counter.eager + counter.graphs}
            print(f"{name}: {out[name]['launches']} launches ({counter.eager} eager "
                  f"operations + {counter.graphs} graph calls)", flush=True)
            if args.top:
                print("   ", ", ".join(f"{k} {v}" for k, v in counter.names.most_common(args.top)))
    return out


if __name__ == "__main__":
    main()
