"""User code named on a command line: ``module:function`` or ``path/file.py:function``.

``train.py model.name=nets.py:build`` and ``evaluate.py --model nets.py:build`` use it, so a
model architecture of your own trains, evaluates and exports without being part of dat;
``train.callbacks`` entries are loaded the same way (:func:`dat.callbacks.load_callback`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["absolute_spec", "accepts", "call_builder", "check_built", "check_spec",
           "describe_error", "exported_program", "exported_program_message", "is_spec",
           "load_function", "load_module", "run_label"]


def is_spec(name: str) -> bool:
    """True for ``module:function`` / ``file.py:function`` (not a registry or timm name)."""
    return ":" in name and not name.startswith("timm/")


def _parts(spec: str, what: str, dotted: bool = False) -> tuple[str, str]:
    module_name, _, func_name = spec.rpartition(":")
    names = func_name.split(".") if dotted else [func_name]
    if not module_name or not all(name.isidentifier() for name in names):
        raise ValueError(f"{what} {spec!r} must look like module:function or "
                         "path/file.py:function")
    return module_name, func_name


def absolute_spec(spec: str) -> str:
    """``spec`` with a file path made absolute (and ``..`` folded), so it resolves from any
    working folder and compares equal however it was written."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name.endswith(".py"):
        return spec
    return f"{os.path.abspath(os.path.expanduser(module_name))}:{func_name}"


def run_label(spec: str) -> str:
    """A short name for run folders: ``nets.py:build`` -> ``nets.build``."""
    module_name, _, func_name = spec.rpartition(":")
    if module_name.endswith(".py"):
        module_name = Path(module_name).stem
    return f"{module_name}.{func_name}"


def check_spec(spec: str, what: str, dotted: bool = False) -> None:
    """The form, and that a named file exists (cheap: nothing is imported). ``dotted``
    allows an attribute path after the colon (``module:obj.attr``)."""
    module_name, _ = _parts(spec, what, dotted)
    if module_name.endswith(".py") and not Path(module_name).expanduser().is_file():
        raise ValueError(f"{what} {spec!r}: {module_name} does not exist; pass the path of a "
                         ".py file (or module:function with its folder on PYTHONPATH)")


def load_function(spec: str, what: str) -> Callable[..., Any]:
    """The callable ``spec`` names; ValueError naming ``what`` (flag or key) and the fix."""
    check_spec(spec, what)
    module_name, func_name = _parts(spec, what)
    module = load_module(module_name, spec, what)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{what} {spec!r}: {module_name} has no function {func_name!r}")
    return func


def load_module(module_name: str, spec: str, what: str) -> ModuleType:
    """Import ``module_name`` (a dotted name, or a ``.py`` path run as a script) for
    ``spec``. A one-line ValueError tells a module that is not there (PYTHONPATH) from one
    that was found but failed while importing (its own error, the line that raised it, and
    the fix); the latter is chained from that error, for debuggers."""
    if module_name.endswith(".py"):
        return _load_file(Path(module_name).expanduser(), spec, what)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        parts = module_name.split(".")
        ours = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if err.name in ours:
            raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({err}); add "
                             "its folder to PYTHONPATH or pass path/to/file.py:function"
                             ) from None
        where = _where(err, None)
        raise ValueError(f"{what} {spec!r}: importing {module_name!r} failed: {err} (a "
                         f"module it imports{f', at {where}' if where else ''}; install it "
                         "or fix that import)") from err
    except Exception as err:  # a syntax error, or the module's own code raised
        raise ValueError(f"{what} {spec!r}: importing {module_name!r} failed: "
                         f"{describe_error(err, None)}; {_fix(err, 'the module')}") from err


def _load_file(path: Path, spec: str, what: str) -> ModuleType:
    """Execute ``path`` as a module, as Python runs a script: its folder goes on
    ``sys.path`` (for imports of its neighbours, also inside the builder) and the module
    into ``sys.modules`` under a name of its own (dataclasses and pickle look it up).
    An error in the file becomes a one-line ValueError naming the file and line."""
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"_dat_user_{path.stem}_{digest}"  # one per file, the same in every process
    file_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = module
    try:
        file_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ValueError(f"{what} {spec!r}: running {path} failed: "
                         f"{describe_error(err, path)}; {_fix(err, 'the file')}") from err
    except BaseException:  # Ctrl-C, SystemExit: as they are
        del sys.modules[name]
        raise
    return module


def call_builder(func: Callable[..., Any], spec: str, what: str, **kwargs: Any) -> Any:
    """``func(**kwargs)``; an error the builder raises becomes a one-line ValueError naming
    ``spec``, the error and where the user's code raised it (chained, for Python users)."""
    try:
        return func(**kwargs)
    except Exception as err:
        module_name = spec.rpartition(":")[0]
        path = Path(module_name).expanduser() if module_name.endswith(".py") else None
        raise ValueError(f"{what} {spec!r}: {spec.rpartition(':')[2]}() raised "
                         f"{describe_error(err, path)}; {_fix(err, 'the builder')}") from err


def check_built(model: object, who: str) -> None:
    """One-line ValueError when what ``who`` (e.g. ``"--model nets.py:build returned"``) names
    cannot be trained or evaluated: not an ``nn.Module``, or a torch.export program."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ValueError(f"{who} {type(model).__name__}, not a torch nn.Module")
    if exported_program(model):
        raise ValueError(exported_program_message(who))


def exported_program(model: object) -> bool:
    """Whether ``model`` is ``ExportedProgram.module()``: torch.export replaces its train()
    and eval() with ones that raise NotImplementedError, so it has no eval mode to set."""
    patched = vars(model).get("eval") if hasattr(model, "__dict__") else None
    return "ExportedProgram" in getattr(patched, "__qualname__", "")


def exported_program_message(who: str) -> str:
    """The refusal of an ``ExportedProgram.module()``; ``who`` names where it came from."""
    return (f"{who} a torch.export program (ExportedProgram.module()), whose train() and "
            "eval() raise NotImplementedError, so it cannot be put in eval mode; return the "
            "original nn.Module instead (the one given to torch.export.export, with its "
            "weights loaded)")


def describe_error(err: BaseException, path: Path | None = None) -> str:
    """``SyntaxError: invalid syntax (nets.py line 3)``: the error's type, its first line,
    and the line that raised it (in ``path`` when the traceback passes through it)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if isinstance(err, SyntaxError):  # the file and line are the point, not the message
        first = err.msg or "invalid syntax"
    where = _where(err, path)
    text = f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__
    return f"{text} ({where})" if where else text


def _where(err: BaseException, path: Path | None) -> str | None:
    """``file line N`` of the line that raised ``err`` (the last in ``path`` if any)."""
    if isinstance(err, SyntaxError):
        return f"{err.filename} line {err.lineno}" if err.filename else None
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if path is not None
            and os.path.realpath(f.filename) == os.path.realpath(path)]
    frame = (mine or frames or [None])[-1]
    return f"{frame.filename} line {frame.lineno}" if frame is not None else None


def _fix(err: BaseException, what: str) -> str:
    if isinstance(err, ImportError):  # a package the user's code needs
        return "install the missing package or fix that import"
    return f"fix {what}"


def accepts(func: Callable[..., Any], name: str) -> bool:
    """True when ``func`` can take the keyword argument ``name``."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)
