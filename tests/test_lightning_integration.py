"""Lightning: step(closure) works as it is; KalmanLossCallback adds accumulation, per-sample losses, manual steps."""

import warnings

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("pytorch_lightning", reason="needs pytorch_lightning: install kalmanopt[test]")

from kalmanopt import KOALAM, KOALAV, KOALAPlusPlus  # noqa: E402
from kalmanopt.integrations.lightning import KalmanLossCallback, per_sample  # noqa: E402


@pytest.fixture(autouse=True)
def quiet_single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|litlogger).*")
        yield
    torch.set_num_threads(n)


def loader(n=256, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


class Spy(KOALAPlusPlus):
    """Records every loss the filter measures (whether it came in a closure or as loss=)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured = []

    def step(self, closure=None, *, loss=None):
        if closure is None or loss is not None:
            if loss is not None:
                self.measured.append(loss.detach().clone())
            return super().step(closure, loss=loss)

        def recording():
            out = closure()
            self.measured.append(out.detach().clone())
            return out

        return super().step(recording)


class Classifier(pl.LightningModule):
    def __init__(self, optimizer=Spy, per_sample_losses=False, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        # KOALA++'s default preset takes AdamW's lr; KOALA-V/M (and KOALA++'s paper preset) the fraction of the loss
        lr = 1e-3 if issubclass(optimizer, KOALAPlusPlus) and kwargs.get("preset") != "paper" else 0.5
        self.optimizer, self.kwargs, self.per_sample_losses = optimizer, {"lr": lr, **kwargs}, per_sample_losses
        self.micro = []  # every training micro-batch's mean loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        self.micro.append(losses.detach().mean())
        return per_sample(self, losses) if self.per_sample_losses else losses.mean()

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), **self.kwargs)


def fit(module, epochs=1, callbacks=(), **kwargs):
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs)
    trainer.fit(module, loader())
    return trainer


def leader_state(opt):
    return opt.state[opt.param_groups[0]["params"][0]]


@pytest.mark.parametrize("cls", [KOALAPlusPlus, KOALAV, KOALAM])
def test_step_with_lightnings_closure_works_as_it_is(cls):
    # KOALA++ with the paper's configuration, explicitly: the test is about Lightning's closure, not the default preset
    module = Classifier(optimizer=cls, **({"preset": "paper"} if cls is KOALAPlusPlus else {}))
    trainer = fit(module, epochs=5)
    opt = trainer.optimizers[0]
    assert type(opt) is cls
    assert int(leader_state(opt)["skipped_steps"]) == 0
    first, last = torch.stack(module.micro[:8]).mean(), torch.stack(module.micro[-8:]).mean()
    assert last < 0.6 * first


def test_without_the_callback_accumulation_measures_only_the_last_micro_batch():
    # what does not work as it is: Lightning's closure returns the last micro-batch's loss / accumulate_grad_batches
    module = Classifier()
    trainer = fit(module, accumulate_grad_batches=2)
    measured = trainer.optimizers[0].measured
    assert len(measured) == 4
    for k, loss in enumerate(measured):
        torch.testing.assert_close(loss, module.micro[2 * k + 1] / 2)


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_callback_measures_the_loss_of_the_accumulated_gradient(accumulate):
    # 8 micro-batches per epoch: with 3 the last window has 2, which Lightning still divides by 3
    module = Classifier()
    trainer = fit(module, epochs=2, callbacks=[KalmanLossCallback()], accumulate_grad_batches=accumulate)
    opt = trainer.optimizers[0]
    windows = ([accumulate] * (8 // accumulate) + ([8 % accumulate] if 8 % accumulate else [])) * 2
    assert len(opt.measured) == len(windows) == trainer.global_step
    start = 0
    for loss, size in zip(opt.measured, windows, strict=True):
        torch.testing.assert_close(loss, torch.stack(module.micro[start:start + size]).sum() / accumulate)
        start += size
    assert int(leader_state(opt)["step"]) == len(windows)
    assert "step" not in opt.__dict__  # unbound after the fit


class NormRecorder(Classifier):
    """Records the total gradient norm before Lightning clips (its hook runs right before the clipping)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norms = []

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).detach())


