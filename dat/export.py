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
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from .models import create, export_main_branch, has_dual_bn

__all__ = ["FORMATS", "export_model", "export_state_dict", "load_exported", "main"]

FORMATS = ("robustbench", "safetensors")


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain (main-branch, single-BN) state dict as contiguous CPU tensors."""
    plain = export_main_branch(model) if has_dual_bn(model) else model
    return {k: v.detach().cpu().clone().contiguous() for k, v in plain.state_dict().items()}


def export_model(model: nn.Module, path: str | Path, format: str = "safetensors",
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s plain state dict to ``path`` in ``format``; return the path."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = export_state_dict(model)
    if format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    else:
        torch.save(state, path)
    return path


def load_exported(path: str | Path, name: str, num_classes: int) -> nn.Module:
    """Build ``create(name, num_classes)`` and load an exported file into it (strict, eval)."""
    from .evaluation.loading import load_state_file

    model = create(name, num_classes=num_classes)
    model.load_state_dict(load_state_file(path), strict=True)
    return model.eval()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dat.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a dat checkpoint (best.pt / last.pt)")
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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints one line per step, returns the exit status."""
    from .evaluation.loading import load_checkpoint

    args = _parse(argv)
    try:
        loaded = load_checkpoint(args.checkpoint)
        meta = {"model": loaded.config.model.name, "num_classes": loaded.num_classes,
                "input": "RGB in [0, 1], normalisation inside the model",
                "bn_branch": "main" if loaded.dual_bn else "single"}
        out = export_model(loaded.model, args.out, args.format, metadata=meta)
        print(f"exported {meta['model']} ({loaded.num_classes} classes, {meta['bn_branch']} BN) "
              f"-> {out} [{args.format}]")
        if not args.no_verify:
            diff = _verify(loaded, out)
            print(f"verified: reloaded with strict=True, max |logit diff| = {diff:.2e}")
            if diff > 1e-5:
                print("error: exported logits differ from the checkpoint's", file=sys.stderr)
                return 1
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
