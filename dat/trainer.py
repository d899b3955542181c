"""The training loop: ``Trainer(cfg).fit()`` (or ``train(cfg)``) -> metrics dict.

Per step, top to bottom: set the learning rate -> (checkpoint) -> method step (attack +
loss + optimiser update, guarded against non-finite values) -> log every
``perf.log_every`` steps (the only host sync). Per epoch: weight averaging,
validation PGD and ``best.pt``, ``last.pt``. At the end: test accuracy of the best
model into ``metrics.json`` and its main-branch weights into ``model.safetensors``.

Under torchrun every rank runs this loop on its shard of each epoch (global batch =
``data.batch_size`` x ranks); see :mod:`dat.distributed`. Validation is split across
ranks and summed; progress bars, TensorBoard, prints, checkpoints, the export and the
final test evaluation happen on rank 0 only (the other ranks return ``{}`` at the end).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed, folder_lock, methods
from .attacks import eager_module
from .averaging import create_averager
from .build import (
    RUN_IN_USE_FIX,
    build_model,
    check_labels,
    check_test_attacks,
    compile_model,
    learning_rate,
    named_run_dir,
    precision_warning,
    prepare_run_dir,
    resolve_channels_last,
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
from .config import (
    CUDA_GRAPH_MODES,
    Config,
    ConfigError,
    checked_config,
    config_to_dict,
    config_to_yaml,
)
from .data import (
    Batch,
    DatasetSplits,
    describe_data,
    load_dataset,
    make_loader,
    stratified_split,
)
from .entry_points import absolute_spec, describe_error
from .guard import (
    StepGuard,
    generator_warnings,
    owned_modules_and_optimizers,
    unique_objects,
)
from .messages import count
from .models import export_main_branch, has_dual_bn
from .run_state import CheckpointedRun, TrainState

__all__ = ["EpochIndex", "Terminated", "TrainState", "Trainer", "TrainingError", "train"]

VAL_SHARE_WARN = 0.25  # warn when validation holds out more of the training folder

# Keys of ``trainer.cfg`` that may change between ``Trainer(cfg)`` and ``fit()`` (e.g. to
# train a finished run longer): the loop reads them as it goes, and a resume may change them
# too (dat.checkpoint.RESUME_MAY_CHANGE). Any other edit would be saved in config.yaml and
# the checkpoints without being used, so fit() refuses it.
FIT_MAY_CHANGE: tuple[str, ...] = (
    "train.epochs", "train.val_every", "train.image_every", "train.max_bad_steps",
    "train.keep_checkpoints", "train.checkpoint_every", "train.test_attacks",
    "optim.lr", "optim.schedule", "optim.milestones", "optim.gamma", "optim.warmup_epochs",
    "optim.lr_scaling", "optim.reference_batch_size", "perf.log_every", "data.eval_batch_size",
)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler stopping the job), handled like Ctrl-C: the step in
    progress finishes and ``last.pt`` is saved; the CLI then exits with status 143."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the message says why."""


class EpochIndex(int):
    """The ``epoch_end`` payload: the 0-based epoch index (the documented contract, kept
    for existing callbacks), with ``number``, the 1-based epoch as printed and as in
    ``metrics.json`` (``epochs``, ``best_epoch``, ``val_history``)."""

    @property
    def number(self) -> int:
        return int(self) + 1


