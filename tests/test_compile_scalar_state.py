"""torch.compile and the optimizers' 0-d float64 state.

With torch 2.13, AOTAutograd drops an in-place write (``copy_``, ``add_``) to a 0-d float64 CPU tensor that is a
graph input: ``torch.compile(lambda t: t.add_(1.0))(torch.ones((), dtype=torch.float64))`` leaves it at 1 (float32,
other shapes and the foreach ops are written back). The filters' group scalars are in the parameters' state dtype, so
a float64 model compiled with its step lost its R estimate (KOALA++), sigma (KOALA-V) or P (KOALA-M) every step.
These tests compare a compiled float64 step with the eager one, state tensor by state tensor.
"""

import pytest
import torch

from kalmanopt import KOALAM, KOALAV, KOALAPlusPlus

CASES = {
    # the paper preset measures R (an EMA of the squared loss): group state written every step
    "koala++-paper": lambda p: KOALAPlusPlus(p, lr=1e-2, preset="paper", foreach=True),
    "koala++-r": lambda p: KOALAPlusPlus(p, lr=1e-2, r=None, foreach=True),
    "koala-v": lambda p: KOALAV(p, lr=1e-2),
    "koala-m": lambda p: KOALAM(p, lr=1e-2),
}


def _run(make, compiled):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in ((4, 3), (3,))]
    opt = make(params)

    def step(losses):
        opt.step(loss=losses)

    step_fn = torch.compile(step, backend="aot_eager") if compiled else step
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        step_fn(torch.rand(8, generator=gen, dtype=torch.float64) + 0.5)
    return opt.state_dict()["state"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_compiled_float64_step_writes_the_group_scalars(name):
    eager, compiled = _run(CASES[name], False), _run(CASES[name], True)
    assert eager.keys() == compiled.keys()
    for index, state in eager.items():
        assert state.keys() == compiled[index].keys()
        for key, value in state.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(compiled[index][key], value, rtol=1e-9, atol=1e-12,
                                           msg=f"state[{index}][{key!r}]")
