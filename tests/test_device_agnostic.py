"""Every optimizer on a CUDA device, tested on this CPU-only machine: no tensor left on the CPU, no host
synchronisation where the step promises none.

**How.** Inside :class:`~torch._subclasses.fake_tensor.FakeTensorMode`, tensors made with ``device="cuda"`` are fake
CUDA tensors (metadata only, nothing is computed), and the mode checks every operator's devices as CUDA does: a CPU
tensor mixed with a CUDA one raises ``FakeTensorDeviceMismatchError`` (a 0-d CPU tensor is allowed, as on CUDA).
:class:`HostTraffic`, a dispatch mode under it, records what would synchronise the host with the device:

* a **host read**, ``aten._local_scalar_dense`` of a device tensor (``.item()``, ``bool(t)``, ``float(t)``,
  ``int(t)``): an error, or where an algorithm reads values by design (LoKO, FullKalman), a stand-in value
  (True, 0, 1.0) so that the step goes on and the rest of it is checked;
* a **blocking copy** between the host and the device (``.to(device)``, ``copy_``): PyTorch waits for the device's
  queue before it returns. A copy from pinned memory with ``non_blocking=True`` does not wait and is allowed.

Two gaps of a CPU-only PyTorch are bridged, neither of them in the code under test:

* a few Python bindings open a CUDA device guard before they dispatch (indexing, ``copy_``, ``~``, ``pin_memory``,
  ``torch.tensor(..., device=...)``), which a build without CUDA cannot open even for a fake tensor;
  :class:`_CudaBindings` routes them to the same aten operators (a pinned copy is an ordinary fake tensor here);
* autograd cannot record on a fake CUDA tensor at all (its input metadata opens a device guard: the process aborts).
  LoKO and FullKalman take a Jacobian in every step, so they run on fake tensors of the ``meta`` device instead:
  FakeTensorMode checks devices the same way for every pair, so a CPU tensor mixed with a meta one is caught as it
  would be with a CUDA one. (For them the device type is all that differs; no code of theirs branches on it.)

The Triton and C kernels of KOALA++ compute for real and cannot run on fake tensors: its tests select the
multi-tensor path (``fused=False``) and the reference (``foreach=False``).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kalmanopt import KOALAM, KOALAV, FullKalman, KOALAPlusPlus, LoKO
from kalmanopt.integrations._loss_feed import LossFeed
from kalmanopt.optim.loko import PREDICTIVE_METHODS, PREDICTIVE_SCALES, predictive_probs

aten = torch.ops.aten


# ------------------------------------------------------------------------------------------------ the harness
class HostTraffic(TorchDispatchMode):
    """Records (or refuses) host reads of device tensors and blocking copies between the host and the device.

    ``reads``: host reads are allowed (recorded, answered with a stand-in value) instead of raising.
    ``largest_upload``: blocking host-to-device copies of at most this many elements are allowed (recorded): the
    small constants an algorithm that synchronises anyway builds with ``torch.tensor``.
    ``downloads``: blocking device-to-host copies are allowed (a benchmark that draws figures on the CPU).
    """

    def __init__(self, *, reads: bool = False, largest_upload: int = 0, downloads: bool = False) -> None:
        super().__init__()
        self.allow_reads, self.largest_upload, self.allow_downloads = reads, largest_upload, downloads
        self.reads: list[tuple[int, ...]] = []
        self.uploads: list[tuple[int, ...]] = []
        self.downloads: list[tuple[int, ...]] = []
        self.pinned: list[torch.Tensor] = []  # pinned copies (kept alive so that ids stay unique)

    def _is_pinned(self, t: torch.Tensor) -> bool:
        return any(t is p for p in self.pinned)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            t = args[0]
            if t.device.type != "cpu":
                if not self.allow_reads:
                    raise AssertionError(f"host synchronisation: a {t.device.type} tensor {tuple(t.shape)} "
                                         f"{t.dtype} is read on the host")
                self.reads.append(tuple(t.shape))
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 0)
        out = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            non_blocking = kwargs.get("non_blocking", False) or (func is aten.copy_.default and len(args) > 2
                                                                  and args[2])
            if isinstance(src, torch.Tensor) and src.device.type != dst.device.type \
                    and not (non_blocking and self._is_pinned(src)):
                what = f"{src.device.type} -> {dst.device.type} copy of {tuple(src.shape)} {src.dtype}"
                download = dst.device.type == "cpu"
                if (download and not self.allow_downloads) or (not download and src.numel() > self.largest_upload):
                    raise AssertionError(f"host synchronisation: a blocking {what}")
                (self.downloads if download else self.uploads).append(tuple(src.shape))
        return out


class _CudaBindings(TorchFunctionMode):
    """The Python bindings that open a device guard before dispatching, routed to their aten operators."""

    def __init__(self, traffic: HostTraffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            return aten.copy_.default(args[0], args[1], kwargs.get("non_blocking", False))
        if func is torch.Tensor.__getitem__:
            view, advanced = _index(args[0], args[1])
            return view if advanced is None else aten.index.Tensor(args[0], advanced)
        if func is torch.Tensor.__setitem__:
            target, index, value = args
            view, advanced = _index(target, index)
            if advanced is not None:
                value = value if isinstance(value, torch.Tensor) else torch.full((), value, dtype=target.dtype,
                                                                                device=target.device)
                aten.index_put_.default(target, advanced, value)
            elif isinstance(value, torch.Tensor):
                aten.copy_.default(view, value)
            else:
                aten.fill_.Scalar(view, value)
            return None
        if func is torch.Tensor.cpu:
            return aten._to_copy.default(args[0], device=torch.device("cpu"))
        if func is torch.Tensor.__invert__:
            return aten.bitwise_not.default(args[0])
        if func is torch.Tensor.pin_memory:
            pinned = args[0].clone()
            self.traffic.pinned.append(pinned)
            return pinned
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type != "cpu":
            device = kwargs.pop("device")
            return func(*args, **kwargs).to(device)  # what torch.tensor does: made on the host, then copied
        return func(*args, **kwargs)


def _index(t: torch.Tensor, index) -> tuple[torch.Tensor | None, list | None]:
    """``t[index]`` as aten views for ints, slices, None and Ellipsis; else the index list of ``aten.index``."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) for i in index):
        if not all(isinstance(i, torch.Tensor) or i == slice(None) for i in index):
            raise NotImplementedError(f"fake CUDA indexing {index!r}")
        return None, [i if isinstance(i, torch.Tensor) else None for i in index]
    view, dim = t, 0
    for i in index:
        if i is Ellipsis:
            dim += t.dim() - sum(1 for j in index if j is not None and j is not Ellipsis)
        elif i is None:
            view, dim = aten.unsqueeze.default(view, dim), dim + 1
        elif isinstance(i, int) and not isinstance(i, bool):
            view = aten.select.int(view, dim, i)
        elif isinstance(i, slice):
            view = aten.slice.Tensor(view, dim, i.start, i.stop, 1 if i.step is None else i.step)
            dim += 1
        else:
            raise NotImplementedError(f"fake CUDA indexing {index!r}")
    return view, None


