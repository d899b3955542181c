"""Build the pieces of a training run from a config, checking user input on the way.

Each check turns a would-be traceback deep in the loop into a one-line error naming
the fix: CUDA asked for but absent, labels outside the class range, images the model
cannot take, an output directory that cannot be written.
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import folder_lock
from .checkpoint import ensure_writable
from .config import Config, ConfigError, OptimConfig
from .data import DataError, DatasetSplits
from .entry_points import is_spec, run_label
from .methods import needs_dual_bn
from .models import create

__all__ = [
    "compile_model",
    "build_model",
    "check_labels",
    "check_test_attacks",
    "learning_rate",
    "precision_warning",
    "prepare_run_dir",
    "resolve_batched",
    "cpu_channels_last_crashes",
    "resolve_channels_last",
    "resolve_device",
    "resolve_fused_split_bn",
    "resolve_precision",
    "seed_everything",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; CUDA asked for but absent -> error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; "
                          "use train.device=cpu (or auto)")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``auto`` = bf16 on a GPU with bf16 tensor cores, else fp32 (None).

    GPUs before compute capability 8.0 (V100, T4, ...) run bf16 emulated, slower than
    fp32, so ``auto`` keeps fp32 there (:func:`precision_warning` says so).
    """
    if precision == "bf16" or (precision == "auto" and _native_bf16(device)):
        return torch.bfloat16
    return None


def precision_warning(precision: str, device: torch.device) -> str | None:
    """What to tell a user whose GPU has no bf16 tensor cores, or None."""
    if device.type != "cuda" or precision not in ("auto", "bf16") or _native_bf16(device):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    kept = "training in fp32" if precision == "auto" else "bf16 runs emulated, slower"
    return (f"this GPU (sm_{major}{minor}) has no bf16 tensor cores: {kept}; "
            "perf.precision=fp32 is the fast choice here")


def _native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: NVIDIA compute capability 8.0 (A100) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def compile_model(model: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model, mode=...)`` with static shapes, or ``model`` for ``off``.

    A DAT step calls the model in up to 5 guard variants (train/eval, BN branch, whether
    x_hat requires grad, B, 2B or 4B images), so the recompile limit is raised to 32
    instead of falling back to eager at torch's default of 8. The trainer runs an epoch's
    last, smaller batch eagerly rather than compile them all again for it
    (BENCHMARKS.md, "Compile counts").
    """
    if mode == "off":
        return model
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    if backend != "inductor":  # modes are inductor options; other backends take none
        return torch.compile(model, backend=backend, dynamic=False)
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def cpu_channels_last_crashes(model: nn.Module | None) -> bool:
    """Whether ``model`` has a strided 1x1 convolution with fewer than 16 input channels:
    torch 2.14's CPU backward for its weights crashes the process (segfault) in
    channels_last on odd batch sizes with more than one thread (a oneDNN bug; resnet_tiny's
    shortcuts are such convolutions)."""
    return model is not None and any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
        and m.in_channels < 16 for m in model.modules())


def resolve_channels_last(setting: str, device: torch.device,
                          model: nn.Module | None = None) -> bool:
    """``auto`` -> channels_last on CUDA and on CPU, where oneDNN's NHWC convolutions
    cut a CPU DAT step by about 20% (BENCHMARKS.md), unless ``model`` is one that
    channels_last crashes on a CPU (:func:`cpu_channels_last_crashes`); ``on`` for such
    a model on a CPU is refused."""
    crashes = device.type == "cpu" and cpu_channels_last_crashes(model)
    if setting == "on" and crashes:
        raise ConfigError("perf.channels_last=on crashes torch's CPU backward for this model "
                          "(a strided 1x1 convolution with < 16 input channels, odd batch "
                          "sizes); use perf.channels_last=auto or off")
    return setting == "on" or (setting == "auto" and device.type in ("cuda", "cpu")
                               and not crashes)


def resolve_batched(setting: str, device: torch.device) -> bool:
    """``auto`` -> one 2B batch on CUDA (fewer launches); two B batches on CPU, where the
    split-BN concatenations cost more than they save (BENCHMARKS.md)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def resolve_fused_split_bn(setting: str, device: torch.device) -> bool:
    """``auto`` -> off on every device: fused split BN (4 operations fewer per BN layer
    and step of the batched attack) ran slower on an H100 (1,085 against 1,295 img/s,
    BENCHMARKS.md), and a CPU does not batch the attack. ``on`` turns it on."""
    del device
    return setting == "on"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_labels(splits: DatasetSplits) -> None:
    """Every label of every split must lie in ``0 .. num_classes - 1``."""
    n = splits.num_classes
    for name in ("train", "val", "test"):
        labels = getattr(splits, name).labels
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise DataError(
                f"{name} labels range {int(labels.min())}..{int(labels.max())} but the dataset "
                f"has {n} classes; labels must be 0..{n - 1}: fix the labels or the class list")


