"""Datasets by name (sample, ImageFolder, CIFAR binaries), splits, loaders, augmentation."""

from __future__ import annotations

import pickle
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dat.config import DataConfig
from dat.data import (
    DataError,
    ImageSet,
    augment_batch,
    load_dataset,
    make_loader,
    stratified_split,
)


def _keys(images: torch.Tensor) -> set[bytes]:
    """One hashable key per image (its raw bytes)."""
    return {img.numpy().tobytes() for img in images}


def _loader(data: ImageSet, kind: str, workers: int = 0, seed: int = 0, batch: int = 64,
            **kwargs):
    cfg = DataConfig(loader=kind, num_workers=workers, batch_size=batch)
    return make_loader(data, cfg, "cpu", train=True, seed=seed, **kwargs)


# ---------------------------------------------------------------- bundled sample, splits


def test_sample_loads_with_a_stratified_validation_split(sample_splits) -> None:
    s = sample_splits
    assert (len(s.train), len(s.val), len(s.test)) == (4000, 1000, 1000)
    assert s.num_classes == 10 and s.image_shape == (3, 32, 32)
    assert s.train.images.dtype == torch.uint8
    assert torch.bincount(s.val.labels).tolist() == [100] * 10
    x, y = s.test.tensors()
    assert x.shape == (1000, 3, 32, 32) and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64


def test_splits_do_not_overlap(sample_splits) -> None:
    train, val, test = (_keys(s.images) for s in (sample_splits.train, sample_splits.val,
                                                  sample_splits.test))
    assert len(val) == 1000  # no duplicates inside the validation split
    assert not val & train
    assert not val & test


def test_validation_split_is_fixed_by_split_seed(sample_splits) -> None:
    again = load_dataset(DataConfig(name="cifar10-sample"))
    assert torch.equal(again.val.images, sample_splits.val.images)
    other = load_dataset(DataConfig(name="cifar10-sample", split_seed=1))
    assert not torch.equal(other.val.images, sample_splits.val.images)
    assert torch.bincount(other.val.labels).tolist() == [100] * 10


def test_train_subset_is_stratified_and_keeps_the_validation_split(sample_splits) -> None:
    small = load_dataset(DataConfig(name="cifar10-sample", train_subset=300, test_subset=50))
    assert (len(small.train), len(small.test)) == (300, 50)
    assert torch.bincount(small.train.labels).tolist() == [30] * 10
    assert torch.equal(small.val.images, sample_splits.val.images)
    assert _keys(small.train.images) <= _keys(sample_splits.train.images)


def test_subsets_of_the_whole_set_and_of_a_class_sorted_test_split(tmp_path: Path) -> None:
    """train_subset equal to the training set is no subset (not an error); test_subset is
    stratified, not the first N of a test/ read class by class."""
    _png_tree(tmp_path, {"train": ["a", "b", "c"], "test": ["a", "b", "c"]}, per_class=4)
    s, _ = _load_noting(tmp_path, train_subset=12, test_subset=3)
    assert len(s.train) == 12
    assert s.test.labels.tolist() == [0, 1, 2]


def test_a_training_subset_keeps_a_rare_class(tmp_path: Path) -> None:
    """A class whose proportional share rounds to zero used to vanish from train_subset
    (200 + 200 + 2 images, subset 50: the rare class got none); now it keeps one."""
    _png_tree(tmp_path, {"train": ["a", "b"], "test": ["a", "b", "c"]}, per_class=100)
    _png_tree(tmp_path, {"train": ["c"]}, per_class=2)
    splits = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=3,
                                     train_subset=50))
    counts = splits.train.labels.bincount(minlength=3).tolist()
    assert sum(counts) == 50 and counts[2] == 1 and abs(counts[0] - counts[1]) <= 1
    with pytest.warns(UserWarning, match="train_subset=2 is smaller than the 3 classes: 1 "
                                         "classes get no training image"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=3,
                                train_subset=2))


def test_a_split_that_leaves_one_training_image_is_refused() -> None:
    with pytest.raises(DataError, match="only 1 training image"), \
            pytest.warns(UserWarning, match="train_subset=1 is smaller than the 10 classes"):
        load_dataset(DataConfig(name="cifar10-sample", train_subset=1))
    with pytest.raises(DataError, match="val_size=4999 would take every image of some class"):
        load_dataset(DataConfig(name="cifar10-sample", val_size=4999))


def test_stratified_split_rejects_a_split_that_leaves_nothing() -> None:
    with pytest.raises(DataError, match="val_size"):
        stratified_split(torch.zeros(10, dtype=torch.int64), 10, seed=0)
    keep, held = stratified_split(torch.arange(6) % 3, 3, seed=0)
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(6))


def test_a_validation_split_never_takes_a_rare_class_out_of_training() -> None:
    labels = torch.tensor([0] * 25 + [1] * 25 + [2] * 5)  # "frog" has 5 images
    keep, held = stratified_split(labels, 50, seed=0, keep_every_class=True)
    assert torch.bincount(labels[keep]).tolist() == [2, 2, 1]
    assert len(held) == 50 and sorted(torch.cat([keep, held]).tolist()) == list(range(55))
    with pytest.raises(DataError, match="every image of some class.*at most 52"):
        stratified_split(labels, 53, seed=0, keep_every_class=True)


