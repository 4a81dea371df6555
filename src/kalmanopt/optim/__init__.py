"""The Kalman optimizers: one module per algorithm, sharing :mod:`.base` and :mod:`.noise`."""

from .base import KalmanOptimizer
from .full_kalman import FullKalman as FullKalman
from .koala_m import KOALAM
from .koala_pp import KOALAPlusPlus
from .koala_v import KOALAV
from .loko import LoKO as LoKO

__all__ = ["KalmanOptimizer", "KOALAM", "KOALAPlusPlus", "KOALAV"]
