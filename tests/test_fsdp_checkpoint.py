"""Distributed checkpointing of FSDP2 models: ``torch.distributed.checkpoint`` saves and restores the optimizer state.

The standard recipe (``get_state_dict`` / ``dcp.save``, then in fresh processes ``get_state_dict`` / ``dcp.load`` /
``set_state_dict``) must reproduce the uninterrupted run bit for bit, with two gloo processes and shards of uneven
size. Per-element state of a sharded parameter is a DTensor laid out like the parameter, so the checkpoint holds it
whole (it is read back unsharded in one process); scalar state is the same on every rank and saved once.
"""

import io
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

from conftest import OPTIMIZERS, assert_unchanged, batch, per_sample_loss, snapshot, tiny_mlp, train

WORLD, BEFORE, AFTER, BATCH = 2, 3, 3, 16
NAMES = ["koala_pp_wd", "koala_v", "koala_m_online_qw"]
PER_ELEMENT = {"koala_pp_wd": {"gain", "prev_grad", "exp_avg_sq", "momentum_buffer"}, "koala_v": set(),
               "koala_m_online_qw": {"momentum", "weight_ema"}}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    mp.spawn(fn, args=(f"tcp://127.0.0.1:{_free_port()}", *args), nprocs=WORLD, join=True)


