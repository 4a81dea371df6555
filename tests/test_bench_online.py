"""``kalmanopt bench online``: the streams it builds (fast ones only; the MiniLM and MNIST streams need caches)."""

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("sklearn")

from kalmanopt.bench import online  # noqa: E402


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KALMANOPT_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_digits_shift_stream(cache):
    task = online.load_task("digits_shift")
    assert list((cache / "models").glob("online_mlp_digits_half_a_*.pt"))
    # half B (899 digits) split into disjoint tuning and evaluation pools that cover it
    assert len(task.labels) == 899 and len(task.tune_pool) == 224 and len(task.eval_pool) == 675
    assert sorted(task.tune_pool + task.eval_pool) == list(range(899))
    weights = online.pretrained_digits_mlp()
    xa, ya, xb, yb = online.digits_halves()
    assert len(ya) == 898 and torch.equal(yb, task.labels) and torch.equal(xb, task.inputs)
    model = task.make_base(0)
    with torch.no_grad():
        acc_a = (model(xa).argmax(1) == ya).float().mean().item()
        acc_b = (model(xb).argmax(1) == yb).float().mean().item()
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(online.DIGITS_PERMUTATION_SEED))
        unshifted = torch.empty_like(xb)
        unshifted[:, perm] = xb
        acc_unshifted = (model(unshifted).argmax(1) == yb).float().mean().item()
    # learnt on A, generalises to B without the shift, near chance (10 %) with it: the stream has to be learnt
    assert acc_a > 0.98 and acc_unshifted > 0.93 and acc_b < 0.15
    assert acc_b == pytest.approx(float(weights["_shifted_half_b_accuracy"]))
    assert not any(p.requires_grad for p in model.parameters())
    # LoRA r=4 on both layers, nothing else trainable
    peft_model, opt = online.build(task, "LoRA", "AdamW", 1e-2, 0)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(names) == 4 and all("lora_" in n for n in names)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 4 * (64 + 64) + 4 * (64 + 10)
