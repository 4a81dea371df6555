"""Data parallelism (two gloo processes on CPU) and mixed precision (GradScaler)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from kalmanopt import KOALAPlusPlus

from conftest import OPTIMIZERS, assert_unchanged, snapshot, tiny_mlp

# KOALA++ with lr_adaptation: its cosine sums the per-tensor partial dot products over the shards (a large rate, and a
# floor far below 1, so that the multiplier moves either way within the few steps and a shard-local cosine would show)
# KOALA++ with length_bound: ||gain_prev||^2 is summed over the shards too (an lr at which the bound binds)
SHARDED = {**OPTIMIZERS, "koala_pp_lra": (KOALAPlusPlus, {"lr": 5e-3, "weight_decay": 1e-2, "lr_adaptation": 0.3,
                                                          "lr_scale_min": 1e-3}),
           "koala_pp_length": (KOALAPlusPlus, {"lr": 5e-2, "length_bound": 1.0, "momentum": 0.0,
                                               "precondition": False})}

STEPS, BATCH = 4, 16


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def _train(model, opt, batches, *, reduce, world=1):
    """``reduce``: hand over 0-d means; with ``world`` > 1 in one process, one mean per would-be rank."""
    for x, y in batches:
        opt.zero_grad()
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step(loss=losses.view(world, -1).mean(1).squeeze(0) if reduce else losses)


def _leave():
    """Exit a finished worker without interpreter shutdown: gloo's worker threads outlive destroy_process_group and
    may still release a collective's tensors while the interpreter shuts down, which aborts the process (exit code
    -6, "terminate called without an active exception") after the work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank, world, init_file, out_dir, name, reduce):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cls, kwargs = OPTIMIZERS[name]
        model = DDP(tiny_mlp())
        opt = cls(model.parameters(), **kwargs)
        half = BATCH // world
        local = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in _batches()]
        _train(model, opt, local, reduce=reduce)
        torch.save([p.detach() for p in model.module.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave()


@pytest.mark.parametrize("name,reduce", [("koala_pp", False), ("koala_pp", True), ("koala_v", True),
                                         ("koala_m_online_qw", False)],
                         ids=["koala_pp-per_sample", "koala_pp-batch_mean", "koala_v-batch_mean", "koala_m-per_sample"])
def test_ddp_matches_one_process_on_the_whole_batch(tmp_path, name, reduce):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), name, reduce), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for a, b in zip(*ranks, strict=True):
        assert torch.equal(a, b), "ranks diverged"

    cls, kwargs = OPTIMIZERS[name]
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    # With 0-d losses each rank's mean counts as one sample of the measurement: a single process reproduces
    # that by handing over the vector of the two half-batch means.
    _train(model, opt, _batches(), reduce=reduce, world=world)
    for a, b in zip(ranks[0], model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)


def _scaled_run(scale, inject_inf_at=None):
    model = tiny_mlp(dtype=torch.float32)
    opt = KOALAPlusPlus(model.parameters(), lr=5e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale is not None)
    scales = []
    for k, (x, y) in enumerate(_batches()):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            losses = torch.nn.functional.cross_entropy(model(x.float()), y, reduction="none")
        scaler.scale(losses.mean()).backward()
        if k == inject_inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
            before = snapshot(opt)
        scaler.step(opt, loss=losses.detach())
        if k == inject_inf_at:
            assert_unchanged(opt, before)
        scaler.update()
        scales.append(scaler.get_scale() if scale is not None else None)
    return model, opt, scales


def test_grad_scaler_unscales_exactly():
    plain, _, _ = _scaled_run(None)
    scaled, _, _ = _scaled_run(2.0**10)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grad_scaler_overflow_skips_and_counts():
    _, opt, scales = _scaled_run(2.0**10, inject_inf_at=1)
    assert int(opt.state[next(iter(opt.param_groups[0]["params"]))]["skipped_steps"]) == 1
    assert scales[1] == scales[0] / 2  # the scaler saw the overflow too


def test_bfloat16_autocast_training_with_scaler():
    model = tiny_mlp(dtype=torch.float32)
    opt = KOALAPlusPlus(model.parameters(), lr=5e-4)
    scaler = torch.amp.GradScaler("cpu")
    first = last = None
    x, y = _batches()[0]
    for _ in range(10):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = torch.nn.functional.cross_entropy(model(x.float()), y, reduction="none").float()
        scaler.scale(losses.mean()).backward()
        scaler.step(opt, loss=losses.detach())
        scaler.update()
        first = losses.mean().item() if first is None else first
        last = losses.mean().item()
    assert last < first


def _fsdp_worker(rank, world, init_file, out_dir, name):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        cls, kwargs = SHARDED[name]
        model = tiny_mlp()  # Linear(5, 7), Linear(7, 3): shards of uneven size, the last bias split 2 + 1
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        opt = cls(model.parameters(), **kwargs)
        half = BATCH // world
        local = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in _batches()]
        _train(model, opt, local, reduce=False)
        full = [p.full_tensor().detach() for p in model.parameters()]
        if rank == 0:
            torch.save(full, os.path.join(out_dir, "fsdp.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave()


@pytest.mark.parametrize("name", ["koala_pp_wd", "koala_v", "koala_m_online_qw", "koala_pp_lra", "koala_pp_length"])
def test_fsdp2_matches_the_unsharded_run(tmp_path, name):
    world = 2
    mp.spawn(_fsdp_worker, args=(world, str(tmp_path / "init"), str(tmp_path), name), nprocs=world, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    cls, kwargs = SHARDED[name]
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    _train(model, opt, _batches(), reduce=False)
    for a, b in zip(sharded, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
