"""``python evaluate.py`` / ``dat-evaluate``: evaluate a checkpoint, a model name or entry point.

    python evaluate.py --checkpoint RUN/checkpoints/best.pt --attacks clean,pgd20,cw,aa
    python evaluate.py --model resnet18 --weights net.pt --data cifar10
    python evaluate.py --model timm/resnet18 --weights net.pt --data cifar100 --normalize imagenet
    python evaluate.py --model mypkg.models:robust_net --weights net.safetensors --data cifar10

``--model`` takes a ``dat.models`` name (``dat.models.list_models()``, or ``timm/<name>``),
built for the data's class count, or a builder ``module:function`` / ``file.py:function``;
a name is resolved before a builder, as train.py's ``model.name`` is.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from ..attacks import DEFAULT_EPS
from ..config import DataConfig
from ..folder_lock import LOCK_NAME, hold_folder
from ..messages import one_line, one_line_warnings
from ..models.normalize import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from .loading import (
    build_entry_point,
    checkpoint_file,
    load_checkpoint,
    prepare_entry_point,
)
from .prepare import COMPILE_MODES
from .progress import PROGRESS_FILE, finished_attacks

__all__ = ["build_parser", "evaluate_main", "parse_eps", "parse_l2_eps"]

PAPER_ATTACKS = "clean,fgsm,pgd20,pgd100,cw,aa"  # the paper's evaluation (Section 6)
# --normalize presets: (mean, std) per RGB channel on the [0, 1] scale
_NORMALIZATIONS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD),
                   "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                   "none": ((0.0,) * 3, (1.0,) * 3)}  # weights trained on raw [0, 1] images


def parse_eps(text: str) -> float:
    """``"8/255"`` or ``"0.0314"`` -> float on the [0, 1] scale.

    A bare integer other than 0 is refused (``1`` almost always means 1/255), as is any
    bare number > 1; decimals up to ``1.0`` are read on the [0, 1] scale.
    """
    text = text.strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            if float(den) == 0:
                raise argparse.ArgumentTypeError(f"eps {text} divides by zero; write e.g. 8/255")
            value = float(num) / float(den)
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read eps {text!r}; write e.g. 8/255") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"eps {text} must be a finite number >= 0; "
                                         "write e.g. 8/255")
    if "/" not in text and value > 1:
        raise argparse.ArgumentTypeError(f"eps {text} is in 0-255 units; write {text}/255")
    if "/" not in text and value == 1 and "." not in text and "e" not in text.lower():
        raise argparse.ArgumentTypeError(
            f"eps {text} is ambiguous; write 1/255 (or 255/255 if the whole [0, 1] range "
            "is really meant)")
    return value


def parse_l2_eps(text: str) -> float:
    """``"0.5"`` -> 0.5: an L2 radius on the [0, 1] pixel scale, written as a decimal.

    A fraction such as ``8/255`` is refused: it is an L-inf habit, and as an L2 length it
    would be some 16 times smaller than the standard CIFAR radius (0.5).
    """
    text = text.strip()
    if "/" in text:
        try:
            said = f"{text} = {parse_eps(text):.4g}; "
        except argparse.ArgumentTypeError:
            said = ""
        raise argparse.ArgumentTypeError(
            f"eps {text} under --norm l2: write the L2 radius as a decimal ({said}the CIFAR "
            "standard is 0.5); x/255 fractions are refused as the L-inf habit")
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read eps {text!r}; write e.g. 0.5") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"eps {text} must be a finite L2 radius >= 0; "
                                         "write e.g. 0.5")
    return value


def _l2_radii(text: str) -> list[float]:
    """An L2 sweep list, plain decimals: ``"0,0.25,0.5,1"``."""
    try:
        values = [float(v) for v in text.strip().strip("[]").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sweep {text!r}: under --norm l2 give L2 radii as decimals, e.g. "
            "0,0.25,0.5,1") from None
    for v in values:
        if not 0 <= v < float("inf"):  # also NaN
            raise argparse.ArgumentTypeError(f"--sweep radius {v:g} must be a finite L2 "
                                             "radius >= 0 (e.g. 0,0.25,0.5,1)")
    return values


def _at_least_one(hint: str = ""):
    """argparse type: an int >= 1; ``hint`` is added to the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}{hint}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _radii(text: str) -> list[float]:
    """A sweep list in 1/255 units: ``"0,1,2,4,8,16"`` (``"[0,1,2]"`` too, as the
    README's synopsis writes the optional value)."""
    try:
        values = [float(v) for v in text.strip().strip("[]").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sweep {text!r}: give radii in 1/255 units, e.g. 0,1,2,4,8,16") from None
    for v in values:
        if not 0 <= v <= 255:  # also NaN
            raise argparse.ArgumentTypeError(
                f"--sweep radius {v:g} is outside 0..255 (1/255 units, e.g. 0,1,2,4,8,16)")
        if 0 < v < 1:  # below one grey level: a [0, 1]-scale radius such as 0.031
            raise argparse.ArgumentTypeError(
                f"--sweep radius {v:g} is below 1/255: radii are in 1/255 units, so write "
                f"{v * 255:.3g} for {v:g} on the [0, 1] scale")
    return [v / 255 for v in values]


def _normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """--normalize: a preset (cifar10, imagenet, none) or ``MEAN/STD``, parsed; the values
    are checked where the model is built (:func:`~dat.evaluation.loading.load_entry_point`
    checks them for Python callers too)."""
    if text in _NORMALIZATIONS:
        return _NORMALIZATIONS[text]
    mean, sep, std = text.partition("/")
    try:
        m, s = (tuple(float(v) for v in part.split(",")) for part in (mean, std))
    except ValueError:
        m = s = ()
    if not sep or not m or not s:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use cifar10, imagenet, none, or MEAN/STD with three values each on the "
            "[0, 1] scale, e.g. 0.5,0.5,0.5/0.25,0.25,0.25")
    return m, s


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate.py", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a dat checkpoint (dict with 'model' and 'config'), "
                     "or a run folder (or its checkpoints/): its best.pt, else last.pt")
    src.add_argument("--model", help="a dat.models name (resnet18, wrn34_10, ...: "
                     "dat.models.list_models(); or timm/<timm name>) built for the data's "
                     "classes, or module:function / file.py:function returning an nn.Module "
                     "on [0, 1] images; a name is tried first, as in train.py's model.name")
    p.add_argument("--weights", help="with --model: a .safetensors or torch state dict file "
                   "(needed with a name)")
    p.add_argument("--weights-key", help="with --weights: the top-level key of the state dict "
                   "to load (e.g. ema, model_ema, state_dict_ema, swa_model); default: the "
                   "first of model_state_dict, state_dict, model, net, ema, then averaged keys")
    p.add_argument("--normalize", type=_normalization, metavar="cifar10|imagenet|none|MEAN/STD",
                   help="with --model NAME: the input normalisation the weights were trained "
                        "with, inside the model (default: the model's own, CIFAR-10's mean "
                        "and std, as dat trains); none for weights trained on raw [0, 1] "
                        "images; MEAN/STD as 0.5,0.5,0.5/0.25,0.25,0.25")
    p.add_argument("--attacks", default=PAPER_ATTACKS,
                   help=f"comma list of clean,fgsm,pgd20,pgd100,pgd<N>,cw,aa ({PAPER_ATTACKS})")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf", type=str.lower,
                   help="threat model (default linf); l2: fgsm is the fast gradient method, "
                        "pgd<N> and cw take eps/4 steps, aa is AutoAttack's L2 version")
    p.add_argument("--eps",
                   help="radius. L-inf: a fraction such as 8/255 or a decimal on the [0, 1] "
                        "scale such as 0.0314 (default 8/255); bare integers other than 0 are "
                        "refused as ambiguous (write 1/255, or 255/255 for the whole range). "
                        "L2: a decimal on the [0, 1] pixel scale (default 0.5)")
    p.add_argument("--n-examples", type=_at_least_one("; leave it out to use the whole split"),
                   help="N examples, stratified by class as data.test_subset (default: all)")
    p.add_argument("--data", help="dataset name (default: the checkpoint's, else cifar10)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test: the test/ folder (or val/ when a tree has no test/); val: the "
                        "data.val_size images held out of train/ that training selected "
                        "best.pt on (not a val/ folder)")
    p.add_argument("--out", help="report folder (default: eval_<name> next to the checkpoint; "
                   "with --model, eval_<model>-<weights name> in the working folder; "
                   "_l2 added under --norm l2)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="feed the model channels_last images (auto: on for CPU and CUDA, "
                        "except models whose channels_last CPU backward crashes torch)")
    p.add_argument("--fold-bn", choices=("auto", "on", "off"), default="auto",
                   help="attack a copy with eval-mode BatchNorm folded into the convolutions "
                        "(auto: on for CPU and CUDA)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="run the attacked forward under torch.compile (off by default: "
                        "compiling pays only on long evaluations; README, Evaluation)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", nargs="?", const="default",
                   help="PGD-20 eps sweep, radii in 1/255 units (default 0,1,2,4,8,16); "
                        "under --norm l2 plain decimals (default 0,0.125,0.25,0.5,1,2)")
    p.add_argument("--diagnostics", nargs="?", const="pgd20", metavar="ATTACK",
                   help="amplitude/phase table for ATTACK (default pgd20)")
    p.add_argument("--heatmap", action="store_true", help="Fourier heat map (Yin et al. 2019)")
    p.add_argument("--heatmap-examples", type=_at_least_one(), default=256,
                   help="images for the heat map (256)")
    p.add_argument("--heatmap-norm", type=float, default=4.0, help="L2 norm per channel")
    p.add_argument("--resume", action="store_true",
                   help="reuse the attacks that finished in OUT/progress.json (same weights, "
                        "examples and settings) and run only the rest")
    p.add_argument("--no-checks", action="store_true", help="skip the integrity checks")
    p.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    p.add_argument("--ignore-class-names", action="store_true",
                   help="evaluate a checkpoint on class folders named otherwise than the ones "
                        "it was trained on (only renamed: labels follow the sorted order)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    p.add_argument("--no-progress", action="store_true")
    return p


def _device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unknown name or absent CUDA -> ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but CUDA is not available; use --device cpu (or auto)")
    return torch.device(name)


def _out_dir(args: argparse.Namespace) -> Path:
    """--out, or ``eval_<name>`` next to the checkpoint / in the working folder."""
    if args.out:
        return Path(args.out)
    # one folder per threat model: an L2 evaluation would overwrite the L-inf report
    norm = "_l2" if args.norm == "l2" else ""
    if args.checkpoint:
        return Path(args.checkpoint).parent / f"eval_{Path(args.checkpoint).stem}{norm}"
    from ..entry_points import is_spec

    name = args.model.rpartition(":")[2] if is_spec(args.model) else args.model
    if args.weights:  # one folder per weights file: a second file would overwrite the first
        name = f"{name}-{Path(args.weights).stem}"
    return Path("eval_" + re.sub(r"[^\w.-]", "_", name) + norm)  # timm/x -> eval_timm_x


def _check_writable(out: Path) -> bool:
    """Create ``out`` and probe-write a file there, so a bad --out fails before any attack;
    True when ``out`` was created here."""
    from ..checkpoint import ensure_writable

    created = not out.exists()
    try:
        ensure_writable(out)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"--out {out}: cannot write a report there ({reason}); pass a "
                         "writable folder with --out") from None
    return created


def _load(args: argparse.Namespace, device: torch.device):
    """(model or None, DataConfig, class names it was trained on or None): a checkpoint's
    model now; an entry point's (None here) once the data says how many classes it has."""
    model, trained_on = None, None
    args.trained_shape = None
    if args.checkpoint:
        loaded = load_checkpoint(args.checkpoint, device=device)
        data, model, trained_on = loaded.config.data, loaded.model, loaded.classes
        if loaded.stored_shape:
            args.trained_shape = tuple(loaded.image_shape)
    else:
        if args.data is None:
            args.data = "cifar10"
        data = DataConfig()
    data.name = args.data or data.name
    data.root = args.data_root or data.root
    return model, data, trained_on


def _check_same_classes(trained_on: list[str] | None, found: list[str],
                        ignore_names: bool = False) -> None:
    """Refuse data whose class folders differ from the run's: labels are folder indices in
    sorted order, so one renamed folder shifts every label and the accuracy silently.
    ``ignore_names`` (--ignore-class-names) allows renamed folders, not another count."""
    if trained_on is None or list(trained_on) == list(found):
        return
    if len(trained_on) != len(found):  # never only renamed
        flag = ("; --ignore-class-names is for renamed folders, not another number of "
                "classes" if ignore_names else "")
        raise ValueError(
            f"the checkpoint was trained on {len(trained_on)} classes and the data has "
            f"{len(found)}; evaluate it on data with the {len(trained_on)} class folders it "
            f"was trained on (--data / --data-root){flag}")
    if ignore_names:
        return
    pairs = enumerate(zip(trained_on, found, strict=False))
    first = next((i for i, (a, b) in pairs if a != b), min(len(trained_on), len(found)))
    raise ValueError(
        f"the checkpoint was trained on {len(trained_on)} classes and the data has "
        f"{len(found)}, which differ from label {first} on ({trained_on[first:first + 2]} vs "
        f"{found[first:first + 2]}); evaluate it on data with the class folders it was "
        "trained on (--data / --data-root), or pass --ignore-class-names if the folders were "
        "only renamed and sort in the same order")


def _check_same_size(trained: tuple[int, ...] | None, found: tuple[int, ...]) -> None:
    """Refuse images of another size than the run trained on (a 64x64 Tiny-ImageNet model
    on a 32x32 copy with the same wnids): global pooling takes any size, so the numbers
    would come out, and be wrong, without a word."""
    if trained is None or tuple(trained) == tuple(found):
        return
    raise ValueError(
        f"the checkpoint was trained on {'x'.join(map(str, trained))} images and the data has "
        f"{'x'.join(map(str, found))}; evaluate it on data of the size it was trained on "
        "(--data / --data-root), or export it (python -m dat.export) and evaluate the weights "
        "with --model/--weights if another size is meant")


def _examples(data_cfg: DataConfig, split: str, n: int | None):
    """The split's images, labels and class names; ``n`` picks a class-stratified subset
    (as data.test_subset does), because test folders are often sorted by label."""
    from ..data import DataError, load_dataset, stratified_split

    data_cfg.test_subset = 0  # evaluate the whole split unless --n-examples says otherwise
    if split == "test":  # the test split does not depend on the validation split: holding
        data_cfg.val_size = 0  # out 1,000 images would refuse a small train/ for nothing
    try:
        splits = load_dataset(data_cfg)
    except DataError as err:  # worded for train.py's keys; name this tool's flags too
        hint = ("; --split val is the data.val_size images held out of train/ (1,000 with "
                "--model), so use --split test on a smaller train/"
                if split == "val" and "val_size" in str(err) else "")
        raise DataError(f"{err} (on evaluate.py: --data and --data-root){hint}") from None
    images = splits.test if split == "test" else splits.val
    if n is not None and n > len(images):
        print(f"note: --n-examples {n} is more than the {split} split's {len(images)} images; "
              f"evaluating all {len(images)}", file=sys.stderr)
    if n is not None and n < len(images):
        _, chosen = stratified_split(images.labels, n, data_cfg.split_seed)
        images = images.subset(chosen)
    return (*images.tensors(), splits.classes)


def _evaluate(args: argparse.Namespace, device: torch.device, out: Path) -> dict:
    """Load the model and examples, run the attacks, write the report to ``out``."""
    from .runner import evaluate

    model, data_cfg, trained_on = _load(args, device)
    if model is None:  # --model: checked before the data loads, built once it has
        mean, std = args.normalize or (None, None)
        func, state = prepare_entry_point(args.model, args.weights,
                                          weights_key=args.weights_key, mean=mean, std=std)
    x, y, classes = _examples(data_cfg, args.split, args.n_examples)
    # refusals before the warning below, so that a refused run prints one line
    _check_same_classes(trained_on, classes, args.ignore_class_names)
    _check_same_size(args.trained_shape, tuple(x.shape[1:]))
    if model is None:
        model = build_entry_point(args.model, func, state, device, len(classes), args.weights)
    outputs = _outputs(model, x)
    if 0 < outputs < len(classes):  # labels may stop short of the missing outputs (a split
        # without the last classes): the numbers would come out, on the wrong class count
        raise ValueError(
            f"the model outputs {outputs} classes but the data has {len(classes)} (the class "
            "folders of train/); build it for that many (a builder gets num_classes= when it "
            "takes that argument), or evaluate it on the data it was trained on (--data, "
            "--data-root)")
    if outputs > len(classes):
        print(f"warning: the model outputs {outputs} classes but the data has "
              f"{len(classes)}; labels 0..{len(classes) - 1} are read as its first "
              f"{len(classes)} outputs, so check that the model was trained on this dataset "
              "(--data, --data-root) and its class order", file=sys.stderr)
    return evaluate(
        model, (x, y), attacks=[a.strip() for a in args.attacks.split(",") if a.strip()],
        eps=args.eps, norm=args.norm, batch_size=args.batch_size, precision=args.precision,
        checks=not args.no_checks, progress=not args.no_progress, seed=args.seed, out_dir=out,
        sweep=args.sweep, diagnostics=args.diagnostics, heatmap=args.heatmap,
        heatmap_norm=args.heatmap_norm, heatmap_examples=args.heatmap_examples,
        tensorboard=args.tensorboard,
        channels_last=None if args.channels_last == "auto" else args.channels_last == "on",
        fold_bn=None if args.fold_bn == "auto" else args.fold_bn == "on", resume=args.resume,
        compile_mode=args.compile, metadata=_metadata(args, data_cfg),
        class_names=classes if len(classes) == outputs else None)


def _metadata(args: argparse.Namespace, data_cfg: DataConfig) -> dict:
    """What this command evaluated, for the report: a folder of reports stays readable
    after its files are moved or the weights change."""
    def where(path: str) -> str:
        return str(Path(path).expanduser().absolute())

    if args.checkpoint:
        meta = {"checkpoint": where(args.checkpoint)}
    else:
        meta = {"model": args.model, "weights": where(args.weights) if args.weights else None}
        if args.normalize is not None:
            meta["normalize"] = [list(args.normalize[0]), list(args.normalize[1])]
    from ..data import describe_data

    return {**meta, **describe_data(data_cfg), "split": args.split}


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """How many logits ``model`` gives (one forward on one image, in eval mode); -1 when
    it fails (the evaluation's own probe then names the problem)."""
    from ..attacks import eager_module, eval_mode

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model = eager_module(model)  # compiled: no graph for one image
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x[:1].to(device))
    except Exception:  # noqa: BLE001 (reported by dat.evaluate's probe, in one line)
        return -1
    return int(out.shape[-1]) if torch.is_tensor(out) and out.dim() == 2 else -1


def _run(args: argparse.Namespace) -> int:
    if args.weights and not args.model:
        raise ValueError("--weights goes with --model; a --checkpoint holds its own weights")
    if args.weights_key and not args.weights:
        raise ValueError("--weights-key goes with --weights (a key inside that file)")
    if args.normalize and not args.model:
        raise ValueError("--normalize goes with --model NAME; a checkpoint's model normalises "
                         "as it was trained")
    if args.checkpoint:
        args.checkpoint = str(checkpoint_file(args.checkpoint))  # a run folder: its best.pt
    device = _device(args.device)
    out = _out_dir(args)
    created = _check_writable(out)
    # held here too (evaluate takes it again): the clean-up below runs under the lock, and
    # a refusal (FolderInUse) comes before it, so another evaluation's files stay untouched
    with hold_folder(out, "wait for it to finish, or pass another --out"):
        try:
            report = _evaluate(args, device, out)
        except BaseException:
            if created and not finished_attacks(out):  # leave no empty report folder behind
                try:
                    for name in (PROGRESS_FILE, LOCK_NAME):
                        (out / name).unlink(missing_ok=True)
                    out.rmdir()
                except OSError:
                    pass
            raise
    from .report import format_markdown

    print(format_markdown(report))
    print(f"report: {report['files']['json']}  {report['files']['markdown']}")
    return 1 if args.strict and report["checks_status"] == "fail" else 0


def _read_radii(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--eps and --sweep read in the units of --norm (argparse reads them as text, as the
    norm may come after them)."""
    linf = args.norm == "linf"
    try:
        if args.eps is None:
            args.eps = DEFAULT_EPS[args.norm]
        else:
            args.eps = parse_eps(args.eps) if linf else parse_l2_eps(args.eps)
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --eps: {err}")
    try:
        if args.sweep == "default":
            args.sweep = True
        elif args.sweep is not None:
            args.sweep = _radii(args.sweep) if linf else _l2_radii(args.sweep)
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --sweep: {err}")
    return args


def _join_negative_eps(argv: list[str]) -> list[str]:
    """``--eps -1/255`` -> ``--eps=-1/255``: argparse reads a leading '-' as an option and
    would report a missing value instead of the negative radius."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--eps" and re.fullmatch(r"-[\d.]+(/[\d.]+)?", out[i + 1]):
            out[i:i + 2] = [f"--eps={out[i + 1]}"]
            break
    return out


def evaluate_main(argv: list[str] | None = None) -> int:
    """Console entry point: parse ``argv``, evaluate, print the report; returns exit status."""
    argv = _join_negative_eps(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    try:
        args = _read_radii(parser, parser.parse_args(argv))
    except SystemExit as stop:  # --help, or a bad argument already reported in one line
        return stop.code if isinstance(stop.code, int) else 2
    try:
        with one_line_warnings():
            return _run(args)
    except KeyboardInterrupt as stop:
        report = getattr(stop, "report", None)  # EvaluationInterrupted: what finished
        if report and report.get("files"):
            done = ", ".join(report["results"])
            print(f"\n{report['interrupted'].split(';')[0]}; partial report ({done}) written "
                  f"to {report['files']['json']}; rerun the same command with --resume for "
                  "the rest", file=sys.stderr)
        elif finished_attacks(_out_dir(args)):  # attacks that finished are kept
            print(f"\ninterrupted; the attacks finished so far are in "
                  f"{_out_dir(args) / PROGRESS_FILE}; rerun the same command with --resume to "
                  "go on from them", file=sys.stderr)
        else:
            print("\ninterrupted before any attack finished; nothing was saved; rerun "
                  "evaluate.py to evaluate again", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # bad input: one line naming the fix, no traceback
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
