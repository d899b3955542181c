"""Checkpoints that survive crashes and cannot run code.

One file holds everything a resume needs (model, method state, optimiser, averaging,
counters, RNG states, resolved config) as tensors and primitives only, so it loads with
``torch.load(weights_only=True)``: a crafted pickle is refused before anything runs.
Writes are atomic: a temporary file in the same directory is flushed, fsynced and
renamed over the old one, after the old one has been kept as ``last.1.pt`` (and older
ones as ``last.2.pt`` ...), so a crash or a corrupt file falls back to a good one.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "RESUME_MAY_CHANGE",
    "CheckpointError",
    "WriteError",
    "atomic_write",
    "atomic_write_text",
    "capture_rng",
    "check_compatible",
    "ensure_writable",
    "find_run_checkpoint",
    "load_checkpoint",
    "load_for_resume",
    "load_model_state",
    "older_copies",
    "resume_target",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "dat-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or does not fit this run."""


class WriteError(OSError):
    """A file could not be written because its disk (or quota) is full; the message names
    the file and says the previous version is intact."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(err: BaseException | None) -> OSError | None:
    """The disk-full OSError in ``err``'s chain (torch.save reports one as a RuntimeError
    raised while handling it), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return err
        err = err.__cause__ or err.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems (or platforms) cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def older_copies(path: Path | str, keep: int) -> list[Path]:
    """The names older copies of ``path`` get: ``last.pt`` -> ``last.1.pt``, ``last.2.pt``."""
    path = Path(path)
    return [path.with_name(f"{path.stem}.{i}{path.suffix}") for i in range(1, keep + 1)]


def _keep_previous(path: Path, keep: int) -> None:
    """Shift older copies one place and keep the current file as copy 1 (hard link)."""
    copies = older_copies(path, keep)
    for newer, older in zip(copies[-2::-1], copies[:0:-1], strict=True):
        if newer.exists():
            os.replace(newer, older)
    if copies and path.exists():
        link = path.with_name(f".{path.name}.link")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)  # path keeps existing: no moment without a last.pt
        except OSError:  # no hard links on this file system: copy instead
            link.write_bytes(path.read_bytes())
        os.replace(link, copies[0])


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None],
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``path`` through ``write(file)`` under a temporary name, fsync, then rename:
    a crash or an error leaves the old file (or none), never half of one. The mode follows
    the umask, like any file ``open`` creates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except Exception as err:
        full = _disk_full(err)
        if full is None:
            raise
        error = WriteError(
            f"could not write {path}: {full.strerror or 'no space left on device'} (disk or "
            f"quota full); the previous {path.name}, if any, is unchanged: free space in "
            f"{path.parent} and run again (a training run continues with --resume)")
        error.errno = full.errno
        raise error from err
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """:func:`atomic_write` for a text file (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def ensure_writable(folder: Path | str) -> None:
    """Create ``folder`` and write and remove a probe file there: a run or report that
    cannot be saved fails now (OSError), not after the work."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe", dir=folder)
    os.close(fd)
    os.unlink(probe)


def save_checkpoint(state: dict[str, Any], path: Path | str, keep: int = 0) -> Path:
    """Atomically write ``state`` to ``path``; keep ``keep`` previous versions."""
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f),
                        before_replace=lambda: _keep_previous(Path(path), keep))


def unsafe_pickle(err: pickle.UnpicklingError) -> bool:
    """Whether ``weights_only`` refused a class or function (code could run), not bad bytes."""
    return "unsupported global" in str(err).lower()


def unsafe_pickle_message(path: Path | str) -> str:
    return (f"{path} holds objects other than tensors and primitives (a pickle that could run "
            "code); refusing to load it. Only load checkpoints you trust; to share weights, "
            "save model.state_dict() (torch.save) or a .safetensors file instead")


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``); one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if unsafe_pickle(err):
            raise CheckpointError(unsafe_pickle_message(path)) from None
        raise CheckpointError(f"{path} is corrupt or truncated (unreadable pickle data); "
                              "use an older copy (e.g. last.1.pt) or start a new run") from None
    except Exception as err:  # truncated zip, empty file, wrong format: all mean "corrupt"
        raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(err)}); "
                              "use an older copy (e.g. last.1.pt) or start a new run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dat training checkpoint ({FORMAT})")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def resume_target(path: Path | str) -> Path:
    """``--resume``'s checkpoint: ``path`` itself, or ``last.pt`` of a run directory or of
    its ``checkpoints/`` folder."""
    path = Path(path)
    if path.is_dir():
        return path / "last.pt" if path.name == "checkpoints" else path / "checkpoints" / "last.pt"
    return path


def load_for_resume(path: Path | str, keep: int = 2,
                    warn: Callable[[str], None] = _to_stderr) -> tuple[dict, Path]:
    """Load ``path`` (a run directory means its last.pt), or, when it is missing or
    corrupt, the newest good older copy."""
    path = resume_target(path)
    candidates = [path, *older_copies(path, max(keep, 1))]
    errors = []
    for candidate in candidates:
        if not candidate.exists():
            if candidate == path:
                errors.append(f"{path} does not exist")
            continue
        try:
            return load_checkpoint(candidate), candidate
        except CheckpointError as err:
            errors.append(str(err))
            warn(f"warning: {err}; trying an older copy")
    raise CheckpointError(f"no usable checkpoint at {path}: {errors[0]}")


