"""Training methods as callable steps: PGD-AT, TRADES, MART and DAT."""

from .base import MethodStep

__all__ = ["MethodStep"]
