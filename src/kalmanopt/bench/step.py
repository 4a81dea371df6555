"""``kalmanopt bench step``: the cost of one optimizer step, KOALA++ against AdamW and its own reference.

Issue 6 asks for a KOALA++ step at the memory-traffic floor. This benchmark measures that and nothing else:
the gradients are preset once (random, fixed) and only ``opt.step(...)`` is timed, on the parameter shapes of
real networks (ResNet-18/50, a 4-layer GPT, GPT-2 124M) written out as lists of shapes: no model code needed.

Contenders: KOALA++ (its default, which on CPU is the fused kernel; ``fused=True``, also with bfloat16 state; the
eager multi-tensor path ``foreach=True``; and the single-tensor reference kernel), KOALA-V, KOALA-M, AdamW
(``foreach``, the for-loop, and ``fused`` where supported), and a re-creation of how the public KOALA++
reference code is *structured* (:class:`_ReferenceStructureKOALAPlusPlus`), the baseline the library improves
on. LoKO is listed but skipped with a note: its step observes model outputs through a forward function, not
preset gradients.

Method: every contender gets its own float32 copy of the parameters; all share the same read-only gradients.
After warm-up steps (so lazy state initialisation is not timed), ``R`` rounds each time every contender once,
in an order rotated every round; one timing is ``N`` consecutive steps between two ``perf_counter`` reads
(with a device synchronisation on CUDA), read both as wall time and as the CPU time of the timing thread
(``time.thread_time``: on a machine shared with other jobs the wall time also counts the time the thread waited
for a core). Reported per contender: median and quartiles of the per-step wall time over the rounds, min/max, the
median CPU time, the ratios of medians to AdamW(foreach=True) (wall and CPU), and the optimizer state in bytes per
parameter.
The Kalman optimizers are handed the same fixed 0-d loss, 2.3, every step.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import kalmanopt
from kalmanopt import paths
from kalmanopt.bench.common import check_device, device_type
from kalmanopt.errors import UsageError

__all__ = [
    "PRESETS", "Preset", "Settings", "add_parser", "check_args", "gpt2_shapes", "gpt4_shapes", "main", "mlp_shapes",
    "n_params", "resnet18_shapes", "resnet50_shapes", "run",
]

Shape = tuple[int, ...]

FIXED_LOSS = 2.3
BASELINE = "adamw"


# ------------------------------------------------------------------------------------------------ shapes
def _batch_norm(channels: int) -> list[Shape]:
    """The learnable tensors of a BatchNorm (weight, bias); running statistics are buffers, not parameters."""
    return [(channels,), (channels,)]


def _resnet_shapes(blocks: Sequence[int], *, bottleneck: bool, width: int = 64,
                   num_classes: int = 1000) -> list[Shape]:
    """Parameter shapes of a torchvision-style ImageNet ResNet, in module registration order.

    A stage's first block gets a 1x1 downsample conv (+ BN) when it changes the stride or the channel count,
    as in torchvision; ``width`` scales every channel count (64 is the real network).
    """
    expansion = 4 if bottleneck else 1
    shapes: list[Shape] = [(width, 3, 7, 7), *_batch_norm(width)]
    in_channels = width
    for stage, n_blocks in enumerate(blocks):
        mid = width * 2**stage
        out_channels = mid * expansion
        for block in range(n_blocks):
            if bottleneck:
                shapes += [(mid, in_channels, 1, 1), *_batch_norm(mid), (mid, mid, 3, 3), *_batch_norm(mid),
                           (out_channels, mid, 1, 1), *_batch_norm(out_channels)]
            else:
                shapes += [(mid, in_channels, 3, 3), *_batch_norm(mid), (mid, mid, 3, 3), *_batch_norm(mid)]
            if block == 0 and (stage > 0 or in_channels != out_channels):
                shapes += [(out_channels, in_channels, 1, 1), *_batch_norm(out_channels)]
            in_channels = out_channels
    return shapes + [(num_classes, in_channels), (num_classes,)]


def resnet18_shapes(width: int = 64) -> list[Shape]:
    """ResNet-18 with its ImageNet head: 11,689,512 parameters (BN weight and bias included) at width 64."""
    return _resnet_shapes([2, 2, 2, 2], bottleneck=False, width=width)


def resnet50_shapes() -> list[Shape]:
    """ResNet-50 (Bottleneck blocks) with its ImageNet head: 25,557,032 parameters."""
    return _resnet_shapes([3, 4, 6, 3], bottleneck=True)


def _gpt_shapes(d_model: int, n_layers: int, vocab: int, context: int) -> list[Shape]:
    """Parameter shapes of a GPT with fused qkv projection, 4x MLP and a head *tied* to the token embedding.

    Token and position embeddings; per layer LayerNorm (w, b), qkv (3d x d, 3d), attention output (d x d, d),
    LayerNorm (w, b), MLP up (4d x d, 4d), MLP down (d x 4d, d); a final LayerNorm. A tied head adds no
    parameter; the number of heads changes no shape.
    """
    d = d_model
    shapes: list[Shape] = [(vocab, d), (context, d)]
    for _ in range(n_layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def gpt4_shapes() -> list[Shape]:
    """The 4-layer GPT of the KOALA++ language-model experiment at d=256 (4 heads), vocab 10k, context 256,
    head tied as in the reference GPT-1 code: 5,785,088 parameters."""
    return _gpt_shapes(256, 4, 10_000, 256)


def gpt2_shapes() -> list[Shape]:
    """GPT-2 small: d=768, 12 layers (12 heads), vocab 50,257, context 1,024, tied head: 124,439,808."""
    return _gpt_shapes(768, 12, 50_257, 1_024)


def mlp_shapes() -> list[Shape]:
    """The 2-layer MLP of ``kalmanopt demo`` (64 inputs, 64 hidden, 10 classes): 4,810 parameters in 4 tensors."""
    return [(64, 64), (64,), (10, 64), (10,)]


def n_params(shapes: Iterable[Sequence[int]]) -> int:
    """Number of scalar parameters in a list of shapes."""
    total = 0
    for shape in shapes:
        count = 1
        for size in shape:
            count *= size
        total += count
    return total


@dataclass(frozen=True)
class Preset:
    """A named parameter set and the default timing budget that suits its size."""

    name: str
    description: str
    shapes: Callable[[], list[Shape]]
    rounds: int
    steps_per_round: int
    warmup: int


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("resnet18", "ResNet-18, ImageNet head (torchvision layout, BN weight+bias)", resnet18_shapes,
           rounds=7, steps_per_round=5, warmup=3),
    Preset("resnet50", "ResNet-50, ImageNet head (torchvision layout, BN weight+bias)", resnet50_shapes,
           rounds=5, steps_per_round=3, warmup=2),
    Preset("gpt4", "4-layer GPT, d=256, 4 heads, vocab 10,000, context 256, tied head", gpt4_shapes,
           rounds=7, steps_per_round=5, warmup=3),
    Preset("gpt2", "GPT-2 small, d=768, 12 layers, 12 heads, vocab 50,257, context 1,024, tied head",
           gpt2_shapes, rounds=3, steps_per_round=2, warmup=1),
    Preset("resnet18-tiny", "ResNet-18 at a quarter of its width (16 base channels), ImageNet head",
           lambda: resnet18_shapes(width=16), rounds=3, steps_per_round=2, warmup=1),
    Preset("mlp", "the demo's MLP: 64-64-10, 4 tensors (per-step overhead, not memory traffic)", mlp_shapes,
           rounds=9, steps_per_round=200, warmup=20),
]}
ALL_PRESETS = ("resnet18", "resnet50", "gpt4", "gpt2", "mlp")
QUICK_PRESET = "resnet18-tiny"


# ------------------------------------------------------------------------------------------------ baseline
class _ReferenceStructureKOALAPlusPlus(Optimizer):
    """KOALA++ written the way the public reference code (github.com/Sumxiaa/KOALA_Plus_Plus) is *structured*.

    Our re-creation of that structure, not their code: the mathematics of the paper's Algorithm 1 (per-tensor
    ``v``, previous gradient, ``S``; first step from the prior ``P0 = sigma * I``, see docs/algorithms.md) in the
    naive style the library is measured against: a Python loop over tensors, about 25 small separate torch
    operations per tensor, ``.view(-1)`` dot products, fresh state tensors every step, and a host
    synchronisation per tensor (``if grad.norm() < eps`` on a tensor). It has none of the library's guards.

    R is the fixed ``r`` when given, else the exponential average of the squared loss (the library's default).
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1.0, sigma: float = 0.1, q: float = 0.1,
                 r: float | None = None, alpha_r: float = 0.9, weight_decay: float = 0.0,
                 eps: float = 1e-9) -> None:
        super().__init__(params, dict(lr=lr, sigma=sigma, q=q, weight_decay=weight_decay))
        self.r = r
        self.alpha_r = alpha_r
        self.eps = eps
        self.r_average: Tensor | None = None

    def _measurement_noise(self, loss: Tensor) -> Tensor:
        """This step's R: the fixed ``r`` or the updated average of ``mean(loss ** 2)``, starting at 1."""
        if self.r is not None:
            return torch.tensor(self.r, dtype=loss.dtype, device=loss.device)
        if self.r_average is None:
            self.r_average = torch.ones((), dtype=loss.dtype, device=loss.device)
        self.r_average = self.r_average * self.alpha_r + loss.square().mean() * (1 - self.alpha_r)
        return self.r_average

    @torch.no_grad()
    def step(self, *, loss: Tensor) -> None:  # type: ignore[override]
        """One KOALA++ measurement update of every tensor, given the loss whose gradient is in ``.grad``."""
        noise = self._measurement_noise(loss.detach())
        loss_mean = loss.detach().mean()
        for group in self.param_groups:
            lr, sigma, q, wd = group["lr"], group["sigma"], group["q"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or p.grad.norm() < self.eps:  # a host sync per tensor, as in the reference
                    continue
                st = self.state[p]
                h = p.grad.view(-1) + wd * p.view(-1)
                if "v" not in st:  # first step: the same gradient seen before under P0 = sigma * I
                    st["v"] = h.mul(sigma)
                    st["prev_grad"] = h
                    st["S"] = torch.dot(h, st["v"]) + q * torch.dot(h, h) + noise
                v_prev, h_prev, s_prev = st["v"], st["prev_grad"], st["S"]
                prev_sq = torch.dot(h_prev, h_prev)
                prev_dot_v = torch.dot(h_prev, v_prev)
                h_dot_prev = torch.dot(h, h_prev)
                h_dot_v = torch.dot(h, v_prev)
                lam = (h_dot_v + q * h_dot_prev) / s_prev
                alpha = h_dot_prev / prev_sq
                w = h_dot_v / prev_sq - h_dot_prev * prev_dot_v / prev_sq**2
                v = (alpha - lam) * v_prev + q * (h - lam * h_prev) + w * h_prev
                s = torch.dot(v + q * h, h) + noise
                layer_loss = loss_mean + 0.5 * wd * torch.dot(p.view(-1), p.view(-1))
                p.add_((-lr * layer_loss * (v + q * h) / s).view(p.shape))
                st["v"], st["prev_grad"], st["S"] = v, h, s


# ------------------------------------------------------------------------------------------------ contenders
@dataclass(frozen=True)
class Contender:
    """One row of the table: how to build the optimizer and whether its step takes the loss.

    ``floats_per_param`` is the peak memory it adds, counted in parameter-sized float32 tensors (its own
    parameter copy, its state, its largest temporary), for the estimate made before anything is allocated.
    """

    key: str
    name: str
    make: Callable[[list[Tensor], float], Optimizer]
    takes_loss: bool
    floats_per_param: float


def _contenders() -> list[Contender]:
    """Every contender with a preset-gradient step, in table order."""
    adamw = torch.optim.AdamW
    return [
        Contender("koala++", "KOALA++ (defaults)",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd), True, 6),
        Contender("koala++-lra", "KOALA++ (lr_adaptation=0.2)",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, lr_adaptation=0.2), True, 6),
        Contender("koala++-fused", "KOALA++ (fused=True)",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, fused=True), True, 5),
        Contender("koala++-fused-bf16", "KOALA++ (fused=True, state_dtype=bfloat16)",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, fused=True, state_dtype=torch.bfloat16),
                  True, 3),
        Contender("koala++-foreach", "KOALA++ (foreach=True)",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, foreach=True), True, 6),
        Contender("koala++-paper", "KOALA++ (preset='paper')",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, preset="paper"), True, 3),
        Contender("koala++-paper-bf16", "KOALA++ (preset='paper', state_dtype=bfloat16)",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, preset="paper",
                                                         state_dtype=torch.bfloat16), True, 4),
        Contender("koala++-paper-foreach", "KOALA++ (preset='paper', foreach=True)",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, foreach=True, preset="paper"), True, 4),
        Contender("koala++-reference", "KOALA++ (preset='paper', foreach=False, reference kernel)",
                  lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, foreach=False, preset="paper"), True, 4),
        Contender("koala++-refstruct", "KOALA++ reference-structure (our re-creation)",
                  lambda ps, wd: _ReferenceStructureKOALAPlusPlus(ps, weight_decay=wd), True, 3),
        Contender("koala-v", "KOALA-V (foreach=True)",
                  lambda ps, wd: kalmanopt.KOALAV(ps, weight_decay=wd, foreach=True), True, 2),
        Contender("koala-m", "KOALA-M (foreach=True)",
                  lambda ps, wd: kalmanopt.KOALAM(ps, weight_decay=wd, foreach=True), True, 3),
        Contender("adamw", "AdamW (foreach=True)",
                  lambda ps, wd: adamw(ps, lr=1e-3, weight_decay=wd, foreach=True), False, 4),
        Contender("adamw-loop", "AdamW (foreach=False)",
                  lambda ps, wd: adamw(ps, lr=1e-3, weight_decay=wd, foreach=False), False, 3),
        Contender("adamw-fused", "AdamW (fused=True)",
                  lambda ps, wd: adamw(ps, lr=1e-3, weight_decay=wd, fused=True), False, 3),
    ]