def test_subsets_keep_the_class_mix_and_equal_shares_on_balanced_sets() -> None:
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    _, held = stratified_split(labels, 20, seed=0)
    assert torch.bincount(labels[held]).tolist() == [12, 6, 2]  # the 6 : 3 : 1 mix
    _, held = stratified_split(labels, 7, seed=0)  # 4.2, 2.1, 0.7: the largest remainder
    assert torch.bincount(labels[held], minlength=3).tolist() == [4, 2, 1]
    balanced = torch.arange(10).repeat_interleave(100)
    _, held = stratified_split(balanced, 32, seed=0)  # 3 each, two classes get 4
    assert sorted(torch.bincount(balanced[held]).tolist()) == [3] * 8 + [4, 4]


def test_subset_ties_are_not_always_the_first_classes() -> None:
    """Fewer examples than classes on a balanced set (--n-examples 100 on Tiny-ImageNet's
    200 x 50 val images): the classes taken are a seeded draw, not classes 0..99."""
    labels = torch.arange(200).repeat_interleave(50)
    _, held = stratified_split(labels, 100, seed=0)
    counts = torch.bincount(labels[held], minlength=200)
    assert len(held) == 100 and int(counts.max()) == 1
    assert 0 < int(counts[100:].sum()) < 100  # both halves of the class list are sampled
    _, again = stratified_split(labels, 100, seed=0)
    assert torch.equal(held, again)  # still fixed by the seed
    _, other = stratified_split(labels, 100, seed=1)
    assert not torch.equal(held, other)


# ---------------------------------------------------------------- ImageFolder trees


def _write_tree(root: Path, split: str, images: torch.Tensor, labels: torch.Tensor,
                classes: list[str]) -> None:
    for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = root / split / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.jpg", quality=95)


@pytest.fixture
def tiny_tree(tmp_path: Path, sample_splits) -> Path:
    """train/ with 24 JPEGs (3 classes x 8), one of them grayscale; test/ with 6."""
    classes = ["cat", "dog", "frog"]
    pick = torch.cat([(sample_splits.train.labels == c).nonzero()[:8, 0] for c in range(3)])
    images, labels = sample_splits.train.images[pick], sample_splits.train.labels[pick]
    _write_tree(tmp_path, "train", images, labels, classes)
    _write_tree(tmp_path, "test", images[::4], labels[::4], classes)
    gray = Image.fromarray(images[0].float().mean(0).to(torch.uint8).numpy(), mode="L")
    gray.save(tmp_path / "train" / "cat" / "gray.jpg")
    return tmp_path


def test_tiny_imagenet_published_layout_loads(tmp_path: Path, sample_splits) -> None:
    """train/<wnid>/images/*, a flat val/images/ + val_annotations.txt, unlabelled test/."""
    wnids = ["n01443537", "n01629819"]
    for label, wnid in enumerate(wnids):
        folder = tmp_path / "train" / wnid / "images"
        folder.mkdir(parents=True)
        images = sample_splits.train.images[sample_splits.train.labels == label][:4]
        for i, img in enumerate(images):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{wnid}_{i}.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "test" / "images").mkdir(parents=True)
    lines, val_labels = [], [1, 0, 1]
    for i, label in enumerate(val_labels):
        img = sample_splits.test.images[sample_splits.test.labels == label][i]
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "val" / "images" /
                                                            f"val_{i}.JPEG")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "test" / "images" /
                                                            f"test_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t31\t31")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    s = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2))
    assert s.classes == wnids and (len(s.train), len(s.val), len(s.test)) == (6, 2, 3)
    assert s.test.labels.tolist() == val_labels  # labels come from the annotation file
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\n")
    with pytest.raises(DataError, match="line 1: expected 'file<TAB>class'"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2))


def test_tiny_imagenet_with_val_sorted_into_class_folders_loads(tmp_path: Path,
                                                                 sample_splits) -> None:
    """A common copy: val/<wnid>/images/* (sorted by a preparation script) with the
    val_annotations.txt kept; the class folders label val/, not the stale file."""
    wnids = ["n01443537", "n01629819"]
    for split, n in (("train", 4), ("val", 2)):
        for label, wnid in enumerate(wnids):
            folder = tmp_path / split / wnid / "images"
            folder.mkdir(parents=True)
            images = sample_splits.train.images[sample_splits.train.labels == label][:n]
            for i, img in enumerate(images):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{split}_{i}.JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn01443537\t0\t0\t31\t31\n")  # names a file of the flat layout
    s = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2))
    assert s.classes == wnids and len(s.test) == 4
    assert s.test.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("held_name", ["test", "val"])