@contextlib.contextmanager
def fake_device(*, real_inputs: bool = False, **traffic_options):
    """Fake tensors (``device="cuda"`` or ``"meta"``) whose devices are checked, and the host traffic recorded.

    ``real_inputs``: real tensors made before (a model built outside) become fake CPU tensors when used. A module
    made of fake tensors cannot be moved with ``Module.to`` (it swaps the tensors, and the mode holds weak
    references to them), so a code path that moves a model it builds is given one built outside."""
    traffic = HostTraffic(**traffic_options)
    with FakeTensorMode(allow_non_fake_inputs=real_inputs), traffic, _CudaBindings(traffic):
        yield traffic


def _assert_state_on(opt: torch.optim.Optimizer, device_type: str, host_side: tuple[str, ...] = ()) -> None:
    for st in opt.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                want = "cpu" if key in host_side else device_type
                assert value.device.type == want, f"state {key!r} is on {value.device}, expected {want}"


# ------------------------------------------------------------------------------------------------ KOALA
KOALA = {
    "koala_v": (KOALAV, {}),
    "koala_v_reference_wd": (KOALAV, {"foreach": False, "weight_decay": 0.1}),
    "koala_m": (KOALAM, {}),
    "koala_m_reference_online_qw": (KOALAM, {"foreach": False, "qw": None, "weight_decay": 0.1}),
    "koala_pp": (KOALAPlusPlus, {"fused": False}),
    "koala_pp_wd_group_bf16_state": (KOALAPlusPlus, {"fused": False, "weight_decay": 0.1, "block": "group",
                                                     "state_dtype": torch.bfloat16}),
}


def _cuda_params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(4, 3, device="cuda", dtype=dtype)),
            torch.nn.Parameter(torch.randn(3, device="cuda", dtype=dtype)),
            torch.nn.Parameter(torch.randn(2, 2, device="cuda", dtype=dtype))]


def _set_grads(params: list[torch.Tensor]) -> None:
    for p in params[:2]:  # the last one has no gradient: its state is never made
        p.grad = torch.randn_like(p)


