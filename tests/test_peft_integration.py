"""PEFT integration: LoRA/DoRA on a tiny BERT built from a config (no download) and on a CNN."""

import pytest
import torch

pytest.importorskip("peft", reason="needs peft: install kalmanopt[test]")
transformers = pytest.importorskip("transformers", reason="needs transformers: install kalmanopt[test]")

from peft import LoraConfig  # noqa: E402

from kalmanopt import LoKO  # noqa: E402
from kalmanopt.integrations.peft import adapter_groups, param_role, wrap  # noqa: E402
from kalmanopt.online import run_online  # noqa: E402


class TinyBertClassifier(torch.nn.Module):
    def __init__(self, classes=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        self.encoder = transformers.BertModel(cfg)
        self.head = torch.nn.Linear(16, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0])


def separable_text_stream(n=240, seed=0):
    """Class 0 sentences use token ids 10-19, class 1 ids 30-39: separable by vocabulary."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    items = []
    for y in labels.tolist():
        ids = torch.randint(10, 20, (1, 8), generator=g) + 20 * y
        ids[0, 0] = 1  # a [CLS]-like first token shared by both classes
        items.append({"input_ids": ids, "attention_mask": torch.ones(1, 8, dtype=torch.long)})
    return items, labels


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_wrapped_tiny_bert_learns_a_separable_stream(use_dora):
    torch.set_num_threads(1)
    model = TinyBertClassifier()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["head"],
                     use_dora=use_dora)
    # random tiny-BERT LoRA Jacobians are minute next to the head's: a per-group automatic prior copes with that
    peft_model, opt = wrap(model, cfg, p0="auto", auto_scope="group")
    assert isinstance(opt, LoKO)
    roles = {g["role"] for g in opt.param_groups}
    assert roles == ({"lora_A", "lora_B", "other"} | ({"magnitude"} if use_dora else set()))
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    items, labels = separable_text_stream()
    result = run_online(peft_model, opt, items, labels, progress=False)
    assert result.skipped_steps == 0
    assert sum(result.correct[-80:]) / 80 >= 0.9
    for n, p in peft_model.named_parameters():  # only adapters (and the head copy) moved
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    lora_b = [p for n, p in peft_model.named_parameters() if param_role(n) == "lora_B"]
    assert any(p.abs().sum() > 0 for p in lora_b)


def test_cnn_lora_on_conv_and_linear_and_per_role_p0():
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 3))
    model, opt = wrap(cnn, LoraConfig(r=2, target_modules=["0", "3"]), p0_by_role={"lora_A": 0.01, "lora_B": 0.2})
    p0 = {g["role"]: g["p0"] for g in opt.param_groups}
    assert p0 == {"lora_A": 0.01, "lora_B": 0.2}
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    out = opt.step(lambda: model(x), y)
    assert out.shape == (2, 3)


def test_baseline_optimizer_through_the_same_wrap():
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    model, opt = wrap(cnn, LoraConfig(r=2, target_modules=["1"]), optimizer=lambda g: torch.optim.AdamW(g, lr=1e-2))
    assert isinstance(opt, torch.optim.AdamW)
    result = run_online(model, opt, torch.randn(20, 1, 4, 4), torch.randint(0, 3, (20,)), progress=False)
    assert len(result.correct) == 20
    with pytest.raises(ValueError, match="p0_by_role"):
        wrap(torch.nn.Linear(3, 2), None, optimizer=lambda g: torch.optim.SGD(g, lr=0.1), p0_by_role={"other": 1.0})


def test_plain_subset_without_peft():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    same, opt = wrap(model, None)
    assert same is model
    assert [g["role"] for g in adapter_groups(model)] == ["other"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 10


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="optimizer"):
        wrap(torch.nn.Linear(3, 2), None, optimizer="sgd")
