"""dat: adversarial training with generative amplitude mix-up (DAT, NeurIPS 2024)."""

from . import (
    attacks,
    callbacks,
    config,
    data,
    export,
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
