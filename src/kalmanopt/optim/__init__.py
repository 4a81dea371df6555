"""The Kalman optimizers: one module per algorithm, sharing :mod:`.base` and :mod:`.noise`."""

from .base import KalmanOptimizer
from .koala_m import KOALAM
from .koala_pp import KOALAPlusPlus
from .koala_v import KOALAV

__all__ = ["KalmanOptimizer", "KOALAM", "KOALAPlusPlus", "KOALAV"]
