"""The loss feed behind the framework integrations: combining micro-batch losses, binding to an optimizer."""

import warnings

import pytest
import torch

from kalmanopt import KOALAPlusPlus
from kalmanopt.integrations._loss_feed import LossFeed

from conftest import batch, per_sample_loss, tiny_mlp


def test_scalar_parts_give_their_weighted_sum():
    feed = LossFeed()
    feed.add(torch.tensor(1.0), 0.5)
    feed.add(torch.tensor(3.0), 0.5)
    assert feed.take().item() == pytest.approx(2.0)
    assert feed.take() is None  # taking empties the feed


def test_per_sample_parts_keep_every_sample_and_the_weighted_mean():
    feed = LossFeed()
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])
    feed.add(a, 0.5)
    feed.add(b, 0.5)
    loss = feed.take()
    assert loss.shape == (4,)
    assert loss.mean().item() == pytest.approx(0.5 * a.mean().item() + 0.5 * b.mean().item())
    # equal micro-batches with weights 1/M: a plain concatenation
    feed.add(a, 0.5)
    feed.add(a + 1, 0.5)
    torch.testing.assert_close(feed.take(), torch.cat([a, a + 1]))
    # mixed 0-d and 1-d: the weighted mean, 0-d
    feed.add(a, 0.5)
    feed.add(torch.tensor(4.0), 0.5)
    assert feed.take().item() == pytest.approx(3.0)


def test_a_new_window_discards_pending_losses():
    feed = LossFeed()
    feed.add(torch.tensor(5.0), window=0)
    feed.add(torch.tensor(1.0), window=1)
    assert feed.take().item() == 1.0
    with pytest.raises(ValueError, match="0-d or 1-d"):
        feed.add(torch.ones(2, 2))


def test_bound_step_measures_the_fed_loss_like_step_loss():
    x, y = batch()
    runs = []
    for bound in (False, True):
        model = tiny_mlp()
        opt = KOALAPlusPlus(model.parameters(), lr=5e-4)
        feed = LossFeed()
        if bound:
            assert feed.bind(opt) is opt
            assert feed.bind(opt) is opt  # idempotent
        for _ in range(3):
            opt.zero_grad()
            losses = per_sample_loss(model, x, y)
            losses.mean().backward()
            if bound:
                feed.add(losses)
                opt.step()
            else:
                opt.step(loss=losses)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_bound_step_with_a_closure_measures_the_fed_loss():
    x, y = batch()
    reference, model = tiny_mlp(), tiny_mlp()
    ref_opt = KOALAPlusPlus(reference.parameters(), lr=5e-4)
    opt = KOALAPlusPlus(model.parameters(), lr=5e-4)
    feed = LossFeed()
    feed.bind(opt)
    for _ in range(3):
        ref_opt.zero_grad()
        losses = per_sample_loss(reference, x, y)
        losses.mean().backward()
        ref_opt.step(loss=losses)

        def closure():
            opt.zero_grad()
            losses = per_sample_loss(model, x, y)
            losses.mean().backward()
            feed.add(losses)
            return losses.mean() / 7  # e.g. Lightning's: the last micro-batch / accumulate_grad_batches

        returned = opt.step(closure)
        assert len(feed) == 0
    # the closure's value is returned, the fed loss is measured
    assert returned.item() == pytest.approx(per_sample_loss(reference, x, y).mean().item() / 7, rel=0.2)
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    # nothing fed: the closure's own value is measured, as without binding
    assert opt.step(lambda: per_sample_loss(model, x, y).mean()) is not None


def test_unbound_or_empty_feed_still_needs_the_loss():
    model = tiny_mlp()
    opt = KOALAPlusPlus(model.parameters(), lr=5e-4)
    feed = LossFeed()
    feed.bind(opt)
    per_sample_loss(model, *batch()).mean().backward()
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()
    LossFeed.unbind(opt)
    assert "step" not in opt.__dict__
    feed.add(torch.tensor(1.0))
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_binding_and_lr_schedulers_in_either_order(scheduler_first):
    model = tiny_mlp()
    opt = KOALAPlusPlus(model.parameters(), lr=4e-4)
    feed = LossFeed()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch warns if step looks overridden after the scheduler
        if scheduler_first:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            feed.bind(opt)
        else:
            feed.bind(opt)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for k in range(3):
            opt.zero_grad()
            losses = per_sample_loss(model, *batch(k))
            losses.mean().backward()
            feed.add(losses)
            opt.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert int(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 3
    LossFeed.unbind(opt)
    assert hasattr(opt.step, "_wrapped_by_lr_sched")  # the scheduler's wrapper is kept
    opt.zero_grad()
    per_sample_loss(model, *batch()).mean().backward()
    feed.add(torch.tensor(1.0))
    with pytest.raises(TypeError, match="needs the loss"):  # unbound: the feed is not read any more
        opt.step()
