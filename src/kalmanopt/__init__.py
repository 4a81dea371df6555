"""kalmanopt: train neural networks with Kalman filters (KOALA++, KOALA-V, KOALA-M)."""

from .optim import KalmanOptimizer, KOALAPlusPlus

__all__ = ["KalmanOptimizer", "KOALAPlusPlus"]
__version__ = "0.1.0"