def test_imagefolder_tree_loads(tiny_tree: Path, held_name: str) -> None:
    if held_name == "val":
        (tiny_tree / "test").rename(tiny_tree / "val")
    cfg = DataConfig(name="imagefolder", root=str(tiny_tree), val_size=3)
    with pytest.warns(UserWarning, match=r"converting non-RGB images to RGB \(1 L\)"):
        s = load_dataset(cfg)
    assert s.classes == ["cat", "dog", "frog"]
    assert (len(s.train), len(s.val), len(s.test)) == (22, 3, 6)
    assert torch.bincount(s.val.labels).tolist() == [1, 1, 1]
    x, _ = s.train.tensors()
    assert x.shape == (22, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    both = s.train.files + s.val.files
    img = ImageSet(torch.zeros(1), files=[next(f for f in both if f.endswith("gray.jpg"))])[0][0]
    assert img.shape == (3, 32, 32) and torch.equal(img[0], img[1])  # gray, now 3 channels
    # Files are read by the DataLoader path exactly as the resident path decodes them.
    a = [b.x for b in _loader(s.train, "resident", batch=8)]
    b = [b.x for b in _loader(s.train, "dataloader", batch=8)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_cifar10_name_reads_an_imagefolder_root(tmp_path: Path, sample_splits) -> None:
    """CIFAR-10 as an ImageFolder tree (the JPEG tree): 10 classes of 32x32."""
    pick = torch.cat([(sample_splits.train.labels == c).nonzero()[:2, 0] for c in range(10)])
    images, labels = sample_splits.train.images[pick], sample_splits.train.labels[pick]
    _write_tree(tmp_path, "train", images, labels, sample_splits.classes)
    _write_tree(tmp_path, "test", images[::2], labels[::2], sample_splits.classes)
    s = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), val_size=10))
    assert s.classes == sample_splits.classes and len(s.test) == 10


@pytest.mark.filterwarnings("ignore:.*converting non-RGB images")
@pytest.mark.parametrize("name, size, found", [("cifar10", 32, "3 classes of 3x32x32"),
                                               ("cifar100", 64, "3 classes of 3x64x64")])
def test_cifar_names_refuse_a_tree_of_other_data(tiny_tree: Path, name, size, found) -> None:
    """It trained on whatever the tree held (e.g. Tiny-ImageNet's 200 classes at 64x64 as
    cifar100), and only the data: line said so."""
    if size != 32:
        for path in tiny_tree.rglob("*.jpg"):
            Image.open(path).resize((size, size)).save(path)
    with pytest.raises(DataError, match=f"data.name={name} but .* holds {found} images, not "
                       f"{name}'s {10 if name == 'cifar10' else 100} of 3x32x32; use "
                       "data.name=imagefolder") as info:
        load_dataset(DataConfig(name=name, root=str(tiny_tree), val_size=3))
    assert "\n" not in str(info.value)


def test_cifar10_name_refuses_ten_classes_of_another_image_size(tmp_path: Path) -> None:
    """The right class count is not enough: 10 classes of 8x8 images are not CIFAR-10."""
    names = [f"c{i}" for i in range(10)]
    _png_tree(tmp_path, {"train": names, "test": names}, per_class=1)
    with pytest.raises(DataError, match=r"holds 10 classes of 3x8x8 images, not cifar10's 10 "
                                        "of 3x32x32"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), val_size=0))


def test_mis_sized_image_gives_a_clear_error(tiny_tree: Path) -> None:
    Image.new("RGB", (30, 32)).save(tiny_tree / "train" / "dog" / "small.png")
    with pytest.raises(DataError, match="30x32 but .* is 32x32; resize all images") as info:
        load_dataset(DataConfig(name="imagefolder", root=str(tiny_tree), val_size=3))
    assert "\n" not in str(info.value)


def test_an_empty_class_folder_in_train_is_refused(tiny_tree: Path) -> None:
    """It used to become an extra class with no images (an 11-class model for 10)."""
    (tiny_tree / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match="class folders without images: zebra; add images"), \
            pytest.warns(UserWarning, match="converting non-RGB"):  # the tree's gray image
        load_dataset(DataConfig(name="imagefolder", root=str(tiny_tree), val_size=3))


