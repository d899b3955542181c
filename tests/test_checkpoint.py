"""Checkpoints: atomic, rotated, safe to load, and a corrupt one falls back to a good one."""

from __future__ import annotations

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
    load_checkpoint,
    load_for_resume,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from dat.models import create


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "epoch": int(value),
            "config": {"model": {"name": "resnet_tiny"}}, "num_classes": 10}


def test_save_is_atomic_and_keeps_older_copies(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    for value in range(4):
        save_checkpoint(_state(value), path, keep=2)
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["last.1.pt", "last.2.pt", "last.pt"]  # no temporary files left behind
    epochs = [load_checkpoint(path.parent / n)["epoch"] for n in ("last.pt", "last.1.pt",
                                                                  "last.2.pt")]
    assert epochs == [3, 2, 1]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64, 64), 3.0))


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