def find_run_checkpoint(out_dir: Path | str, run_name: str) -> Path:
    """``--resume auto``: run_name's last.pt, or the most recent run's under out_dir."""
    out = Path(out_dir)
    if run_name:
        return out / run_name / "checkpoints" / "last.pt"
    runs = sorted(out.glob("*/checkpoints/last*.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise CheckpointError(f"--resume auto found no run under {out}/; "
                              "set train.run_name or give a checkpoint path")
    return runs[-1].with_name("last.pt")


# Config keys (or whole sections) a resume may change; every other key must equal the
# checkpoint's. The rule and its reasons are in check_compatible's docstring.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train.epochs", "train.out_dir", "train.run_name", "train.resume", "train.device",
    "train.val_every", "train.test_attacks", "train.image_every", "train.max_bad_steps",
    "train.keep_checkpoints", "train.callbacks", "train.checkpoint_every",
    "data.root", "data.test_subset", "data.batch_size", "data.eval_batch_size", "data.loader",
    "data.num_workers", "perf",
    "optim.lr", "optim.schedule", "optim.milestones", "optim.gamma", "optim.warmup_epochs",
    "optim.lr_scaling", "optim.reference_batch_size",
)
_AVERAGING = ("train.weight_averaging", "train.ema_decay", "train.swa_start",
              "train.ema_warmup")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUME_MAY_CHANGE)


def _group(key: str) -> str:
    if key.startswith(("method.", "optim.")) or key in _AVERAGING:
        return "method, optimiser or weight averaging"
    if key.startswith("train."):
        return "training or validation settings"
    return key.split(".")[0]


def _normalised(config: dict) -> dict:
    """A stored config with today's defaults filled in and values normalised."""
    from .config import ConfigError, config_from_dict, config_to_dict

    try:
        return config_to_dict(config_from_dict(config))
    except ConfigError:  # one this version cannot validate: as stored, new keys at default
        from .config import Config

        return _deep_merge(config_to_dict(Config()), config)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def check_compatible(state: dict, model_name: str, num_classes: int | None,
                     config: dict | None = None) -> None:
    """Refuse to resume ``state`` as a different experiment; one-line :class:`CheckpointError`.

    Always: the same ``model.name`` and (when ``num_classes`` is given) class count. With
    ``config`` (the new run's :func:`dat.config.config_to_dict`), every key must equal the
    checkpoint's except those in :data:`RESUME_MAY_CHANGE`:

    - may change: ``train.epochs`` (to extend a run; never below the epochs already
      completed, which would train nothing and contradict the metrics), where the run
      lives, where its data lives (``data.root``: data copied to a node's local disk) and
      which device it uses, bookkeeping (``val_every``, checkpoints, images,
      callbacks, ``max_bad_steps``), the final test (``test_attacks``,
      ``data.test_subset``), speed settings (``perf.*``, loader, workers, eval batch),
      ``data.batch_size`` (as with another number of ranks, the run continues at the
      nearest whole step) and the learning-rate schedule (``optim.lr``, ``schedule``,
      ``milestones``, ``gamma``, warm-up, scaling: lowering ``optim.lr`` is the advice
      after non-finite steps);
    - must match: the data (``data.name``, ``val_size``, ``split_seed``,
      ``train_subset``, augmentation), the model (``model.*``), the method and its
      objective (``method.*``), what the optimiser state keeps (``optim.momentum``,
      ``weight_decay``, ``nesterov``), weight averaging, ``train.seed`` (data order,
      validation draws), ``train.steps_per_epoch`` and validation (``val_examples``,
      ``val_pgd_steps``): changing them would mix two experiments in one history.

    New keys default to "must match". To change a fixed key, start a new run.
    """
    saved_config = state.get("config", {})
    saved = saved_config.get("model", {}).get("name")
    saved_classes = state.get("num_classes")
    if saved != model_name or (num_classes is not None and saved_classes != num_classes):
        builds = model_name if num_classes is None else f"{model_name} with {num_classes}"
        raise CheckpointError(
            f"checkpoint was saved for model {saved} with {saved_classes} classes, but this "
            f"run builds {builds}; use the same model.name and dataset (resume without that "
            "override) or start a new run with another train.run_name"
        )
    if config is None:
        return
    old, new = _flatten(_normalised(saved_config)), _flatten(config)
    changed = [k for k in {**old, **new} if not _may_change(k) and old.get(k) != new.get(k)]
    if changed:
        key = changed[0]
        more = f"; also {', '.join(changed[1:])}" if len(changed) > 1 else ""
        raise CheckpointError(
            f"checkpoint does not match this run's {_group(key)} ({key}: trained with "
            f"{old.get(key)}, this run sets {new.get(key)}{more}); a resumed run must stay the "
            "same experiment: resume without that override, or start a new run with another "
            "train.run_name"
        )
    trainer = state.get("trainer", {})
    done, epochs = trainer.get("epoch", 0), new.get("train.epochs")
    started = done + (trainer.get("step_in_epoch", 0) > 0)  # a mid-epoch save: one more
    if isinstance(epochs, int) and epochs < started:
        raise CheckpointError(
            f"checkpoint has already {'started' if started > done else 'completed'} "
            f"{started} epochs, but this run sets train.epochs={epochs}; a resume cannot "
            f"shorten a run: resume with train.epochs={started} or more, or start a new run "
            "with another train.run_name"
        )


def load_model_state(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatch."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:240]
        raise CheckpointError(f"{source} does not fit this model ({detail}); it comes from a "
                              "different architecture or class count") from None


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and primitives."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a run saved on 8 GPUs may resume on fewer: restore the devices that exist
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
