"""kalmanopt: train neural networks with Kalman filters (KOALA++, KOALA-V, KOALA-M)."""

from .optim import KalmanOptimizer, KOALAM, KOALAPlusPlus, KOALAV

__all__ = ["KalmanOptimizer", "KOALAM", "KOALAPlusPlus", "KOALAV"]
__version__ = "0.1.0"
