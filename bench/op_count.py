"""Count the ATen operations of a call that do work: on a GPU, kernel launches.

At batch 128 a DAT step is launch-bound, so this count is what eager speed-ups there must
cut (BENCHMARKS.md). Only torch is imported, so the counter also runs against older
checkouts of dat.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
              "lift_fresh", "_local_scalar_dense", "set_", "resize_"}


def count_ops(fn: Callable[[], object]) -> int:
    """ATen operations of one call of ``fn``; views and allocations are not counted."""

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
                _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


@contextlib.contextmanager
def compile_backend(backend, wrap: Callable | None = None) -> Iterator[None]:
    """Inside, every ``torch.compile`` (dat's included) uses ``backend`` and ignores ``mode``;
    ``wrap`` may wrap what it returns. Restored on exit."""
    real_compile = torch.compile

    def forced(fn, mode=None, dynamic=None, fullgraph=False, **kw):
        compiled = real_compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        return wrap(compiled) if wrap else compiled

    torch.compile = forced
    try:
        yield
    finally:
        torch.compile = real_compile
