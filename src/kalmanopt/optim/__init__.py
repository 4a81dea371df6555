"""The Kalman optimizers: one module per algorithm, sharing :mod:`.base` and :mod:`.noise`."""

from .base import KalmanOptimizer
from .koala_pp import KOALAPlusPlus

__all__ = ["KalmanOptimizer", "KOALAPlusPlus"]
