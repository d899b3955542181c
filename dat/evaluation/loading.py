"""Load models to evaluate: our checkpoints, a ``dat.models`` name with a weights file, or
any ``module:function`` returning a model.

Checkpoint format (written by the trainer): a plain dict loadable with
``torch.load(weights_only=True)`` holding at least ``"model"`` (the state dict, with
``...bn.main.*`` / ``...bn.aux.*`` keys for dual-BN models) and ``"config"``
(``dat.config.config_to_dict(cfg)``). Other keys are ignored.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import Config, config_from_dict
from ..models import convert_dual_bn, create, list_models
from ..models.registry import is_model_name
from ..models.timm_models import check_timm_name
from .weights import (
    CheckpointError,
    has_branch_keys,
    load_state_file,
    load_strict,
    needs_two_branches,
    read_torch_file,
    strip_prefixes,
)

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "load_entry_point",
           "load_state_file"]

_KNOWN_CLASSES = {"cifar10": 10, "cifar10-sample": 10, "cifar100": 100}


@dataclass
class LoadedCheckpoint:
    model: nn.Module  # as trained: two BN branches when the checkpoint has them
    config: Config
    num_classes: int
    dual_bn: bool
    image_shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W) the model was trained on
    classes: list[str] | None = None  # class names in label order, when the run stored them
    stored_shape: bool = False  # image_shape came from the checkpoint, not the default


def _num_classes(ckpt: dict, cfg: Config) -> int:
    if isinstance(ckpt.get("num_classes"), int):
        return ckpt["num_classes"]
    if isinstance(ckpt.get("classes"), (list, tuple)):
        return len(ckpt["classes"])
    if cfg.data.name in _KNOWN_CLASSES:
        return _KNOWN_CLASSES[cfg.data.name]
    from ..data import load_dataset

    return load_dataset(cfg.data).num_classes


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Rebuild the trained model from a checkpoint (eval mode, on ``device``)."""
    ckpt = read_torch_file(Path(path))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not \
            isinstance(ckpt.get("config"), dict):
        raise CheckpointError(
            f"{path} is not a dat checkpoint (a dict with 'model' and 'config'); for other "
            "weights use --model module:function --weights FILE, or --model NAME --weights "
            "FILE for a dat.models architecture (resnet18, timm/<name>)")
    state = strip_prefixes(ckpt["model"])
    cfg = config_from_dict(ckpt["config"])
    # <bn>.main.* next to <bn>.aux.*: a submodule may be named "main" itself (timm's
    # efficientvit_b0), so ".main." alone does not mean two BN branches
    dual = has_branch_keys(state)
    num_classes = _num_classes(ckpt, cfg)
    model = create(cfg.model.name, num_classes=num_classes, dual_bn=dual)
    load_strict(model, state, f"{path} vs {cfg.model.name} ({num_classes} classes)")
    shape = tuple(ckpt.get("image_shape") or (3, 32, 32))
    classes = ckpt.get("classes")
    classes = [str(c) for c in classes] if isinstance(classes, (list, tuple)) else None
    return LoadedCheckpoint(model.to(device).eval(), cfg, num_classes, dual, shape, classes,
                            stored_shape=bool(ckpt.get("image_shape")))


def checkpoint_file(path: str | Path) -> Path:
    """``path``, or for a run folder its ``checkpoints/best.pt`` (else ``last.pt``), the
    weights the run's own final test used."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("best.pt", "last.pt"):
        for folder in (path / "checkpoints", path):  # the run folder, or its checkpoints/
            if (folder / name).is_file():
                return folder / name
    raise CheckpointError(f"{path} is a folder without checkpoints/best.pt or last.pt; pass "
                          "a checkpoint file (a run folder's checkpoints/best.pt)")


def _import(spec: str):
    from ..entry_points import load_function

    try:
        return load_function(spec, "--model")
    except ValueError as err:  # the user's own error stays chained, for Python callers
        raise CheckpointError(str(err)) from err.__cause__


def _check_no_arguments(func, spec: str, num_classes_known: bool = False) -> None:
    """Refuse an entry point that cannot be called without arguments (before calling it);
    a ``num_classes`` parameter is fine when the class count will be passed."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: just call it
        return
    needed = [p.name for p in params if p.default is p.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
              and not (p.name == "num_classes" and num_classes_known)]
    if needed:
        raise CheckpointError(
            f"--model {spec}: the function must take no arguments (num_classes aside), but it "
            f"needs {', '.join(needed)}; put a zero-argument wrapper in a file, e.g. net.py "
            f"with 'def net(): return {spec.rpartition(':')[2]}(...)', and pass --model "
            "net.py:net")


