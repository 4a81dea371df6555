"""kalmanopt.integrations.hf under DDP: two CPU processes (gloo) launched by torch.distributed.run."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers: install kalmanopt[test]")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate: install kalmanopt[test]")


DDP_WORKER = textwrap.dedent("""
    import json, os, sys, warnings
    from pathlib import Path
    import torch
    import torch.distributed as dist
    warnings.filterwarnings("ignore")
    sys.path.insert(0, sys.argv[1])
    from test_hf_integration import RecordingTrainer, Spy, arguments, separable, tiny_bert, transformers
    from kalmanopt.integrations.hf import per_sample_cross_entropy
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    out = Path(sys.argv[2])
    model = tiny_bert(dropout=0.0)
    trainer = RecordingTrainer(model=model, args=arguments(out, batch=8, accumulate=2, epochs=1, ddp_backend="gloo"),
                               train_dataset=separable(), kalman_optimizer=Spy,
                               per_sample_loss=per_sample_cross_entropy if sys.argv[3] == "per_sample" else None)
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    start = torch.cat([p.detach().flatten() for p in tiny_bert(dropout=0.0).parameters()])
    result = {"world": dist.get_world_size(), "steps": len(trainer.optimizer.optimizer.measured),
              "replica_diff": (gathered[0] - gathered[1]).abs().max().item(),
              "moved": (flat - start).abs().max().item()}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()  # a clean shutdown: no rank closes its connections while a peer is still in a collective
    dist.destroy_process_group()
    # gloo's worker threads outlive destroy_process_group and may release a collective's tensors during interpreter
    # shutdown, which aborts the process: leave without it (as examples/distributed.py does)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_replicas_take_identical_steps(tmp_path):
    # two CPU processes (gloo): each feeds its local loss, the optimizer sums the statistics over the processes
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(Path(__file__).parent), str(tmp_path), "per_sample"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world"] == 2 and result["steps"] == 2  # 32 samples per process, 16 per step
        assert result["replica_diff"] == 0.0 and result["moved"] > 0
