"""Reading labelled images from disk: the bundled sample, ImageFolder trees, CIFAR binaries.

Each reader returns ``(train, test, classes)`` as :class:`ImageSet` objects; the
validation split and the loaders live in :mod:`dat.data`. Problems a user can fix
(missing folders, mixed image sizes, no network) raise :class:`DataError` with a
one-line message that names the fix.

ImageFolder trees are read like torchvision's ImageFolder (sorted class folders,
``os.walk`` that follows linked folders), except that:

- hidden names (``.ipynb_checkpoints/``, macOS ``._*`` and ``.DS_Store``) are skipped,
  so they neither become classes nor stop the run;
- other skipped files (unknown suffixes, files outside class folders) are counted in one
  warning, like the non-RGB conversions: nothing is dropped silently (text and annotation
  files such as Tiny-ImageNet's ``*_boxes.txt`` are not counted);
- 16-bit and 32-bit integer images are scaled by 1/257 (0..65535 to 0..255, clipped) and
  float images in [0, 1] by 255 before becoming RGB (PIL would clip or zero them); float
  images outside [0, 1] are refused;
- the test split is ``test/<class>/``, or ``val/<class>/`` when there is no test/, or when
  test/ has no class folder of train/ (an unlabelled ``test/images/`` beside a labelled
  val/, as many datasets are published); the switch is announced in a warning.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["DataError", "ImageSet", "load_cifar", "load_imagefolder", "load_sample"]

SAMPLE_PATH = Path(__file__).resolve().parent / "assets" / "cifar10_sample.npz"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                  ".ppm", ".pgm", ".pbm", ".pnm"}
DOWNLOAD_TIMEOUT = 30.0  # seconds per socket operation: an offline machine fails fast

# torchvision's layout: (folder, train files, test files, label key, meta file, names key)
_CIFAR_BINARY = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", "meta",
                 "fine_label_names"),
}


class DataError(ValueError):
    """A dataset cannot be found or read; the message names the fix."""


@dataclass
class ImageSet:
    """Labelled images: decoded uint8 ``images`` (N, C, H, W), or lazily read ``files``."""

    labels: Tensor  # (N,) int64
    images: Tensor | None = None
    files: list[str] | None = None
    image_shape: tuple[int, int, int] = (3, 32, 32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self.images is not None:
            return self.images[i], int(self.labels[i])
        return _read_image(self.files[i], self.image_shape), int(self.labels[i])

    def subset(self, index: Tensor) -> ImageSet:
        return ImageSet(
            labels=self.labels[index],
            images=None if self.images is None else self.images[index],
            files=None if self.files is None else [self.files[int(i)] for i in index],
            image_shape=self.image_shape,
        )

    def materialize(self) -> ImageSet:
        """Decode every file into one uint8 tensor (for the resident loader)."""
        if self.images is not None:
            return self
        images = torch.stack([_read_image(f, self.image_shape) for f in self.files])
        return ImageSet(self.labels, images=images, image_shape=self.image_shape)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(x, y)``: float images in [0, 1] and labels (for evaluation)."""
        images = self.materialize().images
        return images.float().div_(255), self.labels