def _take_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], path: str, steps: int = 3) -> None:
    for _ in range(steps):
        _set_grads(params)
        if path == "losses":
            opt.step(loss=torch.rand(8, device="cuda"))
        elif path == "host_losses":  # losses computed on the host for a model on the device
            opt.step(loss=torch.rand(8))
        elif path == "number":  # a Python number: made on the host, by the user
            opt.step(loss=0.7)
        elif path == "closure_number":  # torch.optim types the closure Callable[[], float]
            opt.step(lambda: 0.7)
        elif path == "update_numbers":
            opt.predict()
            opt.update(0.7, 0.5)
        elif path == "update_tensors":
            opt.predict()
            opt.update(torch.rand((), device="cuda"), torch.rand((), device="cuda"))


@pytest.mark.parametrize("path", ["losses", "host_losses", "number", "closure_number", "update_numbers",
                                  "update_tensors"])
@pytest.mark.parametrize("spec", list(KOALA.values()), ids=list(KOALA))
def test_koala_steps_on_cuda_without_host_synchronisation(spec, path):
    """Three steps (the first creates the state) on CUDA parameters: every operator's devices agree, no value is
    read on the host and nothing is copied between host and device with a wait, whatever form the loss has.

    Before: a loss given as a Python number or a CPU tensor (or the update's numbers) was measured on the CPU, so
    every flag of the step went to the CPU and back (about 20 blocking copies a step); R, KOALA-V's sigma and
    KOALA-M's P were made with ``torch.tensor(..., device=...)``, a blocking upload at the first step."""
    cls, kwargs = spec
    with fake_device() as traffic:
        params = _cuda_params()
        opt = cls(params, **kwargs)
        _take_steps(opt, params, path)
    _assert_state_on(opt, "cuda")
    # a loss on the host goes to the device from pinned memory, without a wait; a Python number not even that: it is
    # filled in on the device
    assert len(traffic.pinned) == {"host_losses": 3, "update_numbers": 6}.get(path, 0)
    assert sum(1 for st in opt.state.values() if st) == 2  # the tensor without a gradient has none


def test_koala_pp_reference_on_cuda():
    """KOALA++'s readable reference (``foreach=False``), which every other path is tested against."""
    with fake_device():
        params = _cuda_params()
        opt = KOALAPlusPlus(params, foreach=False)
        _take_steps(opt, params, "losses")
    _assert_state_on(opt, "cuda")


@pytest.mark.parametrize("spec", [KOALA["koala_v"], KOALA["koala_m_reference_online_qw"], KOALA["koala_pp"]],
                         ids=["koala_v", "koala_m_reference_online_qw", "koala_pp"])
def test_cpu_tensor_lr_and_grad_scaler_on_cuda(spec):
    """A tensor ``lr`` left on the CPU (as schedulers that keep one there) and GradScaler's device scale and found-inf
    flag: their flags join the step's guard on the device, without a blocking copy."""
    cls, kwargs = spec
    with fake_device():
        params = _cuda_params(torch.bfloat16)
        opt = cls(params, **kwargs, lr=torch.tensor(0.5 if cls is not KOALAPlusPlus else 1e-3))
        opt.grad_scale = torch.full((), 1024.0, device="cuda")
        opt.found_inf = torch.zeros((), device="cuda")
        _take_steps(opt, params, "losses")
    _assert_state_on(opt, "cuda")


def test_bound_loss_feed_with_a_host_clipping_factor_on_cuda():
    """The integrations' loss feed: a clipping factor from a norm reported as a Python number (``torch.as_tensor``
    makes it on the CPU) multiplies the fed CUDA loss as a CPU scalar. Before: ``factor.to(loss)``, a blocking
    upload at every step."""
    with fake_device():
        params = _cuda_params()
        opt = KOALAV(params)
        feed = LossFeed()
        assert feed.bind(opt) is opt
        for window in range(3):
            _set_grads(params)
            feed.add(torch.rand(8, device="cuda"), 0.5, window)
            feed.add(torch.rand(8, device="cuda"), 0.5, window)
            feed.scale(torch.as_tensor(0.25))
            opt.step()
    _assert_state_on(opt, "cuda")


# ------------------------------------------------------------------------------------------------ LoKO, FullKalman
# LoKO and FullKalman read values on the host by design (finiteness checks that decide a skip, Cholesky's info, the
# trust region's largest logit change, the automatic prior): recorded, not refused. What must hold: every operator's
# devices agree, nothing comes back from the device but those scalars, and the only uploads are the small constants
# of the calibration (PREDICTIVE_SCALES, made with torch.tensor) and of a Python-number scale.
CONSTANTS = len(PREDICTIVE_SCALES)

