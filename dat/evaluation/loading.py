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
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import Config, config_from_dict
from ..models import convert_dual_bn, create, has_dual_bn, list_models
from ..models.registry import is_model_name
from ..models.timm_models import check_timm_name

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "load_entry_point",
           "load_state_file"]

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_STATE_KEYS = ("model_state_dict", "state_dict", "model", "net", "ema")  # common layouts
# averaged weights other codebases store beside the raw ones (timm, DeiT/ConvNeXt, SWA): never
# chosen over a raw key above, but named in the note, and loaded when they are the only ones
_AVERAGED_KEYS = ("model_ema", "state_dict_ema", "ema_state_dict", "ema_model", "swa_model",
                  "swa_state_dict")
_KNOWN_CLASSES = {"cifar10": 10, "cifar10-sample": 10, "cifar100": 100}


class CheckpointError(ValueError):
    """A checkpoint or weights file cannot be used; the message names the fix."""


@dataclass
class LoadedCheckpoint:
    model: nn.Module  # as trained: two BN branches when the checkpoint has them
    config: Config
    num_classes: int
    dual_bn: bool
    image_shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W) the model was trained on
    classes: list[str] | None = None  # class names in label order, when the run stored them
    stored_shape: bool = False  # image_shape came from the checkpoint, not the default


def _archive_kind(path: Path) -> str | None:
    """"torchscript" or "export" for archives torch.load(weights_only=True) cannot read."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
        return "torchscript"
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "export"
    return None


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does, whatever its suffix: 8 bytes of
    little-endian header length, then that many bytes of a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:9] == b"{"


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors header (``{}`` when unreadable)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a damaged header: the refusal still names --model
        return {}


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the path of a .pt/.safetensors file")
    if _is_safetensors(path):
        meta = _safetensors_metadata(path)
        if meta.get("model") and meta.get("num_classes"):  # written by python -m dat.export
            raise CheckpointError(
                f"{path} is a safetensors file (weights only) exported from {meta['model']} "
                f"with {meta['num_classes']} classes, not a dat checkpoint; evaluate it with "
                f"--model {meta['model']} --weights {path} --data <its dataset>")
        raise CheckpointError(
            f"{path} is a safetensors file (weights only), not a dat checkpoint; evaluate it "
            f"with --model module:function --weights {path}, or --model NAME for a dat.models "
            "architecture (the one it was exported from, e.g. resnet18)")
    kind = _archive_kind(path)
    if kind == "torchscript":
        raise CheckpointError(
            f"{path} is a TorchScript archive, not a state dict; save its weights with "
            f"torch.save(torch.jit.load('{path}').state_dict(), 'weights.pt') and pass those, "
            f"or let the --model function return torch.jit.load('{path}') (no --weights)")
    if kind == "export":
        raise CheckpointError(
            f"{path} is a torch.export archive, not a state dict; save "
            f"torch.export.load('{path}').state_dict with torch.save and pass that file")
    from ..checkpoint import unsafe_pickle, unsafe_pickle_message

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if unsafe_pickle(err):  # worded as the trainer does
            raise CheckpointError(unsafe_pickle_message(path)) from None
        first = "unreadable pickle data"
    except Exception as err:  # truncated zip, not a torch file at all
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable torch file ({first[:120]}): it is truncated, or was not "
            "written by torch.save; check the file or save the weights again") from None
    raise CheckpointError(
        f"cannot load {path} with torch.load(weights_only=True): {first[:200]}; save a plain "
        "dict of tensors (model.state_dict()) instead of a pickled object, or check the file")


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    if "n_averaged" in state and len(state) > 1 and all(
            k.startswith("module.") for k in state if k != "n_averaged"):
        # torch.optim.swa_utils.AveragedModel: the averaged net under module., plus a counter
        state = {k: v for k, v in state.items() if k != "n_averaged"}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(torch.is_tensor(v)
                                                           for v in value.values())


def load_state_file(path: str | Path, key: str | None = None) -> dict[str, Tensor]:
    """A state dict from a safetensors file (no pickle) or a torch file (weights_only).

    A torch file may hold the state dict itself or a dict with it under one of
    ``_STATE_KEYS`` (the first that holds name -> tensor entries is used; averaged weights
    such as ``model_ema`` only when no raw key holds any), or under ``key`` when given.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or _is_safetensors(path):  # also saved as .bin, .pt
        if key is not None:
            raise CheckpointError(f"{path} is a safetensors file (one state dict); drop the "
                                  "weights key")
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}); "
                                  "re-export it or pass a torch state dict file") from None
    state = _torch_load(path)
    if key is not None:
        if not isinstance(state, dict) or not _is_state_dict(state.get(key)):
            held = [k for k, v in state.items() if _is_state_dict(v)] if isinstance(
                state, dict) else []
            raise CheckpointError(f"{path} holds no state dict under {key!r}; state dicts "
                                  f"found under: {held or 'none'}")
        state = state[key]
    elif isinstance(state, dict) and not _is_state_dict(state):
        known = _STATE_KEYS + _AVERAGED_KEYS
        found = [k for k in known if _is_state_dict(state.get(k))]
        found += [k for k, v in state.items() if k not in known and _is_state_dict(v)]
        if len(found) > 1:  # e.g. raw and EMA weights side by side: say which one is used
            print(f"note: {path} holds weights under {', '.join(map(repr, found))}; using "
                  f"{found[0]!r} (--weights-key NAME evaluates another)", file=sys.stderr)
        if found and (found[0] in known or len(found) == 1):
            state = state[found[0]]
    if not _is_state_dict(state):
        keys = list(state)[:10] if isinstance(state, dict) else None
        what = f"top-level keys {keys}" if keys is not None else f"a {type(state).__name__}"
        raise CheckpointError(
            f"{path} holds no state dict (name -> tensor) and none under "
            f"{', '.join(map(repr, _STATE_KEYS))}: found {what}; save model.state_dict() "
            "on its own or under 'state_dict'")
    return _strip_prefixes(state)