class Trainer(CheckpointedRun):
    """Builds data, model, optimiser, method step and callbacks from ``cfg``; ``fit()``.

    ``cfg`` is checked (types and values, as :func:`dat.load_config` checks them) and
    copied: the trainer works on ``trainer.cfg`` (with the run name it stamps), and the
    caller's ``cfg`` stays free to build the next trainer. Between ``Trainer(cfg)`` and
    ``fit()`` only the keys in :data:`FIT_MAY_CHANGE` of ``trainer.cfg`` may change.
    ``splits`` replaces ``load_dataset(cfg.data)`` (your own data); ``callbacks`` are
    :class:`~dat.callbacks.Callback` objects or ``fn(trainer, event, payload)``.
    """

    def __init__(self, cfg: Config, splits: DatasetSplits | None = None,
                 callbacks: tuple = (), progress: bool = True) -> None:
        cfg = checked_config(cfg, "Trainer(cfg): cfg")
        self.cfg, self.device = cfg, resolve_device(cfg.train.device)
        # config.yaml and checkpoints keep paths that resume and evaluate from any folder
        if splits is None and cfg.data.name != "cifar10-sample":
            cfg.data.root = str(Path(cfg.data.root).expanduser().absolute())
        cfg.model.name = absolute_spec(cfg.model.name)  # your own nets.py:build
        cfg.train.callbacks = [absolute_spec(spec) for spec in cfg.train.callbacks]
        self.dist = distributed.init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.progress = progress and self.dist.is_main
        self._warned: set[str] = set()  # generator warnings already shown
        self.global_batch = cfg.data.batch_size * self.dist.world_size
        check_test_attacks(cfg.train.test_attacks)
        # before the data and the model (minutes on a big dataset), so a typo fails at once,
        # and before the seed, so a module drawing random numbers leaves the weights alone
        configured = [load_callback(spec) for spec in cfg.train.callbacks]
        given = [cb if isinstance(cb, Callback) else FunctionCallback(cb) for cb in callbacks]
        resume = self._resume_path()  # checked before the data loads: a refusal costs nothing
        named = named_run_dir(cfg, resume)
        if named is not None and self.dist.is_main:  # another process still at work there
            folder_lock.check_free(named, RUN_IN_USE_FIX)
        loaded = self.load_resumable(resume) if resume is not None else None
        # once, as the run starts and before the data loads: a resume may not change method.*
        message = methods.baseline_settings_warning(cfg) if resume is None else None
        if message and self.dist.is_main:
            warnings.warn(message, stacklevel=2)
        seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights
        self.splits = splits if splits is not None else load_dataset(cfg.data)
        self._own_splits = splits is not None  # the caller's: not read by data.* settings
        check_labels(self.splits)
        self.model = build_model(cfg, self.splits.num_classes, self.splits.image_shape,
                                 self.device)
        self.channels_last = resolve_channels_last(cfg.perf.channels_last, self.device,
                                                   self.model)
        net = compile_model(self.model, cfg.perf.compile)
        if (message := precision_warning(cfg.perf.precision, self.device)) and self.dist.is_main:
            warnings.warn(message, stacklevel=2)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
        self.method = methods.create(
            cfg, net, self.optimizer, num_classes=self.splits.num_classes,
            image_shape=self.splits.image_shape, train_images=self.splits.train,
            autocast_dtype=resolve_precision(cfg.perf.precision, self.device))
        t = cfg.train
        self._distribute()
        self.averager = create_averager(self.model, t.weight_averaging, t.ema_decay,
                                        t.swa_start, t.ema_warmup)
        self.loader = make_loader(self.splits.train, cfg.data, self.device, train=True,
                                  seed=t.seed, rank=self.dist.rank,
                                  world_size=self.dist.world_size)
        self.steps_per_epoch = min(len(self.loader), t.steps_per_epoch or len(self.loader))
        self.val_data = self._val_subset(t.val_examples, cfg.data.split_seed)
        self.guard = StepGuard([net], [self.optimizer], extra=self.method,
                               agree=distributed.agree_all_ok if self.dist.enabled else None)
        self.state = TrainState()
        self.callbacks: list[Callback] = [ValidationCallback(), CheckpointCallback(),
                                          TensorBoardCallback()]
        for cb in [*configured, *given]:
            self.add_callback(cb)
        # after every check that could fail; rank 0 creates it, the others learn its name
        self.run_dir, cfg.train.run_name = distributed.run_on_main(
            lambda: (prepare_run_dir(cfg, resume), cfg.train.run_name))
        # rank 0 now holds the run directory (dat.folder_lock); fit() lets go at its end,
        # and a trainer dropped before that lets go when it is collected
        self._unlock = weakref.finalize(self, folder_lock.release,
                                        folder_lock.key_of(self.run_dir))
        if not self.dist.is_main:
            self._unlock.detach()
        self._synced_at = -1  # global step of the last BN-statistics sync
        self._fresh, self._stop_requested = resume is None, False
        self._last_saved_step: int | None = None  # global step of this session's last last.pt
        if resume is not None:
            try:
                self.resume(resume, loaded)
            except BaseException:  # refused: let go of the folder now, not at collection
                self._unlock()
                raise
        self._built_with = ckpt._flatten(config_to_dict(cfg))  # what the pieces were built from

    # -- public helpers -------------------------------------------------------------
    def add_callback(self, callback: Callback | Callable[[Any, str, Any], None]) -> None:
        """Register a :class:`Callback` or a plain ``fn(trainer, event, payload)``."""
        if not isinstance(callback, Callback):
            callback = FunctionCallback(callback)
        if callback.before_checkpoint:  # just before the built-in CheckpointCallback
            at = next((i for i, cb in enumerate(self.callbacks)
                       if isinstance(cb, CheckpointCallback)), len(self.callbacks))
            self.callbacks.insert(at, callback)
        else:
            self.callbacks.append(callback)

    def request_stop(self) -> None:
        """Stop training early, from a callback: called at ``step_end`` (or ``log``), the
        step in progress is the last one; at ``epoch_end``, that epoch is the last. fit()
        then saves ``last.pt``, tests ``best.pt`` and returns its metrics as usual; a later
        resume, or fit() again, continues to ``train.epochs``. Under torchrun, call it on
        every rank at the same step (callbacks run on every rank; a decision from one
        rank's local numbers would leave the others waiting)."""
        self._stop_requested = True

    def eval_model(self) -> torch.nn.Module:
        """The model to validate and export: the weight average when there is one."""
        if self.averager is not None and self.averager.active:
            return self.averager.module
        return self.model

    def sync_buffers(self) -> None:
        """Average BN running statistics over ranks (model, AAG, weight average).

        Not needed with ``model.sync_bn`` (the statistics already agree); at most once
        per step, so validation, best.pt and last.pt see the same values.
        """
        if (not self.dist.enabled or self.cfg.model.sync_bn
                or self._synced_at == self.state.global_step):
            return
        modules, _ = self._trained_modules()
        for module in modules + ([self.averager.module] if self.averager else []):
            distributed.average_buffers(module)
        self._synced_at = self.state.global_step

    def _say_error(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr)

    # -- the loop -------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs (from where a resume left off); metrics."""
        self._check_config_edits()
        self._check_run_dir_unclaimed()
        self._fit_t0, first = time.perf_counter(), self.state.global_step
        self._stop_requested = False
        if self.dist.is_main and not self._unlock.alive:  # fit() again, after a first fit
            self._unlock = weakref.finalize(self, folder_lock.release, folder_lock.acquire(
                self.run_dir, RUN_IN_USE_FIX))
        try:
            return self._fit(first)
        except BaseException as error:  # no train_end: let TensorBoard's files and thread go now
            for callback in self.callbacks:
                if isinstance(callback, TensorBoardCallback) and callback.writer is not None:
                    callback.writer.close()
                    callback.writer = None
            self._emit_error(error)
            raise
        finally:
            self._unlock()

    def _check_config_edits(self) -> None:
        """Edits of ``trainer.cfg`` since ``Trainer(cfg)``: checked like a new config, and
        refused unless the loop reads that key as it goes (:data:`FIT_MAY_CHANGE`)."""
        checked = checked_config(self.cfg, "trainer.cfg")
        now = ckpt._flatten(config_to_dict(checked))
        changed = [k for k in now if now[k] != self._built_with.get(k)]
        fixed = [k for k in changed if k not in FIT_MAY_CHANGE]
        if fixed:
            key, more = fixed[0], "".join(f"; also {k}" for k in fixed[1:])
            raise ConfigError(
                f"trainer.cfg.{key} changed from {self._built_with.get(key)!r} to {now[key]!r}"
                f"{more} after Trainer(cfg) built its model, data and method from the old "
                "value, so the run would record a setting it does not use; build a new "
                "Trainer from the edited config (between Trainer(cfg) and fit() only these may "
                "change: "
                f"{', '.join(FIT_MAY_CHANGE)})")
        if changed:
            check_test_attacks(checked.train.test_attacks)
            for key in changed:  # the checked (converted) values, in the caller's objects
                section, _, name = key.partition(".")
                setattr(getattr(self.cfg, section), name, getattr(getattr(checked, section), name))
            self._built_with = now

    def _check_run_dir_unclaimed(self) -> None:
        """A new run's folder must still be its own: another Trainer of this process with
        the same ``train.run_name`` (the folder lock is per process) may have written a run
        there since this one was built, and this fit would overwrite it."""
        if not self._fresh or self._last_saved_step is not None or self.dist.enabled:
            return
        if any((self.run_dir / "checkpoints").glob("last*.pt")):
            raise ConfigError(
                f"{self.run_dir} already holds a run, written after this Trainer was built "
                "(another Trainer in this process with the same train.run_name?); fitting this "
                "one would overwrite its checkpoints and metrics: build it with another "
                "train.run_name, or resume that run (train.resume=auto)")

    def _say_data(self) -> None:
        """One line on what the run trains, selects and tests on (a renamed or hidden class
        folder, or a validation split that ate the data, shows here), and a warning when
        the validation split holds out most of the training folder."""
        s, d = self.splits, self.cfg.data
        used = len(self.val_data[1])
        name = "your splits" if self._own_splits else d.name + (
            f" {d.root}" if d.name != "cifar10-sample" else "")  # which copy it read
        print(f"data: {name}, {len(s.classes)} classes, {len(s.train):,} training / "
              f"{len(s.val):,} validation ({used:,} used) / {len(s.test):,} test images, "
              f"{'x'.join(map(str, s.image_shape))}")
        held_out = not self._own_splits and d.val_size > 0 and d.train_subset == 0
        folder = len(s.train) + len(s.val)
        if held_out and len(s.val) > VAL_SHARE_WARN * folder:
            warnings.warn(f"data.val_size={d.val_size} holds out {len(s.val) / folder:.0%} of "
                          f"the {folder:,} training images, and validation uses {used:,} of "
                          "them; lower data.val_size (e.g. to train.val_examples)",
                          stacklevel=2)

    def _fit(self, first: int) -> dict[str, Any]:
        if self.dist.is_main:
            self._say_data()
            ckpt.atomic_write_text(self.run_dir / "config.yaml", config_to_yaml(self.cfg))
        self._emit("on_train_start")
        total = self.cfg.train.epochs * self.steps_per_epoch
        self._bar = tqdm(total=total, initial=first, disable=not self.progress,
                         dynamic_ncols=True, desc=self.run_dir.name)
        self._reset_log()
        try:
            with self._deferred_interrupt():
                self._train_epochs()
        finally:  # also on Ctrl-C or an error: no bar redrawn below the message
            self._bar.close()
        self.count_wall_time()
        self._fit_t0 = None  # the final test is not training time
        return self._finish()

    def _train_epochs(self) -> None:
        for epoch in range(self.state.epoch, self.cfg.train.epochs):
            if self._stop_requested:  # asked for at the end of the previous epoch
                self._say_stopped()
                return
            self.method.on_epoch_start(epoch)
            for batch in self._batches(epoch):
                self._in_step = True  # Ctrl-C from here waits for the step's end
                self._set_lr(epoch, self.state.step_in_epoch)
                self._emit("on_step_start")
                stats = self._train_step(batch)
                self._emit("on_step_end", stats)
                if self.state.global_step % self.cfg.perf.log_every == 0:
                    self._log()
                self._in_step = False
                if self._interrupted:
                    self._stop_interrupted()
                if self._stop_requested and self.state.step_in_epoch < self.steps_per_epoch:
                    if self._sum_keys:
                        self._log()
                    self.save_last()  # an exact resume point, as at Ctrl-C
                    self._say_stopped()
                    return
            self._end_epoch(epoch)

    def _say_stopped(self) -> None:
        if self.dist.is_main:
            s = self.state
            print(f"stopped early by trainer.request_stop() after {count(s.global_step, 'step')} "
                  f"({count(s.epoch, 'epoch')} and {count(s.step_in_epoch, 'step')} of the next)",
                  file=sys.stderr)

    @contextlib.contextmanager
    def _deferred_interrupt(self) -> Iterator[None]:
        """A Ctrl-C (SIGINT) or a scheduler's SIGTERM during a step finishes it and saves
        ``last.pt`` (an exact resume point, like ``train.checkpoint_every``'s); a second
        one, or one outside a step, stops at once. Main thread of a single process only
        (under torchrun ranks would disagree), and only for signals nobody else handles."""
        self._in_step, self._interrupted = False, None
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        ours = [s for s, default in defaults.items() if signal.getsignal(s) is default]
        if (self.dist.enabled or threading.current_thread() is not threading.main_thread()
                or not ours):
            yield  # torchrun, a thread, or someone else's handlers (or SIG_IGN): theirs
            return

        def handler(signum: int, frame: Any) -> None:
            stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
            if not self._in_step or self._interrupted:
                raise stop
            self._interrupted = stop

        previous = {s: signal.signal(s, handler) for s in ours}
        try:
            yield
        finally:
            for s, before in previous.items():
                signal.signal(s, before)

    def _stop_interrupted(self) -> None:
        if self._sum_keys:  # the timing and stats since the last log go into the checkpoint
            self._log()
        self.count_wall_time()  # fit() ends here
        self.save_last()  # again if train.checkpoint_every just saved: now with the time
        raise self._interrupted

    def _batches(self, epoch: int) -> Iterator[Batch]:
        """This epoch's batches; after a resume, consumed ones are regenerated and skipped
        so the augmentation draws stay aligned with an uninterrupted run."""
        self.loader.set_epoch(epoch)
        for i, batch in enumerate(itertools.islice(self.loader, self.steps_per_epoch)):
            if i >= self.state.step_in_epoch:
                yield batch

    def _set_lr(self, epoch: int, step: int) -> None:
        lr = learning_rate(self.cfg.optim, epoch, step, self.steps_per_epoch,
                           self.cfg.train.epochs, self.global_batch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x, x_raw, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            x_raw = x_raw.contiguous(memory_format=torch.channels_last)
        if self.cfg.perf.compile in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA graph outputs rotate
        self.guard.snapshot()
        with self._eager_if_odd(len(y)):
            stats = self.method.run(x, y, x_raw)
        ok = self.guard.commit(stats.get("loss"))  # restores the pre-step state if not ok
        s = self.state
        s.global_step, s.step_in_epoch, s.images_seen = (
            s.global_step + 1, s.step_in_epoch + 1,
            s.images_seen + len(y) * self.dist.world_size)  # ranks' batches differ by <= 1
        if self.averager is not None:
            self.averager.update_step(self.model)
        self._accumulate(stats, ok)
        self._bar.update(1)
        return stats

    def _eager_if_odd(self, batch_size: int) -> contextlib.AbstractContextManager:
        """Eager for a batch of another size than the others (an epoch's last one), when
        the model or the attack steps are compiled: static shapes would compile each of
        their graphs again for that one step per epoch (7 graphs for a DAT step, tens of
        seconds each on a GPU). A loader of one batch per epoch stays compiled, and so does
        torch < 2.6, which has no ``torch.compiler.set_stance``."""
        perf = self.cfg.perf
        set_stance = getattr(torch.compiler, "set_stance", None)
        if ((perf.compile == "off" and perf.compile_attacks == "off") or set_stance is None
                or batch_size == self.cfg.data.batch_size or len(self.loader) < 2):
            return contextlib.nullcontext()
        return set_stance("force_eager")

    def _accumulate(self, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        """Device-side sums of the good steps' stats: one stack, one where and one add for
        all of them (a per-stat loop costs ~60 kernel launches per step)."""
        keys = tuple(stats)
        kept = torch.where(ok, torch.stack([v.float() for v in stats.values()]), 0.0)
        if self._sum_keys is None or keys == self._sum_keys:
            self._sum_vec = kept if self._sum_keys is None else self._sum_vec + kept
            self._sum_keys = keys
        else:  # the stats changed names mid-interval: add them up by name
            zero = kept.new_zeros(())
            old = dict(zip(self._sum_keys, self._sum_vec.unbind(), strict=True))
            new = dict(zip(keys, kept.unbind(), strict=True))
            self._sum_keys = tuple(dict.fromkeys(self._sum_keys + keys))
            self._sum_vec = torch.stack([old.get(k, zero) + new.get(k, zero)
                                         for k in self._sum_keys])
        self._good = self._good + ok.float()

    def _reset_log(self) -> None:
        self._sum_keys: tuple[str, ...] | None = None  # names of the entries of _sum_vec
        self._sum_vec = torch.zeros(0, device=self.device)
        self._good = torch.zeros((), device=self.device)
        self._log_mark, self._log_images = time.perf_counter(), self.state.images_seen

    def _log(self) -> None:
        """The one host sync: means since the last log, throughput, the non-finite check."""
        keys = list(self._sum_keys or ())
        counters = self.guard.counters(self._good.device)  # equal on all ranks already
        sums = distributed.all_reduce_sum(torch.cat([self._sum_vec, self._good.view(1)]))
        values = torch.cat([sums, torch.stack(counters).to(sums)]).tolist()
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
        for warning in generator_warnings(means):
            if warning.split(":")[0] not in self._warned:
                self._warned.add(warning.split(":")[0])
                self._say_error(f"warning: {warning}")
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
        if self._sum_keys:
            self._log()
        self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        self.sync_buffers()  # before SWA reads them and validation uses them
        if self.averager is not None:
            self.averager.update_epoch(self.model, epoch)
        self._emit("on_epoch_end", EpochIndex(epoch))
        self._reset_log()

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def _emit_error(self, error: BaseException) -> None:
        """``train_error`` on every callback; one that raises is reported in one line and
        the rest still run (a Ctrl-C or exit skips them): ``error`` is what fit() raises."""
        for callback in self.callbacks:
            try:
                callback.on_train_error(self, error)
            except BaseException as err:  # reported; the original error goes on
                name = getattr(getattr(callback, "fn", None), "__qualname__",
                               type(callback).__name__)
                rank = f" (rank {self.dist.rank})" if self.dist.enabled else ""
                rest = "" if isinstance(err, Exception) else "; skipped the other callbacks"
                print(f"warning{rank}: callback {name} failed in train_error: "
                      f"{describe_error(err)}{rest}; raising the original "
                      f"{type(error).__name__}", file=sys.stderr)
                if not isinstance(err, Exception):
                    return

    # -- state and the end of a run ---------------------------------------------------
    def _trained_modules(self) -> tuple[list[torch.nn.Module], list]:
        """Every module and optimiser a step updates: classifier, AAG, AWP's proxy."""
        modules, optimizers = [self.model], [self.optimizer]
        for owner in (self.method, getattr(self.method, "awp", None)):
            more_modules, more_optimizers = owned_modules_and_optimizers(owner)
            modules += [eager_module(m) for m in more_modules]  # compiled: the inner one
            optimizers += more_optimizers
        return unique_objects(modules), unique_objects(optimizers)

    def _distribute(self) -> None:
        """Under torchrun: SyncBN if asked, rank 0's weights everywhere, averaged gradients;
        then a seed per rank, so attack and AAG noise differ between ranks."""
        if not self.dist.enabled:
            return
        modules, optimizers = self._trained_modules()
        distributed.prepare_modules(modules, optimizers, sync_bn=self.cfg.model.sync_bn,
                            device_type=self.device.type)
        seed_everything(distributed.rank_seed(self.cfg.train.seed, self.dist.rank))

    def _val_subset(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` validation images, stratified (splits may be stored sorted by label)."""
        val = self.splits.val
        if len(val) == 0:
            return torch.empty(0, *self.splits.image_shape), torch.empty(0, dtype=torch.long)
        if n < len(val):
            val = val.subset(stratified_split(val.labels, n, seed)[1])
        return val.tensors()

    def _best_model(self) -> tuple[torch.nn.Module, str]:
        best = self.run_dir / "checkpoints" / "best.pt"
        model = copy.deepcopy(self.eval_model())
        if not best.is_file():
            return model, "final weights (no validation ran)"
        saved = ckpt.load_checkpoint(best)
        ckpt.load_model_state(model, saved["model"], str(best))
        kind = saved.get("weights")  # absent in best.pt files from before 2026-11-27
        return model, f"best.pt (epoch {self.state.best_epoch}" + (
            f", {kind} weights)" if kind else ")")

    def _finish(self) -> dict[str, Any]:
        from .evaluation import evaluate
        from .export import export_model

        if not self.dist.is_main:  # rank 0 exports and tests; nothing here waits for it
            self._emit("on_train_end", {})
            return {}
        model, which = self._best_model()
        plain = export_main_branch(model) if has_dual_bn(model) else model
        export_model(plain, self.run_dir / "model.safetensors",  # file mode as the umask says
                     metadata={"model": self.cfg.model.name,
                               "num_classes": str(self.splits.num_classes)})
        x, y = self.splits.test.tensors()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            report = evaluate(plain.eval(), (x, y), attacks=list(self.cfg.train.test_attacks),
                              eps=self.cfg.method.attack.eps,
                              batch_size=self.cfg.data.eval_batch_size, progress=self.progress,
                              out_dir=self.run_dir / "test",  # the full report, with plots
                              resume="auto",  # a test cut short by Ctrl-C goes on
                              class_names=self.splits.classes,
                              metadata=self._test_metadata(which))
        metrics = self._metrics(report, which)
        ckpt.atomic_write_text(self.run_dir / "metrics.json",
                               json.dumps(metrics, indent=2) + "\n")
        self._emit("on_train_end", metrics)
        print(f"run directory: {self.run_dir}\nTensorBoard:   tensorboard --logdir "
              f"{self.run_dir / 'tb'}\nmetrics:       {self.run_dir / 'metrics.json'}\n"
              f"test report:   {self.run_dir / 'test' / 'report.md'}")
        return metrics

    def _test_metadata(self, which: str) -> dict[str, Any]:
        """What the final test evaluated, named in ``test/report.json`` and ``report.md``
        as ``evaluate.py`` names it (the checkpoint, the data, the split)."""
        best = self.run_dir / "checkpoints" / "best.pt"
        data = {"data": "your splits"} if self._own_splits else describe_data(self.cfg.data)
        return {"checkpoint": str(best.absolute()) if best.is_file() else None,
                "evaluated": which, **data, "split": "test"}

    def _metrics(self, report: dict, which: str) -> dict[str, Any]:
        s = self.state
        return {
            "test": report["results"], "test_examples": report.get("n", 0),
            "test_checks": report.get("checks_status", "skip"),
            "test_check_findings": {name: {"status": c["status"], "message": c["message"]}
                                    for name, c in report.get("checks", {}).items()},
            "evaluated": which, "best_epoch": s.best_epoch, "best_val_pgd": s.best_val_pgd,
            "val": s.last_val, "val_history": s.history, "epochs": s.epoch,
            "steps": s.global_step, "bad_steps": s.bad_steps,
            "wall_seconds": round(s.wall_seconds, 2),
            "images_per_second": round(s.images_seen / max(s.step_seconds, 1e-9), 1),
            "weight_averaging": self.cfg.train.weight_averaging,
            "method": self.cfg.method.name, "model": self.cfg.model.name,
            "dataset": self.cfg.data.name, "device": str(self.device),
            "world_size": self.dist.world_size, "global_batch": self.global_batch,
            "run_dir": str(self.run_dir),
        }


def train(cfg: Config, **kwargs: Any) -> dict[str, Any]:
    """``Trainer(cfg, **kwargs).fit()``: train, evaluate, write the run directory."""
    return Trainer(cfg, **kwargs).fit()
