"""Data-parallel training with KOALA++ under torchrun: DDP (default) or FSDP2 (--fsdp), CPU (gloo) or CUDA (nccl).

    torchrun --standalone --nproc_per_node=2 examples/distributed.py            # DDP
    torchrun --standalone --nproc_per_node=2 examples/distributed.py --fsdp     # FSDP2 (fully_shard)

(``--standalone`` runs the rendezvous on a free local port, so several jobs on one machine do not collide.)

Every rank feeds its own per-sample losses; the optimizer sums the loss statistics over the ranks, so all ranks
take the step one process would take on the global batch.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kalmanopt import KOALAPlusPlus


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = KOALAPlusPlus(model.parameters(), lr=1e-3)  # AdamW's lr

    data = torch.Generator().manual_seed(1 + rank)  # each rank draws its own shard of the data
    teacher = torch.Generator().manual_seed(123)
    w = torch.randn(20, 4, generator=teacher)
    for step in range(args.steps):
        x = torch.randn(32, 20, generator=data)
        y = (x @ w).argmax(1)
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step(loss=losses)
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {losses.mean().item():.4f}")
    if rank == 0:
        print(f"done: {world} ranks, {'FSDP2' if args.fsdp else 'DDP'}, final loss {losses.mean().item():.4f}",
              flush=True)
    dist.barrier()  # no rank tears down its connections while a peer is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo (CPU) keeps its worker threads after destroy_process_group, and a worker may still be releasing the last
    # collective's tensors when the interpreter shuts down; taking the GIL then aborts the process ("terminate
    # called without an active exception", exit code -6) although training finished. Leave without interpreter
    # shutdown once everything is flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
