"""Build dat/assets/cifar10_sample.npz from the JPEG CIFAR-10 tree.

The sample is balanced (default 500 train / 100 test images per class), chosen with a
fixed seed, and stores the original JPEG bytes (about 5 MB in all), so decoding it gives
exactly the pixels of the tree. Stored as plain uint8/int64 arrays: no pickle.

    python scripts/make_sample.py --source ../shared/data/cifar10-jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _pick(folder: Path, per_class: int, rng: np.random.Generator) -> tuple[list[bytes], list[int]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    blobs, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((folder / name).glob("*.jpg"))
        if len(files) < per_class:
            raise SystemExit(f"{folder / name} has {len(files)} images, fewer than {per_class}")
        for i in sorted(rng.choice(len(files), per_class, replace=False)):
            blobs.append(files[i].read_bytes())
            labels.append(label)
    return blobs, labels


def _pack(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="../shared/data/cifar10-jpg")
    parser.add_argument("--out", default="dat/assets/cifar10_sample.npz")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source = Path(args.source)
    if not (source / "train").is_dir():
        raise SystemExit(f"error: --source {source} holds no train/<class>/ folders; point it "
                         "at a CIFAR-10 ImageFolder tree (train/ and test/ of JPEGs)")
    rng = np.random.default_rng(args.seed)
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    arrays = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        blobs, labels = _pick(source / split, per_class, rng)
        arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"] = _pack(blobs)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    arrays["classes"] = np.asarray(classes, dtype="U16")
    np.savez(args.out, **arrays)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size / 1e6:.1f} MB, classes {classes}")


if __name__ == "__main__":
    main()
