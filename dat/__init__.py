"""dat: adversarial training with generative amplitude mix-up (DAT, NeurIPS 2024)."""

from . import (
    attacks,
    callbacks,
    config,
    data,
    generator,
    losses,
    mixing,
    models,
    spectral,
)
from .config import Config, load_config
from .evaluation import evaluate
from .generator import AmplitudeGenerator
from .methods.dat import DATStep
from .mixing import AmplitudeMix

__version__ = "0.1.0"


def __getattr__(name: str):
    """``dat.export`` on first use: imported eagerly, ``python -m dat.export`` would warn
    that the module was already loaded."""
    if name == "export":
        import importlib

        return importlib.import_module(".export", __name__)
    raise AttributeError(f"module 'dat' has no attribute {name!r}")

__all__ = [
    "AmplitudeGenerator",
    "AmplitudeMix",
    "Config",
    "DATStep",
    "attacks",
    "callbacks",
    "config",
    "data",
    "evaluate",
    "export",
    "generator",
    "load_config",
    "losses",
    "mixing",
    "models",
    "spectral",
]