CONTENDER_KEYS = ("koala++", "koala++-lra", "koala++-fused", "koala++-fused-bf16", "koala++-foreach", "koala++-paper",
                  "koala++-paper-bf16", "koala++-paper-foreach",
                  "koala++-reference", "koala++-refstruct", "koala-v", "koala-m", "loko", "adamw", "adamw-loop",
                  "adamw-fused")


def _select(requested: Sequence[str] | None) -> tuple[list[Contender], list[str]]:
    """The contenders to run, and notes on requested ones that cannot run here (LoKO)."""
    available = _contenders()
    keys = list(requested) if requested else list(CONTENDER_KEYS)
    unknown = [k for k in keys if k not in CONTENDER_KEYS]
    if unknown:
        raise UsageError(f"--optimizers: unknown optimizer(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(CONTENDER_KEYS)}")
    notes = [_loko_note()] if "loko" in keys else []
    return [c for c in available if c.key in keys], notes


def _loko_note() -> str:
    """Why LoKO has no row: it is absent, or its step observes model outputs rather than preset gradients."""
    if not hasattr(kalmanopt, "LoKO"):
        return "LoKO skipped: kalmanopt.LoKO does not exist yet"
    return ("LoKO skipped: LoKO.step(forward_fn, target) runs the forward pass and its own Jacobian, so it "
            "has no preset-gradient step comparable to these rows")


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Prepared:
    """A built and warmed-up optimizer, with the closure that makes one step."""

    contender: Contender
    optimizer: Optimizer
    step: Callable[[], Any]
    n_params: int
    name: str = ""


