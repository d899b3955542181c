"""Weights files from anywhere: what a file is, the state dict inside it, and a strict
load that explains itself.

Reads torch pickles (``weights_only``), safetensors under any suffix, and the layouts other
codebases use (DDP / compile prefixes, ``state_dict`` / ``model`` / ``ema`` keys, averaged
weights, a one-prefix shift such as a normalisation wrapper, DAT's two BN branches), and
refuses TorchScript and torch.export archives with the fix.
"""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import has_dual_bn

__all__ = ["CheckpointError", "has_branch_keys", "load_state_file", "load_strict",
           "needs_two_branches", "read_torch_file", "strip_prefixes"]


_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_STATE_KEYS = ("model_state_dict", "state_dict", "model", "net", "ema")  # common layouts
# averaged weights other codebases store beside the raw ones (timm, DeiT/ConvNeXt, SWA): never
# chosen over a raw key above, but named in the note, and loaded when they are the only ones
_AVERAGED_KEYS = ("model_ema", "state_dict_ema", "ema_state_dict", "ema_model", "swa_model",
                  "swa_state_dict")


class CheckpointError(ValueError):
    """A checkpoint or weights file cannot be used; the message names the fix."""


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


def read_torch_file(path: Path) -> object:
    """``torch.load(path, weights_only=True)``; a safetensors, TorchScript or torch.export
    file, or one that is not a readable torch file, is refused with the fix."""
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


def strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the DDP / torch.compile prefix every key shares, and without an
    AveragedModel's counter."""
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
    state = read_torch_file(path)
    if key is not None:
        if not isinstance(state, dict) or not _is_state_dict(state.get(key)):
            if _is_state_dict(state):
                raise CheckpointError(f"{path} is itself a state dict, with no {key!r} key; "
                                      "drop the weights key (--weights-key)")
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
    return strip_prefixes(state)


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


def load_strict(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """A strict ``load_state_dict`` that explains a mismatch (``what`` names the pair) and
    takes keys shifted by one wrapper prefix or missing BatchNorm counters."""
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


_BRANCH_KEY = re.compile(r"^(.*)\.main\.([^.]+)$")


def has_branch_keys(state: dict[str, Tensor]) -> bool:
    """Whether ``state`` holds DualBatchNorm keys: ``<bn>.main.<name>`` next to
    ``<bn>.aux.<name>`` (a key with ``.main.`` alone is a submodule named ``main``)."""
    return any((m := _BRANCH_KEY.match(k)) and f"{m[1]}.aux.{m[2]}" in state for k in state)


def needs_two_branches(model: nn.Module, state: dict[str, Tensor]) -> bool:
    """True when ``state`` is a split-BN (DAT) state dict of this single-BN model: every
    key matches once ``.main.`` / ``.aux.`` are read as one BatchNorm."""
    if has_dual_bn(model) or not has_branch_keys(state):
        return False
    own = set(model.state_dict())  # DualBatchNorm keys: <bn>.main.<name>, <bn>.aux.<name>
    single = {re.sub(r"\.main\.([^.]+)$", r".\1", k) for k in state
              if not re.search(r"\.aux\.[^.]+$", k)}
    return single == own
