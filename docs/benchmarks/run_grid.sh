#!/usr/bin/env bash
# The KOALA++ development grid (the default preset against the paper's algorithm and the peers a user would pick
# instead), constant lr and cosine, 3 seeds, one torch thread per run on a shared 2-core CPU.
# Usage: bash docs/benchmarks/run_grid.sh vision|lm|fm60k|sweep|report
# Every command names its recorded file with --out and replaces it with --overwrite (without them a run writes to
# ./kalmanopt-results/ and leaves results/ alone).
set -euo pipefail
OPTS=koala++,koala++-paper,adamw,adamw-schedulefree,momo-adam
SCHEDULED=koala++,koala++-paper,adamw   # Schedule-Free and MoMo-Adam take no schedule: their constant runs stand
case "${1:-}" in
  vision)
    for schedule in constant cosine; do
      opts=$OPTS; [ "$schedule" = cosine ] && opts=$SCHEDULED
      kalmanopt bench vision --dataset fashion_mnist --train-size 10000 --epochs 3 --schedule "$schedule" \
        --optimizers "$opts" --no-progress --out "results/grid/fashion_mnist-10k-$schedule.json" --overwrite
      kalmanopt bench vision --dataset mnist_subset --valid-size 1000 --epochs 3 --schedule "$schedule" \
        --optimizers "$opts" --no-progress --out "results/grid/mnist_subset-$schedule.json" --overwrite
    done
    ;;
  lm)
    for schedule in constant cosine; do
      opts=$OPTS; [ "$schedule" = cosine ] && opts=$SCHEDULED
      kalmanopt bench lm --train-chars 300000 --eval-chars 20000 --epochs 2 --schedule "$schedule" --lr adamw=0.001 \
        --optimizers "$opts" --no-progress --out "results/grid/moby_dick-300k-$schedule.json" --overwrite
    done
    ;;
  fm60k)
    for schedule in constant cosine; do
      opts=$OPTS; [ "$schedule" = cosine ] && opts=$SCHEDULED
      kalmanopt bench vision --dataset fashion_mnist --valid-size 0 --epochs 2 --schedule "$schedule" \
        --optimizers "$opts" --no-progress --out "results/grid/fashion_mnist-60k-$schedule.json" --overwrite
    done
    ;;
  sweep)
    # AdamW at its best learning rate: a sweep over 1/3, 1, 3 x its default on the validation split (one seed, one
    # epoch), then the 3 seeds at the chosen value, constant lr.
    kalmanopt bench vision --dataset fashion_mnist --train-size 10000 --epochs 3 --schedule constant --sweep \
      --optimizers adamw --no-progress --out results/grid/sweep/fashion_mnist-10k-adamw-swept.json --overwrite
    kalmanopt bench vision --dataset mnist_subset --valid-size 1000 --epochs 3 --schedule constant --sweep \
      --optimizers adamw --no-progress --out results/grid/sweep/mnist_subset-adamw-swept.json --overwrite
    kalmanopt bench lm --train-chars 300000 --eval-chars 20000 --epochs 2 --schedule constant --sweep \
      --optimizers adamw --no-progress --out results/grid/sweep/moby_dick-300k-adamw-swept.json --overwrite
    ;;
  report)
    python -m kalmanopt.bench.grid results/grid docs/benchmarks/grid.md
    # + time-to-accuracy figures per file
    kalmanopt report results/grid --out docs/benchmarks/grid_report.md --overwrite
    ;;
  *) echo "usage: $0 vision|lm|fm60k|sweep|report" >&2; exit 2 ;;
esac