def test_a_corrupt_image_read_in_a_loader_worker_is_one_line(tiny_tree: Path, capsys) -> None:
    """torch folds the worker's traceback into the error; the CLI prints its last line."""
    from dat.cli import train_main

    jpeg = (tiny_tree / "train" / "dog").glob("*.jpg").__next__()
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # the header reads, the pixels do not
    code = train_main([
        "--no-progress", "data.name=imagefolder", f"data.root={tiny_tree}", "data.val_size=3",
        "data.loader=dataloader", "data.num_workers=1", "data.batch_size=4",
        "model.name=resnet_tiny", "method.name=pgd_at", "train.epochs=1",
        f"train.out_dir={tiny_tree / 'runs'}", "train.val_every=0", "train.test_attacks=[]"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith(f"error: cannot read image {jpeg}: ") and "Traceback" not in err
    assert err.endswith("remove or replace the file")


@pytest.mark.filterwarnings("ignore:.*converting non-RGB images")  # the tree's L image
def test_evaluate_model_on_a_small_tree_reads_its_test_split(tiny_tree: Path, capsys) -> None:
    """evaluate.py --model holds out data.val_size=1000 training images it never uses for
    --split test, so a train/ of 24 images was refused ("lower it", with no flag to do so)."""
    import json

    import dat
    from dat.evaluation.cli import evaluate_main

    model = dat.models.create("resnet_tiny", 3).eval()
    torch.save(model.state_dict(), tiny_tree / "net.pt")
    out = tiny_tree / "e"
    argv = ["--model", "resnet_tiny", "--weights", str(tiny_tree / "net.pt"), "--data",
            "imagefolder", "--data-root", str(tiny_tree), "--attacks", "clean",
            "--no-progress", "--no-checks"]
    assert evaluate_main([*argv, "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["n"] == 6  # all of test/
    assert evaluate_main([*argv, "--split", "val", "--out", str(tiny_tree / "v")]) == 2
    assert "use --split test" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*converting non-RGB images")  # the tree's L image
def test_evaluate_refuses_a_model_with_fewer_outputs_than_classes(tiny_tree: Path,
                                                                  capsys) -> None:
    """A 2-output model on 3 class folders whose test/ lacks the last one: no label reached
    the missing output, so it was evaluated without a word (chance read as 50%)."""
    import shutil

    from dat.evaluation.cli import evaluate_main

    shutil.rmtree(tiny_tree / "test" / "frog")
    (tiny_tree / "two.py").write_text(
        "import dat\n\ndef build():\n    return dat.models.create('resnet_tiny', 2)\n")
    assert evaluate_main(["--model", f"{tiny_tree / 'two.py'}:build", "--data", "imagefolder",
                          "--data-root", str(tiny_tree), "--attacks", "clean", "--no-progress",
                          "--no-checks", "--out", str(tiny_tree / "e")]) == 2
    err = capsys.readouterr().err
    assert "error: the model outputs 2 classes but the data has 3" in err
    assert not (tiny_tree / "e").exists()


def test_cli_warnings_are_one_line() -> None:
    from dat.messages import one_line_warnings

    with one_line_warnings():
        text = warnings.formatwarning("converting non-RGB\nimages", UserWarning, "x.py", 3)
    assert text == "warning: converting non-RGB images\n"


def test_missing_folders_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root=.* does not exist"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "nope")))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="neither test/ nor val/; add .*/test/<class>/ images"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))


def _png_tree(root: Path, layout: dict[str, list[str]], per_class: int = 2) -> None:
    """``root/<split>/<class>/<i>.png``: 8x8 RGB images of distinct colours."""
    for split, classes in layout.items():
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = Image.new("RGB", (8, 8), (40 * c, 20 * i, 99))
                image.save(root / split / name / f"{i}.png")


def _load_noting(root: Path, **kwargs) -> tuple:
    """``load_dataset`` of the ImageFolder at ``root`` and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_dataset(DataConfig(name="imagefolder", root=str(root), val_size=0, **kwargs))
    return s, [str(w.message) for w in caught]


def test_16_bit_and_float_images_are_scaled_to_8_bits(tmp_path: Path) -> None:
    """PIL's own RGB conversion made a 16-bit PNG nearly all 255 and a float TIFF all 0."""
    v = np.arange(64, dtype=np.int32).reshape(8, 8) * 4  # the 8-bit values 0..252
    wide = v * 257
    wide[0, :2] = (-5, 70000)  # mode I is clipped: 0 and 255
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
        Image.fromarray((v * 257).astype(np.uint16)).save(tmp_path / split / "a" / "16.png")
        Image.fromarray(wide).save(tmp_path / split / "b" / "32.tif")
        Image.fromarray((v / 255).astype(np.float32)).save(tmp_path / split / "b" / "f.tif")
    s, notes = _load_noting(tmp_path)
    assert any("converting non-RGB images to RGB (1 F, 1 I, 1 I;16)" in n for n in notes)
    want = torch.from_numpy(v.astype(np.uint8)).expand(3, 8, 8)
    clipped = want.clone()
    clipped[:, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    images = {Path(f).name: s.test[i][0] for i, f in enumerate(s.test.files)}
    assert images["16.png"].dtype == torch.uint8 and torch.equal(images["16.png"], want)
    assert torch.equal(images["f.tif"], want) and torch.equal(images["32.tif"], clipped)
    Image.fromarray(np.full((8, 8), 2.0, np.float32)).save(tmp_path / "train" / "b" / "bad.tif")
    with pytest.raises(DataError, match=r"bad.tif is a float image with values outside \[0, 1\]"):
        _load_noting(tmp_path)


def test_8_bit_values_in_a_16_bit_file_are_named(tmp_path: Path) -> None:
    """A uint8 array saved as uint16 (0..255 in a 16-bit PNG) was scaled by 1/257 to an
    all-black image, noticed only as one more "converting non-RGB" count."""
    v = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4  # 0..252 stored as 16-bit
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(v * 257).save(tmp_path / split / name / "wide.png")
    Image.fromarray(v).save(tmp_path / "train" / "a" / "narrow.png")
    _, notes = _load_noting(tmp_path)
    dark = [n for n in notes if "hold values only up to 255" in n]
    assert len(dark) == 1 and "1 16/32-bit images" in dark[0] and "narrow.png" in dark[0]


def test_16_bit_values_round_to_the_nearest_8_bit_value(tmp_path: Path) -> None:
    """0..65535 to 0..255 rounds (x + 128) // 257, not truncates: 257 v + 200 is v + 1; a
    16-bit file whose largest value is exactly 255 is named as 8-bit data too."""
    v = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(v * 257 + 200).save(tmp_path / split / "a" / "wide.png")
    narrow = v.copy()
    narrow[0, 0] = 255
    Image.fromarray(narrow).save(tmp_path / "train" / "a" / "narrow.png")
    s, notes = _load_noting(tmp_path)
    want = torch.from_numpy(v.astype(np.uint8) + 1).expand(3, 8, 8)
    assert torch.equal(s.test[0][0], want)
    assert any("1 16/32-bit images" in n and "narrow.png" in n for n in notes)


def test_float_images_round_to_8_bits_and_refuse_values_outside_0_1(tmp_path: Path) -> None:
    """[0, 1] is closed (1.0 is 255) and values are rounded (0.999 is 255, not 254); values
    below 0 or NaN are refused like values above 1."""
    white = np.ones((8, 8), np.float32)
    white[0, 1] = 0.999
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        for name in ("f.tif", "g.tif"):  # two: BatchNorm needs two training images
            Image.fromarray(white).save(tmp_path / split / "a" / name)
    s, _ = _load_noting(tmp_path)
    assert torch.equal(s.test[0][0], torch.full((3, 8, 8), 255, dtype=torch.uint8))
    for value in (-0.5, float("nan")):
        bad = np.full((8, 8), 0.5, np.float32)
        bad[0, 0] = value
        Image.fromarray(bad).save(tmp_path / "train" / "a" / "bad.tif")
        with pytest.raises(DataError, match=r"bad.tif is a float image with values outside"):
            _load_noting(tmp_path)


def test_an_image_resized_after_the_scan_is_refused_when_read(tmp_path: Path) -> None:
    """Headers are checked when the tree is scanned; a file replaced later (mid-run) by one
    of another size must not reach a batch (torch.stack would fail without naming it)."""
    path = tmp_path / "late.png"
    Image.new("RGB", (6, 8)).save(path)
    data = ImageSet(torch.zeros(1, dtype=torch.int64), files=[str(path)], image_shape=(3, 8, 8))
    with pytest.raises(DataError, match=r"late.png is 6x8 but the dataset's images are 8x8"):
        data[0]


def test_held_out_images_of_another_size_than_train_are_refused(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": ["cat", "dog"]})
    (tmp_path / "test" / "cat").mkdir(parents=True)
    Image.new("RGB", (6, 6)).save(tmp_path / "test" / "cat" / "0.png")
    with pytest.raises(DataError, match=r"test images are \(3, 6, 6\), train/ images "
                                        r"\(3, 8, 8\); resize all images to one size"):
        _load_noting(tmp_path)


def test_annotation_files_beside_the_class_folders_are_not_counted(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    (tmp_path / "train" / "wnids.txt").write_text("cat\ndog\n")  # as Tiny-ImageNet ships
    assert _load_noting(tmp_path)[1] == []


def test_an_annotation_naming_a_missing_file_says_which_line(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": ["n1", "n2"]})
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "val_annotations.txt").write_text("gone.JPEG\tn1\t0\t0\t7\t7\n")
    with pytest.raises(DataError, match=r"val_annotations.txt line 1 names .*gone.JPEG, which "
                                        "does not exist"):
        _load_noting(tmp_path)


def test_hidden_folders_and_files_are_skipped(tmp_path: Path) -> None:
    """.ipynb_checkpoints/ became class 0 and shifted every label; macOS ._* stopped the run."""
    _png_tree(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    for split in ("train", "test"):
        _png_tree(tmp_path, {f"{split}/.ipynb_checkpoints": ["x"]})
        (tmp_path / split / ".ipynb_checkpoints" / "0.png").write_bytes(b"")
        (tmp_path / split / ".DS_Store").write_bytes(b"\0")
        for png in (tmp_path / split).glob("[!.]*/*.png"):
            (png.parent / f"._{png.name}").write_bytes(b"\0\5\26\7 AppleDouble")
    _png_tree(tmp_path, {"train/dog/.thumbnails": ["y"]})
    s, notes = _load_noting(tmp_path)
    assert s.classes == ["cat", "dog"] and s.train.labels.tolist() == [0, 0, 1, 1]
    assert s.test.labels.tolist() == [0, 0, 1, 1] and not notes
    assert all("/." not in f for f in s.train.files + s.test.files)


def test_images_in_linked_sub_folders_are_read_without_looping(tmp_path: Path) -> None:
    """Path.rglob skipped linked folders silently; a link to a parent must not loop."""
    _png_tree(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    _png_tree(tmp_path / "elsewhere", {"more": ["cats"]}, per_class=3)
    (tmp_path / "data" / "train" / "cat" / "linked").symlink_to(tmp_path / "elsewhere" / "more")
    (tmp_path / "data" / "train" / "cat" / "loop").symlink_to(tmp_path / "data" / "train")
    (tmp_path / "elsewhere" / "more" / "cats" / "back").symlink_to(tmp_path / "elsewhere")
    s, _ = _load_noting(tmp_path / "data")
    assert s.train.labels.tolist() == [0] * 5 + [1] * 2
    assert sum("/cat/linked/cats/" in f for f in s.train.files) == 3
    assert not any("/loop/" in f for f in s.train.files)


def test_skipped_files_are_counted_in_one_warning(tmp_path: Path) -> None:
    """Files that are not read (wrong suffix, no class folder) used to vanish silently."""
    _png_tree(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "dog" / "new.jfif", format="JPEG")
    for name in ("cat/a.heic", "cat/b.heic", "dog/scan.jp2", "dog/README", "cat.jpg",
                 "cat/cat_boxes.txt", "dog/labels.csv"):  # annotation files: not counted
        (tmp_path / "train" / name).write_text("not read")
    s, notes = _load_noting(tmp_path)
    assert s.train.files[-1].endswith("new.jfif") and len(s.train) == 5
    assert notes == [f"{tmp_path / 'train'}: skipped 4 files that are not images (.heic 2, "
                     "(no suffix) 1, .jp2 1) and 1 files outside class folders (.jpg 1)"]


def test_an_unlabelled_test_folder_beside_a_labelled_val_folder(tmp_path: Path) -> None:
    """val/<class>/ + an unlabelled test/images/ (a common layout) failed on class 'images'."""
    _png_tree(tmp_path, {"train": ["cat", "dog"], "test": ["images"]})
    with pytest.raises(DataError, match=r"test has no class folder of train/ \(it has \['images'\]"
                       r"\); put its images in .*, or add labelled .*/val/<class>/ images"):
        _load_noting(tmp_path)
    _png_tree(tmp_path, {"val": ["cat", "dog"]}, per_class=3)
    s, notes = _load_noting(tmp_path)
    assert s.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert notes == [f"{tmp_path / 'test'} has no class folder of train/ (unlabelled?), so "
                     f"{tmp_path / 'val'} is the test split"]


def test_test_classes_that_train_lacks_name_the_fix(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": ["dog"], "test": ["cat", "dog"]})
    with pytest.raises(DataError, match=r"test has classes \['cat'\] that train/ lacks; rename "
                       r"or remove those folders so test/'s classes are a subset of train/'s"):
        _load_noting(tmp_path)


# ---------------------------------------------------------------- torchvision binaries


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Write a small binary CIFAR folder in torchvision's layout; return (images, labels)."""
    rng = np.random.default_rng(0)
    n_classes = 10 if name == "cifar10" else 100
    images = rng.integers(0, 256, (60, 3072), dtype=np.uint8)
    labels = np.arange(60) % n_classes
    if name == "cifar10":
        folder, key = root / "cifar-10-batches-py", "labels"
        folder.mkdir()
        for i in range(5):  # 5 training batches of 10, then a test batch of 10
            part = slice(i * 10, i * 10 + 10)
            batch = {"data": images[part], key: labels[part].tolist()}
            _dump(folder / f"data_batch_{i + 1}", batch)
        _dump(folder / "test_batch", {"data": images[50:], key: labels[50:].tolist()})
        _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder, key = root / "cifar-100-python", "fine_labels"
        folder.mkdir()
        _dump(folder / "train", {"data": images[:50], key: labels[:50].tolist()})
        _dump(folder / "test", {"data": images[50:], key: labels[50:].tolist()})
        _dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return images.reshape(-1, 3, 32, 32), labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_binary_folder_loads(tmp_path: Path, name: str) -> None:
    images, labels = _fake_cifar(tmp_path, name)
    s = load_dataset(DataConfig(name=name, root=str(tmp_path), val_size=0))
    assert len(s.classes) == (10 if name == "cifar10" else 100) and s.classes[3] == "c3"
    assert torch.equal(s.train.images, torch.from_numpy(images[:50]))
    assert torch.equal(s.train.labels, torch.from_numpy(labels[:50]))
    assert torch.equal(s.test.images, torch.from_numpy(images[50:]))
    assert s.image_shape == (3, 32, 32)


def test_binary_folder_refuses_pickled_code(tmp_path: Path) -> None:
    _fake_cifar(tmp_path, "cifar10")
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": print, "labels": []})
    with pytest.raises(DataError, match="not allowed"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), val_size=0))


def test_offline_cifar_without_data_fails_fast_naming_data_root(tmp_path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # no network, whatever the machine
    root = tmp_path / "absent"
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"data.root='.*absent'") as info:
        load_dataset(DataConfig(name="cifar10", root=str(root)))
    assert time.perf_counter() - start < 20  # seconds
    assert "\n" not in str(info.value)
    assert not root.exists()  # no empty folder left behind


def test_a_failed_download_restores_the_socket_timeout_and_keeps_an_existing_root(
        tmp_path, monkeypatch) -> None:
    """The 30 s download timeout is process-wide: it must not outlive the download (it
    would cut TensorBoard's or a user's connections); a folder the user made stays."""
    import sys
    from types import SimpleNamespace

    def offline(*args, **kwargs):
        raise OSError("no network")

    # a stand-in torchvision whose download fails at once (and costs no import)
    fake = SimpleNamespace(datasets=SimpleNamespace(CIFAR10=offline, CIFAR100=offline))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(7.0)
    try:
        with pytest.raises(DataError, match=r"could not be downloaded \(no network\)"):
            load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
        assert socket.getdefaulttimeout() == 7.0
    finally:
        socket.setdefaulttimeout(before)
    assert tmp_path.is_dir()  # existed (empty) before: not removed


# ---------------------------------------------------------------- loaders


@pytest.mark.parametrize("workers", [0, 2])
def test_resident_and_dataloader_give_the_same_batches(sample_splits, workers: int) -> None:
    data = sample_splits.train.subset(torch.arange(200))
    resident = list(_loader(data, "resident", seed=3))
    loaded = list(_loader(data, "dataloader", workers=workers, seed=3))
    assert len(resident) == len(loaded) == 4
    for a, b in zip(resident, loaded, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.x_raw, b.x_raw) and torch.equal(a.y, b.y)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_leaves_the_global_random_stream_alone(sample_splits, workers) -> None:
    """DataLoader drew its workers' base seed from torch's global generator each time an
    epoch started iterating: training's attack and AAG noise then differed from the
    resident loader's, and a mid-epoch resume (which starts the epoch's iteration again
    after restoring the saved generator state) drew once more than the uninterrupted run,
    so Ctrl-C + --resume was not bit-identical with data.loader=dataloader."""
    data = sample_splits.train.subset(torch.arange(64))
    draws = []
    for kind in ("resident", "dataloader"):
        torch.manual_seed(0)
        next(iter(_loader(data, kind, workers=workers, seed=3)))
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


def _crop_candidates(raw: torch.Tensor, padding: int) -> torch.Tensor:
    """Every crop of the zero-padded image, flipped or not: (2 * (2p+1)^2, C, H, W)."""
    padded = torch.nn.functional.pad(raw, (padding,) * 4)
    h, w = raw.shape[-2:]
    crops = [padded[:, dy : dy + h, dx : dx + w]
             for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def test_augmentation_crops_and_flips_the_padded_image(sample_splits) -> None:
    data = sample_splits.train.subset(torch.arange(96))
    raw_keys = _keys(data.images)
    shifted = flipped = 0
    for batch in _loader(data, "resident", batch=32):
        assert _keys((batch.x_raw * 255).round().to(torch.uint8)) <= raw_keys  # un-augmented
        for x, raw in zip(batch.x, batch.x_raw, strict=True):
            matches = (_crop_candidates(raw, 4) == x).flatten(1).all(dim=1).nonzero()
            assert len(matches) >= 1
            shifted += int(not torch.equal(x, raw))
            flipped += int(matches[0, 0] >= 81)
    assert shifted > 48 and 20 < flipped < 76  # crops and flips really happen


def test_augment_batch_without_crop_or_flip_is_identity() -> None:
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(augment_batch(x, 0, False, torch.Generator().manual_seed(0)), x)


def test_random_crop_draws_every_offset_per_image_on_non_square_images() -> None:
    """Offsets 0..2p in both axes, drawn per image and independently per axis; h != w
    (ImageFolder images need not be square)."""
    raw = torch.arange(1, 25, dtype=torch.float32).view(1, 1, 4, 6)  # distinct, not 0
    out = augment_batch(raw.expand(200, 1, 4, 6), 2, False, torch.Generator().manual_seed(0))
    assert out.shape == (200, 1, 4, 6)
    candidates = _crop_candidates(raw[0], 2)[:25]  # unflipped, index dy * 5 + dx
    found = [(candidates == x).flatten(1).all(1).nonzero().flatten().tolist() for x in out]
    assert all(len(f) == 1 for f in found)
    assert {f[0] for f in found} == set(range(25))  # every (dy, dx), so dy != dx too


def test_flips_are_drawn_per_image_with_probability_one_half() -> None:
    """One draw per image, not one per batch (a whole batch mirrored or not)."""
    x = torch.rand(1, 3, 5, 5).expand(64, 3, 5, 5)
    out = augment_batch(x, 0, True, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.equal(flipped | (out == x).flatten(1).all(1), torch.ones(64, dtype=torch.bool))
    assert 20 <= int(flipped.sum()) <= 44  # some of one batch, not all or none


def test_set_epoch_changes_the_order_deterministically(sample_splits) -> None:
    data = sample_splits.train.subset(torch.arange(128))
    a, b = _loader(data, "resident"), _loader(data, "resident")

    def labels_and_images(loader):
        return [torch.cat([batch.y.float(), batch.x.flatten()]) for batch in loader]

    first = labels_and_images(a)
    assert all(torch.equal(p, q) for p, q in zip(first, labels_and_images(a), strict=True))
    a.set_epoch(1)
    b.set_epoch(1)
    second = labels_and_images(a)
    assert all(torch.equal(p, q) for p, q in zip(second, labels_and_images(b), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(first, second, strict=True))


@pytest.mark.parametrize("n, world, batch", [(100, 3, 16), (35, 2, 8), (18, 4, 4), (12, 3, 3)])
@pytest.mark.parametrize("kind", ["resident", "dataloader"])
def test_rank_sharding_covers_every_sample_once(n: int, world: int, batch: int, kind: str):
    ids = torch.arange(n)
    data = ImageSet(ids, images=torch.zeros(n, 3, 4, 4, dtype=torch.uint8), image_shape=(3, 4, 4))
    for epoch in (0, 1):
        seen, counts = [], set()
        for rank in range(world):
            loader = _loader(data, kind, batch=batch, rank=rank, world_size=world)
            loader.set_epoch(epoch)
            batches = list(loader)
            counts.add(len(batches))
            assert len(batches) == len(loader)
            assert min(len(b.y) for b in batches) >= 2  # BatchNorm in train mode needs 2+
            seen += torch.cat([b.y for b in batches]).tolist()
        assert sorted(seen) == list(range(n))
        assert len(counts) == 1  # equal step counts on every rank (DDP would hang otherwise)


def test_bad_rank_gives_a_clear_error(sample_splits) -> None:
    with pytest.raises(DataError, match="rank=2"):
        _loader(sample_splits.val, "resident", rank=2, world_size=2)


def _numbered(n: int) -> ImageSet:
    """``n`` distinct 3x4x4 images labelled 0..n-1 (image i is filled with i)."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageSet(torch.arange(n), images=images, image_shape=(3, 4, 4))


def test_an_evaluation_loader_keeps_order_and_images_in_eval_batches() -> None:
    """train=False: the data in order, not augmented, in batches of eval_batch_size."""
    cfg = DataConfig(batch_size=4, eval_batch_size=8)
    batches = list(make_loader(_numbered(20), cfg, "cpu", train=False))
    assert [len(b.y) for b in batches] == [8, 8, 4]
    assert torch.equal(torch.cat([b.y for b in batches]), torch.arange(20))
    assert all(torch.equal(b.x, b.x_raw) for b in batches)


def test_one_image_makes_one_batch() -> None:
    """--n-examples 1: a single image is one batch, not an empty or failing loader."""
    loader = make_loader(_numbered(1), DataConfig(), "cpu", train=False)
    assert len(loader) == 1 and [b.y.tolist() for b in loader] == [[0]]


def test_training_batches_are_shuffled_differently_each_epoch() -> None:
    loader = _loader(_numbered(32), "resident", batch=8)
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        orders.append(torch.cat([b.y for b in loader]))
    assert sorted(orders[0].tolist()) == list(range(32))
    assert not torch.equal(orders[0], torch.arange(32)) and not torch.equal(*orders)


@pytest.mark.parametrize("padding, flip", [(0, False), (0, True), (2, False)])
def test_crop_padding_and_flip_settings_reach_the_training_loader(padding, flip) -> None:
    data = ImageSet(torch.zeros(32, dtype=torch.int64), image_shape=(3, 6, 6),
                    images=torch.randint(1, 256, (32, 3, 6, 6), dtype=torch.uint8))
    cfg = DataConfig(batch_size=32, crop_padding=padding, flip=flip)
    (batch,) = make_loader(data, cfg, "cpu", train=True)
    flipped = (batch.x == batch.x_raw.flip(-1)).flatten(1).all(1)
    same = (batch.x == batch.x_raw).flatten(1).all(1)
    assert bool((same | flipped).all()) == (padding == 0)  # no crop: raw or mirrored only
    assert bool(flipped.any()) == flip
    if padding:  # every image is one of the 25 crops of its 2-pixel padding, not more
        assert all((_crop_candidates(r, 2)[:25] == x).flatten(1).all(1).any()
                   for x, r in zip(batch.x, batch.x_raw, strict=True))


def test_ranks_draw_different_augmentations() -> None:
    """Each rank crops and flips with its own draws (the same draws on every rank would
    augment the global batch in lock-step)."""
    images = torch.randint(1, 256, (1, 3, 8, 8), dtype=torch.uint8).expand(32, 3, 8, 8)
    data = ImageSet(torch.arange(32), images=images.contiguous(), image_shape=(3, 8, 8))
    x0, x1 = (next(iter(_loader(data, "resident", batch=16, rank=r, world_size=2))).x
              for r in (0, 1))
    assert not torch.equal(x0, x1)


def test_fewer_images_than_ranks_are_refused() -> None:
    with pytest.raises(DataError, match="1 images cannot be sharded over 2 ranks"):
        _loader(_numbered(1), "resident", rank=0, world_size=2)


def test_auto_loader_keeps_a_small_file_tree_resident(tmp_path: Path) -> None:
    """``auto`` decodes up to 200,000 files onto the device; more stay on disk."""
    from dat.data import DataLoaderLoader, ResidentLoader

    _png_tree(tmp_path, {"train": ["a", "b"]})
    files = sorted(str(p) for p in tmp_path.rglob("*.png"))
    small = ImageSet(torch.tensor([0, 0, 1, 1]), files=files, image_shape=(3, 8, 8))
    assert isinstance(make_loader(small, DataConfig(), "cpu", train=True), ResidentLoader)
    big = ImageSet(torch.zeros(200_001, dtype=torch.int64), files=files[:1] * 200_001,
                   image_shape=(3, 8, 8))
    assert isinstance(make_loader(big, DataConfig(), "cpu", train=True), DataLoaderLoader)
