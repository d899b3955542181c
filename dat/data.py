"""Datasets by name, the validation split, and two loaders with one interface.

Every loader yields :class:`Batch` (``x`` augmented, ``x_raw`` un-augmented, ``y``) as
float images in [0, 1] on the target device. Augmentation (random crop with zero
padding + horizontal flip) runs on whole batches on the device, with random draws made
on a CPU generator, so the resident and DataLoader paths give identical batches for the
same seed on any device.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DataConfig

__all__ = [
    "Batch",
    "DataError",
    "DataLoaderLoader",
    "DatasetSplits",
    "ImageSet",
    "ResidentLoader",
    "augment_batch",
    "load_dataset",
    "make_loader",
    "stratified_split",
]

SAMPLE_PATH = Path(__file__).resolve().parent / "assets" / "cifar10_sample.npz"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DataError(ValueError):
    """A dataset cannot be found or read; the message names the fix."""


class Batch(NamedTuple):
    x: Tensor  # (B, C, H, W) float in [0, 1], augmented
    x_raw: Tensor  # (B, C, H, W) float in [0, 1], un-augmented (DAT's recombined branch)
    y: Tensor  # (B,) int64


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


@dataclass
class DatasetSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


_grayscale_noted: set[str] = set()


def _to_rgb_array(img, source: str) -> np.ndarray:
    if img.mode != "RGB":
        if img.mode in ("L", "LA", "I", "I;16", "1", "P") and source not in _grayscale_noted:
            _grayscale_noted.add(source)
            warnings.warn(f"{source}: {img.mode} images converted to RGB", stacklevel=3)
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _read_image(path: str, shape: tuple[int, int, int] | None = None) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = _to_rgb_array(img, str(Path(path).parent.parent))
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}; remove or replace the file") from None
    if shape is not None and arr.shape[:2] != shape[1:]:
        raise DataError(
            f"{path} is {arr.shape[1]}x{arr.shape[0]} but the dataset's images are "
            f"{shape[2]}x{shape[1]}; resize all images to one size"
        )
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _decode_jpegs(buffer: np.ndarray, offsets: np.ndarray) -> Tensor:
    from PIL import Image

    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(offsets) - 1):
        blob = buffer[offsets[i] : offsets[i + 1]].tobytes()
        with Image.open(io.BytesIO(blob)) as img:
            out[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_sample() -> tuple[ImageSet, ImageSet, list[str]]:
    with np.load(SAMPLE_PATH, allow_pickle=False) as f:
        sets = [
            ImageSet(torch.from_numpy(f[f"{s}_labels"]),
                     images=_decode_jpegs(f[f"{s}_jpeg"], f[f"{s}_offsets"]))
            for s in ("train", "test")
        ]
        classes = [str(c) for c in f["classes"]]
    return sets[0], sets[1], classes


def _scan_folder(folder: Path, classes: list[str] | None = None) -> tuple[ImageSet, list[str]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = classes or found
    if not classes:
        raise DataError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>")
    unknown = set(found) - set(classes)
    if unknown:
        raise DataError(f"{folder} has classes {sorted(unknown)} that train/ lacks")
    files, labels = [], []
    for label, name in enumerate(classes):
        for p in sorted((folder / name).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(str(p))
                labels.append(label)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    shape = tuple(_read_image(files[0]).shape)
    return ImageSet(torch.tensor(labels, dtype=torch.int64), files=files, image_shape=shape), classes


def _load_imagefolder(root: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    if not (root / "train").is_dir():
        raise DataError(
            f"data.root={str(root)!r} has no train/ folder; an ImageFolder tree needs "
            "train/<class>/* and val/<class>/* or test/<class>/*"
        )
    train, classes = _scan_folder(root / "train")
    held = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if held is None:
        raise DataError(f"data.root={str(root)!r} has train/ but neither test/ nor val/")
    test, _ = _scan_folder(held, classes)
    if test.image_shape != train.image_shape:
        raise DataError(f"{held} images are {test.image_shape}, train/ images {train.image_shape}")
    return train, test, classes


def _load_cifar(name: str, root: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    import torchvision

    if (root / "train").is_dir():
        return _load_imagefolder(root)
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sets = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=not (root / cls.base_folder).is_dir())
        except Exception as err:  # offline download, corrupt archive, unwritable root
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(
                f"{name} not found under data.root={str(root)!r} and could not be downloaded "
                f"({reason}); set data.root to torchvision's folder (holding {cls.base_folder}/) "
                "or to an ImageFolder tree with train/ and test/"
            ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        sets.append(ImageSet(torch.tensor(ds.targets, dtype=torch.int64), images=images))
    return sets[0], sets[1], list(ds.classes)


def stratified_split(labels: Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(keep, held)`` indices: ``held`` has ``size`` items, balanced across labels."""
    if size <= 0:
        return torch.arange(len(labels)), torch.empty(0, dtype=torch.int64)
    if size >= len(labels):
        raise DataError(f"data.val_size={size} leaves no training images; lower it")
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    quota = torch.full((len(classes),), size // len(classes))
    quota[: size % len(classes)] += 1
    held = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=gen)[:q]])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().flatten(), held_idx


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """Load ``cfg.name`` and hold out a stratified validation split from its training set."""
    root = Path(cfg.root).expanduser()
    if cfg.name == "cifar10-sample":
        train, test, classes = _load_sample()
    elif cfg.name in ("cifar10", "cifar100"):
        train, test, classes = _load_cifar(cfg.name, root)
    elif cfg.name == "imagefolder":
        if not root.is_dir():
            raise DataError(f"data.root={str(root)!r} does not exist; point it at a folder "
                            "with train/<class>/* and val/ or test/")
        train, test, classes = _load_imagefolder(root)
    else:
        raise DataError(f"unknown dataset {cfg.name!r}")
    if cfg.train_subset:
        keep, _ = stratified_split(train.labels, len(train) - cfg.train_subset, cfg.split_seed)
        train = train.subset(keep) if cfg.train_subset < len(train) else train
    keep, held = stratified_split(train.labels, cfg.val_size, cfg.split_seed)
    if cfg.test_subset and cfg.test_subset < len(test):
        test = test.subset(torch.arange(cfg.test_subset))
    if train.images is not None:
        shape = tuple(train.images.shape[1:])
        train.image_shape = test.image_shape = shape
    return DatasetSplits(train.subset(keep), train.subset(held), test, classes)


