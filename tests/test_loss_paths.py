"""closure, loss= and predict()/update() are three doors into one filter step."""

import pytest
import torch

from conftest import snapshot, tiny_mlp, train


@pytest.mark.parametrize("reduce", [False, True], ids=["per_sample", "batch_mean"])
def test_three_paths_agree(optimizer_spec, reduce):
    cls, kwargs = optimizer_spec
    results = {}
    for path in ("closure", "loss", "predict_update"):
        model = tiny_mlp()
        opt = cls(model.parameters(), **kwargs)
        train(model, opt, 5, path=path, reduce=reduce)
        if path == "predict_update":
            opt.predict()  # step() predicts ahead; bring the papers' API to the same point
        results[path] = snapshot(opt)
    ref_params, ref_state = results["loss"]
    for path in ("closure", "predict_update"):
        params, state = results[path]
        for a, b in zip(ref_params, params, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for sa, sb in zip(ref_state.values(), state.values(), strict=True):
            for k, v in sa.items():
                if isinstance(v, torch.Tensor):
                    torch.testing.assert_close(v, sb[k], rtol=0, atol=0, msg=k)


def test_step_returns_what_the_closure_returned(optimizer_spec):
    cls, kwargs = optimizer_spec
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    sentinel = {}

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sentinel["loss"] = loss
        return loss

    assert opt.step(closure) is sentinel["loss"]


def test_step_without_loss_names_the_three_ways(optimizer_spec):
    cls, kwargs = optimizer_spec
    opt = cls(tiny_mlp().parameters(), **kwargs)
    with pytest.raises(TypeError, match=r"(?s)closure.*loss=.*predict\(\).*update"):
        opt.step()


def test_closure_and_loss_together_is_an_error(optimizer_spec):
    cls, kwargs = optimizer_spec
    opt = cls(tiny_mlp().parameters(), **kwargs)
    with pytest.raises(TypeError, match="not both"):
        opt.step(lambda: torch.tensor(1.0), loss=torch.tensor(1.0))


@pytest.mark.parametrize("r_stat", ["second_moment", "squared_mean", "mean_variance"])
def test_r_statistics(r_stat):
    from kalmanopt import KOALAPlusPlus

    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = KOALAPlusPlus([p], r=None, alpha_r=0.5, r_stat=r_stat, r_clip=None)  # R estimated (not any preset's)
    p.grad = torch.ones(2, dtype=torch.float64)
    losses = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    opt.step(loss=losses)
    stat = {"second_moment": (1 + 4 + 36) / 3, "squared_mean": 3.0**2, "mean_variance": 7.0 / 3}[r_stat]
    assert opt.state[p]["measurement_noise"].item() == pytest.approx(0.5 + 0.5 * stat)


def test_mean_variance_needs_per_sample_losses():
    from kalmanopt import KOALAPlusPlus

    p = torch.zeros(2, requires_grad=True)
    opt = KOALAPlusPlus([p], r_stat="mean_variance")
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(loss=torch.tensor(1.0))
