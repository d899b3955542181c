"""Things the training loop calls at step, log and epoch ends.

Built in: :class:`ValidationCallback` (clean + PGD accuracy on held-out images, picks
``best.pt``), :class:`CheckpointCallback` (``last.pt`` every epoch and every
``train.checkpoint_every`` steps) and :class:`TensorBoardCallback`. Your own: subclass
:class:`Callback`, or pass any ``fn(trainer, event, payload)`` to
``trainer.add_callback(fn)`` or name it in the config as ``train.callbacks:
["module:function"]`` (or ``"path/file.py:function"``; loaded by ``Trainer(cfg)`` before the
data, the model and the seed, so a typo costs no waiting; draws at import or in ``__init__``
are not seeded by ``train.seed``). Events: ``train_start``, ``step_start``,
``step_end`` (payload: stats as device tensors, do not sync), ``log`` (payload: means as
floats), ``epoch_end`` (payload: the 0-based epoch index; ``payload.number`` is the 1-based
epoch of ``metrics.json``), ``train_end`` (payload: metrics), ``train_error`` (payload: the
exception ``fit()`` is about to raise). ``trainer.request_stop()`` in a callback ends
training early (after that step, or that epoch), with the usual final test.

``train_error`` runs on every callback when ``fit()`` raises after its start-up checks: an
error in a callback or a step, the non-finite guard's ``TrainingError``, and also Ctrl-C and
SIGTERM (``KeyboardInterrupt`` / ``dat.trainer.Terminated``: a Ctrl-C during a step has
saved ``last.pt`` by then). It comes after the trainer's own clean-up (progress bar and
TensorBoard closed, resume point saved) and before the exception propagates, with the run
folder still held. An exception in a ``train_error`` handler is printed in one line and the
next callback still runs (a Ctrl-C skips the rest); the original exception is raised.

Under torchrun every callback runs on every rank (so it may use collectives); check
``trainer.dist.is_main`` before writing files. ``train_end``'s payload is ``{}`` on
ranks other than 0, which do not run the final test evaluation. ``train_error`` runs only
on the ranks where ``fit()`` raised: no collectives there (the other ranks may not come).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .attacks import check_unit_range, eval_mode, pgd
from .config import ConfigError
from .distributed import all_reduce_sum
from .entry_points import check_spec, load_module
from .models import bn_branch, has_dual_bn

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = [
    "Callback",
    "CheckpointCallback",
    "FunctionCallback",
    "TensorBoardCallback",
    "ValidationCallback",
    "load_callback",
    "robust_accuracy",
]


class Callback:
    """Base class: override the events you need; each receives the trainer.

    ``before_checkpoint = True`` runs its ``epoch_end`` before the epoch's ``last.pt`` is
    saved (built-in validation runs first either way): a run stopped inside it resumes
    from the previous checkpoint and runs it again, instead of skipping that epoch.
    """

    before_checkpoint = False

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, stats: dict[str, Tensor]) -> None: ...
    def on_log(self, trainer: Trainer, means: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None: ...
    def on_train_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_train_error(self, trainer: Trainer, error: BaseException) -> None: ...


class FunctionCallback(Callback):
    """Adapts ``fn(trainer, event, payload)`` to :class:`Callback`."""

    def __init__(self, fn: Callable[[Any, str, Any], None]) -> None:
        if not callable(fn):
            raise TypeError(f"a callback must be a Callback or fn(trainer, event, payload), "
                            f"not {type(fn).__name__}")
        if isinstance(fn, type) and issubclass(fn, Callback):  # the class, not an instance
            raise TypeError(f"{fn.__name__} is a Callback class; add an instance of it: "
                            f"{fn.__name__}(...)")
        try:
            inspect.signature(fn).bind(None, "train_start", None)
        except TypeError:  # fails now, not at the first event after the data has loaded
            raise TypeError(f"callback {getattr(fn, '__qualname__', fn)}{inspect.signature(fn)} "
                            "cannot take (trainer, event, payload); give it those three "
                            "parameters") from None
        except ValueError:  # no signature to read (some builtins): called as it is
            pass
        self.fn = fn

    def on_train_start(self, trainer):
        self.fn(trainer, "train_start", None)

    def on_step_start(self, trainer):
        self.fn(trainer, "step_start", None)

    def on_step_end(self, trainer, stats):
        self.fn(trainer, "step_end", stats)

    def on_log(self, trainer, means):
        self.fn(trainer, "log", means)

    def on_epoch_end(self, trainer, epoch):
        self.fn(trainer, "epoch_end", epoch)

    def on_train_end(self, trainer, metrics):
        self.fn(trainer, "train_end", metrics)

    def on_train_error(self, trainer, error):
        self.fn(trainer, "train_error", error)


def load_callback(spec: str) -> Callback:
    """``"module:function"`` or ``"path/file.py:function"`` (a function, a Callback class or
    instance) -> :class:`Callback`. Loaded as :mod:`dat.entry_points` loads a builder: a
    one-line ConfigError names a module that is not there, or a module that failed while
    importing (chained from its error), a missing attribute, or one that is not callable."""
    what = "train.callbacks"
    try:
        check_spec(spec, what, dotted=True)
        module_name, _, attr = spec.rpartition(":")
        target: Any = load_module(module_name, spec, what)
    except ValueError as err:  # the user's own error stays chained, for Python callers
        raise ConfigError(str(err)) from err.__cause__
    owner = Path(module_name).name if module_name.endswith(".py") else module_name
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{what} {spec!r}: {owner} has no {part!r}{hint}")
        owner, target = f"{owner}.{part}", getattr(target, part)
    if isinstance(target, type) and issubclass(target, Callback):
        try:
            return target()
        except TypeError as err:  # an __init__ that needs arguments the config cannot give
            raise ConfigError(
                f"{what} {spec!r}: {owner}() failed ({err}); a class named in the config is "
                "built without arguments: give its arguments defaults, or add it from "
                f"Python with trainer.add_callback({owner.rpartition('.')[2]}(...))") from err
    if isinstance(target, Callback):
        return target
    if not callable(target):
        raise ConfigError(f"{what} {spec!r}: {owner} ({type(target).__name__}) is not "
                          "callable; name a function fn(trainer, event, payload), a Callback "
                          "subclass or an instance of one")
    try:
        return FunctionCallback(target)
    except TypeError as err:
        raise ConfigError(f"{what} {spec!r}: {err}") from None


@torch.no_grad()
def _count_correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x).argmax(dim=1) == y).sum()


def robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
    batch_size: int = 500, seed: int = 0,
) -> tuple[float, float]:
    """(clean, PGD-``steps``) accuracy in percent, for checkpoint selection.

    Runs on the model's device in eval mode with the main BN branch, under a forked RNG
    (training's random stream is untouched, which exact resume relies on). Batch ``i``
    starts PGD from a draw seeded ``seed + i``. Under torchrun the batches are dealt to
    the ranks in turn (batch ``i`` to rank ``i % world``) and the correct counts summed,
    so every rank gets the same numbers as one process would; call it on every rank.
    """
    if len(x):
        check_unit_range(x, "robust_accuracy")  # once, not per batch (each would sync)
    device = next(model.parameters()).device
    forked = [device] if device.type == "cuda" else []
    rank, world = _rank_and_world()
    counts = torch.zeros(2, device=device)  # (clean, robust) correct predictions
    main = bn_branch(model, "main") if has_dual_bn(model) else contextlib.nullcontext()
    with torch.random.fork_rng(devices=forked), eval_mode(model), main:
        batches = zip(x.split(batch_size), y.split(batch_size), strict=True)
        for i, (xb, yb) in enumerate(batches):
            if i % world != rank:
                continue
            torch.manual_seed(seed + i)
            xb, yb = xb.to(device), yb.to(device)
            counts[0] += _count_correct(model, xb, yb)
            x_adv = pgd(model, xb, yb, eps, alpha, steps, check_range=False)  # (B, C, H, W)
            counts[1] += _count_correct(model, x_adv, yb)
    clean, robust = all_reduce_sum(counts).tolist()
    n = max(len(y), 1)
    return 100.0 * clean / n, 100.0 * robust / n


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ValidationCallback(Callback):
    """Every ``train.val_every`` epochs (and after the last): val accuracy, best.pt.

    Under torchrun the validation images are split across ranks and the counts summed.
    """

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        t = trainer.cfg.train
        last = epoch + 1 == t.epochs
        if not t.val_every or ((epoch + 1) % t.val_every and not last):
            return
        x, y = trainer.val_data
        if len(y) == 0:
            return
        a = trainer.cfg.method.attack
        clean, robust = robust_accuracy(trainer.eval_model(), x, y, a.eps, a.alpha,
                                        t.val_pgd_steps, trainer.cfg.data.eval_batch_size,
                                        seed=t.seed)
        s = trainer.state
        s.last_val = {"epoch": epoch + 1, "clean": clean, f"pgd{t.val_pgd_steps}": robust}
        s.history.append(dict(s.last_val))
        if (robust, clean) > (s.best_val_pgd, s.best_val_clean):  # ties: higher clean wins
            s.best_val_pgd, s.best_val_clean, s.best_epoch = robust, clean, epoch + 1
            trainer.save_best()


class CheckpointCallback(Callback):
    """``last.pt`` after every epoch and every ``train.checkpoint_every`` steps."""

    def on_step_end(self, trainer: Trainer, stats: dict[str, Tensor]) -> None:
        every = trainer.cfg.train.checkpoint_every
        if every and trainer.state.global_step % every == 0:
            trainer.save_last()

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        trainer.save_last()


class TensorBoardCallback(Callback):
    """Scalars (every step stat, lr, images/s, validation), image grids, test numbers, all
    at the global step.

    Rank 0 only under torchrun (scalars are means over ranks; images are rank 0's).
    """

    def __init__(self) -> None:
        self.writer = None

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if trainer.dist.is_main:
            # a resume after a hard stop (kill -9, torchrun) repeats steps logged since the
            # last checkpoint: purge_step hides those older events, so no step appears twice
            step = trainer.state.global_step
            self.writer = SummaryWriter(str(trainer.run_dir / "tb"),
                                        purge_step=step + 1 if step else None)

    def on_step_end(self, trainer: Trainer, stats: dict[str, Tensor]) -> None:
        every, step = trainer.cfg.train.image_every, trainer.state.global_step
        if (self.writer is None or not every or step % every
                or not hasattr(trainer.method, "last_images")):
            return
        for name, images in (trainer.method.last_images() or {}).items():
            if images.dim() == 4 and images.shape[1] in (1, 3):
                grid = images.detach().float()[:16].cpu()
                if name.startswith("log_amp"):  # spectra: scale each to [0, 1] for display
                    grid = grid / grid.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                self.writer.add_images(f"images/{name}", grid.clamp(0, 1), step)

    def on_log(self, trainer: Trainer, means: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in means.items():
            self.writer.add_scalar(f"train/{key}", value, trainer.state.global_step)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if self.writer is None:
            return
        val = trainer.state.last_val
        if val.get("epoch") == epoch + 1:  # at the global step, like train/* and test/*
            for key, value in val.items():
                if key != "epoch":
                    self.writer.add_scalar(f"val/{key}", value, trainer.state.global_step)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in metrics.get("test", {}).items():
            self.writer.add_scalar(f"test/{key}", value, trainer.state.global_step)
        self.writer.close()


class AutoAttackCallback(Callback):
    """Reference AutoAttack on ``n`` validation images every ``every`` epochs (rank 0).

    A robustness check during training that PGD alone cannot give (docs/method.md, section 14:
    label smoothing can mask cross-entropy attacks). Each result is appended to
    ``autoattack.json`` in the run directory (kept across resumes) and printed. Name it in
    a config as ``train.callbacks: ["dat.callbacks:autoattack_every_10_epochs"]``, or add
    your own with ``trainer.add_callback(AutoAttackCallback(every=5, n=200))``.
    """

    before_checkpoint = True  # a stop during AutoAttack repeats the epoch, AA included

    def __init__(self, every: int = 10, n: int = 500) -> None:
        if every < 1 or n < 1:
            raise ValueError(f"AutoAttackCallback(every={every}, n={n}): both must be >= 1")
        self.every, self.n = every, n

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if (epoch + 1) % self.every or not trainer.dist.is_main:
            return
        from .data import stratified_split
        from .evaluation import evaluate

        x, y = trainer.val_data
        if len(y) == 0:
            print("note: AutoAttackCallback: no validation images (data.val_size=0); "
                  "skipped", file=sys.stderr)
            return
        if self.n < len(y):  # a class-stratified subset: validation data is sorted by class
            keep = stratified_split(y, self.n, seed=0)[1]
            x, y = x[keep], y[keep]
        device = trainer.device
        # evaluate() seeds the global generators: training must not see that
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            report = evaluate(trainer.eval_model(), (x, y), attacks=["clean", "aa"],
                              eps=trainer.cfg.method.attack.eps,
                              batch_size=trainer.cfg.data.eval_batch_size, checks=False,
                              progress=False)
        entry = {"epoch": epoch + 1, "n": report["n"], **report["results"]}
        path = trainer.run_dir / "autoattack.json"
        history = json.loads(path.read_text()) if path.is_file() else []
        history = [h for h in history if h["epoch"] < entry["epoch"]] + [entry]
        from .checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(history, indent=1))
        print(f"epoch {entry['epoch']}: AutoAttack on {entry['n']} validation images: "
              f"clean {entry['clean']:.2f}%, aa {entry['aa']:.2f}%", file=sys.stderr)


autoattack_every_10_epochs = AutoAttackCallback(every=10, n=500)
"""``train.callbacks`` entry: AutoAttack on 500 validation images every 10 epochs."""
