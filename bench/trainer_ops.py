"""Operations (kernel launches on a GPU) of one real trainer step against the bare method.

    python bench/trainer_ops.py [--model resnet18] [overrides ...]

Builds the trainer on the bundled sample (EMA, batched branches and the fused step guard
on, as on a GPU) and counts, with ``op_count.count_ops``, one ``Trainer._train_step`` and
one bare ``method.run`` on the same batch. The difference is the trainer's own per-step work: the
non-finite-step guard, the device-side stat sums and the weight average.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from op_count import count_ops  # noqa: E402

from dat.config import load_config  # noqa: E402
from dat.trainer import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            "data.name=cifar10-sample", f"model.name={args.model}", "data.batch_size=4",
            "train.weight_averaging=ema", "train.image_every=0", "perf.batched_branches=on",
            f"train.out_dir={out}", *args.overrides])
        trainer = Trainer(cfg, progress=False)
        trainer.guard.fused = True  # the guard as on CUDA (on a CPU it runs per tensor)
        trainer._reset_log()
        trainer._bar = type("NoBar", (), {"update": lambda self, n: None})()
        x, x_raw, y = batch = next(iter(trainer.loader))
        trainer._train_step(batch)  # first step: optimiser state exists afterwards
        step = count_ops(lambda: trainer._train_step(batch))
        cl = torch.channels_last
        bare = count_ops(lambda: trainer.method.run(x.contiguous(memory_format=cl), y,
                                                    x_raw.contiguous(memory_format=cl)))
    counts = {"trainer_step": step, "method_run": bare, "trainer_overhead": step - bare}
    print(counts)
    return counts


if __name__ == "__main__":
    main()