@dataclass
class Row:
    """The measurements of one contender on one preset (times in milliseconds per step)."""

    key: str
    name: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    ratio_to_adamw: float | None
    state_bytes_per_param: float
    per_step_ms: list[float] = field(repr=False)
    cpu_median_ms: float = 0.0
    cpu_ratio_to_adamw: float | None = None
    per_step_cpu_ms: list[float] = field(default_factory=list, repr=False)


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a wall-clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_tensors(shapes: Sequence[Shape], std: float, generator: torch.Generator,
                    device: torch.device) -> list[Tensor]:
    """Float32 normal tensors of the given shapes and standard deviation, drawn on CPU, sent to ``device``."""
    return [(std * torch.randn(s, generator=generator)).to(device) for s in shapes]


def _prepare(contender: Contender, params: Sequence[Tensor], grads: Sequence[Tensor], *, weight_decay: float,
             warmup: int, loss: Tensor) -> Prepared:
    """Build the optimizer on its own copy of the parameters with the shared gradients; run the warm-up."""
    own = [p.clone().requires_grad_(True) for p in params]
    for p, g in zip(own, grads, strict=True):
        p.grad = g
    optimizer = contender.make(own, weight_decay)
    if contender.takes_loss:
        def step() -> Any:
            return optimizer.step(loss=loss)
    else:
        step = optimizer.step
    for _ in range(warmup):
        step()
    name = contender.name
    if contender.key in ("koala++", "koala++-paper", "koala++-paper-bf16"):  # the default path: say which one ran
        kernel = "fused kernel" if "_fused_work" in optimizer.__dict__ else \
            "Triton kernels" if "_triton_cache" in optimizer.__dict__ else "multi-tensor path"
        name = f"{name[:-1]}; {kernel})"
    return Prepared(contender, optimizer, step, n_params(p.shape for p in own), name)


