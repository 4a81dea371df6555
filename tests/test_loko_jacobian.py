"""LoKO's Jacobian rows through ``scaled_dot_product_attention``, whose fused CPU backward has no vmap batching rule.

``torch.func.vmap`` then runs that operator once per row (a "performance drop" ``UserWarning``); the rows must
still be the exact Jacobian, in every mode, and a whole step must not depend on the mode.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from kalmanopt import LoKO
from kalmanopt.optim.loko import JACOBIAN_MODES, jacobian_rows

# the fallback's warning is expected here: what is tested is that the result does not depend on it
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class TinyAttention(torch.nn.Module):
    """One self-attention layer (2 heads) with a residual, mean pooling and a head: logits (batch, classes)."""

    def __init__(self, dim=8, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):  # (batch, tokens, dim)
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.head((x + self.out(a)).mean(1))


def setup(seed=0):
    torch.manual_seed(seed)
    model = TinyAttention().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_rows_are_the_jacobian_through_sdpa(mode):
    model, x = setup()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def logits(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,)).reshape(-1)

    expected = torch.autograd.functional.jacobian(logits, tuple(p.detach() for p in params))  # one row at a time
    rows = jacobian_rows(model(x).reshape(-1), params, mode)
    assert len(rows) == len(params)
    for r, e, p in zip(rows, expected, params, strict=True):
        assert r.shape == (6, *p.shape)
        torch.testing.assert_close(r, e, rtol=1e-12, atol=1e-12)


def test_step_does_not_depend_on_the_jacobian_mode():
    """Three full default steps (low-rank, trust region) on a model with attention: vmap, batched and loop agree."""
    final = {}
    for mode in JACOBIAN_MODES:
        model, x = setup()
        opt = LoKO(model.parameters(), jacobian=mode)
        for s in range(3):
            y = torch.tensor([s % 3, (s + 1) % 3])
            opt.step(lambda model=model, x=x: model(x), y)
        final[mode] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    start = torch.cat([p.detach().reshape(-1) for p in setup()[0].parameters()])
    assert (final["vmap"] - start).abs().max() > 1e-4  # the steps moved the parameters
    for mode in JACOBIAN_MODES:
        torch.testing.assert_close(final[mode], final["loop"], rtol=1e-10, atol=1e-12)


def test_loop_mode_needs_no_batching_rule():
    """``jacobian="loop"`` runs one plain backward per row: no fallback warning on a model with attention."""
    model, x = setup()
    opt = LoKO(model.parameters(), jacobian="loop")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        opt.step(lambda: model(x), torch.tensor([0, 2]))


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_rows_of_parameters_some_outputs_do_not_use_are_zero(mode):
    """A parameter that only some rows depend on gets exact zeros in the other rows; one no row uses, zeros."""
    a = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, 1.0, -3.0], dtype=torch.float64, requires_grad=True)
    unused = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    h = torch.cat([3.0 * a, b.square().sum(0, keepdim=True)])  # rows 0, 1: a only; row 2: b only
    rows = jacobian_rows(h, [a, unused, b], mode)
    expected_a = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    expected_b = torch.cat([torch.zeros(2, 3, dtype=torch.float64), 2.0 * b.detach().unsqueeze(0)])
    assert torch.equal(rows[0], expected_a)
    assert torch.equal(rows[1], torch.zeros(3, 2, 2, dtype=torch.float64))
    assert torch.equal(rows[2], expected_b)
