"""Benchmark baselines that have no maintained PyTorch package we can use: **our own implementations** of K-FAC and
AdaFisher, written from their papers for the benchmark suites (they are not library optimizers).

* :class:`KFAC`: Kronecker-factored approximate curvature (Martens & Grosse, 2015; convolutions as in Grosse &
  Martens, 2016), empirical Fisher from the training loss's own backward pass.
* :class:`AdaFisher`: Gomes et al., "AdaFisher: Adaptive Second Order Optimization via Fisher Information",
  ICLR 2025: diagonals of the Kronecker factors, an Adam-like update with the Fisher diagonal as the second moment.

Both take the model (not its parameters): they hook its ``nn.Linear`` and ``nn.Conv2d`` layers to see each layer's
inputs and output gradients. Parameters of other layers get a plain (momentum) gradient step.
"""

from .adafisher import AdaFisher
from .kfac import KFAC

__all__ = ["KFAC", "AdaFisher"]
