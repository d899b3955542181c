"""Export a trained model as a plain single-BN network: safetensors or a RobustBench-style file.

The exported weights are the main BN branch only (the one evaluation uses) and load
with ``strict=True`` into ``dat.models.create(name, num_classes)``, whose forward takes
[0, 1] images and normalises inside. ``safetensors`` loads without pickle;
``robustbench`` is a torch state-dict file of the plain model (``weights_only=True``
loads it), the form RobustBench model zoo entries ship. ``robustbench`` itself is never
imported (torchattacks installs a clashing module of that name).

    python -m dat.export --checkpoint best.pt --format safetensors --out model.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from .models import create, export_main_branch, has_dual_bn

__all__ = ["FORMATS", "check_suffix", "export_model", "export_state_dict", "load_exported", "main"]

FORMATS = ("robustbench", "safetensors")
_SUFFIXES = {"robustbench": (".pt", ".pth"), "safetensors": (".safetensors",)}


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain (main-branch, single-BN) state dict as contiguous CPU tensors."""
    plain = export_main_branch(model) if has_dual_bn(model) else model
    return {k: v.detach().cpu().clone().contiguous() for k, v in plain.state_dict().items()}


def check_suffix(path: str | Path, format: str) -> None:
    """Refuse an output name whose extension does not match ``format`` (one-line ValueError)."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; use one of {', '.join(FORMATS)}")
    if path.suffix not in _SUFFIXES[format]:
        other = [f for f in FORMATS if path.suffix in _SUFFIXES[f]]
        fix = f" or pass --format {other[0]}" if other else ""
        raise ValueError(f"--out {path} does not fit --format {format}: name it "
                         f"{path.with_suffix(_SUFFIXES[format][0]).name}{fix}")


def export_model(model: nn.Module, path: str | Path, format: str = "safetensors",
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s plain state dict to ``path`` in ``format``; return the path.

    The file is written under a temporary name and renamed, so a failed write leaves
    nothing at ``path``; its mode follows the umask (0644 under 022), like other run files.
    """
    from .checkpoint import atomic_write

    check_suffix(path, format)
    state = export_state_dict(model)

    def write(f) -> None:  # through open(), so the umask applies (save_file writes 0600)
        if format == "safetensors":
            from safetensors.torch import save

            f.write(save(state, metadata={k: str(v) for k, v in (metadata or {}).items()}))
        else:
            torch.save(state, f)

    return atomic_write(path, write)


def load_exported(path: str | Path, name: str, num_classes: int) -> nn.Module:
    """Build ``create(name, num_classes)`` and load an exported file into it (strict, eval)."""
    from .evaluation.loading import load_state_file

    model = create(name, num_classes=num_classes)
    model.load_state_dict(load_state_file(path), strict=True)
    return model.eval()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dat.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a dat checkpoint (best.pt / last.pt), "
                   "or a run folder (its best.pt, else last.pt)")
    p.add_argument("--format", choices=FORMATS, default="safetensors")
    p.add_argument("--out", required=True, help="output file (.safetensors or .pt)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading the file and comparing logits with the checkpoint")
    return p.parse_args(argv)


def _verify(loaded, path: Path) -> float:
    """Max |logit difference| between the checkpoint's main branch and the exported file."""
    x = torch.rand((4, *loaded.image_shape), generator=torch.Generator().manual_seed(0))
    plain = load_exported(path, loaded.config.model.name, loaded.num_classes)
    with torch.no_grad():
        reference = export_main_branch(loaded.model) if loaded.dual_bn else loaded.model
        return float((reference.eval()(x) - plain(x)).abs().max())


def _unwritable(out: Path, err: OSError) -> OSError:
    return OSError(f"cannot write {out} ({err.strerror or err}); pass a writable path with "
                   "--out")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints one line per step, returns the exit status."""
    from .evaluation.loading import checkpoint_file, load_checkpoint

    args = _parse(argv)
    out = Path(args.out)
    staged = out.with_name(f".{out.stem}.export{out.suffix}")  # renamed to --out once verified
    try:
        check_suffix(out, args.format)  # before the (slow) checkpoint load
        loaded = load_checkpoint(checkpoint_file(args.checkpoint))  # a run folder: best.pt
        meta = {"model": loaded.config.model.name, "num_classes": loaded.num_classes,
                "input": "RGB in [0, 1], normalisation inside the model",
                "bn_branch": "main" if loaded.dual_bn else "single"}
        try:
            export_model(loaded.model, staged, args.format, metadata=meta)
        except OSError as err:
            raise _unwritable(out, err) from None
        diff = None if args.no_verify else _verify(loaded, staged)
        if diff is not None and diff > 1e-5:
            print(f"error: exported logits differ from the checkpoint's (max {diff:.2e}); "
                  f"nothing written to {out}", file=sys.stderr)
            return 1
        try:
            os.replace(staged, out)
        except OSError as err:
            raise _unwritable(out, err) from None
        print(f"exported {meta['model']} ({loaded.num_classes} classes, {meta['bn_branch']} BN) "
              f"-> {out} [{args.format}]")
        if diff is not None:
            print(f"verified: reloaded with strict=True, max |logit diff| = {diff:.2e}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(OSError):  # e.g. --out under a file: nothing was staged
            staged.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