@pytest.mark.parametrize("clip", [1e-3, 1e3], ids=["clipping", "not_clipping"])
def test_callback_measures_the_clipped_loss(clip):
    # clipping by norm multiplies the gradient by c = min(1, clip / norm): the filter measures c times the loss
    module = NormRecorder()
    trainer = fit(module, callbacks=[KalmanLossCallback()], accumulate_grad_batches=2, gradient_clip_val=clip)
    opt = trainer.optimizers[0]
    assert len(opt.measured) == len(module.norms) == 4
    for k, (loss, norm) in enumerate(zip(opt.measured, module.norms, strict=True)):
        factor = torch.clamp(clip / (norm + 1e-6), max=1.0)
        assert (factor < 0.1) if clip < 1 else (factor == 1)
        torch.testing.assert_close(loss, (module.micro[2 * k] + module.micro[2 * k + 1]) / 2 * factor)


def test_callback_warns_that_value_clipping_cannot_be_matched():
    with pytest.warns(UserWarning, match="clipping by value"):
        fit(Classifier(), callbacks=[KalmanLossCallback()], gradient_clip_val=1e-3, gradient_clip_algorithm="value")


def test_callback_with_a_grad_scaler():
    # precision="16-mixed" on a GPU: Lightning runs the closure itself, then scaler.step(optimizer) with no loss;
    # a CPU GradScaler takes the same path here
    from pytorch_lightning.plugins.precision import MixedPrecision

    def scaled():
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))]

    with pytest.raises(TypeError, match="needs the loss"):
        fit(Classifier(optimizer=KOALAPlusPlus), plugins=scaled())
    module = Classifier()
    trainer = fit(module, callbacks=[KalmanLossCallback()], plugins=scaled(), accumulate_grad_batches=2)
    opt = trainer.optimizers[0]
    assert len(opt.measured) == 4
    for k, loss in enumerate(opt.measured):  # un-scaled
        torch.testing.assert_close(loss, (module.micro[2 * k] + module.micro[2 * k + 1]) / 2)
    assert int(leader_state(opt)["skipped_steps"]) == 0


def test_callback_hands_over_per_sample_losses():
    module = Classifier(per_sample_losses=True, r_stat="mean_variance")
    trainer = fit(module, callbacks=[KalmanLossCallback()], accumulate_grad_batches=2)
    opt = trainer.optimizers[0]
    assert len(opt.measured) == 4
    for k, loss in enumerate(opt.measured):
        assert loss.shape == (64,)  # both micro-batches' samples
        torch.testing.assert_close(loss.mean(), (module.micro[2 * k] + module.micro[2 * k + 1]) / 2)
    assert int(leader_state(opt)["skipped_steps"]) == 0


class Manual(Classifier):
    def __init__(self, explicit_loss, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.explicit_loss = explicit_loss

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        self.micro.append(losses.detach().mean())
        self.manual_backward(losses.mean())
        if self.explicit_loss:
            opt.step(loss=losses)
        else:
            opt.step()


@pytest.mark.parametrize("explicit_loss", [True, False], ids=["step_loss", "step"])
def test_manual_optimization_with_the_callback(explicit_loss):
    module = Manual(explicit_loss)
    trainer = fit(module, callbacks=[KalmanLossCallback()])
    opt = trainer.optimizers[0]
    assert len(opt.measured) == 8
    for loss, micro in zip(opt.measured, module.micro, strict=True):
        torch.testing.assert_close(loss.mean(), micro)
        assert loss.shape == ((32,) if explicit_loss else ())


def test_manual_step_with_loss_needs_the_callback():
    # LightningOptimizer.step always passes a closure, which clashes with loss=
    with pytest.raises(TypeError, match="not both"):
        fit(Manual(True))