LOKO = {
    "default_lowrank_softmax": {"rank": 4},
    "lowrank_logits_ema_trust": {"rank": 4, "observation": "logits", "noise": "ema", "q": 0.01, "inflation": 0.1},
    "lowrank_auto_p0_group_batched": {"rank": 4, "p0": "auto", "auto_scope": "group", "jacobian": "batched"},
    "diagonal_logits_ema_diag_auto": {"rank": 0, "observation": "logits", "noise": "ema_diag", "p0": "auto"},
    "diagonal_softmax_vd_loop": {"rank": 0, "variance_update": "vd", "jacobian": "loop"},
    "diagonal_loss": {"rank": 0, "observation": "loss", "noise": "ema"},
}


def _meta_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 4, device="meta"), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3, device="meta"))


@pytest.mark.parametrize("kwargs", list(LOKO.values()), ids=list(LOKO))
def test_loko_step_and_predictive_on_a_device(kwargs):
    """Two steps of a batch of two, then the predictive by every method (with ``noise=True`` where R lives on the
    logits): nothing on the CPU but the host-side counters, no device data copied to the host."""
    with fake_device(reads=True, largest_upload=CONSTANTS) as traffic:
        model = _meta_model()
        opt = LoKO(model.parameters(), **kwargs)
        x, y = torch.randn(2, 5, device="meta"), torch.randint(0, 3, (2,), device="meta")
        for _ in range(2):
            logits = opt.step(lambda: model(x), y)
        assert logits.device.type == "meta"
        if kwargs.get("observation") != "loss":
            assert opt.last_predictive.cov.device.type == "meta"
            for method in PREDICTIVE_METHODS:
                pred = opt.predictive(lambda: model(x), method, samples=4,
                                      noise=kwargs.get("observation") == "logits")
                assert pred.probs.device.type == "meta"
    # host-side counters, as torch.optim keeps its step on the CPU: read without a synchronisation
    _assert_state_on(opt, "meta", host_side=("step", "skipped_steps", "p0_auto"))
    assert traffic.reads  # it does read on the host (documented): the stand-ins were used


@pytest.mark.parametrize("noise", ["fixed", "ema"])
def test_full_kalman_step_on_a_device(noise):
    with fake_device(reads=True) as traffic:
        model = _meta_model()
        opt = FullKalman(model.parameters(), noise=noise, q=0.01)
        x, y = torch.randn(2, 5, device="meta"), torch.randint(0, 3, (2,), device="meta")
        for _ in range(2):
            opt.step(lambda: model(x), y)
        assert opt.covariance().device.type == "meta"
    _assert_state_on(opt, "meta", host_side=("step", "skipped_steps"))
    assert traffic.reads


def test_monte_carlo_predictive_draws_on_the_device():
    """``predictive_probs(method="mc")`` without a generator draws on the logits' device (before: on the CPU, then a
    blocking upload of samples x batch x classes; a CUDA generator could not be passed at all). A CPU generator still
    draws on the CPU, so that its draws are the same on every device (that upload is asked for)."""
    with fake_device():
        mean = torch.randn(2, 3, device="cuda")
        cov = torch.eye(3, device="cuda", dtype=torch.float64).expand(2, 3, 3)
        probs = predictive_probs(mean, cov, "mc", samples=16)
        assert probs.device.type == "cuda"
    with fake_device(largest_upload=16 * 2 * 3) as traffic:
        mean = torch.randn(2, 3, device="cuda")
        cov = torch.eye(3, device="cuda", dtype=torch.float64).expand(2, 3, 3)
        predictive_probs(mean, cov, "mc", samples=16, generator=torch.Generator().manual_seed(0))
    assert traffic.uploads == [(16, 2, 3)]


