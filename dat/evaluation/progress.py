"""Resumable evaluations: each finished attack is saved to ``OUT/progress.json`` at once.

An AutoAttack run on a full test set takes hours; a crash, a Ctrl-C or a lost machine
must not cost the attacks that already finished. After each attack the per-example
correctness, accuracy, settings and bounds statistics are written atomically, under a
fingerprint of what was evaluated: a digest of the model (its module types and settings,
parameters and every buffer, non-persistent ones such as a Normalize's mean included), of
the examples and of which of them the model classifies correctly, and the settings that
change a number (seed, precision, device type, channels_last, BN folding, compile mode,
threat model).
``evaluate(..., resume=True)`` (``--resume``) reuses an attack only when the fingerprint
and the attack's own settings match; every attack re-seeds its random generator, so a
reused attack equals a rerun one. The batch size is recorded per attack but may change
on a resume (after running out of memory): it only regroups the random starts. Adding
attacks to a finished evaluation runs only the new ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .suite import BoundsStats, EvaluationError

__all__ = ["PROGRESS_FILE", "AttackCache", "finished_attacks", "fingerprint", "pack_mask",
           "unpack_mask"]

PROGRESS_FILE = "progress.json"
_FORMAT = 1
_WORDS = {"clean_predictions": "clean predictions (same weights: changed model code?)",
          "compile": "compile mode", "norm": "threat model (norm)"}


def _digest(named, h=None) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of tensors (any dtype or device;
    other values by their repr), without copying a CPU tensor's bytes."""
    h = h or hashlib.sha256()
    for name, value in named:
        if not torch.is_tensor(value):
            h.update(f"{name}|{value!r}|".encode())
            continue
        t = value.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.layout}|".encode())
        if t.is_meta:
            continue
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous().reshape(-1)
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def _model_digest(model: nn.Module) -> str:
    """Module types and settings (extra_repr), parameters and all buffers: what makes the
    logits, beyond ``state_dict`` (which leaves out non-persistent buffers)."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}|{type(module).__qualname__}|{module.extra_repr()}|".encode())
    return _digest([*model.named_parameters(), *model.named_buffers()], h)


def fingerprint(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor, **settings) -> dict:
    """What an evaluation's numbers depend on: the model, the examples, which of them the
    model classifies correctly (``clean``, (N,) bool: catches a changed forward), and
    ``settings``."""
    return {"format": _FORMAT, "model": _model_digest(model), "n": len(y),
            "examples": _digest([("x", x), ("y", y)]), "clean_predictions": pack_mask(clean),
            **settings}


def _plain(value):
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def pack_mask(mask: Tensor) -> str:
    """(N,) bool -> hex string, one bit per point (padded to a multiple of 8)."""
    return np.packbits(mask.cpu().numpy().astype(np.uint8)).tobytes().hex()


def unpack_mask(text: str, n: int) -> Tensor:
    """Inverse of :func:`pack_mask` for ``n`` points."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


def finished_attacks(folder: str | Path) -> list[str]:
    """Labels of the attacks saved in ``folder/progress.json`` ([] when none or unreadable)."""
    try:
        return list(json.loads((Path(folder) / PROGRESS_FILE).read_text())["attacks"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


class AttackCache:
    """The finished attacks of one evaluation, kept in ``folder/progress.json``.

    ``resume``: True loads the file and reuses its attacks; a file of another evaluation
    (other weights, examples or settings) is refused in one line rather than mixed in.
    ``"auto"``: reuse when the fingerprint matches, else start over (the trainer's final
    test, whose best checkpoint may have changed). False: start over; the file is replaced
    as attacks finish.
    """

    def __init__(self, folder: str | Path, fingerprint: dict, resume: bool | str) -> None:
        if resume not in (True, False, "auto"):
            raise EvaluationError(f"resume={resume!r}; use True, False or 'auto'")
        self.path = Path(folder) / PROGRESS_FILE
        self.fingerprint = _plain(fingerprint)
        self.entries: dict[str, dict] = {}
        self.reused: list[str] = []
        if resume and self.path.is_file():
            self.entries = self._load(strict=resume is True)
        self._write()  # now: the folder never holds another evaluation's progress

    def _load(self, strict: bool) -> dict[str, dict]:
        try:
            saved = json.loads(self.path.read_text())
            before, entries = saved["fingerprint"], saved["attacks"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            if not strict:
                return {}
            raise EvaluationError(f"{self.path} cannot be read ({type(err).__name__}); delete "
                                  "it or run without --resume (resume=False)") from None
        differ = sorted(k for k in set(before) | set(self.fingerprint)
                        if before.get(k) != self.fingerprint.get(k))
        if len(differ) > 1 and "clean_predictions" in differ:
            differ.remove("clean_predictions")  # implied by the other model, examples or
            # settings (bf16 or BN folding move logits); alone, it means changed model code
        differ = [_WORDS.get(k, k) for k in differ]
        if differ and not strict:
            return {}
        if differ:
            raise EvaluationError(
                f"{self.path} holds an evaluation with other {', '.join(differ)}; pass "
                "another --out (out_dir) for this one, or run without --resume "
                "(resume=False) to start over there")
        return entries

    def get(self, label: str, info: dict, n: int) -> dict | None:
        """The saved result of ``label`` if it ran with ``info``'s settings on ``n`` points:
        ``{"mask", "bounds", "info", "extra"}``; else None. ``info`` leaves out the batch
        size, which a resume may change."""
        entry = self.entries.get(label)
        if entry is None or entry["settings"] != _plain(info) or entry["n"] != n:
            return None
        bounds = BoundsStats(entry["bounds"]["eps"])
        for key, value in entry["bounds"].items():
            if value is not None:
                setattr(bounds, key, value)
        self.reused.append(label)
        return {"mask": unpack_mask(entry["mask"], n), "bounds": bounds, "info": entry["info"],
                "extra": entry.get("extra", {})}

    def put(self, label: str, info: dict, mask: Tensor, bounds: BoundsStats, report_info: dict,
            extra: dict | None = None) -> None:
        """Record a finished attack and rewrite the file atomically."""
        self.entries[label] = {"settings": _plain(info), "n": len(mask), "mask": pack_mask(mask),
                               "bounds": bounds.to_dict(), "info": _plain(report_info),
                               "extra": _plain(extra or {})}
        self._write()

    def _write(self) -> None:
        from ..checkpoint import atomic_write

        text = json.dumps({"fingerprint": self.fingerprint, "attacks": self.entries}, indent=1)
        atomic_write(self.path, lambda f: f.write(text.encode()))
