#!/usr/bin/env bash
# The GPU check of the fused KOALA++ step (issue 20), prepared to run on a bare machine with an NVIDIA GPU:
#   bash docs/benchmarks/gpu_check.sh            (from anywhere; about 5 minutes, at most 8)
# What such a machine has: Python 3.12, PyTorch with CUDA, Triton, pytest (the project's other extras need not be
# there, nor a network): the repository runs as it is, from its source tree (PYTHONPATH=src), nothing installed.
# It writes under results/gpu/:
#   environment.txt   the GPU, driver, Python, torch and Triton versions
#   tests.txt         tests/test_koala_pp_triton.py: the CUDA tests (Triton kernels against the reference, skipped
#                     steps bit for bit, GradScaler, low precision, torch.compile as one operator node) and the
#                     interpreter tests of the same kernels
#   step.json/.md     kalmanopt bench step --device cuda: ms/step (CUDA events) of KOALA++ (default: the Triton
#                     kernels; bfloat16 state; the multi-tensor path) against AdamW(foreach) and AdamW(fused), on the
#                     ResNet-18, ResNet-50 and GPT-2 parameter shapes
#   floor.md          the same medians against each step's bytes-moved floor at the measured copy bandwidth
#   fm60k.json/.md    kalmanopt bench vision --device cuda: Fashion-MNIST 60k, the small CNN, 2 epochs, KOALA++ against
#                     AdamW (seed 0; the protocol of results/fm60k/: no validation split, constant lr, AdamW at 3e-3),
#                     test accuracy and wall-clock training time. Fashion-MNIST is not in the repository: it is read
#                     from the kalmanopt cache ($KALMANOPT_DATA, or $KALMANOPT_HOME/data, default
#                     ~/.cache/kalmanopt/data; `kalmanopt data fetch fashion_mnist` on a machine with a network fills
#                     it) or Debian's /usr/share/datasets/fashion-mnist; without it this part is skipped, with a line
#                     saying so (no download is tried)
#   online/           kalmanopt bench online --device cuda --quick: the digits stream (scikit-learn's bundled 8x8
#                     digits, no download) with LoRA, LoKO at its defaults against LoRA/AdamW and LoRA/AdaGrad
#                     (online_digits_shift_quick.json; online.log: one line per run)
# Each part has its own time limit, all within one overall deadline (GPU_CHECK_SECONDS, default 470: under 8 minutes
# in all; a part that would start with less than a minute left is skipped, saying so), and a part that fails does not
# stop the others (the exit status is the first failure's).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
OUT=results/gpu
mkdir -p "$OUT"
status=0
fail() { [ "$status" -ne 0 ] || status=$1; echo "gpu_check: $2 failed (exit $1)" >&2; }
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
# enough: whether a part may start (a minute left); limit CAP: the seconds it may take, at most CAP and what is left
# (never 0: `timeout 0` would not limit it at all)
enough() { [ $((deadline - SECONDS)) -ge 60 ]; }
limit() { local left=$((deadline - SECONDS)); [ "$left" -ge 1 ] || left=1; echo $((left < $1 ? left : $1)); }
skip() { echo "gpu_check: $1 skipped: $2" >&2; }
late="less than a minute left before the deadline (GPU_CHECK_SECONDS)"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" - <<'EOF'
import platform, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
      f"{triton_version}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
} > "$OUT/environment.txt" 2>&1
found=$?
cat "$OUT/environment.txt"
if [ "$found" -ne 0 ]; then
  echo "gpu_check: no CUDA device here: nothing to check" >&2
  exit "$found"
fi

# 1. The tests (about 2-3 minutes: each kernel specialisation compiles at its first launch).
timeout "$(limit 300)" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_koala_pp_triton.py > "$OUT/tests.txt" 2>&1 \
  || fail $? "the tests (see $OUT/tests.txt)"
tail -n 5 "$OUT/tests.txt"

# 2. The step table (about 1-2 minutes).
if ! enough; then
  skip "the step table" "$late"
else
  timeout "$(limit 240)" "$PY" -m kalmanopt.cli bench step --device cuda --preset resnet18,resnet50,gpt2 \
    --optimizers koala++,koala++-fused-bf16,koala++-foreach,adamw,adamw-fused --max-memory-gb 60 \
    --out "$OUT/step.json" --overwrite > "$OUT/step.md" 2> "$OUT/step.log" \
    || fail $? "the step table (see $OUT/step.log)"
  cat "$OUT/step.md"
fi

# 3. Each median against the step's floor: the bytes it must move (fused kernels: one read of everything, one write
#    of what changes) at the bandwidth of a large device-to-device copy (about 20 seconds).
if ! enough; then
  skip "the floor table" "$late"
elif [ -s "$OUT/step.json" ]; then
timeout "$(limit 60)" "$PY" - "$OUT/step.json" > "$OUT/floor.md" <<'EOF' || fail $? "the floor table"
import json, sys
import torch

