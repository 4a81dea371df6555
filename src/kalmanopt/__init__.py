"""kalmanopt: train neural networks with Kalman filters (KOALA++, KOALA-V, KOALA-M, LoKO)."""

from .optim import KOALAM, KOALAV, FullKalman, KalmanOptimizer, KOALAPlusPlus, LoKO

__all__ = ["FullKalman", "KalmanOptimizer", "KOALAM", "KOALAPlusPlus", "KOALAV", "LoKO"]
__version__ = "0.1.0"
