"""The fused KOALA++ step on CPU (``fused=True``, and the default where it can run): a small C kernel.

One call does the whole measurement update of every param group: the loss moments, R, the guards, one reduction
pass per tensor (every dot product the step needs, with the effective gradient and the diagonal metric formed on the
fly, never stored), the scalar algebra, and one element-wise pass per tensor that writes the gain, the previous
gradient, the second moment, the momentum buffer and the parameter. That is the memory traffic of two reads of the
state and one write, against about 50 passes for the eager multi-tensor path (each ``torch._foreach_*`` op reads and
writes its operands once), and one Python-to-C call per step instead of ~100 small tensor operations.

Why C and not PyTorch's own machinery: ``torch.compile`` of the step (inductor's C++ backend) takes minutes to compile
on ResNet-sized parameter lists and generates one reduction loop per tensor and statistic; a C++ extension
(``torch.utils.cpp_extension``) needs the PyTorch headers and ~1 minute per compile. This kernel is plain C99 with no
headers beyond ``math.h``, kept as a source file shipped with the package (``kalmanopt/kernels/koala_pp_step.c``):
it compiles in about a second with ``cc -O3 -march=native``, once per machine and per version of that file (cached
under ``$KALMANOPT_CACHE_DIR`` or ``~/.cache/kalmanopt``), and is called through :mod:`ctypes` with the tensors'
data pointers. Without a C compiler (or with ``KALMANOPT_NATIVE=0``) :func:`load` returns ``None`` and the optimizer
uses the multi-tensor path.

CPU only: the kernel reads the loss and the state scalars from memory, which on CPU is what the eager path does too
(there is no device to synchronise with). On CUDA the same step runs as Triton kernels
(:mod:`kalmanopt.optim._koala_pp_triton`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

__all__ = ["SUFFIXES", "load", "unavailable_reason"]

#: koala_abi_version() of the kernel this module calls (its arguments' layout)
ABI_VERSION = 6
#: the kernel's source, shipped as package data (kalmanopt/kernels/koala_pp_step.c) and read when the library is built
_SOURCE_FILE = "koala_pp_step.c"

# (compute dtype, suffix, sqrt, per-element state storage): the state in the compute dtype, or in bfloat16
_VARIANTS = (("float", "f32", "sqrtf", None), ("double", "f64", "sqrt", None),
             ("float", "f32_bf16", "sqrtf", "bf16"), ("double", "f64_bf16", "sqrt", "bf16"))
#: the kernel's suffix for (compute dtype, state storage dtype), by torch dtype name
SUFFIXES = {("float32", "float32"): "f32", ("float64", "float64"): "f64", ("float32", "bfloat16"): "f32_bf16",
            ("float64", "bfloat16"): "f64_bf16"}
# -fno-math-errno lets sqrt vectorise (it changes no result); no -ffast-math: IEEE semantics, NaN and inf tests intact.
_FLAGS = ("-O3", "-fno-math-errno", "-fopenmp-simd", "-std=gnu99", "-shared", "-fPIC")
_ARCH_FLAGS = ("-march=native", "-mprefer-vector-width=512")  # dropped if this compiler rejects them
_OPENMP_FLAGS = ("-fopenmp",)  # threads within large tensors; without it the kernel runs on the calling thread

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _source() -> str:
    """The C source (read at build time: the cache key below covers its text, so an edited kernel is rebuilt)."""
    return resources.files("kalmanopt.kernels").joinpath(_SOURCE_FILE).read_text(encoding="utf-8")


def _program() -> str:
    source = _source()
    parts = []
    for real, suffix, sqrt, storage in _VARIANTS:
        state = "#define STATE uint16_t\n#define STATE_BF16 1\n" if storage == "bf16" else f"#define STATE {real}\n"
        parts.append(f"#define REAL {real}\n#define SUFFIX {suffix}\n#define SQRT {sqrt}\n{state}\n{source}\n"
                     "#undef REAL\n#undef SUFFIX\n#undef SQRT\n#undef STATE\n#undef STATE_BF16\n")
    return "".join(parts)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: a cached library is rebuilt on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("flags", "model name", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    from kalmanopt.paths import kernel_dir  # $KALMANOPT_CACHE_DIR, else $KALMANOPT_HOME/kernels

    return kernel_dir()


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    program = _program()
    key = hashlib.sha256("\0".join([program, compiler, version, " ".join(_FLAGS + _OPENMP_FLAGS + _ARCH_FLAGS),
                                     platform.machine(), _cpu_signature()]).encode()).hexdigest()[:20]
    try:
        directory = _cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (CI, containers): a per-user folder in the temporary directory
        directory = Path(tempfile.gettempdir()) / f"kalmanopt-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"koala_pp_fused_{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            source = Path(tmp) / "koala_pp_fused.c"
            source.write_text(program)
            built = Path(tmp) / target.name
            attempts = (_FLAGS + _OPENMP_FLAGS + _ARCH_FLAGS, _FLAGS + _OPENMP_FLAGS, _FLAGS + _ARCH_FLAGS, _FLAGS)
            for flags in attempts:
                result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"],
                                        capture_output=True, text=True, timeout=300)
                if result.returncode == 0:
                    break
            if result.returncode != 0:
                raise RuntimeError(f"compiling the fused KOALA++ kernel failed: {result.stderr.strip()[-2000:]}")
            os.replace(built, target)  # atomic: concurrent processes never load a half-written library
    library = ctypes.CDLL(str(target))
    if library.koala_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{target} is not this version's kernel")
    pointer = ctypes.c_void_p
    for suffix in SUFFIXES.values():
        fn = getattr(library, f"koala_pp_step_{suffix}")
        fn.restype = ctypes.c_int
        # n_groups, hp, R, skipped, updates, lr_log_scale, first, 12 per-tensor arrays, measurement, kind, ...
        fn.argtypes = [ctypes.c_int, *([pointer] * 6), *([pointer] * 12), pointer, ctypes.c_int, pointer, pointer,
                       pointer, pointer, ctypes.c_int]
    library.koala_bf16_round.restype = None
    library.koala_bf16_round.argtypes = [ctypes.c_int64, pointer, pointer]
    return library


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built at the first call in a process when not cached), or None where it cannot be."""
    global _library, _reason, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            if os.environ.get("KALMANOPT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                _reason = "disabled by KALMANOPT_NATIVE=0"
            else:
                try:
                    _library = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
                    _reason = str(error) or type(error).__name__
            _tried = True
    return _library


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (None when the kernel is available)."""
    load()
    return _reason
