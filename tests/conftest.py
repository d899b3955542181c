"""Shared pytest fixtures (CPU, deterministic, tiny models, real images from the sample).

Torch runs single-threaded in tests: on the shared 2-core machine, two OpenMP threads
competing with other processes made a 4-step attack on 16 images take 7 s instead of 0.06 s.
The suite uses the cores with processes instead: pyproject's addopts start two pytest-xdist
workers (``-n 2``; ``pytest -n 0`` runs in one process, for ``-s`` and pdb). Session fixtures
are built once in each worker, and no test may rely on another having run first.

Fixture names are stable; other test modules rely on them:

- ``ctrl_c_as_in_a_terminal`` (autouse, session): SIGINT raises KeyboardInterrupt even
  when pytest was started in the background, where SIGINT is ignored.
- ``seed_everything`` (autouse): seeds ``random``, NumPy and torch with 0 before each test.
- ``sample_splits`` (session): ``dat.data.load_dataset`` of ``cifar10-sample`` with the
  default split, a :class:`dat.data.DatasetSplits` with 4,000 train / 1,000 val / 1,000
  test images. Shared across tests: never modify it in place.
- ``sample_batch`` (session): ``(x, y)`` of 16 test images spread over all 10 classes,
  x (16, 3, 32, 32) float in [0, 1], y (16,) int64. Shared: ``.clone()`` before modifying.
- ``make_tiny_model``: factory ``make_tiny_model(dual_bn=False, seed=0, num_classes=10)``
  returning a freshly seeded ``resnet_tiny`` in train mode.
- ``make_warm_model``: like ``make_tiny_model`` but its BatchNorm running statistics
  have seen a few real batches (and with ``dual_bn`` the aux branch differs from the
  main one), so tests on running statistics and branches compare non-trivial values.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import dat
from dat.config import DataConfig
from dat.data import DatasetSplits, load_dataset

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_as_in_a_terminal() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, also when pytest was started in
    the background (``cmd &`` in a script ignores SIGINT, and Python then leaves it
    ignored, in pytest and in the CLIs it starts): the Ctrl-C tests need the default."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(autouse=True)
def seed_everything() -> None:
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sample_splits() -> DatasetSplits:
    return load_dataset(DataConfig(name="cifar10-sample"))


@pytest.fixture(scope="session")
def sample_batch(sample_splits: DatasetSplits) -> tuple[Tensor, Tensor]:
    x, y = sample_splits.test.subset(torch.arange(16) * 62).tensors()  # labels 0..9
    return x, y  # (16, 3, 32, 32) in [0, 1], (16,)


def _tiny(dual_bn: bool = False, seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return dat.models.create("resnet_tiny", num_classes=num_classes, dual_bn=dual_bn)


@pytest.fixture
def make_tiny_model() -> Callable[..., nn.Module]:
    return _tiny


@pytest.fixture
def make_warm_model(sample_splits: DatasetSplits) -> Callable[..., nn.Module]:
    x, _ = sample_splits.train.subset(torch.arange(64)).tensors()  # (64, 3, 32, 32)

    def build(dual_bn: bool = False, seed: int = 0, num_classes: int = 10) -> nn.Module:
        model = _tiny(dual_bn, seed, num_classes)
        with torch.no_grad():
            for part in x.split(32):
                model(part)
            if dual_bn:
                with dat.models.bn_branch(model, "aux"):
                    model(x.flip(-1) * 0.5)  # darker images: aux statistics differ
        return model

    return build


_HOLDER = '''
import importlib.util, sys
spec = importlib.util.spec_from_file_location("folder_lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
try:
    lock.acquire(sys.argv[2], "fix")
except lock.FolderInUse as err:
    print(err, flush=True)
    sys.exit(3)
print("held", flush=True)
if sys.argv[3] == "hold":
    sys.stdin.read()
'''


@pytest.fixture
def lock_elsewhere() -> Iterator[Callable[[Path, str], subprocess.Popen]]:
    """``lock_elsewhere(folder, "hold" | "try")``: dat.folder_lock in a second process
    (loaded alone: no torch import, fast). "hold" keeps the lock until killed (all are
    killed after the test); "try" takes it and exits (0) or prints the refusal (3)."""
    started: list[subprocess.Popen] = []
    source = Path(dat.__file__).parent / "folder_lock.py"

    def start(folder: Path, mode: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(source), str(folder),
                                    mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()