def load_entry_point(spec: str, weights: str | Path | None = None,
                     device: torch.device | str = "cpu",
                     num_classes: int | None = None,
                     weights_key: str | None = None,
                     mean: tuple[float, ...] | None = None,
                     std: tuple[float, ...] | None = None) -> nn.Module:
    """A model on [0, 1] images from a ``dat.models`` name and its weights, or from
    ``module:function`` returning an ``nn.Module`` (weights optional); eval mode.

    ``spec`` is resolved as ``dat.models.create`` resolves ``model.name``: ``timm/<name>``,
    then a registered name (``dat.models.list_models()``), then ``module:function``.
    A name is built with ``num_classes`` (default 10, as ``create``) and, when given, the
    ``mean`` / ``std`` its weights expect (default CIFAR-10's, as dat trains); a name needs
    ``weights``. A function taking ``num_classes`` gets it when it is given (the evaluation
    passes the data's class count), as ``model.name=file.py:function`` does in training.
    ``weights_key`` picks the state dict inside the weights file (e.g. ``model_ema``).
    """
    func, state = prepare_entry_point(spec, weights, num_classes_known=num_classes is not None,
                                      weights_key=weights_key, mean=mean, std=std)
    return build_entry_point(spec, func, state, device, num_classes, weights)


def prepare_entry_point(spec: str, weights: str | Path | None = None,
                        num_classes_known: bool = True, weights_key: str | None = None,
                        mean: tuple[float, ...] | None = None,
                        std: tuple[float, ...] | None = None):
    """The builder (for a ``dat.models`` name, ``create`` waiting for the class count) and
    the weights file's state dict (or None), read and checked before any data loads, so a
    bad ``--model`` or ``--weights`` fails at once."""
    from ..entry_points import is_spec

    if is_model_name(spec):  # as create reads it: a name before module:function
        func = _registry_builder(spec, weights, mean, std)
    elif not is_spec(spec):
        raise _unknown_model(spec)
    elif mean is not None or std is not None:
        raise CheckpointError(f"--model {spec}: --normalize (mean, std) is for dat.models names; "
                              "a builder's model normalises inside itself, so drop it")
    else:
        func = _import(spec)
        if not isinstance(func, nn.Module):  # a model instance is used as it is
            _check_no_arguments(func, spec, num_classes_known)
    state = None if weights is None else strip_prefixes(load_state_file(weights, weights_key))
    return func, state


def _registry_builder(name: str, weights: str | Path | None, mean: tuple[float, ...] | None,
                      std: tuple[float, ...] | None) -> functools.partial:
    """``create(name, ...)`` waiting for ``num_classes``; refusals before any data loads."""
    if name.startswith("timm/"):
        try:
            check_timm_name(name.removeprefix("timm/"))
        except ValueError as err:
            raise CheckpointError(f"--model {name}: {err}") from None
    if weights is None:  # a registry model starts from random weights
        raise CheckpointError(f"--model {name} is a dat.models name, whose weights start "
                              "random; pass --weights FILE, a state dict of that architecture "
                              "(python -m dat.export writes one)")
    if (mean is None) != (std is None):
        raise CheckpointError(f"mean={mean}, std={std}: give both, or neither (CIFAR-10's)")
    if mean is not None and not (len(mean) == len(std) == 3 and all(0 <= m <= 1 for m in mean)
                                 and all(0 < s <= 1 for s in std)):  # also NaN
        raise CheckpointError(f"mean={mean}, std={std}: three values each (RGB) on the [0, 1] "
                              "scale with std > 0 (divide 0-255 values by 255)")
    return functools.partial(create, name, mean=mean, std=std)  # None: the model's own


def _unknown_model(spec: str) -> CheckpointError:
    """A ``--model`` that is neither a ``dat.models`` name nor ``module:function``: where
    the names are listed, and the likely one."""
    import difflib

    import timm

    close = difflib.get_close_matches(spec, list_models(), n=1)
    if spec.endswith(".py"):
        hint = f"name the function in the file too, e.g. {spec}:build; "
    elif timm.is_model(spec):  # e.g. resnet50: timm has it, dat.models has not
        hint = f"did you mean timm/{spec}? "
    else:
        hint = f"did you mean {close[0]}? " if close else ""
    return CheckpointError(
        f"--model {spec!r} is neither a dat.models name ({', '.join(list_models())}, "
        f"timm/<timm name>) nor a builder module:function / path/file.py:function; {hint}"
        "python -c 'import dat; print(dat.models.list_models())' lists the names "
        "(timm.list_models() the timm ones)")


def build_entry_point(spec: str, func, state: dict[str, Tensor] | None,
                      device: torch.device | str, num_classes: int | None,
                      weights: str | Path | None = None) -> nn.Module:
    """Call the builder (with ``num_classes`` when it takes it), load ``state`` strictly."""
    from ..entry_points import accepts, call_builder, check_built

    if isinstance(func, nn.Module):  # module:attribute naming a model, not a builder
        model = func
    else:
        given = num_classes is not None and accepts(func, "num_classes")
        try:
            model = call_builder(func, spec, "--model",
                                 **({"num_classes": num_classes} if given else {}))
        except ValueError as err:
            raise CheckpointError(str(err)) from err.__cause__
    try:
        check_built(model, f"--model {spec} is" if isinstance(func, nn.Module)
                    else f"--model {spec} returned")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if state is not None:
        if needs_two_branches(model, state):
            convert_dual_bn(model)
            print(f"note: {weights} holds DAT's two BatchNorm branches; the model from {spec} "
                  "got them too (convert_dual_bn) and is evaluated on the main branch",
                  file=sys.stderr)
        load_strict(model, state, f"{weights} vs {spec}")
    return model.to(device).eval()