def _common_prefix_match(own: dict[str, Tensor], state: dict[str, Tensor]) -> str | None:
    """How ``state`` lines up with ``own`` when one of them has an extra leading submodule
    name: "+P" when the model wraps the saved net as submodule P (e.g. nn.Sequential(
    Normalize, net) gives "1."), "-P" when the saved keys carry a wrapper's P (Lightning's
    "model."); None when no single prefix makes the key sets equal."""
    def prefix(keys) -> str | None:
        heads = {k.split(".", 1)[0] for k in keys if "." in k}
        return f"{heads.pop()}." if len(heads) == 1 and all("." in k for k in keys) else None

    def core(keys) -> set[str]:  # a missing BatchNorm counter is filled in later
        return {k for k in keys if not k.endswith(".num_batches_tracked")}

    wrap = prefix(set(own) - set(state))
    if wrap and core(wrap + k for k in state) == core(own):
        return "+" + wrap
    saved = prefix(state)
    if saved and core(k[len(saved):] for k in state) == core(own):
        return "-" + saved
    return None


def _load_strict(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    own = model.state_dict()
    shift = None if set(own) == set(state) else _common_prefix_match(own, state)
    if shift is not None:
        sign, prefix = shift[0], shift[1:]
        state = ({prefix + k: v for k, v in state.items()} if sign == "+"
                 else {k[len(prefix):]: v for k, v in state.items()})
        how = f"the prefix {prefix!r} added" if sign == "+" else f"{prefix!r} removed"
        print(f"note: {what}: the weights' keys match the model's with {how}; loaded that "
              "way", file=sys.stderr)
    # checkpoints from torch < 0.4.1 have no BatchNorm counter; torch's strict load accepts
    # that too (the counter does not change an eval-mode forward)
    state = {**{k: own[k] for k in own if k.endswith(".num_batches_tracked")
                and k not in state}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if (shapes and not missing and not unexpected and len({k.rpartition(".")[0] for k in shapes})
            == 1 and all(own[k].shape[1:] == state[k].shape[1:] for k in shapes)):
        # one layer's outputs alone (the classifier's weight and bias): the class count
        k = shapes[0]
        raise CheckpointError(
            f"{what}: the weights have {state[k].shape[0]} outputs at {k!r}, the model "
            f"{own[k].shape[0]}: they were trained for {state[k].shape[0]} classes; evaluate "
            f"them on a dataset with that many (--data, or num_classes=)")
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{what}: {len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected "
            f"{unexpected[:2]}, {len(shapes)} shape mismatches {shapes[:2]}; check the model "
            "name and number of classes the weights were trained with")
    model.load_state_dict(state, strict=True)


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
    ckpt = _torch_load(Path(path))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not \
            isinstance(ckpt.get("config"), dict):
        raise CheckpointError(
            f"{path} is not a dat checkpoint (a dict with 'model' and 'config'); for other "
            "weights use --model module:function --weights FILE, or --model NAME --weights "
            "FILE for a dat.models architecture (resnet18, timm/<name>)")
    state = _strip_prefixes(ckpt["model"])
    cfg = config_from_dict(ckpt["config"])
    # <bn>.main.* next to <bn>.aux.*: a submodule may be named "main" itself (timm's
    # efficientvit_b0), so ".main." alone does not mean two BN branches
    dual = _has_branch_keys(state)
    num_classes = _num_classes(ckpt, cfg)
    model = create(cfg.model.name, num_classes=num_classes, dual_bn=dual)
    _load_strict(model, state, f"{path} vs {cfg.model.name} ({num_classes} classes)")
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
    state = None if weights is None else _strip_prefixes(load_state_file(weights, weights_key))
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
        if _needs_two_branches(model, state):
            convert_dual_bn(model)
            print(f"note: {weights} holds DAT's two BatchNorm branches; the model from {spec} "
                  "got them too (convert_dual_bn) and is evaluated on the main branch",
                  file=sys.stderr)
        _load_strict(model, state, f"{weights} vs {spec}")
    return model.to(device).eval()


_BRANCH_KEY = re.compile(r"^(.*)\.main\.([^.]+)$")


def _has_branch_keys(state: dict[str, Tensor]) -> bool:
    """Whether ``state`` holds DualBatchNorm keys: ``<bn>.main.<name>`` next to
    ``<bn>.aux.<name>`` (a key with ``.main.`` alone is a submodule named ``main``)."""
    return any((m := _BRANCH_KEY.match(k)) and f"{m[1]}.aux.{m[2]}" in state for k in state)


def _needs_two_branches(model: nn.Module, state: dict[str, Tensor]) -> bool:
    """True when ``state`` is a split-BN (DAT) state dict of this single-BN model: every
    key matches once ``.main.`` / ``.aux.`` are read as one BatchNorm."""
    if has_dual_bn(model) or not _has_branch_keys(state):
        return False
    own = set(model.state_dict())  # DualBatchNorm keys: <bn>.main.<name>, <bn>.aux.<name>
    single = {re.sub(r"\.main\.([^.]+)$", r".\1", k) for k in state
              if not re.search(r"\.aux\.[^.]+$", k)}
    return single == own