def _to_rgb(img: PILImage, path: str) -> np.ndarray:
    """``img`` as uint8 (H, W, 3). PIL's own conversion clips 16-bit images to 255 and zeroes
    float ones, so those are scaled here: integer modes by 1/257, floats in [0, 1] by 255."""
    if img.mode.startswith("I"):  # I;16, I;16B, ... and I: 0..65535 -> 0..255, rounded
        gray = np.clip((np.asarray(img).astype(np.int64) + 128) // 257, 0, 255)
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise DataError(f"{path} is a float image with values outside [0, 1]; scale it "
                            "to [0, 1] or save it as an 8- or 16-bit PNG")
        gray = (values * 255).round()
    else:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


def _read_image(path: str, shape: tuple[int, int, int] | None = None) -> Tensor:
    """One image as uint8 (3, H, W); non-RGB modes are converted (noticed at scan time)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = _to_rgb(img, path)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}; remove or replace the file") from None
    if shape is not None and arr.shape[:2] != shape[1:]:
        raise DataError(
            f"{path} is {arr.shape[1]}x{arr.shape[0]} but the dataset's images are "
            f"{shape[2]}x{shape[1]}; resize all images to one size"
        )
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _check_headers(files: list[str], folder: Path) -> tuple[int, int, int]:
    """Read every header: all images must share one size; note non-RGB ones. Only float
    images are decoded, so that one outside [0, 1] stops the run now, not mid-epoch."""
    from PIL import Image

    size, converted, dark = None, {}, []
    for f in files:
        try:
            with Image.open(f) as img:
                this, mode = img.size, img.mode  # (W, H)
                if mode == "F":
                    _to_rgb(img, f)
                elif mode.startswith("I") and int(np.asarray(img).max()) <= 255:
                    dark.append(f)  # 8-bit values in a 16/32-bit file: 1/257 makes them black
        except OSError as err:
            raise DataError(f"cannot read image {f}: {err}; remove or replace the file") from None
        size = size or (this, f)
        if this != size[0]:
            raise DataError(
                f"{f} is {this[0]}x{this[1]} but {size[1]} is {size[0][0]}x{size[0][1]}; "
                "resize all images to one size"
            )
        if mode != "RGB":
            converted[mode] = converted.get(mode, 0) + 1
    if converted:
        modes = ", ".join(f"{n} {m}" for m, n in sorted(converted.items()))
        warnings.warn(f"{folder}: converting non-RGB images to RGB ({modes})", stacklevel=4)
    if dark:
        warnings.warn(f"{folder}: {len(dark)} 16/32-bit images (e.g. {dark[0]}) hold values only "
                      "up to 255, so scaling 0..65535 to 0..255 leaves them nearly black; if "
                      "they hold 8-bit data, save them as 8-bit images", stacklevel=4)
    return (3, size[0][1], size[0][0])


def _hidden(name: str) -> bool:
    """Names starting with "." are metadata (.ipynb_checkpoints, macOS ._* and .DS_Store)."""
    return name.startswith(".")


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` that are not hidden."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def _walk_error(err: OSError) -> None:
    """os.walk skips unreadable folders silently; stop instead."""
    raise DataError(f"cannot list {err.filename}: {err.strerror}; fix its permissions")


def _walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder``, sorted as ``Path`` objects. Linked folders are
    followed (as torchvision does; ``Path.rglob`` skips them), but not a link to a folder
    above itself, ``folder`` or any parent of it (a loop, or images read twice)."""
    real = Path(os.path.realpath(folder))
    files, above = [], {str(folder): {str(p) for p in (real, *real.parents)}}
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_walk_error, followlinks=True):
        chain, kept = above.pop(dirpath), []
        for name in dirnames:
            real = os.path.realpath(os.path.join(dirpath, name))
            if not _hidden(name) and real not in chain:
                kept.append(name)
                above[os.path.join(dirpath, name)] = chain | {real}
        dirnames[:] = kept
        files += [Path(dirpath, f) for f in filenames if not _hidden(f)]
    return sorted(files)