def test_the_harness_catches_what_it_is_for():
    """The checks this file relies on: a CPU tensor meeting a CUDA one, a host read, a blocking copy."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with fake_device(), pytest.raises(FakeTensorDeviceMismatchError):
        torch.ones(3, device="cuda") + torch.ones(3)
    with fake_device(), pytest.raises(AssertionError, match="read on the host"):
        bool(torch.ones(3, device="cuda").sum() > 0)
    with fake_device(), pytest.raises(AssertionError, match="blocking cpu -> cuda"):
        torch.ones((), device="cuda").copy_(torch.ones(()))
    with fake_device(), pytest.raises(AssertionError, match="blocking cuda -> cpu"):
        torch.ones(3, device="cuda").cpu()
    with fake_device():  # pinned and non-blocking: no wait
        torch.ones(3).pin_memory().to(torch.device("cuda", 0), non_blocking=True)  # a parameter's device
        torch.ones(3, device="cuda") * torch.ones(())  # a 0-d CPU tensor is a scalar argument, as on CUDA


# ------------------------------------------------------------------------------------------------ the commands
def test_demo_device_cuda_without_cuda_is_refused_before_anything_runs(monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from kalmanopt.bench import digits
    from kalmanopt.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    ran = []
    monkeypatch.setattr(digits, "load_digits", lambda *a, **k: ran.append(a))
    assert main(["demo", "--epochs", "1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "kalmanopt: error: --device cuda: CUDA is not available in this PyTorch build or on this machine\n"
    assert ran == []
    with pytest.raises(SystemExit) as e:
        main(["demo", "--device", "tpu"])
    assert e.value.code == 2 and "--device: expected cpu or cuda[:N], got 'tpu'" in capsys.readouterr().err


def test_demo_trains_where_it_is_told(monkeypatch):
    """``--device`` reaches the training loop (cpu here; the same path takes cuda)."""
    pytest.importorskip("sklearn")
    from kalmanopt.bench import digits
    from kalmanopt.cli import main

    seen = []
    result = digits.DigitsResult("x", 0.5, 1.0, 0.1)
    monkeypatch.setattr(digits, "train_digits", lambda *a, device, **k: seen.append(device) or result)
    monkeypatch.setattr(digits, "load_digits", lambda: (torch.zeros(1, 64),) * 4)
    assert main(["demo", "--epochs", "1", "--device", "cpu"]) == 0
    assert seen == [torch.device("cpu")] * 2


def test_train_digits_moves_model_and_data(monkeypatch):
    """The digits task on a device: the model and every batch where ``device`` says (meta stands in for CUDA)."""
    from kalmanopt.bench import digits

    devices = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            devices.append({p.device.type for g in self.param_groups for p in g["params"]})
            return None

    mlp = digits.make_mlp()  # built outside (see fake_device)
    monkeypatch.setattr(digits, "make_mlp", lambda: mlp)
    with fake_device(real_inputs=True, reads=True, largest_upload=10 ** 6):  # the model and digits, once
        data = (torch.randn(40, 64), torch.randint(0, 10, (40,)), torch.randn(8, 64), torch.randint(0, 10, (8,)))
        digits.train_digits("sgd", lambda m: Recorder(m.parameters(), lr=0.1), epochs=1, batch_size=16, data=data,
                            device="meta")
    assert devices == [{"meta"}] * 3


def test_covariance_runs_on_the_device_and_draws_on_the_cpu(monkeypatch, tmp_path):
    """``bench covariance --device``: the filter, the model and the digits on the device (meta stands in for CUDA,
    through ``check_device``, which the CLI calls first: its refusal of cuda without CUDA is in
    test_cli_errors.py), every saved P back on the CPU for the figures."""
    from kalmanopt import data
    from kalmanopt.bench import covariance
    from kalmanopt.cli import build_parser

    args = build_parser().parse_args(["bench", "covariance", "--samples", "3", "--save-at", "0", "2", "--every", "1",
                                      "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out")])
    covariance.check_args(args)
    lenet = covariance.NarrowLeNet5(c1=1, c2=1, f1=4, f2=4)  # built outside (see fake_device)
    monkeypatch.setattr(covariance, "NarrowLeNet5", lambda: lenet)
    monkeypatch.setattr(covariance, "check_device", lambda a: torch.device("meta"))
    monkeypatch.setattr(data, "load", lambda name, root=None: types.SimpleNamespace(
        x_train=torch.randint(0, 255, (6, 28, 28), dtype=torch.uint8), y_train=torch.randint(0, 10, (6,)),
        x_test=torch.randint(0, 255, (2, 28, 28), dtype=torch.uint8), y_test=torch.randint(0, 10, (2,))))
    drawn = []
    monkeypatch.setattr(covariance, "_heatmaps", lambda saved, *a, **k: drawn.append(
        {step: P.device.type for step, P in saved.items()}))
    monkeypatch.setattr(covariance, "_shares_plot", lambda *a: None)
    devices = []
    step = FullKalman.step
    monkeypatch.setattr(FullKalman, "step", lambda self, *a: devices.append(
        {p.device.type for g in self.param_groups for p in g["params"]}) or step(self, *a))
    with fake_device(real_inputs=True, reads=True, largest_upload=10 ** 6, downloads=True):
        result = covariance.run(args)
    assert devices == [{"meta"}] * 3
    assert drawn == [{0: "cpu", 2: "cpu"}] * 2  # |P| and the correlations
    assert result["provenance"]["device"] == "meta"
