"""LoKO's defaults (softmax observation, moment-matched R, rank-64 LoFi precision, trust region) and the trust region.

The trust region is checked against its definition: the same step without it, then the mean step scaled by
``trust / max|z+ - z|`` when a logit of the measured batch moved further than ``trust``, with the filter's state as
computed without it.
"""

import math

import pytest
import torch

from kalmanopt import LoKO


def model_and_data(seed: int = 0, n: int = 4, c: int = 3, b: int = 2):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(n, 5), torch.nn.Tanh(), torch.nn.Linear(5, c)).double()
    x = 3.0 * torch.randn(b, n, dtype=torch.float64)
    y = torch.randint(0, c, (b,))
    return model, x, y


def clone(model):
    twin = type(model)(*[type(m)(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else type(m)()
                         for m in model]).double()
    twin.load_state_dict(model.state_dict())
    return twin


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_the_defaults():
    model, x, y = model_and_data()
    opt = LoKO(model.parameters())
    g = opt.param_groups[0]
    assert (g["observation"], g["noise"], g["rank"], g["trust"], g["p0"], g["jacobian"]) == (
        "softmax", "moment", 64, 3.0, 0.1, "vmap")
    assert (g["trust_check"], g["truncation"], g["classes"]) == ("predicted", "whitened", 0)
    # the moment-matched R belongs to the softmax observation: another observation gets a fixed R by default
    assert LoKO(model.parameters(), observation="logits").param_groups[0]["noise"] == "fixed"
    assert LoKO(model.parameters(), observation="loss").param_groups[0]["noise"] == "fixed"
    with pytest.raises(ValueError, match="moment"):
        LoKO(model.parameters(), observation="logits", noise="moment")
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="trust"):
            LoKO(model.parameters(), trust=bad)
    opt.step(lambda: model(x), y)
    assert opt.last_predictive is not None and opt.last_predictive.probs.shape == (2, 3)
    assert torch.allclose(opt.last_predictive.probs.sum(1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("rank", [0, 64])
def test_trust_region_scales_the_mean_step_and_keeps_the_covariance(rank):
    model, x, y = model_and_data()
    free, bounded = clone(model), clone(model)
    kw = dict(p0=30.0, rank=rank)  # a large prior: the first step moves the logits by much more than 0.5
    opt_free = LoKO(free.parameters(), trust=0.0, **kw)
    opt_bounded = LoKO(bounded.parameters(), trust=0.5, **kw)
    theta0 = params(model)
    with torch.no_grad():
        z0 = model(x)
    opt_free.step(lambda: free(x), y)
    opt_bounded.step(lambda: bounded(x), y)
    delta = params(free) - theta0
    with torch.no_grad():
        moved = float((free(x) - z0).abs().max())
    assert moved > 0.5  # the region binds in this case
    torch.testing.assert_close(params(bounded), theta0 + (0.5 / moved) * delta, rtol=1e-12, atol=1e-12)
    assert opt_bounded.trust_scaled_steps == 1 and opt_free.trust_scaled_steps == 0
    for p_free, p_bounded in zip(free.parameters(), bounded.parameters(), strict=True):
        for key, value in opt_free.state[p_free].items():
            assert torch.equal(value, opt_bounded.state[p_bounded][key]), key


def test_trust_region_that_does_not_bind_changes_nothing():
    model, x, y = model_and_data(seed=1)
    free, bounded = clone(model), clone(model)
    opt_free = LoKO(free.parameters(), trust=0.0, p0=1e-4)
    opt_bounded = LoKO(bounded.parameters(), trust=3.0, p0=1e-4)
    for _ in range(3):
        opt_free.step(lambda: free(x), y)
        opt_bounded.step(lambda: bounded(x), y)
    assert torch.equal(params(free), params(bounded))
    assert opt_bounded.trust_scaled_steps == 0


@pytest.mark.parametrize("rank", [0, 8])
def test_non_finite_outputs_after_the_step_undo_it_bit_for_bit(rank):
    model, x, y = model_and_data()
    opt = LoKO(model.parameters(), rank=rank, trust_check="forward")  # the check that runs the model again
    opt.step(lambda: model(x), y)  # some state first
    before = params(model).clone()
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    calls = []

    def forward():
        calls.append(1)
        out = model(x)
        return out if len(calls) == 1 else out * math.nan  # the second call (after the step) is non-finite

    opt.step(forward, y)
    assert len(calls) == 2
    assert torch.equal(params(model), before)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key == "skipped_steps":
                assert int(value) == 1
            else:
                assert torch.equal(value, state[id(p)][key]), key
    assert opt.skipped_steps == 1 and opt.last_predictive is None


def test_forward_fn_that_changes_shape_on_its_second_call_is_an_error_that_loses_nothing():
    model, x, y = model_and_data()
    opt = LoKO(model.parameters(), trust_check="forward")
    before = params(model).clone()
    calls = []

    def forward():
        calls.append(1)
        return model(x) if len(calls) == 1 else model(x)[:1]

    with pytest.raises(ValueError, match="deterministic"):
        opt.step(forward, y)
    assert torch.equal(params(model), before)
    assert not any(opt.state[p] for p in model.parameters() if p is not next(model.parameters()))


def test_calibrated_predictive_uses_the_scale_with_the_lowest_past_nll_and_leaves_training_alone():
    from kalmanopt.optim.loko import PREDICTIVE_SCALES, predictive_probs

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    twin = clone(model)
    calibrated = LoKO(model.parameters(), rank=8, calibrate="scale")
    plain = LoKO(twin.parameters(), rank=8, calibrate=False)
    xs = 2.0 * torch.randn(25, 1, 4, dtype=torch.float64)
    ys = torch.randint(0, 3, (25, 1))
    past = torch.zeros(len(PREDICTIVE_SCALES), dtype=torch.float64)
    chosen = []
    for x, y in zip(xs, ys, strict=True):
        calibrated.step(lambda x=x: model(x), y)
        plain.step(lambda x=x: twin(x), y)
        raw = plain.last_predictive  # the filter's own covariance
        best = min(range(len(PREDICTIVE_SCALES)), key=lambda i: (float(past[i]), i))
        scale = PREDICTIVE_SCALES[best]
        chosen.append(scale)
        expected = predictive_probs(raw.mean, scale * raw.cov, "probit")
        torch.testing.assert_close(calibrated.last_predictive.probs, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(calibrated.last_predictive.cov, scale * raw.cov, rtol=1e-12, atol=1e-12)
        for i, s in enumerate(PREDICTIVE_SCALES):
            past[i] -= float(predictive_probs(raw.mean, s * raw.cov, "probit")[0, y].log())
    assert torch.equal(params(model), params(twin))  # the predictive never touches the filter
    assert chosen[0] == 1.0 and len(set(chosen)) > 1  # starts at the filter's own covariance, then moves
    assert calibrated.predictive_scale == PREDICTIVE_SCALES[int(torch.argmin(past))]
    torch.testing.assert_close(calibrated.state[next(model.parameters())]["predictive_nll"], past)
