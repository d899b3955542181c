"""The training loop: ``Trainer(cfg).fit()`` (or ``train(cfg)``) -> metrics dict.

Per step, top to bottom: set the learning rate -> (checkpoint) -> method step (attack +
loss + optimiser update, guarded against non-finite values) -> log every
``perf.log_every`` steps (the only host sync). Per epoch: weight averaging,
validation PGD and ``best.pt``, ``last.pt``. At the end: test accuracy of the best
model into ``metrics.json`` and its main-branch weights into ``model.safetensors``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import methods
from .averaging import create_averager
from .build import (
    build_model,
    check_labels,
    check_test_attacks,
    learning_rate,
    prepare_run_dir,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from .callbacks import (
    Callback,
    CheckpointCallback,
    FunctionCallback,
    TensorBoardCallback,
    ValidationCallback,
    load_callback,
)
from .config import Config, config_to_dict, config_to_yaml
from .data import Batch, DatasetSplits, load_dataset, make_loader, stratified_split
from .guard import StepGuard
from .models import export_main_branch, has_dual_bn

__all__ = ["TrainState", "Trainer", "TrainingError", "train"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the message says why."""


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


class Trainer:
    """Builds data, model, optimiser, method step and callbacks from ``cfg``; ``fit()``.

    ``splits`` replaces ``load_dataset(cfg.data)`` (your own data); ``callbacks`` are
    :class:`~dat.callbacks.Callback` objects or ``fn(trainer, event, payload)``.
    """

    def __init__(self, cfg: Config, splits: DatasetSplits | None = None,
                 callbacks: tuple = (), progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.device = resolve_device(cfg.train.device)
        check_test_attacks(cfg.train.test_attacks)
        seed_everything(cfg.train.seed)
        self.splits = splits if splits is not None else load_dataset(cfg.data)
        check_labels(self.splits)
        self.model = build_model(cfg, self.splits.num_classes, self.splits.image_shape,
                                 self.device)
        net = torch.compile(self.model) if cfg.perf.compile else self.model
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
        self.method = methods.create(
            cfg, net, self.optimizer, num_classes=self.splits.num_classes,
            image_shape=self.splits.image_shape, train_images=self.splits.train,
            autocast_dtype=resolve_precision(cfg.perf.precision, self.device))
        t = cfg.train
        self.averager = create_averager(self.model, t.weight_averaging, t.ema_decay,
                                        t.swa_start, t.ema_warmup)
        self.loader = make_loader(self.splits.train, cfg.data, self.device, train=True,
                                  seed=t.seed)
        self.steps_per_epoch = min(len(self.loader), t.steps_per_epoch or len(self.loader))
        self.val_data = self._val_subset(t.val_examples, cfg.data.split_seed)
        self.guard = StepGuard([net], [self.optimizer], extra=self.method)
        self.state = TrainState()
        self.callbacks: list[Callback] = [ValidationCallback(), CheckpointCallback(),
                                          TensorBoardCallback()]
        for cb in [*map(load_callback, t.callbacks), *callbacks]:
            self.add_callback(cb)
        resume = self._resume_path()
        self.run_dir = prepare_run_dir(cfg, resume)  # after every check that could fail
        if resume is not None:
            self.resume(resume)

    # -- public helpers -------------------------------------------------------------
    def add_callback(self, callback: Callback | Callable[[Any, str, Any], None]) -> None:
        """Register a :class:`Callback` or a plain ``fn(trainer, event, payload)``."""
        if not isinstance(callback, Callback):
            callback = FunctionCallback(callback)
        self.callbacks.append(callback)

    def eval_model(self) -> torch.nn.Module:
        """The model to validate and export: the weight average when there is one."""
        if self.averager is not None and self.averager.active:
            return self.averager.module
        return self.model

    def save_last(self) -> Path:
        """Everything a resume needs, atomically, keeping older good copies."""
        path = self.run_dir / "checkpoints" / "last.pt"
        return ckpt.save_checkpoint(self._checkpoint_state(), path,
                                    keep=self.cfg.train.keep_checkpoints)

    def save_best(self) -> Path:
        """``best.pt``: the evaluated weights (averaged if enabled) with the config."""
        state = {"model": self.eval_model().state_dict(), **self._identity(),
                 "epoch": self.state.best_epoch, "val": dict(self.state.last_val)}
        return ckpt.save_checkpoint(state, self.run_dir / "checkpoints" / "best.pt")

    def resume(self, path: Path) -> None:
        """Restore model, optimiser, method, averaging, counters and RNG from ``path``."""
        state, used = ckpt.load_for_resume(path, keep=self.cfg.train.keep_checkpoints)
        ckpt.check_compatible(state, self.cfg.model.name, self.splits.num_classes)
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
        ckpt.restore_rng(state["rng"])
        self._sync_best()
        print(f"resumed from {used} at epoch {self.state.epoch}, "
              f"step {self.state.step_in_epoch} of the epoch")

    def _sync_best(self) -> None:
        """Select against the best.pt on disk: after a fallback to an older last.pt, best.pt
        may come from the abandoned later steps, and metrics must describe that file."""
        path = self.run_dir / "checkpoints" / "best.pt"
        s = self.state
        try:
            best = ckpt.load_checkpoint(path) if path.is_file() else None
        except ckpt.CheckpointError as err:
            print(f"warning: {err}; the next validation writes a new best.pt", file=sys.stderr)
            best = None
        if best is None:
            s.best_val_pgd, s.best_val_clean, s.best_epoch = -1.0, -1.0, 0
            return
        val = best.get("val", {})
        pgd = next((v for k, v in val.items() if k.startswith("pgd")), -1.0)
        s.best_val_pgd, s.best_val_clean = pgd, val.get("clean", -1.0)
        s.best_epoch = int(best.get("epoch", 0))

    # -- the loop -------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs (from where a resume left off); metrics."""
        t0, first = time.perf_counter(), self.state.global_step
        (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        self._emit("on_train_start")
        total = self.cfg.train.epochs * self.steps_per_epoch
        self._bar = tqdm(total=total, initial=first, disable=not self.progress,
                         dynamic_ncols=True, desc=self.run_dir.name)
        self._reset_log()
        for epoch in range(self.state.epoch, self.cfg.train.epochs):
            self.method.on_epoch_start(epoch)
            for batch in self._batches(epoch):
                self._set_lr(epoch, self.state.step_in_epoch)
                self._emit("on_step_start")
                stats = self._train_step(batch)
                self._emit("on_step_end", stats)
                if self.state.global_step % self.cfg.perf.log_every == 0:
                    self._log()
            self._end_epoch(epoch)
        self._bar.close()
        self.state.wall_seconds += time.perf_counter() - t0
        return self._finish()

    def _batches(self, epoch: int) -> Iterator[Batch]:
        """This epoch's batches; after a resume, consumed ones are regenerated and skipped
        so the augmentation draws stay aligned with an uninterrupted run."""
        self.loader.set_epoch(epoch)
        for i, batch in enumerate(itertools.islice(self.loader, self.steps_per_epoch)):
            if i >= self.state.step_in_epoch:
                yield batch

    def _set_lr(self, epoch: int, step: int) -> None:
        lr = learning_rate(self.cfg.optim, epoch, step, self.steps_per_epoch,
                           self.cfg.train.epochs, self.cfg.data.batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x, x_raw, y = batch
        if self.cfg.perf.channels_last == "on" or (
                self.cfg.perf.channels_last == "auto" and self.device.type == "cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
            x_raw = x_raw.contiguous(memory_format=torch.channels_last)
        self.guard.snapshot()
        stats = self.method.run(x, y, x_raw)
        ok = self.guard.commit(stats.get("loss"))  # restores the pre-step state if not ok
        s = self.state
        s.global_step, s.step_in_epoch, s.images_seen = (
            s.global_step + 1, s.step_in_epoch + 1, s.images_seen + len(y))
        if self.averager is not None:
            self.averager.update_step(self.model)
        for key, value in stats.items():  # device-side sums of good steps only
            self._sums[key] = self._sums.get(key, 0) + torch.where(ok, value.float(), 0.0)
        self._good = self._good + ok.float()
        self._bar.update(1)
        return stats

    def _reset_log(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._good = torch.zeros((), device=self.device)
        self._log_mark, self._log_images = time.perf_counter(), self.state.images_seen

    def _log(self) -> None:
        """The one host sync: means since the last log, throughput, the non-finite check."""
        keys = list(self._sums)
        counters = self.guard.counters(self._good.device)
        values = torch.stack([*self._sums.values(), self._good, *counters]).tolist()
        good, (consecutive, bad) = values[len(keys)], values[len(keys) + 1:]
        now = time.perf_counter()
        self.state.step_seconds += now - self._log_mark
        means = {k: v / good if good else math.nan for k, v in zip(keys, values, strict=False)}
        means["lr"] = self.optimizer.param_groups[0]["lr"]
        means["images_per_s"] = (self.state.images_seen - self._log_images) / max(
            now - self._log_mark, 1e-9)
        self.state.bad_steps += int(bad)
        means["bad_steps"] = self.state.bad_steps
        self._bar.set_postfix({k: f"{means[k]:.3g}" for k in ("loss", "acc_adv", "images_per_s")
                               if k in means})
        self._emit("on_log", means)
        self._reset_log()
        if consecutive >= self.cfg.train.max_bad_steps:
            self._stop_non_finite(int(consecutive))

    def _stop_non_finite(self, consecutive: int) -> None:
        path = self.save_last()  # the guard rolled every bad step back: this is good state
        self._bar.close()
        raise TrainingError(
            f"training stopped after {consecutive} consecutive non-finite steps "
            f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); the last good state is in "
            f"{path}; lower optim.lr, use perf.precision=fp32 or check the data")

    def _end_epoch(self, epoch: int) -> None:
        if self._sums:
            self._log()
        self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        if self.averager is not None:
            self.averager.update_epoch(self.model, epoch)
        self._emit("on_epoch_end", epoch)
        self._reset_log()

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    # -- state and the end of a run ---------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"config": config_to_dict(self.cfg), "num_classes": self.splits.num_classes,
                "classes": list(self.splits.classes), "dual_bn": has_dual_bn(self.model),
                "image_shape": list(self.splits.image_shape)}

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "averaging": None if self.averager is None else self.averager.state_dict(),
            "trainer": asdict(self.state), "rng": ckpt.capture_rng(),
            "loader": {"seed": self.loader.seed, "epoch": self.loader.epoch},
            **self._identity(),
        }

    def _val_subset(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` validation images, stratified (splits may be stored sorted by label)."""
        val = self.splits.val
        if len(val) == 0:
            return torch.empty(0, *self.splits.image_shape), torch.empty(0, dtype=torch.long)
        if n < len(val):
            val = val.subset(stratified_split(val.labels, n, seed)[1])
        return val.tensors()

    def _resume_path(self) -> Path | None:
        t = self.cfg.train
        if not t.resume:
            return None
        if t.resume == "auto":
            return ckpt.find_run_checkpoint(t.out_dir, t.run_name)
        return Path(t.resume)

    def _best_model(self) -> tuple[torch.nn.Module, str]:
        best = self.run_dir / "checkpoints" / "best.pt"
        model = copy.deepcopy(self.eval_model())
        if not best.is_file():
            return model, "final weights (no validation ran)"
        ckpt.load_model_state(model, ckpt.load_checkpoint(best)["model"], str(best))
        return model, f"best.pt (epoch {self.state.best_epoch})"

    def _finish(self) -> dict[str, Any]:
        from safetensors.torch import save_file

        from .evaluation import evaluate

        model, which = self._best_model()
        plain = export_main_branch(model) if has_dual_bn(model) else model
        tensors = {k: v.detach().cpu().clone().contiguous()
                   for k, v in plain.state_dict().items()}
        save_file(tensors, str(self.run_dir / "model.safetensors"),
                  metadata={"model": self.cfg.model.name,
                            "num_classes": str(self.splits.num_classes)})
        x, y = self.splits.test.tensors()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            report = evaluate(plain.eval(), (x, y), attacks=list(self.cfg.train.test_attacks),
                              eps=self.cfg.method.attack.eps,
                              batch_size=self.cfg.data.eval_batch_size, progress=self.progress)
        metrics = self._metrics(report, which)
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self._emit("on_train_end", metrics)
        print(f"run directory: {self.run_dir}\nTensorBoard:   tensorboard --logdir "
              f"{self.run_dir / 'tb'}\nmetrics:       {self.run_dir / 'metrics.json'}")
        return metrics

    def _metrics(self, report: dict, which: str) -> dict[str, Any]:
        s = self.state
        return {
            "test": report["results"], "test_examples": report.get("n", 0),
            "test_checks": report.get("checks_status", "skip"),
            "evaluated": which, "best_epoch": s.best_epoch, "best_val_pgd": s.best_val_pgd,
            "val": s.last_val, "val_history": s.history, "epochs": s.epoch,
            "steps": s.global_step, "bad_steps": s.bad_steps,
            "wall_seconds": round(s.wall_seconds, 2),
            "images_per_second": round(s.images_seen / max(s.step_seconds, 1e-9), 1),
            "method": self.cfg.method.name, "model": self.cfg.model.name,
            "dataset": self.cfg.data.name, "device": str(self.device),
            "run_dir": str(self.run_dir),
        }


def train(cfg: Config, **kwargs: Any) -> dict[str, Any]:
    """``Trainer(cfg, **kwargs).fit()``: train, evaluate, write the run directory."""
    return Trainer(cfg, **kwargs).fit()