def _leave():
    """Exit a finished worker without interpreter shutdown: gloo's worker threads outlive destroy_process_group and
    may release a collective's tensors while the interpreter shuts down, which aborts the process (as in
    test_distributed.py)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _sharded(name, seed=0):
    from torch.distributed.fsdp import fully_shard

    model = tiny_mlp(seed=seed)  # Linear(5, 7), Linear(7, 3): shards of uneven size (4 + 3 rows, 2 + 1 rows)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    cls, kwargs = OPTIMIZERS[name]
    return model, cls(model.parameters(), **kwargs)


def _train(model, opt, rank, steps):
    """Each rank trains on its half of the global batches ``steps`` (per-sample losses)."""
    half = BATCH // WORLD
    for k in steps:
        x, y = batch(k, n=BATCH)
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        opt.zero_grad()
        losses = per_sample_loss(model, x, y)
        losses.mean().backward()
        opt.step(loss=losses)


def _full_params(model):
    return [p.full_tensor().detach() for p in model.parameters()]


def _full_state(opt):
    """Every state entry by (parameter index, key), DTensors gathered whole; collective, so every rank calls it."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            if isinstance(value, dist.tensor.DTensor):
                value = value.full_tensor()
            out[i, key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _check_layout(model, opt, name):
    """Per-element state is a DTensor like its parameter; everything else is a plain tensor or a Python scalar."""
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key in PER_ELEMENT[name]:
                assert isinstance(value, dist.tensor.DTensor), key
                assert value.shape == p.shape and value.placements == p.placements, key
                assert value.to_local().shape == p.to_local().shape, key
            else:
                assert not isinstance(value, dist.tensor.DTensor), key


def _save_worker(rank, init, out, name):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model, opt = _sharded(name)
        _train(model, opt, rank, range(BEFORE))
        _check_layout(model, opt, name)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out, "dcp"))
        # A DCP-free checkpoint of the same moment: each rank saves its own state dict.
        torch.save(opt.state_dict(), os.path.join(out, f"optim_rank{rank}.pt"))
        state = _full_state(opt)
        _train(model, opt, rank, range(BEFORE, BEFORE + AFTER))
        straight = _full_params(model)
        if rank == 0:
            torch.save(state, os.path.join(out, "state.pt"))
            torch.save(straight, os.path.join(out, "straight.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave()


def _resume_worker(rank, init, out, name):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        results = {}
        # 1. The standard DCP recipe on a fresh model (another init) and a fresh optimizer (no state yet).
        model, opt = _sharded(name, seed=123)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out, "dcp"))
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        _check_layout(model, opt, name)
        results["state"] = _full_state(opt)
        model_sd = {key: value.detach().clone() for key, value in model_sd.items()}  # the loaded weights
        _train(model, opt, rank, range(BEFORE, BEFORE + AFTER))
        results["dcp"] = _full_params(model)

        # 2. The per-rank torch.save checkpoint, read with weights_only=True, into a fresh optimizer.
        model, opt = _sharded(name, seed=123)
        set_model_state_dict(model, model_sd)
        saved = torch.load(os.path.join(out, f"optim_rank{rank}.pt"), weights_only=True)
        opt.load_state_dict(saved)
        _check_layout(model, opt, name)
        _train(model, opt, rank, range(BEFORE, BEFORE + AFTER))
        results["per_rank"] = _full_params(model)

        # 3. The same, with per-element state as plain local shards (how it was held before it was sharded).
        model, opt = _sharded(name, seed=123)
        set_model_state_dict(model, model_sd)
        saved = torch.load(os.path.join(out, f"optim_rank{rank}.pt"), weights_only=True)
        for values in saved["state"].values():
            for key, value in values.items():
                if isinstance(value, dist.tensor.DTensor):
                    values[key] = value.to_local().clone()
        opt.load_state_dict(saved)
        _check_layout(model, opt, name)
        _train(model, opt, rank, range(BEFORE, BEFORE + AFTER))
        results["local_shards"] = _full_params(model)
        if rank == 0:
            torch.save(results, os.path.join(out, "resumed.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave()


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_dcp_resume_is_bit_exact(tmp_path, name):
    """Train 3 steps, checkpoint, train 3 more == fresh processes that load the checkpoint and train 3 steps."""
    _spawn(_save_worker, str(tmp_path), name)
    _spawn(_resume_worker, str(tmp_path), name)
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    _assert_same_state(torch.load(tmp_path / "state.pt", weights_only=True), resumed["state"])
    for how in ("dcp", "per_rank", "local_shards"):
        for a, b in zip(straight, resumed[how], strict=True):
            assert torch.equal(a, b), how

    # The checkpoint holds whole tensors: one process without FSDP reads it into an unsharded model and optimizer.
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    cls, kwargs = OPTIMIZERS[name]
    model = tiny_mlp(seed=123)
    opt = cls(model.parameters(), **kwargs)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    params = list(model.parameters())
    for (i, key), value in state.items():
        loaded = opt.state[params[i]][key]
        if isinstance(value, torch.Tensor):
            assert loaded.dtype == value.dtype and torch.equal(loaded, value), (i, key)
        else:
            assert loaded == value, (i, key)
    # ... and training on from it is the unsharded continuation of the sharded run (up to summation order).
    for k in range(BEFORE, BEFORE + AFTER):
        x, y = batch(k, n=BATCH)
        opt.zero_grad()
        losses = per_sample_loss(model, x, y)
        losses.mean().backward()
        opt.step(loss=losses)
    for a, b in zip(straight, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- one process, no FSDP


@pytest.mark.parametrize("name", NAMES)
def test_get_state_dict_on_a_fresh_optimizer_creates_its_state_and_moves_nothing(name):
    """DCP's get_state_dict creates missing state by calling step() with zero gradients and lr 0."""
    cls, kwargs = OPTIMIZERS[name]
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    _, optim_sd = get_state_dict(model, opt)
    assert set(optim_sd["state"]) == {name for name, _ in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert opt.param_groups[0]["lr"] == kwargs["lr"]
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    # Training from the created state is training from no state.
    train(model, opt, 3)
    reference = tiny_mlp()
    train(reference, cls(reference.parameters(), **kwargs), 3)
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_without_a_loss_still_raises():
    cls, kwargs = OPTIMIZERS["koala_pp"]
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()  # no gradients
    x, y = batch(0)
    per_sample_loss(model, x, y).mean().backward()
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()  # gradients, lr 0.5
    opt.param_groups[0]["lr"] = 0.0
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()  # lr 0, but the gradients are not zero
    assert not opt.state
    train(model, opt, 1)
    before = snapshot(opt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()  # zero gradients and lr 0, but the state exists: not a probe
    assert_unchanged(opt, before)


def test_plain_state_dict_loads_weights_only_and_resumes(optimizer_spec):
    """Without torch.distributed the state dict holds plain tensors and numbers: torch.load(weights_only=True)."""
    cls, kwargs = optimizer_spec
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    get_state_dict(model, opt)  # the probe path, then training
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    for values in checkpoint["opt"]["state"].values():
        for v in values.values():
            assert type(v) in (torch.Tensor, bool, int, float)
    train(model, opt, 2, seed=3)
    resumed_model = tiny_mlp(seed=123)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = cls(resumed_model.parameters(), **kwargs)
    resumed.load_state_dict(checkpoint["opt"])
    train(resumed_model, resumed, 2, seed=3)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