def _suffix_counts(counts: Counter[str]) -> str:
    """``.txt 10, .csv 2``: the most common suffixes first."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{ext or '(no suffix)'} {n}" for ext, n in items)


# annotation and text files that datasets ship beside images (Tiny-ImageNet: *_boxes.txt)
_NOT_IMAGES = {".txt", ".csv", ".json", ".xml", ".md", ".yaml", ".yml", ".mat", ".npy", ".npz"}


def _note_skipped(folder: Path, others: Counter[str], loose: Counter[str]) -> None:
    """One warning counting the files that are not read and may be images in a format not
    listed (.heic, .jp2, ...), so that none vanishes silently; annotation files are not
    counted."""
    others = Counter({k: n for k, n in others.items() if k not in _NOT_IMAGES})
    loose = Counter({k: n for k, n in loose.items() if k not in _NOT_IMAGES})
    parts = []
    if others:
        parts.append(f"{others.total()} files that are not images ({_suffix_counts(others)})")
    if loose:
        parts.append(f"{loose.total()} files outside class folders ({_suffix_counts(loose)})")
    if parts:
        warnings.warn(f"{folder}: skipped {' and '.join(parts)}", stacklevel=4)


def _scan_folder(folder: Path, classes: list[str] | None = None) -> tuple[ImageSet, list[str]]:
    found = _class_folders(folder)
    classes = classes or found
    if not classes:
        raise DataError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>")
    unknown = set(found) - set(classes)
    if unknown:
        raise DataError(f"{folder} has classes {sorted(unknown)} that train/ lacks; rename or "
                        f"remove those folders so {folder.name}/'s classes are a subset of "
                        "train/'s")
    files, labels, others = [], [], Counter[str]()
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        for p in _walk_files(folder / name):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(str(p))
                labels.append(label)
            else:
                others[p.suffix.lower()] += 1
    loose = Counter(p.suffix.lower() for p in folder.iterdir()
                    if not p.is_dir() and not _hidden(p.name))
    _note_skipped(folder, others, loose)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    shape = _check_headers(files, folder)
    labels_t = torch.tensor(labels, dtype=torch.int64)
    return ImageSet(labels_t, files=files, image_shape=shape), classes


def _scan_annotated(folder: Path, annotations: Path, classes: list[str]) -> ImageSet:
    """Images of ``folder/images/`` labelled by ``annotations`` (``file<TAB>class...``)."""
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{annotations} line {n}: expected 'file<TAB>class' with a class "
                            f"of train/, got {line[:80]!r}")
        path = folder / "images" / fields[0]
        if not path.is_file():
            raise DataError(f"{annotations} line {n} names {path}, which does not exist")
        files.append(str(path))
        labels.append(index[fields[1]])
    if not files:
        raise DataError(f"{annotations} lists no images")
    shape = _check_headers(files, folder)
    return ImageSet(torch.tensor(labels, dtype=torch.int64), files=files, image_shape=shape)


def _held_out_folder(root: Path, classes: list[str]) -> Path:
    """``test/``; ``val/`` when there is no test/, or when test/ has no class folder of
    train/ but val/ does (an unlabelled ``test/images/`` beside a labelled val/)."""
    test, val = root / "test", root / "val"
    if not test.is_dir():
        return val
    in_test = _class_folders(test)
    if set(in_test) & set(classes):
        return test
    if val.is_dir() and set(_class_folders(val)) & set(classes):
        warnings.warn(f"{test} has no class folder of train/ (unlabelled?), so {val} is the "
                      "test split", stacklevel=3)
        return val
    raise DataError(f"{test} has no class folder of train/ (it has {in_test[:5]}); put its "
                    f"images in {test}/<class>/ named as in train/, or add labelled "
                    f"{val}/<class>/ images")


def load_imagefolder(root: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """``root/train/<class>/*`` plus ``root/test/`` (or ``root/val/``) as the held-out set.

    Tiny-ImageNet's published layout also works as is: images under
    ``train/<class>/images/``, and a flat ``val/images/`` labelled by
    ``val/val_annotations.txt`` (its unlabelled ``test/`` is then ignored).
    """
    if not (root / "train").is_dir():
        raise DataError(
            f"data.root={str(root)!r} has no train/ folder; an ImageFolder tree needs "
            "train/<class>/* and val/<class>/* or test/<class>/*"
        )
    annotations = root / "val" / "val_annotations.txt"
    if not any((root / s).is_dir() for s in ("test", "val")):
        raise DataError(f"data.root={str(root)!r} has train/ but neither test/ nor val/; add "
                        f"{root / 'test'}/<class>/ images, or {root / 'val'}/<class>/")
    train, classes = _scan_folder(root / "train")
    empty = [c for c, n in zip(classes, torch.bincount(train.labels, minlength=len(classes))
                               .tolist(), strict=True) if n == 0]
    if empty:  # it would silently become a class the model can never learn
        raise DataError(f"{root / 'train'} has class folders without images: "
                        f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}; add "
                        "images or remove the empty folders")
    # Tiny-ImageNet as published: flat val/images/ + a label file. Many copies have had val/
    # sorted into val/<wnid>/ and kept the label file: then the class folders are the labels.
    flat_val = (root / "val" / "images").is_dir() and "images" not in classes
    if annotations.is_file() and flat_val:
        held = root / "val"
        test = _scan_annotated(held, annotations, classes)
    else:
        held = _held_out_folder(root, classes)
        test, _ = _scan_folder(held, classes)
    if test.image_shape != train.image_shape:
        raise DataError(
            f"{held} images are {test.image_shape}, train/ images {train.image_shape}; "
            "resize all images to one size"
        )
    return train, test, classes


def _decode_jpegs(buffer: np.ndarray, offsets: np.ndarray) -> Tensor:
    from PIL import Image

    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(offsets) - 1):
        blob = buffer[offsets[i] : offsets[i + 1]].tobytes()
        with Image.open(io.BytesIO(blob)) as img:
            out[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_sample() -> tuple[ImageSet, ImageSet, list[str]]:
    """The bundled 5,000 + 1,000 image CIFAR-10 sample (``cifar10-sample``)."""
    with np.load(SAMPLE_PATH, allow_pickle=False) as f:
        sets = [
            ImageSet(torch.from_numpy(f[f"{s}_labels"]),
                     images=_decode_jpegs(f[f"{s}_jpeg"], f[f"{s}_offsets"]))
            for s in ("train", "test")
        ]
        classes = [str(c) for c in f["classes"]]
    return sets[0], sets[1], classes


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (CIFAR batches), nothing executable."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"cannot read {path} ({err}); re-download the dataset") from None


def _read_cifar_binary(folder: Path, name: str) -> tuple[ImageSet, ImageSet, list[str]]:
    """Read torchvision's CIFAR python batches (no checksum, so re-packed copies work too)."""
    _, train_files, test_files, label_key, meta_file, names_key = _CIFAR_BINARY[name]
    sets = []
    for files in (train_files, test_files):
        parts = [_unpickle(folder / f) for f in files]
        if any("data" not in p or label_key not in p for p in parts):
            raise DataError(f"{folder} lacks 'data'/{label_key!r} entries; re-download {name}")
        data = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32) uint8
        sets.append(ImageSet(torch.from_numpy(labels), images=images))
    classes = [str(c) for c in _unpickle(folder / meta_file)[names_key]]
    return sets[0], sets[1], classes


def _download_cifar(name: str, root: Path) -> None:
    """Fetch ``name`` with torchvision, with socket timeouts so that offline fails fast."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    created = not root.exists()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        cls(str(root), train=True, download=True)
    except Exception as err:  # offline, DNS failure, corrupt archive, unwritable root
        if created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # leave no empty folder behind
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{name} not found under data.root={str(root)!r} and could not be downloaded "
            f"({reason}); set data.root to torchvision's folder (holding "
            f"{_CIFAR_BINARY[name][0]}/) or to an ImageFolder tree with train/ and test/"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def load_cifar(name: str, root: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """CIFAR-10/100 from an ImageFolder tree, torchvision's binary folder, or a download.

    A tree must hold CIFAR's 10 or 100 classes of 3x32x32 images: other data under the
    name would train (and be recorded) as CIFAR, and the evaluation assumes the count.
    """
    if (root / "train").is_dir():
        train, test, classes = load_imagefolder(root)
        expected = 10 if name == "cifar10" else 100
        if len(classes) != expected or tuple(train.image_shape) != (3, 32, 32):
            shape = "x".join(map(str, train.image_shape))
            raise DataError(
                f"data.name={name} but data.root={str(root)!r} holds {len(classes)} classes "
                f"of {shape} images, not {name}'s {expected} of 3x32x32; use "
                f"data.name=imagefolder for other data, or point data.root at {name} itself")
        return train, test, classes
    folder = root / _CIFAR_BINARY[name][0]
    if not folder.is_dir():
        _download_cifar(name, root)
    return _read_cifar_binary(folder, name)
