"""Console entry points named in pyproject.toml (``dat-train``, ``dat-evaluate``).

User errors (bad config values, missing data, unusable checkpoints) print one line
``error: ...`` and exit with status 2; a run stopped by the non-finite guard exits 1.
Under torchrun (``torchrun --nproc_per_node=N train.py ...``) every rank runs
``train_main``; errors name their rank and only rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

__all__ = ["evaluate_main", "train_main"]

DEFAULT_PRESET = "quickstart"


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Adversarial training (DAT, PGD-AT, TRADES, MART).",
        epilog="example: python train.py --config quickstart method.name=trades train.epochs=2")
    parser.add_argument("--config", default=None,
                        help=f"preset name in dat/configs/ or a YAML path "
                             f"(default: {DEFAULT_PRESET})")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue a run from its checkpoint ('auto': the run's last.pt)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved, validated configuration as YAML and exit "
                             "(with --resume: after checking the run may resume with it)")
    parser.add_argument("--list-presets", action="store_true",
                        help="list the presets in dat/configs/ with their first line and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=2 method.attack.eps=8/255")
    return parser


def _resume_config(args: argparse.Namespace):
    """A resumed run keeps its saved config; ``key=value`` overrides still apply. With
    ``--config`` that file is the config, and the resume refuses any key it may not change
    (:data:`dat.checkpoint.RESUME_MAY_CHANGE`) instead of ignoring the file."""
    from .checkpoint import find_run_checkpoint, load_for_resume, resume_target
    from .config import config_from_dict, config_to_yaml, load_config

    path = args.resume
    if path == "auto":
        located = load_config(args.config or DEFAULT_PRESET, args.overrides)
        path = find_run_checkpoint(located.train.out_dir, located.train.run_name)
    path = resume_target(path)  # a run directory means its last.pt
    saved = Path(path).parent.parent / "config.yaml"
    if Path(path).parent.name == "checkpoints":  # the run continues in its own folder
        _refuse_other_run_folder(args.overrides, Path(path).parent.parent)
    if Path(path).parent.name == "checkpoints" and os.environ.get("RANK", "0") == "0":
        from .build import RUN_IN_USE_FIX
        from .folder_lock import check_free

        check_free(saved.parent, RUN_IN_USE_FIX)  # before a half-written run is read
    overrides = [*args.overrides, f"train.resume={path}"]
    if args.config:  # the user's own config: the resume refuses what it may not change
        return load_config(args.config, overrides)
    if saved.is_file():  # its run_name is the folder's (set on resume): not re-checked
        return load_config(str(saved), ["train.run_name=", *overrides])
    state, _ = load_for_resume(path, warn=lambda msg: None)  # config of the checkpoint itself
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "config.yaml"
        file.write_text(config_to_yaml(config_from_dict(state["config"])))
        return load_config(str(file), overrides)


def _refuse_other_run_folder(overrides: list[str], run_dir: Path) -> None:
    """``--resume PATH train.run_name=NEW`` (or ``train.out_dir=NEW``) would write into
    PATH's own run folder, not NEW: refuse it instead of overwriting that run's best.pt,
    metrics.json and report."""
    from .config import ConfigError

    last = {}  # the value that takes effect: a later key=value overrides an earlier one
    for item in overrides:
        key, _, value = (part.strip() for part in item.partition("="))
        last[key] = value
    for key, value in last.items():
        if key == "train.run_name" and value not in ("", run_dir.name):
            target = run_dir.parent / value
        elif key == "train.out_dir" and value and (
                Path(value).expanduser().resolve() != run_dir.parent.resolve()):
            target = Path(value) / run_dir.name
        else:
            continue
        raise ConfigError(
            f"--resume continues the run in {run_dir}, not in {key}={value}; drop {key}, or "
            f"copy the run first (cp -r {run_dir} {target}) and resume the copy")


def _summary(metrics: dict) -> str:
    """One line: test accuracies, then training throughput (labelled: not test speed)."""
    tests = (", ".join(f"{k} {v:.2f}%" for k, v in metrics.get("test", {}).items())
             or "no test attacks")
    return (f"test ({metrics.get('test_examples', 0)} images, {metrics['evaluated']}): {tests}; "
            f"training {metrics['images_per_second']:.1f} images/s")


def _interrupted(cfg, argv: list[str] | None) -> str:
    """The Ctrl-C line: the command that resumes, or, with no checkpoint yet, starts over."""
    from .checkpoint import older_copies, resume_target

    if cfg is None or not cfg.train.run_name:  # stopped before the run had a directory
        return f"interrupted before training started; start over: {_command(argv)}"
    last = Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints" / "last.pt"
    if cfg.train.resume not in ("", "auto"):
        last = resume_target(cfg.train.resume)  # a run folder means its last.pt
    if any(p.is_file() for p in (last, *older_copies(last, max(cfg.train.keep_checkpoints, 1)))):
        how = (" (under torchrun: your torchrun command with --resume)"
               if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
        return (f"interrupted; continue from the last checkpoint: python train.py --resume "
                f"{last}{how}")
    return ("interrupted before the first checkpoint (end of epoch 1, or every "
            f"train.checkpoint_every steps), nothing to resume; start over: {_command(argv)}")


def _command(argv: list[str] | None) -> str:
    return shlex.join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)])


def train_main(argv: list[str] | None = None) -> int:
    """``dat-train`` / ``python train.py``: see ``--help``."""
    from .checkpoint import CheckpointError, WriteError
    from .config import ConfigError, load_config
    from .data import DataError
    from .distributed import cleanup_distributed
    from .folder_lock import FolderInUse
    from .messages import one_line, one_line_warnings
    from .trainer import Terminated, Trainer, TrainingError

    args = _train_parser().parse_intermixed_args(argv)  # options may follow key=value
    if args.list_presets:
        print(_presets())
        return 0
    cfg = None
    try:
        if args.resume:
            cfg = _resume_config(args)
        else:
            cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
        from .entry_points import absolute_spec

        cfg.model.name = absolute_spec(cfg.model.name)  # as the run stores it
        cfg.train.callbacks = [absolute_spec(spec) for spec in cfg.train.callbacks]
        if args.print_config:
            from .build import check_test_attacks
            from .checkpoint import check_compatible, load_for_resume
            from .config import config_to_dict, config_to_yaml

            check_test_attacks(cfg.train.test_attacks)  # as a run checks them, at once

            if args.resume:  # the resume's own refusal, before anything is printed
                state, _ = load_for_resume(cfg.train.resume, warn=lambda msg: None)
                check_compatible(state, cfg.model.name, None, config_to_dict(cfg))
                from .build import named_run_dir

                named = named_run_dir(cfg, Path(cfg.train.resume))
                if named is not None:  # the folder the resumed run writes into, as Trainer
                    cfg.train.run_name = named.name
            print(config_to_yaml(cfg), end="")
            return 0
        with one_line_warnings():
            trainer = Trainer(cfg, progress=not args.no_progress)
            cfg = trainer.cfg  # the checked copy, with the run name the trainer stamped
            metrics = trainer.fit()
        cleanup_distributed()
    except KeyboardInterrupt as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, from rank 0
            print(f"\n{_interrupted(cfg, argv)}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130  # 128 + SIGTERM / SIGINT
    except (ConfigError, DataError, CheckpointError, FolderInUse) as err:
        print(f"error{_rank_tag()}: {one_line(err)}", file=sys.stderr)
        return 2
    except (TrainingError, WriteError) as err:
        print(f"error{_rank_tag()}: {one_line(err)}", file=sys.stderr)
        return 1
    if metrics:  # empty on ranks other than 0 under torchrun
        print(_summary(metrics))
    return 0


def _presets() -> str:
    """One line per preset: its name and the first sentence of its header comment."""
    import itertools

    from .config import CONFIG_DIR

    lines = []
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    width = max(len(p.stem) for p in paths)
    for path in paths:
        header = itertools.takewhile(lambda line: line.startswith("#"),
                                     path.read_text().splitlines())
        text = " ".join(line.lstrip("#").strip() for line in header)
        sentence = text.split(". ", 1)[0].rstrip(".")
        lines.append(f"{path.stem:<{width}} {sentence}")
    return "\n".join(lines)


def _rank_tag() -> str:
    """`` (rank N)`` under torchrun: an error may come from one rank only."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f" (rank {os.environ.get('RANK', '?')})"
    return ""


def evaluate_main(argv: list[str] | None = None) -> int:
    """``dat-evaluate``: see ``python evaluate.py --help``."""
    from .evaluation.cli import evaluate_main as run

    return run(argv)
