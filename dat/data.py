"""Datasets by name, the validation split, and two loaders with one interface.

Every loader yields :class:`Batch` (``x`` augmented, ``x_raw`` un-augmented, ``y``) as
float images in [0, 1] on the target device. Augmentation (random crop with zero
padding + horizontal flip) runs on whole batches on the device, with random draws made
on a CPU generator, so the resident and DataLoader paths give identical batches for the
same seed on a given device (CUDA's x / 255 can differ from the CPU's in the last bit).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DataConfig
from .datasets import DataError, ImageSet, load_cifar, load_imagefolder, load_sample

__all__ = [
    "Batch",
    "DataError",
    "DataLoaderLoader",
    "DatasetSplits",
    "ImageSet",
    "ResidentLoader",
    "augment_batch",
    "describe_data",
    "load_dataset",
    "make_loader",
    "stratified_split",
]


class Batch(NamedTuple):
    x: Tensor  # (B, C, H, W) float in [0, 1], augmented
    x_raw: Tensor  # (B, C, H, W) float in [0, 1], un-augmented (DAT's recombined branch)
    y: Tensor  # (B,) int64


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


def stratified_split(labels: Tensor, size: int, seed: int, keep_every_class: bool = False,
                     hold_every_class: bool = False) -> tuple[Tensor, Tensor]:
    """``(keep, held)`` indices: ``held`` has ``size`` items, each class in proportion to
    its share of ``labels`` (equal shares on a balanced set; on an imbalanced one the
    subset keeps the set's class mix, so its accuracy estimates the whole set's).

    ``keep_every_class``: leave at least one image of every class in ``keep`` (a
    validation split must not take a rare class out of training). ``hold_every_class``:
    put at least one image of every class in ``held`` when ``size`` allows (a training
    subset must not drop a rare class whose share rounds to zero).
    """
    if size <= 0:
        return torch.arange(len(labels)), torch.empty(0, dtype=torch.int64)
    if size >= len(labels):
        raise DataError(f"data.val_size={size} leaves no training images; lower it")
    classes, counts = labels.unique(return_counts=True)
    cap = (counts - 1).clamp(min=0) if keep_every_class else counts
    if size > int(cap.sum()):
        raise DataError(f"data.val_size={size} would take every image of some class out of "
                        f"training; lower it to at most {int(cap.sum())}")
    # ties between equal remainders are broken in a seeded random class order, not by
    # class index: 100 of Tiny-ImageNet's 200 classes (50 images each) must not always be
    # classes 0..99; a separate generator, so splits without ties stay as they were
    ties = torch.randperm(len(counts), generator=torch.Generator().manual_seed(seed + 1))
    quotas = _quotas(counts, cap, size, ties)
    if hold_every_class and bool(((quotas == 0) & (cap > 0)).any()):
        ones = (cap > 0).long()
        rest = size - int(ones.sum())
        if rest == 0:
            quotas = ones
        elif rest > 0:  # one each, the rest in proportion
            quotas = ones + _quotas(counts - ones, cap - ones, rest, ties)
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c, q in zip(classes.tolist(), quotas.tolist(), strict=True):
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=gen)[:q]])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().flatten(), held_idx


def _quotas(counts: Tensor, cap: Tensor, size: int, ties: Tensor | None = None) -> Tensor:
    """Per-class sizes summing to ``size``, proportional to ``counts`` (largest remainder;
    ties go in the order ``ties`` (a permutation of the classes; None: class index)),
    none above ``cap``."""
    exact = counts.double() * size / counts.sum()
    quota = torch.minimum(exact.floor().long(), cap)
    rank = torch.arange(len(counts)) if ties is None else torch.argsort(ties)  # its inverse
    order = sorted(range(len(counts)),
                   key=lambda i: (-(exact[i] - quota[i]).item(), int(rank[i])))
    while int(quota.sum()) < size:  # one pass, unless caps turned some classes away
        for i in order:
            if int(quota.sum()) == size:
                break
            if quota[i] < cap[i]:
                quota[i] += 1
    return quota


def describe_data(cfg: DataConfig) -> dict[str, str]:
    """The dataset's name and, unless it ships with dat, its folder (absolute): what an
    evaluation report records of the data it ran on."""
    if cfg.name == "cifar10-sample" or not cfg.root:
        return {"data": cfg.name}
    return {"data": cfg.name, "data_root": str(Path(cfg.root).expanduser().absolute())}


def _read_dataset(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str]]:
    root = Path(cfg.root).expanduser()
    if cfg.name == "cifar10-sample":
        return load_sample()
    if cfg.name in ("cifar10", "cifar100"):
        return load_cifar(cfg.name, root)
    if cfg.name == "imagefolder":
        if not root.is_dir():
            raise DataError(f"data.root={str(root)!r} does not exist; point it at a folder "
                            "with train/<class>/* and val/ or test/")
        return load_imagefolder(root)
    raise DataError(f"unknown dataset {cfg.name!r}; use cifar10, cifar100, imagefolder "
                    "or cifar10-sample")


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """Load ``cfg.name`` and hold out a stratified validation split from its training set.

    The validation split depends only on the dataset, ``val_size`` and ``split_seed``: it
    is drawn before ``train_subset``, so quick runs select on the same images as full runs.
    """
    train, test, classes = _read_dataset(cfg)
    if train.images is not None:
        train.image_shape = test.image_shape = tuple(train.images.shape[1:])
    keep, held = stratified_split(train.labels, cfg.val_size, cfg.split_seed,
                                  keep_every_class=True)
    train, val = train.subset(keep), train.subset(held)
    if 0 < cfg.train_subset < len(train):
        _, chosen = stratified_split(train.labels, cfg.train_subset, cfg.split_seed,
                                     hold_every_class=True)
        train = train.subset(chosen)
        missing = len(classes) - len(train.labels.unique())
        if missing:
            warnings.warn(f"data.train_subset={cfg.train_subset} is smaller than the "
                          f"{len(classes)} classes: {missing} classes get no training image; "
                          "raise it to at least the number of classes", stacklevel=2)
    if len(train) < 2:  # BatchNorm needs two images per batch
        raise DataError(f"only {len(train)} training image(s) left after holding out "
                        f"data.val_size={cfg.val_size} (and data.train_subset); lower them")
    if 0 < cfg.test_subset < len(test):
        # stratified, not the first N: test sets are often stored sorted by label
        _, chosen = stratified_split(test.labels, cfg.test_subset, cfg.split_seed)
        test = test.subset(chosen)
    return DatasetSplits(train, val, test, classes)


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


def _num_batches(n: int, batch_size: int) -> int:
    """Batches from ``n`` samples; a last batch of one sample joins the previous batch."""
    full, rest = divmod(n, batch_size)
    if rest == 1 and full > 0 and batch_size > 1:  # BatchNorm needs 2+ samples: merge, not drop
        return full
    return full + (1 if rest else 0)


def _epoch_batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator,
                   rank: int, world: int) -> list[Tensor]:
    """This rank's index batches: every sample once across ranks, equal counts on all ranks.

    Equal counts matter because DDP ranks that step a different number of times hang; the
    count is that of the largest shard, ``ceil(n / world)``.
    """
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    chunks = list(order[rank::world].split(batch_size))
    if len(chunks) > _num_batches(-(-n // world), batch_size):
        last = chunks.pop()  # pop before indexing: the list shrinks
        chunks[-1] = torch.cat([chunks[-1], last])
    if len(chunks) > 1 and len(chunks[-1]) == 1 and len(chunks[-2]) > 2:
        # A shard one sample shorter than the largest: borrow one so no batch has size 1.
        chunks[-1] = torch.cat([chunks[-2][-1:], chunks[-1]])
        chunks[-2] = chunks[-2][:-1]
    return chunks


class _LoaderBase:
    def __init__(self, data: ImageSet, batch_size: int, device: torch.device | str,
                 shuffle: bool = True, augment: bool = True, padding: int = 4,
                 flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.data, self.batch_size, self.device = data, batch_size, torch.device(device)
        self.shuffle, self.augment, self.padding, self.flip = shuffle, augment, padding, flip
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(data) < world_size:
            raise DataError(f"{len(data)} images cannot be sharded over {world_size} ranks")

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically: order and crops depend on (seed, epoch, rank) only."""
        self.epoch = epoch

    def __len__(self) -> int:
        return _num_batches(-(-len(self.data) // self.world_size), self.batch_size)

    def _generators(self) -> tuple[torch.Generator, torch.Generator]:
        """(order, augmentation) generators: the order is shared by all ranks (so shards
        partition it), the augmentation draws differ per rank."""
        base = self.seed * 100003 + self.epoch
        order = torch.Generator().manual_seed(base)
        return order, torch.Generator().manual_seed(base * 1009 + 1 + self.rank)

    def _batches(self) -> tuple[list[Tensor], torch.Generator]:
        order, augment = self._generators()
        batches = _epoch_batches(len(self.data), self.batch_size, self.shuffle, order,
                                 self.rank, self.world_size)
        return batches, augment

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
        batches, gen = self._batches()
        for idx in batches:
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
        batches, gen = self._batches()
        # DataLoader draws its workers' base seed when it starts iterating; from the global
        # generator that draw would shift training's random stream (attack starts, AAG
        # noise), and a resume, which starts the epoch's iteration again after restoring
        # that stream, would draw once more than the uninterrupted run: its own generator
        seeds = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) * 1009)
        loader = torch.utils.data.DataLoader(
            self.data, batch_sampler=_OrderSampler(batches), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False, generator=seeds,
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