def _prepare_all(contenders: Sequence[Contender], shapes: Sequence[Shape], settings: Settings, warmup: int,
                 notes: list[str]) -> list[Prepared]:
    """Seeded parameters and gradients, then every contender built and warmed up on them.

    A contender whose construction or warm-up raises (e.g. fused AdamW on a device without that kernel) is
    skipped with a note instead of stopping the benchmark. The seed parameters are freed on return.
    """
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    params = _random_tensors(shapes, 0.02, generator, settings.device)
    grads = _random_tensors(shapes, 1e-3, generator, settings.device)
    loss = torch.tensor(FIXED_LOSS, device=settings.device)
    prepared = []
    for contender in contenders:
        try:
            prepared.append(_prepare(contender, params, grads, weight_decay=settings.weight_decay,
                                     warmup=warmup, loss=loss))
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
            note = f"{contender.name} skipped: {type(error).__name__}: {str(error).splitlines()[0]}"
            notes.append(note)
            print(f"  note: {note}", file=sys.stderr)
    return prepared


def _time_steps(step: Callable[[], Any], n_steps: int, device: torch.device) -> tuple[float, float]:
    """Wall and thread-CPU seconds per step over ``n_steps`` consecutive steps (garbage collection paused, as
    timeit does). The CPU time is the calling thread's: with one torch thread, all of the step's work. On CUDA the
    wall time is the device's, between two CUDA events around the steps (the host may run ahead of the device, whose
    time the step is)."""
    _synchronize(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        events = None
        if device.type == "cuda":
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record(torch.cuda.current_stream(device))
        start, cpu_start = time.perf_counter(), time.thread_time()
        for _ in range(n_steps):
            step()
        if events is not None:
            events[1].record(torch.cuda.current_stream(device))
        _synchronize(device)
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
        if events is not None:
            elapsed = events[0].elapsed_time(events[1]) / 1e3
    finally:
        if gc_was_enabled:
            gc.enable()
    return elapsed / n_steps, cpu / n_steps


def _rotation(items: Sequence[Prepared], round_index: int) -> list[Prepared]:
    """The order of one round: rotated by one more place every round, so no contender always goes first."""
    shift = round_index % len(items)
    return list(items[shift:]) + list(items[:shift])


def _progress(rounds: int, label: str) -> Iterable[int]:
    """Round numbers, shown with a tqdm bar when tqdm is installed, else one line per round on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(rounds, label)
    return tqdm(range(rounds), desc=label, unit="round", file=sys.stderr)


def _plain_progress(rounds: int, label: str) -> Iterator[int]:
    """Round numbers, announced on stderr as each round starts."""
    for r in range(rounds):
        print(f"  {label}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        yield r


def _state_bytes(optimizer: Optimizer) -> int:
    """Bytes held in tensors of ``optimizer.state`` (per-parameter and group-level state alike)."""
    return sum(v.nbytes for st in optimizer.state.values() for v in st.values() if isinstance(v, Tensor))


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (inclusive method; a single value is its own quartiles)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _summarize(prepared: Prepared, seconds: list[tuple[float, float]], baseline: tuple[float, float] | None) -> Row:
    """One table row from the per-round (wall, CPU) seconds-per-step of a contender; ``baseline`` holds AdamW's
    median wall and CPU milliseconds."""
    ms = [1e3 * wall for wall, _ in seconds]
    cpu_ms = [1e3 * cpu for _, cpu in seconds]
    q1, median, q3 = _quartiles(ms)
    cpu_median = _quartiles(cpu_ms)[1]
    ratio = median / baseline[0] if baseline else None
    cpu_ratio = cpu_median / baseline[1] if baseline and baseline[1] > 0 else None
    return Row(prepared.contender.key, prepared.name or prepared.contender.name, median, q1, q3, min(ms), max(ms),
               ratio, _state_bytes(prepared.optimizer) / prepared.n_params, ms, cpu_median, cpu_ratio, cpu_ms)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Settings:
    """Everything a run depends on, resolved from the command line (``None``: the preset's default)."""

    presets: list[str]
    rounds: int | None = None
    steps_per_round: int | None = None
    warmup: int | None = None
    optimizers: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weight_decay: float = 5e-4
    seed: int = 0
    max_memory_gb: float = 16.0
    profile: int = 0  # steps of each contender to run under torch.profiler after the timing (0: none)


def _check_memory(preset: Preset, contenders: Sequence[Contender], count: int, limit_gb: float) -> float:
    """Estimated peak bytes (shared gradients plus each contender's share); refuse to start above limit."""
    estimate = 4 * count * (1 + sum(c.floats_per_param for c in contenders))
    if estimate > limit_gb * 2**30:
        raise UsageError(
            f"{preset.name}: the selected optimizers need about {estimate / 2**30:.1f} GiB at once, over "
            f"--max-memory-gb {limit_gb:g}; run fewer at a time with --optimizers"
        )
    return estimate


def run_preset(preset: Preset, settings: Settings) -> dict[str, Any]:
    """Time every selected contender on one parameter set; returns the JSON-ready record of the run."""
    rounds = settings.rounds or preset.rounds
    steps = settings.steps_per_round or preset.steps_per_round
    warmup = settings.warmup or preset.warmup
    contenders, notes = _select(settings.optimizers)
    shapes = preset.shapes()
    count = n_params(shapes)
    estimate = _check_memory(preset, contenders, count, settings.max_memory_gb)
    print(f"[{preset.name}] {count:,} parameters in {len(shapes)} tensors; {len(contenders)} optimizers; "
          f"about {estimate / 2**30:.2f} GiB", file=sys.stderr)

    prepared = _prepare_all(contenders, shapes, settings, warmup, notes)
    if not prepared:
        raise UsageError(f"{preset.name}: no optimizer could be run ({'; '.join(notes)})")
    seconds: dict[str, list[tuple[float, float]]] = {p.contender.key: [] for p in prepared}
    for r in _progress(rounds, preset.name):
        for item in _rotation(prepared, r):
            seconds[item.contender.key].append(_time_steps(item.step, steps, settings.device))

    baseline = None
    if BASELINE in seconds:
        baseline = (_quartiles([1e3 * wall for wall, _ in seconds[BASELINE]])[1],
                    _quartiles([1e3 * cpu for _, cpu in seconds[BASELINE]])[1])
    else:
        notes.append("no ratio column: AdamW (foreach=True) was not run")
    rows = [_summarize(p, seconds[p.contender.key], baseline) for p in prepared]
    profiles = {p.contender.key: _profile(p, settings.profile) for p in prepared} if settings.profile else {}
    return {
        "preset": preset.name, "description": preset.description, "n_params": count, "n_tensors": len(shapes),
        "rounds": rounds, "steps_per_round": steps, "warmup": warmup, "notes": notes,
        "rows": [asdict(row) for row in rows], "profiles": profiles,
    }


def _profile(prepared: Prepared, steps: int, rows: int = 12) -> str:
    """torch.profiler's table of the operators ``steps`` steps of a contender spend their CPU time in."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            prepared.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def provenance(device: torch.device) -> dict[str, Any]:
    """Where and how the numbers were taken: the suites' common provenance plus the device timed on."""
    from .common import provenance as common_provenance

    info = common_provenance(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    info.update(kalmanopt=kalmanopt.__version__, torch=torch.__version__, device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    return info


def _ms(value: float) -> str:
    """Milliseconds with three significant digits at least (the MLP's steps take a few microseconds)."""
    return f"{value:.2f}" if value >= 1 else f"{value:.4f}"


def _format_ratio(ratio: float | None) -> str:
    """The ratio column: ``1.23x``, or ``n/a`` without an AdamW(foreach=True) row."""
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def markdown(record: dict[str, Any], info: dict[str, Any], weight_decay: float) -> str:
    """The report of one preset: provenance lines, the table, the notes."""
    lines = [
        f"## kalmanopt bench step: {record['preset']}",
        "",
        f"{record['description']}: {record['n_params']:,} parameters in {record['n_tensors']} tensors, "
        f"float32 on {info['device']}.",
        "",
        f"- command: `{info['command']}`",
        f"- torch {info['torch']}, threads: {info['threads']}, CPU {info['cpu']}, "
        f"device {info['device_name']}, {info['date']}",
        f"- {record['rounds']} interleaved rounds (order rotated each round) x {record['steps_per_round']} "
        f"steps, after {record['warmup']} warm-up steps; gradients preset once; Kalman optimizers get a "
        f"fixed loss {FIXED_LOSS}; weight decay {weight_decay:g} for all",
        "",
        "| optimizer | median ms/step | IQR ms | min-max ms | vs AdamW (foreach) | CPU ms/step | CPU vs AdamW "
        "| state B/param |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["rows"]:
        lines.append(
            f"| {row['name']} | {_ms(row['median_ms'])} | {_ms(row['q1_ms'])}-{_ms(row['q3_ms'])} "
            f"| {_ms(row['min_ms'])}-{_ms(row['max_ms'])} | {_format_ratio(row['ratio_to_adamw'])} "
            f"| {_ms(row.get('cpu_median_ms', 0.0))} | {_format_ratio(row.get('cpu_ratio_to_adamw'))} "
            f"| {row['state_bytes_per_param']:.2f} |"
        )
    lines += [
        "",
        "KOALA++ reference-structure is our re-creation of how the public reference code is structured "
        "(per-tensor Python loop, ~25 small ops and a host sync per tensor), not that code itself.",
        *[f"- note: {note}" for note in record["notes"]],
    ]
    for key, table in record.get("profiles", {}).items():
        lines += ["", f"torch.profiler, {key}:", "", "```", table.rstrip(), "```"]
    return "\n".join(lines)


def run(settings: Settings, out: Path) -> dict[str, Any]:
    """Run every requested preset, print one markdown report each, write all results as JSON to ``out``."""
    info = provenance(settings.device)
    records = []
    for name in settings.presets:
        record = run_preset(PRESETS[name], settings)
        print(markdown(record, info, settings.weight_decay) + "\n", flush=True)
        records.append(record)
    results = {
        "provenance": info,
        "settings": {
            "presets": settings.presets, "optimizers": settings.optimizers, "device": str(settings.device),
            "weight_decay": settings.weight_decay, "seed": settings.seed, "fixed_loss": FIXED_LOSS,
        },
        "results": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}", file=sys.stderr)
    return results


# -------------------------------------------------------------------------------------------- command line
def _presets(args: argparse.Namespace) -> tuple[list[str], str]:
    """The preset names a command line asks for, and the name of its results file (:class:`UsageError` if bad)."""
    if args.quick and args.preset is not None:
        raise UsageError(f"--quick is the preset {QUICK_PRESET} on a small budget: give --quick or --preset")
    preset = QUICK_PRESET if args.quick else (args.preset or "resnet18")
    names = list(ALL_PRESETS) if preset == "all" else [n.strip() for n in preset.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise UsageError(f"--preset: unknown preset(s) {unknown}; choose from {', '.join(PRESETS)} or all (or a "
                         "comma list)")
    return names, preset.replace(",", "+")


def _optimizers(args: argparse.Namespace) -> list[str] | None:
    return [k.strip() for k in args.optimizers.split(",") if k.strip()] if args.optimizers else None


def check_args(args: argparse.Namespace) -> None:
    """Presets, optimizers, device, the memory estimate of every preset, and the results file: called by the CLI
    before anything runs or is written (:class:`UsageError`, one line)."""
    names, preset = _presets(args)
    contenders, _ = _select(_optimizers(args))
    for name in names:
        _check_memory(PRESETS[name], contenders, n_params(PRESETS[name].shapes()), args.max_memory_gb)
    check_device(args)
    args.out_path = paths.output_file(args.out, Path("step") / f"step-{preset}.json", overwrite=args.overwrite)


def _settings(args: argparse.Namespace) -> tuple[Settings, str]:
    """Resolve the command line into :class:`Settings` and the preset name that names the output file."""
    names, preset = _presets(args)
    device = check_device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        presets=names, rounds=args.rounds,
        steps_per_round=args.steps_per_round, warmup=args.warmup, optimizers=_optimizers(args), device=device,
        weight_decay=args.weight_decay, seed=args.seed, max_memory_gb=args.max_memory_gb,
        profile=args.profile,
    )
    return settings, preset


def main(args: argparse.Namespace) -> int:
    """Entry point of ``kalmanopt bench step`` (the ``func`` of its parser)."""
    if getattr(args, "out_path", None) is None:  # called directly, not through the CLI
        check_args(args)
    settings, _ = _settings(args)
    run(settings, args.out_path)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``step`` sub-command to the subparsers of ``kalmanopt bench``."""
    from kalmanopt.options import COUNT, NONNEGATIVE, POSITIVE, SEED, integer, number

    parser = subparsers.add_parser(
        "step", help="time one optimizer step: KOALA++ against AdamW and its reference",
        description=(__doc__ or "").split("\n\n", 1)[0],
    )
    parser.add_argument("--preset", default=None,
                        help="parameter set, or a comma list of them, from " + ", ".join(PRESETS)
                        + " (default: resnet18; all: " + ", ".join(ALL_PRESETS) + ")")
    parser.add_argument("--quick", action="store_true",
                        help=f"a few seconds: preset {QUICK_PRESET}, 3 rounds x 2 steps, 1 warm-up step")
    parser.add_argument("--rounds", type=COUNT, help="timing rounds (default: per preset)")
    parser.add_argument("--steps-per-round", type=COUNT,
                        help="consecutive steps in one timing (default: per preset)")
    parser.add_argument("--warmup", type=COUNT,
                        help="untimed steps per optimizer first (default: per preset)")
    parser.add_argument("--optimizers", help="comma list of optimizers to include (default: all), from: "
                        + ",".join(CONTENDER_KEYS))
    parser.add_argument("--threads", type=integer(0, 4096), default=0,
                        help="torch threads (default 0: PyTorch's choice)")
    parser.add_argument("--device", type=device_type, default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--weight-decay", type=number(0.0), default=5e-4,
                        help="weight decay for all: KOALA coupled, AdamW decoupled (default: 5e-4)")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seed of the parameters and gradients (default: 0)")
    parser.add_argument("--max-memory-gb", type=POSITIVE, default=16.0,
                        help="refuse a preset whose estimated peak memory is above this (default: 16)")
    parser.add_argument("--profile", type=NONNEGATIVE, default=0, metavar="STEPS",
                        help="after timing, run STEPS steps of each optimizer under torch.profiler and print the "
                        "operators they spend their time in (default: 0, no profile)")
    parser.add_argument("--out", help=f"JSON results file (default: {paths.SCRATCH}/step/step-<preset>.json in the "
                        "current directory, replaced by the next run of the same preset)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the --out file if it exists (without it an existing file is refused)")
    parser.set_defaults(func=main)
    return parser
