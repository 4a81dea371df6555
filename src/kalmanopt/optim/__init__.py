"""The Kalman optimizers: one module per algorithm, sharing :mod:`.base` and :mod:`.noise`."""

from .base import KalmanOptimizer
from .full_kalman import FullKalman
from .koala_m import KOALAM
from .koala_pp import KOALAPlusPlus
from .koala_v import KOALAV
from .loko import LoKO

__all__ = ["FullKalman", "KalmanOptimizer", "KOALAM", "KOALAPlusPlus", "KOALAV", "LoKO"]
