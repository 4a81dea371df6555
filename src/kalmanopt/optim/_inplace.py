"""In-place writes of the optimizers' 0-d state that survive ``torch.compile``.

With torch 2.13, AOTAutograd drops an in-place write (``copy_``, ``add_``) to a 0-d float64 CPU tensor that is an
input of the compiled graph: ``torch.compile(lambda t: t.add_(1.0), backend="aot_eager")`` leaves
``torch.ones((), dtype=torch.float64)`` at 1 (silently; float32, tensors of other shapes and the ``_foreach`` ops are
written back). The filters keep their group scalars (R, sigma, P) in the parameters' state dtype, so a float64 model
stepped under ``torch.compile`` kept them at their initial values. Writing through a 1-element view of the same
storage is written back (tests/test_compile_scalar_state.py compares the compiled step with the eager one).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["copy_into"]


def copy_into(dst: Tensor, value: Tensor) -> Tensor:
    """``dst.copy_(value)``; a 0-d ``dst`` is written through a view of shape ``(1,)`` (see the module docstring)."""
    if dst.dim() == 0:
        dst.view(1).copy_(value.reshape(1))
    else:
        dst.copy_(value)
    return dst