# Bytes per parameter of one step on float32 parameters with weight decay (the bench's 5e-4): (read, written), as the
# kernels move them. KOALA++ reads gradient, parameter and state in its reduction pass (g, p, s, H, G) and again in
# its element-wise pass (and m), and writes parameter and state once (p, s, H, G, m); on a GPU the writes take the
# same memory bandwidth as the reads, so the floor counts both. Fused AdamW reads g, p and two moments, writes three.
BYTES = {
    "koala++": ((4 + 4 + 3 * 4) + (4 + 4 + 4 * 4), 4 + 4 * 4),  # 44 read, 20 written
    "koala++-fused-bf16": ((4 + 4 + 3 * 2) + (4 + 4 + 4 * 2), 4 + 4 * 2),  # 30 read, 12 written: bfloat16 state
    "adamw-fused": (4 + 4 + 2 * 4, 4 + 2 * 4),  # 16 read, 12 written
}
numel = 1 << 28  # 1 GiB of float32
src, dst = torch.empty(numel, device="cuda"), torch.empty(numel, device="cuda")
dst.copy_(src)
best = 0.0
for _ in range(10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    best = max(best, 2 * 4 * numel / (start.elapsed_time(end) / 1e3))
results = json.load(open(sys.argv[1]))
device = results["provenance"].get("device_name", "?")
print(f"## KOALA++ step against its bytes-moved floor on {device}\n")
print(f"Copy bandwidth (1 GiB device-to-device, best of 10): {best / 1e9:.0f} GB/s. Floor = (bytes read + bytes "
      "written) per parameter x parameters / that bandwidth.\n")
print("| preset | optimizer | median ms/step | bytes read + written | floor ms | x floor | vs AdamW (foreach) |")
print("|---|---|---:|---:|---:|---:|---:|")
for record in results["results"]:
    for row in record["rows"]:
        cells = [record["preset"], row["name"], "%.3f" % row["median_ms"], "", "", "", ""]
        if row["key"] in BYTES:
            read, written = BYTES[row["key"]]
            floor = (read + written) * record["n_params"] / best * 1e3
            cells[3:6] = ["%d + %d" % (read, written), "%.3f" % floor, "%.2fx" % (row["median_ms"] / floor)]
        if row["ratio_to_adamw"] is not None:
            cells[6] = "%.2fx" % row["ratio_to_adamw"]
        print("| " + " | ".join(cells) + " |")
EOF
fi
[ -s "$OUT/floor.md" ] && cat "$OUT/floor.md"

# 4. Fashion-MNIST 60k, 2 epochs, KOALA++ against AdamW on the GPU (about a minute with the data in host memory; the
#    first KOALA++ steps compile the Triton kernels). Only from a local copy of the data: this machine has no network.
if ! fm_dir=$("$PY" -c "from kalmanopt import data; print(data.locate('fashion_mnist'))" 2>/dev/null); then
  skip "Fashion-MNIST 60k" "Fashion-MNIST is neither in the kalmanopt cache (KALMANOPT_DATA=${KALMANOPT_DATA:-unset}) \
nor in /usr/share/datasets/fashion-mnist; run 'kalmanopt data fetch fashion_mnist' on a machine with a network and \
point KALMANOPT_DATA at that cache"
elif ! enough; then
  skip "Fashion-MNIST 60k" "$late"
else
  echo "gpu_check: Fashion-MNIST from $fm_dir"
  timeout "$(limit 240)" "$PY" -m kalmanopt.cli bench vision --device cuda --dataset fashion_mnist --valid-size 0 \
    --epochs 2 --seeds 0 --optimizers koala++,adamw --lr adamw=0.003 --schedule constant --no-progress \
    --out "$OUT/fm60k.json" --overwrite > "$OUT/fm60k.log" 2>&1 || fail $? "Fashion-MNIST 60k (see $OUT/fm60k.log)"
  tail -n 4 "$OUT/fm60k.log"
  [ -s "$OUT/fm60k.json" ] && "$PY" -m kalmanopt.cli report "$OUT/fm60k.json" --no-plots --no-summary \
    > "$OUT/fm60k.md" 2>> "$OUT/fm60k.log" && cat "$OUT/fm60k.md"
fi

# 5. A LoKO stream on the GPU: the digits stream, quick (two orders of 60 samples after a 30-sample tuning stream),
#    LoRA only, no ablation rows (about a minute: batch size 1, many small kernels per step).
if ! enough; then
  skip "the LoKO stream" "$late"
else
  timeout "$(limit 180)" "$PY" -m kalmanopt.cli bench online --device cuda --quick --task digits_shift \
    --adapters LoRA --ablations none --no-progress --out "$OUT/online" --overwrite > "$OUT/online.log" 2>&1 \
    || fail $? "the LoKO stream (see $OUT/online.log)"
  grep "^\[digits_shift\]" "$OUT/online.log" | tail -n 8
fi
echo "gpu_check: results in $OUT/ (exit $status)"
exit "$status"
