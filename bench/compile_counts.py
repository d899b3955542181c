"""How many graphs torch.compile builds in a run of train.py or evaluate.py, and why.

    python bench/compile_counts.py [--backend aot_eager] train [key=value ...]
    python bench/compile_counts.py [--backend aot_eager] evaluate [evaluate.py options]

Runs the CLI in this process with every ``torch.compile`` routed through a recording
backend (inductor by default; ``aot_eager`` counts the same graphs without generating
code). Prints one line per graph (its image input, grad mode, frozen parameters, the
compiled modules' train flag and BN branch), then the totals: graphs, graph breaks and
dynamo's compile seconds. ``TORCH_LOGS=recompiles`` adds torch's guard failures.
BENCHMARKS.md, "Compile counts".
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import compile_times, counters
from torch._guards import CompileContext


def _image(inputs: list) -> str:
    """The largest 4-D input that is not a parameter: shape, dtype, requires_grad, layout."""
    images = [t for t in inputs if isinstance(t, torch.Tensor)
              and not isinstance(t, nn.Parameter) and t.dim() == 4]
    if not images:
        return "-"
    t = max(images, key=torch.Tensor.numel)
    nhwc = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return (f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            f"{' requires_grad' if t.requires_grad else ''}{' channels_last' if nhwc else ''}")


def _branch(model: nn.Module) -> str:
    """The BN branch of a dual-BN model's first DualBatchNorm ("-" for a plain model)."""
    return next((m.branch for m in model.modules() if hasattr(m, "branch")), "-")


def main(argv: list[str]) -> int:
    backend_name = "inductor"
    if argv[:1] == ["--backend"]:
        backend_name, argv = argv[1], argv[2:]
    if not argv or argv[0] not in ("train", "evaluate"):
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    modules: list[nn.Module] = []
    start = time.perf_counter()

    def backend(gm, example_inputs):
        frozen = sum(isinstance(t, nn.Parameter) and not t.requires_grad for t in example_inputs)
        state = [f"train={m.training} branch={_branch(m)}" for m in modules]
        print(f"graph {CompileContext.current_compile_id()}: {_image(example_inputs)}, "
              f"grad={torch.is_grad_enabled()}, frozen parameters {frozen}, {' '.join(state)}, "
              f"at {time.perf_counter() - start:.1f} s", flush=True)
        return lookup_backend(backend_name)(gm, example_inputs)

    real_compile = torch.compile

    def recorded_compile(fn=None, *, mode=None, dynamic=None, fullgraph=False, **kw):
        if isinstance(fn, nn.Module):
            modules.append(fn)
        return real_compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)

    torch.compile = recorded_compile
    from dat.cli import evaluate_main, train_main

    sys.argv = [f"{argv[0]}.py", *argv[1:]]
    try:
        return (train_main if argv[0] == "train" else evaluate_main)()
    finally:
        names, values = compile_times(repr="csv", aggregate=True)
        seconds = dict(zip(names, values, strict=True)).get("_compile.compile_inner", "0")
        print(f"graphs: {counters['stats']['unique_graphs']}, graph breaks: "
              f"{sum(counters['graph_break'].values())}, compile seconds: {float(seconds):.1f} "
              f"({backend_name}, torch {torch.__version__}), "
              f"wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
