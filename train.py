"""Train: ``python train.py [--config PRESET_OR_YAML] [--resume PATH|auto] [key=value ...]``.

With no arguments it runs ``dat/configs/quickstart.yaml`` (a short DAT run on the bundled
CIFAR-10 sample, a few minutes on a laptop CPU). All logic lives in :mod:`dat.cli`.

Several GPUs or machines: ``torchrun --standalone --nproc_per_node=8 train.py --config
PRESET optim.lr_scaling=linear`` (see the README's multi-GPU section).
"""

import sys

from dat.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
