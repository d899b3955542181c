"""Checkpoints: atomic, rotated, safe to load, and a corrupt one falls back to a good one."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dat.checkpoint import (
    CheckpointError,
    capture_rng,
    check_compatible,
    find_run_checkpoint,
    load_checkpoint,
    load_for_resume,
    load_model_state,
    restore_rng,
    resume_target,
    save_checkpoint,
)
from dat.models import create


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "epoch": int(value),
            "config": {"model": {"name": "resnet_tiny"}}, "num_classes": 10}


def test_save_is_atomic_and_keeps_older_copies(tmp_path: Path) -> None:
    """keep=3: each save moves last.2.pt to last.3.pt before last.1.pt to last.2.pt (the
    other order would overwrite one copy with a newer one, which keep=2 cannot show)."""
    path = tmp_path / "ckpt" / "last.pt"
    for value in range(5):
        save_checkpoint(_state(value), path, keep=3)
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["last.1.pt", "last.2.pt", "last.3.pt", "last.pt"]  # no temporary files
    epochs = [load_checkpoint(path.parent / n)["epoch"] for n in ("last.pt", "last.1.pt",
                                                                  "last.2.pt", "last.3.pt")]
    assert epochs == [4, 3, 2, 1]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64, 64), 4.0))


def test_truncated_checkpoints_give_one_line_errors(tmp_path: Path) -> None:
    path = save_checkpoint(_state(1), tmp_path / "last.pt")
    blob = path.read_bytes()
    rng = random.Random(0)
    for offset in [0, 1, len(blob) - 1, *rng.sample(range(2, len(blob) - 1), 12)]:
        bad = tmp_path / f"cut{offset}.pt"
        bad.write_bytes(blob[:offset])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(bad)
        assert "\n" not in str(info.value) and "corrupt" in str(info.value)


def test_resume_falls_back_to_the_previous_good_copy(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    for value in range(3):
        save_checkpoint(_state(value), path, keep=2)
    path.write_bytes(path.read_bytes()[:1000])  # a crash tore the newest file
    warnings: list[str] = []
    state, used = load_for_resume(path, keep=2, warn=warnings.append)
    assert used.name == "last.1.pt" and state["epoch"] == 1
    assert len(warnings) == 1 and "corrupt" in warnings[0]
    for p in tmp_path.glob("last*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_for_resume(path, keep=2, warn=warnings.append)


class _Payload:
    """Unpickling this would create the sentinel file (code execution)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "dat-checkpoint-v1", "model": _Payload(sentinel)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch.load's legacy format
    assert not sentinel.exists()
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not sentinel.exists()


def test_other_files_are_not_mistaken_for_checkpoints(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a dat training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.random(), np.random.rand(), torch.rand(1)
    path = save_checkpoint({"rng": capture_rng()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    restore_rng(load_checkpoint(path)["rng"])
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_checkpoints_for_another_model_or_class_count_are_refused() -> None:
    state = _state(0)
    check_compatible(state, "resnet_tiny", 10)
    with pytest.raises(CheckpointError, match="saved for model resnet_tiny with 10 classes"):
        check_compatible(state, "resnet_small", 10)
    with pytest.raises(CheckpointError, match="builds resnet_tiny with 100"):
        check_compatible(state, "resnet_tiny", 100)
    weights = create("resnet_tiny", num_classes=10).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_model_state(create("resnet_tiny", num_classes=100), weights, "best.pt")
    assert "best.pt does not fit this model" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_crash_before_the_final_rename_leaves_last_pt_in_place(
        tmp_path: Path, monkeypatch) -> None:
    """The previous last.pt is kept as last.1.pt by a hard link, so last.pt itself exists
    until the new file is renamed over it: a crash in between leaves both good."""
    path = save_checkpoint(_state(1), tmp_path / "last.pt", keep=2)
    real_replace = os.replace

    def crash_on_the_final_rename(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt  # e.g. killed right there
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_final_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2), path, keep=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert load_for_resume(path, keep=2)[0]["epoch"] == 1


def test_resume_falls_back_to_an_older_copy_also_with_keep_0(tmp_path: Path) -> None:
    """train.keep_checkpoints may change on a resume: copies written under an earlier
    setting are still the fallback when last.pt is torn."""
    path = tmp_path / "last.pt"
    for value in range(2):
        save_checkpoint(_state(value), path, keep=1)
    path.write_bytes(b"torn")
    state, used = load_for_resume(path, keep=0, warn=lambda message: None)
    assert used.name == "last.1.pt" and state["epoch"] == 0


def test_resume_targets_of_a_run_folder_and_of_auto(tmp_path: Path) -> None:
    """--resume takes a file, a run folder or its checkpoints/ folder; --resume auto
    without a run name takes the run saved most recently, not the last one by name."""
    runs = tmp_path / "runs"
    for name, mtime in (("b-old", 1_000_000), ("a-new", 2_000_000)):
        last = save_checkpoint(_state(1), runs / name / "checkpoints" / "last.pt")
        os.utime(last, (mtime, mtime))
    a = runs / "a-new" / "checkpoints" / "last.pt"
    assert resume_target(a) == a
    assert resume_target(runs / "a-new") == a
    assert resume_target(runs / "a-new" / "checkpoints") == a
    assert find_run_checkpoint(runs, "") == a
    assert find_run_checkpoint(runs, "b-old") == runs / "b-old" / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match="--resume auto found no run under"):
        find_run_checkpoint(tmp_path / "empty", "")


def test_every_key_a_resume_may_change_is_accepted() -> None:
    """RESUME_MAY_CHANGE as documented in check_compatible: extending epochs, moving the
    run or its data, bookkeeping, speed settings and the learning-rate schedule (lowering
    optim.lr is the advice after non-finite steps)."""
    from dat.config import config_to_dict, load_config

    base = ["model.name=resnet_tiny", "data.name=cifar10-sample", "train.epochs=2"]
    changed = [
        "train.epochs=5", "train.out_dir=elsewhere", "train.run_name=moved",
        "train.resume=auto", "train.device=cpu", "train.val_every=2",
        "train.test_attacks=[clean]", "train.image_every=0", "train.max_bad_steps=3",
        "train.keep_checkpoints=4", "train.callbacks=[mod:fn]", "train.checkpoint_every=7",
        "data.root=/local/disk", "data.test_subset=10", "data.batch_size=64",
        "data.eval_batch_size=100", "data.loader=dataloader", "data.num_workers=0",
        "perf.log_every=7", "perf.precision=fp32", "perf.channels_last=off",
        "optim.lr=0.01", "optim.schedule=cosine", "optim.milestones=[1]", "optim.gamma=0.5",
        "optim.warmup_epochs=1", "optim.lr_scaling=linear", "optim.reference_batch_size=256",
    ]
    state = {"config": config_to_dict(load_config(None, base)), "num_classes": 10,
             "trainer": {"epoch": 2, "step_in_epoch": 0}}
    new = config_to_dict(load_config(None, [*base, *changed]))
    check_compatible(state, "resnet_tiny", 10, new)
    new["optim"]["momentum"] = 0.5  # what the optimiser state keeps: fixed
    with pytest.raises(CheckpointError, match=r"\(optim.momentum: trained with 0.9"):
        check_compatible(state, "resnet_tiny", 10, new)