def check_test_attacks(names: list[str]) -> None:
    """Unknown ``train.test_attacks`` names fail now, not after hours of training."""
    from .evaluation.suite import EvaluationError, validate_attack_names

    try:
        validate_attack_names(list(names))
    except EvaluationError as err:
        raise ConfigError(f"train.test_attacks: {err}") from None


def _check_fits(model: nn.Module, name: str, shape: tuple[int, int, int],
                num_classes: int, device: torch.device) -> None:
    """One eval-mode forward of two blank images: a clear error instead of one mid-run."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape, device=device))
    except Exception as err:  # shape errors surface as RuntimeError, AssertionError, ...
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DataError(
            f"images of size {shape[0]}x{shape[1]}x{shape[2]} do not fit model {name} "
            f"({detail}); resize the images, choose a model made for this size, or build "
            "it for this size in a file of your own (model.name=nets.py:build, e.g. a timm "
            "ViT with img_size=" + str(shape[1]) + ")") from err  # for Python callers
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise DataError(f"model {name} returns shape {tuple(out.shape)} for 2 images; "
                        f"expected (2, {num_classes}) logits")


def build_model(cfg: Config, num_classes: int, image_shape: tuple[int, int, int],
                device: torch.device) -> nn.Module:
    """The registry model (dual BN when the method needs it) on ``device``, checked."""
    try:
        model = create(cfg.model.name, num_classes=num_classes, dual_bn=needs_dual_bn(cfg))
    except ValueError as err:  # a builder's own errors already name model.name
        raise ConfigError(str(err) if is_spec(cfg.model.name) else
                          f"model.name={cfg.model.name!r}: {err}") from err.__cause__
    model = model.to(device)
    if resolve_channels_last(cfg.perf.channels_last, device, model):
        model = model.to(memory_format=torch.channels_last)
    _check_fits(model, cfg.model.name, image_shape, num_classes, device)
    return model


RUN_IN_USE_FIX = "wait for it to finish or stop it (a new run can take another train.run_name)"


def named_run_dir(cfg: Config, resume: Path | None) -> Path | None:
    """The run directory a resume or a set ``train.run_name`` points at (None: a new name
    will be stamped); touches nothing."""
    if resume is not None and resume.parent.name == "checkpoints":
        return resume.parent.parent
    return Path(cfg.train.out_dir) / cfg.train.run_name if cfg.train.run_name else None


def _new_run_name(cfg: Config) -> str:
    """``method-model-data-time``, claimed by creating its folder (an atomic mkdir): runs
    started in the same second get ``-2``, ``-3``, ... instead of sharing one folder."""
    model = run_label(cfg.model.name) if is_spec(cfg.model.name) else cfg.model.name
    model = re.sub(r"[^A-Za-z0-9_.-]", "_", model)  # timm/x -> timm_x; nets.py:build -> nets.build
    base = f"{cfg.method.name}-{model}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        try:
            (Path(cfg.train.out_dir) / name).mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:
            return name  # ensure_writable names the problem with out_dir
        return name
    raise ConfigError(f"no free run name like {base} in {cfg.train.out_dir}; set train.run_name")


def _is_writable_dir(folder: Path) -> bool:
    try:
        ensure_writable(folder)
    except OSError:
        return False
    return True


def prepare_run_dir(cfg: Config, resume: Path | None) -> Path:
    """Create (or, on resume, reuse) ``out_dir/run_name`` and lock it for this process
    (:func:`dat.folder_lock.acquire`; the caller releases it); fill in a default run_name."""
    run_dir = named_run_dir(cfg, resume)
    if run_dir is None:
        cfg.train.run_name = _new_run_name(cfg)
        run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
    elif resume is not None and resume.parent.name == "checkpoints":
        cfg.train.run_name = run_dir.name
    try:
        ensure_writable(run_dir / "checkpoints")
    except OSError as err:
        why = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        if resume is None and _is_writable_dir(Path(cfg.train.out_dir)):
            # out_dir is fine: a file stands where the run's own folder should be
            raise ConfigError(f"run folder {run_dir} cannot be created ({why}); choose "
                              "another train.run_name (or move that file)") from None
        raise ConfigError(f"train.out_dir={cfg.train.out_dir!r} is not writable "
                          f"({err.strerror or err}); choose another with train.out_dir=DIR"
                          ) from None
    # held until the trainer lets go (dat.folder_lock): a second process is refused here,
    # before it can look for last.pt or write anything
    key = folder_lock.acquire(run_dir, RUN_IN_USE_FIX)
    try:
        if resume is None:
            _start_fresh(run_dir)
    except BaseException:  # refused: the folder is free again
        folder_lock.release(key)
        raise
    return run_dir


def _start_fresh(run_dir: Path) -> None:
    """A new run: refuse a folder that holds a resumable run; move the checkpoints of an
    attempt that stopped before its first last.pt (its best.pt) away, so none is ever
    tested or exported as this run's model."""
    folder = run_dir / "checkpoints"
    if any(folder.glob("last*.pt")):  # last.pt, or an older copy a resume falls back to
        raise ConfigError(f"{run_dir} already holds a run; resume it with --resume auto "
                          "(train.resume=auto) or choose another train.run_name")
    leftovers = sorted(p for p in folder.glob("*.pt") if p.is_file())
    if not leftovers:
        return
    aside = folder / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for path in leftovers:
        path.replace(aside / path.name)
    print(f"note: {folder} held {', '.join(p.name for p in leftovers)} from an earlier "
          f"attempt that saved no last.pt; moved to {aside} (this run starts from scratch)",
          file=sys.stderr)


def learning_rate(o: OptimConfig, epoch: int, step: int, steps_per_epoch: int,
                  total_epochs: int, global_batch: int) -> float:
    """Learning rate for batch ``step`` of 0-based ``epoch``.

    ``lr_scaling=linear`` multiplies ``optim.lr`` by global_batch / reference_batch_size.
    Warm-up is linear over ``warmup_epochs``. ``piecewise`` multiplies by ``gamma`` once
    for every milestone reached: milestone ``m`` decays after ``m`` whole epochs (0-based
    ``epoch >= m``, as the published DAT code and ``MultiStepLR`` count, so milestone 100
    trains epochs 0..99 at the initial lr); ``cosine`` anneals per step to 0.
    """
    lr = o.lr * (global_batch / o.reference_batch_size if o.lr_scaling == "linear" else 1.0)
    done = epoch * steps_per_epoch + step  # steps taken before this one
    warmup = o.warmup_epochs * steps_per_epoch
    if done < warmup:
        return lr * (done + 1) / warmup
    if o.schedule == "piecewise":
        return lr * o.gamma ** sum(epoch >= m for m in o.milestones)
    if o.schedule == "cosine":
        t = (done - warmup) / max(total_epochs * steps_per_epoch - warmup, 1)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return lr
