"""How far the dataset amplitude scale's 10,000-image mean is from the whole training set's.

    python scripts/mean_amplitude_subsample.py ../shared/data/cifar10-jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dat.datasets import load_imagefolder
from dat.generator import mean_amplitude
from dat.methods.dat_build import _mean_amplitude_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="ImageFolder root with train/<class>/*")
    args = p.parse_args()
    train, _, _ = load_imagefolder(args.root)
    sub = _mean_amplitude_of(train)  # what amplitude_scale=dataset uses
    full = mean_amplitude(train.materialize().images)
    rel = ((sub - full).abs() / full).flatten()
    print(f"{len(train)} training images: per-frequency relative difference mean "
          f"{rel.mean():.4f}, max {rel.max():.4f}")


if __name__ == "__main__":
    main()
