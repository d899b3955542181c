"""Write a sample-format .npz (scripts/make_sample.py) back out as an ImageFolder tree.

    python bench/unpack_npz.py .devdata/cifar10_25k.npz /tmp/cifar10-25k

Used on a lent GPU machine, where the JPEG tree cannot be carried whole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(src: str, dst: str) -> None:
    with np.load(src, allow_pickle=False) as f:
        classes = [str(c) for c in f["classes"]]
        for split in ("train", "test"):
            buf, offsets, labels = f[f"{split}_jpeg"], f[f"{split}_offsets"], f[f"{split}_labels"]
            for name in classes:
                (Path(dst) / split / name).mkdir(parents=True, exist_ok=True)
            for i, label in enumerate(labels):
                path = Path(dst) / split / classes[label] / f"{i:05d}.jpg"
                path.write_bytes(buf[offsets[i]:offsets[i + 1]].tobytes())
    print(f"unpacked {src} into {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    main(*sys.argv[1:3])
