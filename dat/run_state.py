"""Checkpoints of a training run: ``last.pt`` / ``best.pt``, resume, the saved counters.

:class:`CheckpointedRun` is mixed into :class:`dat.trainer.Trainer`; it holds what a
checkpoint stores and restores, so the trainer module keeps only the loop.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import distributed
from .build import seed_everything
from .config import config_to_dict
from .models import has_dual_bn

__all__ = ["CheckpointedRun", "TrainState"]


@dataclass
class TrainState:
    """Counters a resume restores (plain values, stored in every checkpoint)."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already consumed
    global_step: int = 0
    images_seen: int = 0
    bad_steps: int = 0  # non-finite steps skipped in total
    step_seconds: float = 0.0  # time spent in training steps (excludes validation)
    wall_seconds: float = 0.0  # time in fit(), summed over resumes
    best_val_pgd: float = -1.0  # percent
    best_val_clean: float = -1.0  # percent, breaks ties in best_val_pgd
    best_epoch: int = 0
    last_val: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one entry per validation


class CheckpointedRun:
    """Saving and resuming for the trainer (uses its model, optimiser, method, state)."""

    def save_last(self) -> Path:
        """Everything a resume needs, atomically, keeping older good copies.

        Call it on every rank: BN statistics and RNG states are gathered, rank 0 writes.
        """
        self.sync_buffers()
        self.count_wall_time()  # a kill after this save keeps the time spent until it
        state, path = self._checkpoint_state(), self.run_dir / "checkpoints" / "last.pt"
        # the same step again (an epoch's end just after a train.checkpoint_every save, or
        # Ctrl-C there): replace last.pt, so the older copies stay older points of the run
        again = self._last_saved_step == self.state.global_step
        if self.dist.is_main:
            ckpt.save_checkpoint(state, path,
                                 keep=0 if again else self.cfg.train.keep_checkpoints)
        distributed.barrier()
        self._last_saved_step = self.state.global_step
        return path

    def weights_kind(self) -> str:
        """Which weights :meth:`eval_model` gives now: "ema", "swa" or "raw" (SWA before
        ``train.swa_start``, or no averaging)."""
        averager = self.averager
        return self.cfg.train.weight_averaging if averager is not None and averager.active \
            else "raw"

    def count_wall_time(self) -> None:
        """Add the time since the last count (or since fit() started) to
        ``state.wall_seconds``, which is summed over resumes."""
        now, since = time.perf_counter(), getattr(self, "_fit_t0", None)
        if since is not None:
            self.state.wall_seconds += now - since
            self._fit_t0 = now

    def save_best(self) -> Path:
        """``best.pt``: the evaluated weights (averaged if enabled) with the config."""
        self.sync_buffers()
        state = {"model": self.eval_model().state_dict(), **self._identity(),
                 "epoch": self.state.best_epoch, "val": dict(self.state.last_val),
                 "weights": self.weights_kind()}
        path = self.run_dir / "checkpoints" / "best.pt"
        if self.dist.is_main:
            ckpt.save_checkpoint(state, path)
        distributed.barrier()
        return path

    def load_resumable(self, path: Path) -> tuple[dict, Path]:
        """Load ``path`` (or its newest good older copy) and refuse a checkpoint of another
        experiment (:func:`dat.checkpoint.check_compatible`); needs only ``cfg``, so the
        trainer calls it before loading data."""
        state, used = ckpt.load_for_resume(path, keep=self.cfg.train.keep_checkpoints,
                                           warn=self._say_error)
        if "optimizer" not in state or "trainer" not in state:
            raise ckpt.CheckpointError(
                f"{used} holds model weights only (a best.pt or an export), not a point to "
                f"continue training from; resume from {used.parent / 'last.pt'}")
        ckpt.check_compatible(state, self.cfg.model.name, None, config_to_dict(self.cfg))
        return state, used

    def resume(self, path: Path, loaded: tuple[dict, Path] | None = None) -> None:
        """Restore model, optimiser, method, averaging, counters and RNG from ``path``
        (``loaded``: what :meth:`load_resumable` returned for it).

        A checkpoint written with another number of ranks (or batch size) continues at
        the same point of the epoch when that maps to whole steps, else at its start.
        """
        state, used = loaded if loaded is not None else self.load_resumable(path)
        ckpt.check_compatible(state, self.cfg.model.name, self.splits.num_classes)
        self._check_same_validation(state, used)
        ckpt.load_model_state(self.model, state["model"], str(used))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state["method"])
            if self.averager is not None:
                self.averager.load_state_dict(state["averaging"] or {"kind": "none"})
            self.state = TrainState(**state["trainer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ckpt.CheckpointError(
                f"{used} does not match this run's method, optimiser or weight averaging "
                f"({' '.join(str(err).split())[:160]}); resume with the run's own settings"
            ) from None
        self._restore_rng(state)
        self._sync_best()
        saved_batch = state.get("loader", {}).get("global_batch", self.global_batch)
        step, note = distributed.resume_position(self.state.step_in_epoch, saved_batch,
                                         self.global_batch)
        self.state.step_in_epoch = step
        if note:
            self._say_error(f"note: {note}")
        if self.dist.is_main:
            print(f"resumed from {used} in epoch {self.state.epoch + 1} (1-based, as in "
                  f"metrics.json), after {self.state.step_in_epoch} of its steps")
            if self.state.epoch >= self.cfg.train.epochs:
                n = self.state.epoch
                done = "its one epoch" if n == 1 else f"all {n} epochs"
                print(f"note: the run already completed {done}; "
                      "nothing to train, re-running the final test (to train longer, "
                      f"resume with train.epochs={self.state.epoch + 1} or more)")

    def _restore_rng(self, state: dict[str, Any]) -> None:
        """Each rank's own RNG state when the number of ranks is unchanged; otherwise rank
        0 continues the saved main stream and other ranks draw fresh per-rank seeds."""
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == self.dist.world_size:
            ckpt.restore_rng(ranks[self.dist.rank])
        elif self.dist.is_main:
            ckpt.restore_rng(state["rng"])
        else:
            seed_everything(distributed.rank_seed(self.cfg.train.seed + self.state.global_step,
                                          self.dist.rank))

    def _sync_best(self) -> None:
        """Select against the best.pt on disk: after a fallback to an older last.pt, best.pt
        may come from the abandoned later steps, and metrics must describe that file."""
        path = self.run_dir / "checkpoints" / "best.pt"
        s = self.state
        try:
            best = ckpt.load_checkpoint(path) if path.is_file() else None
        except ckpt.CheckpointError:
            self._say_error(f"warning: {path} is corrupt or unreadable, so the best weights so "
                            "far are lost; the next validation writes a new best.pt")
            best = None
        if best is None:
            s.best_val_pgd, s.best_val_clean, s.best_epoch = -1.0, -1.0, 0
            return
        val = best.get("val", {})
        pgd = next((v for k, v in val.items() if k.startswith("pgd")), -1.0)
        s.best_val_pgd, s.best_val_clean = pgd, val.get("clean", -1.0)
        s.best_epoch = int(best.get("epoch", 0))

    def _identity(self) -> dict[str, Any]:
        return {"config": config_to_dict(self.cfg), "num_classes": self.splits.num_classes,
                "classes": list(self.splits.classes), "dual_bn": has_dual_bn(self.model),
                "image_shape": list(self.splits.image_shape),
                "val_digest": self.val_digest}

    @property
    def val_digest(self) -> str:
        """SHA-256 of the validation images and labels that pick best.pt (computed once)."""
        if getattr(self, "_val_digest", None) is None:
            x, y = self.val_data
            h = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
            h.update(y.detach().cpu().numpy().astype("int64").tobytes())
            self._val_digest = h.hexdigest()
        return self._val_digest

    def _check_same_validation(self, state: dict[str, Any], used: Path) -> None:
        """A resume selects on the same validation images as the run it continues: the
        split follows the dataset's files, so added or removed images would move it."""
        saved = state.get("val_digest")  # absent in checkpoints from before 2026-11-27
        if saved is not None and saved != self.val_digest:
            raise ckpt.CheckpointError(
                f"{used} was validated on other images than this run's validation split (the "
                "dataset's files changed since, or the split rule did); resume with the same "
                "data, or start a new run with another train.run_name")

    def _checkpoint_state(self) -> dict[str, Any]:
        rng = distributed.all_gather_objects(ckpt.capture_rng())  # every rank's, rank 0 first
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "averaging": None if self.averager is None else self.averager.state_dict(),
            "trainer": asdict(self.state), "rng": rng[0],
            "rng_ranks": rng if self.dist.enabled else None,
            "loader": {"seed": self.loader.seed, "epoch": self.loader.epoch,
                       "world_size": self.dist.world_size, "global_batch": self.global_batch},
            **self._identity(),
        }

    def _resume_path(self) -> Path | None:
        t = self.cfg.train
        if not t.resume:
            return None
        if t.resume == "auto":
            return ckpt.find_run_checkpoint(t.out_dir, t.run_name)
        return ckpt.resume_target(t.resume)
