"""dat: adversarial training with generative amplitude mix-up (DAT, NeurIPS 2024)."""

from . import attacks, config, data, losses, models, spectral
from .config import Config, load_config

__version__ = "0.1.0"

__all__ = [
    "Config",
    "attacks",
    "config",
    "data",
    "load_config",
    "losses",
    "models",
    "spectral",
]
