"""kalmanopt.integrations.hf: the Hugging Face Trainer hands the (accumulated) loss to a KOALA optimizer."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers: install kalmanopt[test]")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate: install kalmanopt[test]")

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from kalmanopt import KOALAV, KOALAPlusPlus  # noqa: E402
from kalmanopt.integrations.hf import KalmanTrainer, per_sample_cross_entropy  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # two shared cores: one intra-op thread is much faster for a model this small
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(n)


def tiny_bert(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


def separable(n=64, length=8, seed=0):
    """Class 0 sequences use tokens 2..24, class 1 tokens 25..49."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    low = torch.randint(2, 25, (n, length), generator=g)
    high = torch.randint(25, 50, (n, length), generator=g)
    ids = torch.where(y[:, None] == 0, low, high)
    mask = torch.ones(length, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": y[i]} for i in range(n)]


def arguments(tmp_path, *, batch=16, accumulate=1, epochs=1, lr=1e-3, **kw):
    kw = {"max_grad_norm": 0.0, "lr_scheduler_type": "constant", **kw}
    return TrainingArguments(str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                             num_train_epochs=epochs, learning_rate=lr, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, logging_steps=8, seed=0, **kw)


class Spy(KOALAPlusPlus):
    """Records every loss the filter measures."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured = []
        self.first_grad = None

    def step(self, closure=None, *, loss=None):
        self.measured.append(None if loss is None else loss.detach().clone())
        if self.first_grad is None:
            self.first_grad = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"]}
        return super().step(closure, loss=loss)


class RecordingTrainer(KalmanTrainer):
    """Records the loss of every training micro-batch as compute_loss returns it (before any GA scaling)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro = []
        self.micro_inputs = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.micro.append((out[0] if return_outputs else out).detach().clone())
            self.micro_inputs.append({k: v.clone() for k, v in inputs.items() if k != "num_items_in_batch"})
        return out


def inner(trainer):
    return trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours


def test_trainer_trains_bert_with_koala_pp(tmp_path):
    # lr 1e-3: the library's default, AdamW's (from scratch)
    trainer = KalmanTrainer(model=tiny_bert(), args=arguments(tmp_path, epochs=20, lr=1e-3), train_dataset=separable())
    trainer.train()
    opt = inner(trainer)
    assert type(opt) is KOALAPlusPlus and opt.param_groups[0]["lr"] == 1e-3
    # the Trainer's two groups: weight decay from TrainingArguments, none on biases and LayerNorm
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["weight_decay"] == 0.0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.25 * losses[0], losses
    # the filter measured every one of the 80 steps (4 per epoch) and skipped none
    leader = opt.state[opt.param_groups[0]["params"][0]]
    assert int(leader["step"]) == 80 and int(leader["skipped_steps"]) == 0


def micro_gradient(model, inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("trainer_averages", [False, True], ids=["trainer_sums", "trainer_averages"])
@pytest.mark.parametrize("accumulate", [2, 3])
def test_gradient_accumulation_measures_the_loss_of_the_accumulated_gradient(tmp_path, accumulate, trainer_averages):
    # 64 samples in micro-batches of 8: 8 per epoch, so with 3 the last window of each epoch has 2.
    # BertForSequenceClassification.forward takes **kwargs, so Trainer 5.x passes num_items_in_batch and assumes the
    # model divided its loss by it; BERT's classification loss ignores it, so by default the Trainer accumulates the
    # *sum* of the micro-batch gradients. model.accepts_loss_kwargs = False makes it average them.
    model = tiny_bert(dropout=0.0)
    if trainer_averages:
        model.accepts_loss_kwargs = False
    trainer = RecordingTrainer(model=model, train_dataset=separable(), kalman_optimizer=Spy,
                               args=arguments(tmp_path, batch=8, accumulate=accumulate, epochs=2))
    trainer.train()
    windows = [accumulate] * (8 // accumulate) + ([8 % accumulate] if 8 % accumulate else [])
    windows = windows * 2
    opt = inner(trainer)
    assert len(opt.measured) == len(windows) == trainer.state.global_step
    start = 0
    for loss, size in zip(opt.measured, windows, strict=True):
        assert loss.dim() == 0
        micro = torch.stack(trainer.micro[start:start + size])
        torch.testing.assert_close(loss, micro.mean() if trainer_averages else micro.sum())
        start += size
    assert start == len(trainer.micro)

    # and the gradient the filter got at the first step is the gradient of the loss it measured
    model = tiny_bert(dropout=0.0)
    losses, grads = zip(*(micro_gradient(model, inputs) for inputs in trainer.micro_inputs[:accumulate]), strict=True)
    scale = 1.0 / accumulate if trainer_averages else 1.0
    torch.testing.assert_close(opt.measured[0], torch.stack(losses).sum() * scale)
    for name, p in trainer.model.named_parameters():
        expected = torch.stack([g[name] for g in grads]).sum(0) * scale
        torch.testing.assert_close(opt.first_grad[id(p)], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulated_micro_batches_train_like_one_batch(tmp_path):
    runs = []
    for batch, accumulate in ((16, 1), (8, 2)):
        model = tiny_bert(dropout=0.0)
        model.accepts_loss_kwargs = False  # BERT's classification loss ignores num_items_in_batch (see above)
        trainer = KalmanTrainer(model=model, train_dataset=separable(),
                                args=arguments(tmp_path, batch=batch, accumulate=accumulate, epochs=2))
        trainer.train()
        runs.append([p.detach().clone() for p in trainer.model.parameters()])
    moved = [p.detach() for p in tiny_bert(dropout=0.0).parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(runs[0], moved, strict=True))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grad_scaler_path(tmp_path):
    # fp16 on a GPU: accelerate's AcceleratedOptimizer calls GradScaler.step(optimizer), which hands the scale to our
    # optimizer (it un-scales the gradients itself); a CPU GradScaler takes the same path here
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        model = tiny_bert(dropout=0.0)
        model.accepts_loss_kwargs = False
        trainer = RecordingTrainer(model=model, train_dataset=separable(), kalman_optimizer=Spy,
                                   args=arguments(tmp_path, batch=8, accumulate=2, epochs=1))
        trainer.accelerator.scaler = scaler
        trainer.train()
        assert trainer.optimizer.scaler is scaler
        opt = inner(trainer)
        for k, loss in enumerate(opt.measured):
            torch.testing.assert_close(loss, torch.stack(trainer.micro[2 * k:2 * k + 2]).mean())
        assert int(opt.state[opt.param_groups[0]["params"][0]]["skipped_steps"]) == 0
        runs.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b)


def test_per_sample_losses_reach_the_filter(tmp_path):
    trainer = RecordingTrainer(model=tiny_bert(), args=arguments(tmp_path, batch=8, accumulate=2, epochs=1),
                               train_dataset=separable(), eval_dataset=separable(16, seed=1), kalman_optimizer=Spy,
                               kalman_kwargs={"r_stat": "mean_variance"}, per_sample_loss=per_sample_cross_entropy)
    trainer.train()
    measured = inner(trainer).measured
    assert len(measured) == 4
    for k, loss in enumerate(measured):
        assert loss.shape == (16,)  # both micro-batches' samples
        torch.testing.assert_close(loss.mean(), torch.stack(trainer.micro[2 * k:2 * k + 2]).mean())
    opt = inner(trainer)
    assert int(opt.state[opt.param_groups[0]["params"][0]]["skipped_steps"]) == 0
    # evaluation goes through the same compute_loss, without feeding the optimizer
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert len(inner(trainer).measured) == 4


def test_per_sample_cross_entropy_matches_the_model_loss():
    model = tiny_bert(dropout=0.0)
    batch = separable(8)
    inputs = {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
    out = model(**inputs)
    per = per_sample_cross_entropy(out, inputs["labels"])
    assert per.shape == (8,)
    torch.testing.assert_close(per.mean(), out.loss)
    # token level with ignored positions, and the causal shift
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 3, 4], [0, -100, -100, 6, 5]])
    assert per_sample_cross_entropy({"logits": logits}, labels).shape == (7,)
    shifted = per_sample_cross_entropy((logits,), labels, shift=True)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(shifted.mean(), expected)


def test_optimizer_and_scheduler_passed_in(tmp_path):
    model = tiny_bert()
    opt = KOALAV(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "optimizer.step() has been overridden"
        trainer = KalmanTrainer(model=model, args=arguments(tmp_path, epochs=1), train_dataset=separable(),
                                optimizers=(opt, sched))
        trainer.train()
    assert inner(trainer) is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)  # 4 steps of StepLR(2, 0.5)
    assert int(opt.state[opt.param_groups[0]["params"][0]]["skipped_steps"]) == 0
    # the loss feed is empty after the run: a bare step() still asks for the loss
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()


def test_non_kalman_optimizer_is_left_alone(tmp_path):
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = KalmanTrainer(model=model, args=arguments(tmp_path, epochs=1), train_dataset=separable(),
                            optimizers=(opt, None))
    trainer.train()
    assert "step" not in opt.__dict__ and trainer.state.global_step == 4


def test_configuration_errors_and_warnings(tmp_path):
    model, data = tiny_bert(), separable()
    with pytest.raises(ValueError, match="learning_rate"):
        KalmanTrainer(model=model, args=arguments(tmp_path), train_dataset=data, kalman_kwargs={"lr": 0.5})
    with pytest.raises(ValueError, match="not both"):
        KalmanTrainer(model=model, args=arguments(tmp_path), train_dataset=data, kalman_kwargs={"q": 0.1},
                      optimizers=(KOALAPlusPlus(model.parameters()), None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # KOALA++ takes the Trainer's defaults as they are: AdamW's lr, clipping
        KalmanTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                      train_dataset=data)
    with pytest.warns(UserWarning, match="AdamW learning rate"):  # KOALA-V's lr is still the paper's
        KalmanTrainer(model=model, args=arguments(tmp_path, lr=5e-5), train_dataset=data, kalman_optimizer=KOALAV)


class ClipRecordingTrainer(RecordingTrainer):
    """Records the total gradient norm the Trainer's clipping saw before it clipped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norms = []

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        self.norms.append(norm.detach().clone())
        return norm


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3], ids=["clipping", "not_clipping"])
def test_gradient_clipping_scales_the_measured_loss_like_the_gradient(tmp_path, max_grad_norm):
    # Clipping multiplies the gradient by c = min(1, max_norm / norm): the filter must measure c times the loss
    # (the loss whose gradient it receives), and exactly the loss where clipping does not bind.
    model = tiny_bert(dropout=0.0)
    model.accepts_loss_kwargs = False
    trainer = ClipRecordingTrainer(model=model, train_dataset=separable(), kalman_optimizer=Spy,
                                   args=arguments(tmp_path, batch=8, accumulate=2, max_grad_norm=max_grad_norm))
    trainer.train()
    opt = inner(trainer)
    assert len(opt.measured) == len(trainer.norms) == 4
    for k, (loss, norm) in enumerate(zip(opt.measured, trainer.norms, strict=True)):
        factor = torch.clamp(max_grad_norm / (norm.float() + 1e-6), max=1.0)
        assert (factor < 0.1) if max_grad_norm < 1 else (factor == 1)
        expected = torch.stack(trainer.micro[2 * k:2 * k + 2]).mean() * factor
        torch.testing.assert_close(loss, expected.to(loss.dtype))

