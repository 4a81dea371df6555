#!/usr/bin/env bash
# The runs behind docs/benchmarks/fm60k.md and the protocol tables of docs/benchmarks/vision_lm.md: cosine annealing
# to 0 over the run (the reference configurations' schedule; constant lr as the second column), the KOALA++ default
# preset ('adaptive') as "KOALA++ (default)" and the paper's algorithm as "KOALA++ (paper)", one torch thread per run,
# training time counted as the training thread's CPU time (--clock cpu, the default with one thread).
# Usage: bash docs/benchmarks/run_protocol.sh fm60k-epochs|fm60k-time|fm60k-constant|vision5k|lm|report
# Every command names its recorded file with --out and replaces it with --overwrite (without them a run writes to
# ./kalmanopt-results/ and leaves results/ alone).
set -euo pipefail
# Learning rates, vision: the Fashion-MNIST/CNN sweep of docs/benchmarks/vision_lm.md (default x {1/3, 1, 3}, one
# epoch, validation split; its "KOALA++" was the paper's algorithm, so its 0.333 goes to koala++-paper); the entries
# that sweep did not have (the default KOALA++ preset, K-FAC, AdaFisher, Schedule-Free AdamW, MoMo, MoMo-Adam) run at
# the registry's defaults (1, 0.01, 0.001, 0.0025, 1, 0.01).
VISION_LR="--lr koala++-paper=0.333 --lr koala++-vanilla=0.333 --lr koala-v=0.333 --lr koala-m=0.333 --lr sgd=0.15
 --lr adam=0.003 --lr adamw=0.003 --lr adagrad=0.00333 --lr adahessian=0.0333 --lr sophiah=0.09 --lr shampoo=0.05
 --lr soap=0.009"
# Language model: the moby_dick sweep of docs/benchmarks/vision_lm.md (its "KOALA++", the paper's algorithm: 0.01).
LM_LR="--lr koala++-paper=0.01 --lr koala++-vanilla=0.01 --lr koala-v=0.00333 --lr koala-m=0.01 --lr sgd=0.1
 --lr adam=0.001 --lr adamw=0.001 --lr soap=0.009"
SHORT=koala++,koala++-paper,koala++-vanilla,koala-v,koala-m,adamw,adam,sgd,soap
NOSCHED=adamw-schedulefree,momo-adam   # set their own step size: run once, in the constant-lr files
LM_ALL=$SHORT,adagrad,adahessian,sophiah,shampoo,kfac,adafisher,adamw-schedulefree,momo,momo-adam
FM60K=results/fm60k/fashion_mnist-60k-cnn-cosine-epochs.json
case "${1:-}" in
  fm60k-epochs)
    # every optimizer of the registry's default list, all 60,000 training images (--valid-size 0), 2 epochs, 3 seeds
    # shellcheck disable=SC2086
    kalmanopt bench vision --valid-size 0 --epochs 2 $VISION_LR --no-progress --out "$FM60K" --overwrite
    ;;
  fm60k-time)
    # equal training time: every run gets AdamW's mean training time (thread CPU seconds) of the 2-epoch runs above
    budget=$(python -c "import json,statistics,sys; d=json.load(open(sys.argv[1])); \
print(f\"{statistics.fmean(r['train_seconds'] for r in d['runs'] if r['optimizer']=='adamw'):.1f}\")" "$FM60K")
    # shellcheck disable=SC2086
    kalmanopt bench vision --valid-size 0 --epochs 20 --seconds "$budget" $VISION_LR --no-progress \
      --out results/fm60k/fashion_mnist-60k-cnn-cosine-time.json --overwrite
    ;;
  fm60k-constant)
    # the same 60k images and 2 epochs at a constant lr (no schedule) for the vision5k set: the defaults' setting
    # shellcheck disable=SC2086
    kalmanopt bench vision --valid-size 0 --epochs 2 --schedule constant --optimizers "$SHORT,$NOSCHED" $VISION_LR \
      --no-progress --out results/fm60k/fashion_mnist-60k-cnn-constant-epochs.json --overwrite
    ;;
  vision5k)
    # the older 5k-image table (docs/benchmarks/vision_lm.md) under the protocol: cosine, then constant lr
    for schedule in cosine constant; do
      opts=$SHORT; [ "$schedule" = constant ] && opts=$SHORT,$NOSCHED
      # shellcheck disable=SC2086
      kalmanopt bench vision --train-size 5000 --test-size 5000 --epochs 3 --schedule "$schedule" \
        --optimizers "$opts" $VISION_LR --no-progress --overwrite \
        --out "results/vision/protocol/fashion_mnist-5k-$schedule.json"
    done
    ;;
  lm)
    # the language-model table under the protocol: every optimizer of the registry's default list under cosine (as
    # the 60k Fashion-MNIST table), the vision5k set under constant lr; entries the moby_dick sweep did not have run
    # at the registry's defaults
    for schedule in cosine constant; do
      opts=$LM_ALL; [ "$schedule" = constant ] && opts=$SHORT,$NOSCHED
      # shellcheck disable=SC2086
      kalmanopt bench lm --train-chars 250000 --eval-chars 20000 --epochs 2 --schedule "$schedule" \
        --optimizers "$opts" $LM_LR --no-progress --out "results/lm/protocol/moby_dick-250k-$schedule.json" --overwrite
    done
    ;;
  report)
    # fm60k.md and vision_lm_protocol.md: the prose above the marker line is kept, the tables below it regenerated
    kalmanopt report results/fm60k --out docs/benchmarks/fm60k.md --into
    tmp=$(mktemp -p docs/benchmarks tables.XXXXXX)   # in the page's folder: the figures' relative links hold
    python -m kalmanopt.bench.grid results/vision/protocol "$tmp.grid"
    kalmanopt report results/vision/protocol --no-summary --out "$tmp" --overwrite
    python -m kalmanopt.bench.grid results/lm/protocol "$tmp.lmgrid"
    kalmanopt report results/lm/protocol --no-summary --out "$tmp.lm" --overwrite
    cat "$tmp.grid" "$tmp" "$tmp.lmgrid" "$tmp.lm" > "$tmp.all"
    python -c "import sys, pathlib; from kalmanopt.bench.report import splice; \
splice(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text())" docs/benchmarks/vision_lm_protocol.md "$tmp.all"
    rm -f "$tmp" "$tmp.grid" "$tmp.lmgrid" "$tmp.lm" "$tmp.all"
    ;;
  *) echo "usage: $0 fm60k-epochs|fm60k-time|fm60k-constant|vision5k|lm|report" >&2; exit 2 ;;
esac
