"""Kernel sources of the fused KOALA++ step, kept as code so that they are read, diffed and searched as code.

* ``koala_pp_step.c``: the CPU step, plain C99, shipped as package data and compiled at first use by
  :mod:`kalmanopt.optim._koala_pp_fused` (called through :mod:`ctypes`).
* :mod:`kalmanopt.kernels.koala_pp_triton`: the CUDA step in Triton (``pip install triton``), launched by
  :mod:`kalmanopt.optim._koala_pp_triton`; the same kernels run on CPU tensors under Triton's interpreter, which is
  how the tests check them without a GPU.

Nothing here is imported by ``import kalmanopt``: Triton is imported the first time a step needs it.
"""