def augment_batch(
    images: Tensor, padding: int, flip: bool, generator: torch.Generator
) -> Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip for a whole batch.

    Random draws come from ``generator`` (on the CPU), so results do not depend on the
    device the batch lives on.
    """
    b, _, h, w = images.shape
    if padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(images.device)
        padded = F.pad(images, (padding,) * 4)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(b, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images


def _epoch_batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator,
                   rank: int, world: int) -> list[Tensor]:
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    order = order[rank::world]
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:  # BatchNorm needs 2+ samples: merge, not drop
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


class _LoaderBase:
    def __init__(self, data: ImageSet, batch_size: int, device: torch.device | str,
                 shuffle: bool = True, augment: bool = True, padding: int = 4,
                 flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.data, self.batch_size, self.device = data, batch_size, torch.device(device)
        self.shuffle, self.augment, self.padding, self.flip = shuffle, augment, padding, flip
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically: the order depends on (seed, epoch) only."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(range(self.rank, len(self.data), self.world_size))
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest >= 2 or (rest == 1 and full == 0) else 0)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100003 + self.epoch)

    def _finish(self, images_u8: Tensor, labels: Tensor, gen: torch.Generator) -> Batch:
        x_raw = images_u8.float().div_(255)
        x = augment_batch(x_raw, self.padding, self.flip, gen) if self.augment else x_raw
        return Batch(x, x_raw, labels)


class ResidentLoader(_LoaderBase):
    """The whole dataset as uint8 on the device; batches are index-gathered there.

    uint8 on the device is 4x smaller than float and makes a CIFAR epoch's data movement
    free; crop and flip are a few batched tensor ops.
    """

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device | str,
                 **kwargs) -> None:
        super().__init__(data.materialize(), batch_size, device, **kwargs)
        self.images = self.data.images.to(self.device)
        self.labels = self.data.labels.to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        gen = self._generator()
        for idx in _epoch_batches(len(self.data), self.batch_size, self.shuffle, gen,
                                  self.rank, self.world_size):
            idx = idx.to(self.device)
            yield self._finish(self.images[idx], self.labels[idx], gen)


class _OrderSampler(torch.utils.data.Sampler):
    def __init__(self, batches: list[Tensor]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter([b.tolist() for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


class DataLoaderLoader(_LoaderBase):
    """Images read (and decoded) by DataLoader workers; same batches as :class:`ResidentLoader`."""

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device | str,
                 num_workers: int = 2, **kwargs) -> None:
        super().__init__(data, batch_size, device, **kwargs)
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[Batch]:
        gen = self._generator()
        batches = _epoch_batches(len(self.data), self.batch_size, self.shuffle, gen,
                                 self.rank, self.world_size)
        loader = torch.utils.data.DataLoader(
            self.data, batch_sampler=_OrderSampler(batches), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            yield self._finish(images, labels.to(self.device, non_blocking=True), gen)


def make_loader(data: ImageSet, cfg: DataConfig, device: torch.device | str, train: bool,
                seed: int = 0, rank: int = 0, world_size: int = 1) -> _LoaderBase:
    """The loader ``cfg.loader`` asks for; ``auto`` keeps decoded data resident."""
    kind = cfg.loader
    if kind == "auto":
        kind = "resident" if data.images is not None or len(data) <= 200_000 else "dataloader"
    common = dict(
        shuffle=train, augment=train, padding=cfg.crop_padding, flip=cfg.flip, seed=seed,
        rank=rank, world_size=world_size,
    )
    batch = cfg.batch_size if train else cfg.eval_batch_size
    if kind == "resident":
        return ResidentLoader(data, batch, device, **common)
    return DataLoaderLoader(data, batch, device, num_workers=cfg.num_workers, **common)
