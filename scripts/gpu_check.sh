#!/usr/bin/env bash
# The GPU check, prepared for one short lease of a GPU machine (about 15 minutes):
#   1. pytest -m gpu, then the stacked and layer-norm tests on the GPU -> $OUT/pytest-gpu.txt
#   2. bnrnn bench --device cuda          -> $OUT/bench.txt
#   3. a seqMNIST BN-LSTM run with the paper preset, stopped cleanly (SIGTERM: checkpoint,
#      exit 143) after TRAIN_SECONDS      -> $OUT/train.log, $OUT/metrics.jsonl,
#      then bnrnn report on it            -> $OUT/report/seqmnist.png, $OUT/report/report.md
#   4. the same with a 2-layer bidirectional BN-LSTM for STACK_SECONDS -> $OUT/train-stack.log
#
# usage: scripts/gpu_check.sh [OUT]      (OUT defaults to $OUT, else runs/gpu-check)
# settings (environment): DEVICE=cuda, STEPS=20000 (an H100 took about 21 ms a graphed
# step), TRAIN_SECONDS=480, STACK_SECONDS=60 (0: skip part 4), EVAL_EVERY=500, DATA_ROOT (a folder holding MNIST/raw/*.gz;
# default: the first of shared/data, ../shared/data, runs/data that has it),
# BENCH_ARGS (extra bnrnn bench options).
# Try it on the CPU with small numbers first:
#   DEVICE=cpu STEPS=20 EVAL_EVERY=10 TRAIN_SECONDS=120 BENCH_ARGS="--shape seqmnist --repeats 1 --warmup 0" \
#       scripts/gpu_check.sh runs/gpu-check-cpu
# Exit status: 0 when every part ran and passed, 1 when a part failed (the others still run).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-${OUT:-runs/gpu-check}}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-20000}"
TRAIN_SECONDS="${TRAIN_SECONDS:-480}"
STACK_SECONDS="${STACK_SECONDS:-60}"
EVAL_EVERY="${EVAL_EVERY:-500}"
BENCH_ARGS="${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
failed=()

if [ -z "${DATA_ROOT:-}" ]; then
    for candidate in shared/data ../shared/data runs/data; do
        if [ -d "$candidate/MNIST/raw" ]; then DATA_ROOT="$candidate"; break; fi
    done
fi
if [ -z "${DATA_ROOT:-}" ] || [ ! -d "$DATA_ROOT/MNIST/raw" ]; then
    echo "gpu_check: no MNIST/raw under ${DATA_ROOT:-shared/data, ../shared/data or runs/data}; set DATA_ROOT" >&2
    exit 2
fi
if ! python3 -c "import bnrnn" 2>/dev/null; then
    echo "== installing bnrnn (no dependencies: torch and the rest must be there)"
    python3 -m pip install -q --no-deps -e . || { echo "gpu_check: bnrnn does not install" >&2; exit 2; }
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'no cuda',
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/pytest-gpu.txt"

if [ "$DEVICE" = cuda ]; then
    echo "== pytest -m gpu"
    python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee -a "$OUT/pytest-gpu.txt" || failed+=("pytest -m gpu")
    # The stacked layers' Triton cases run on CUDA where there is one (their cpu cases would
    # build the compiled CPU loops first: CPU work, CI's).
    echo "== stacked layers on the GPU"
    python3 -m pytest -q -p no:cacheprovider tests/test_stacked.py -k "not cpu" 2>&1 |
        tee -a "$OUT/pytest-gpu.txt" || failed+=("stacked-layer tests")
else
    echo "(DEVICE=$DEVICE: pytest -m gpu skipped)" | tee -a "$OUT/pytest-gpu.txt"
fi

echo "== bnrnn bench --device $DEVICE $BENCH_ARGS"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
python3 -m bnrnn.cli bench --device "$DEVICE" $BENCH_ARGS 2>&1 | tee "$OUT/bench.txt" || failed+=("bench")

# A seqMNIST run of at most $STEPS steps stopped after $2 seconds, logged to $OUT/$3; the
# rest of the arguments are overrides. Sets last_run to the run folder.
timed_run() {
    local name=$1 seconds=$2 log=$3 status
    shift 3
    local run
    run="runs/gpu-check-runs/$name-$(date +%Y%m%d-%H%M%S)"
    last_run=$run
    echo "== training $run for at most $STEPS steps or $seconds s"
    timeout --preserve-status --signal=TERM "$seconds" python3 -m bnrnn.cli train experiment=paper_seqmnist \
        "data.root=$DATA_ROOT" data.download=false "device=$DEVICE" "trainer.max_steps=$STEPS" \
        "trainer.eval_every=$EVAL_EVERY" trainer.test_at_end=false trainer.progress=off "hydra.run.dir=$run" "$@" \
        > "$OUT/$log" 2>&1
    status=$?
    tail -n 5 "$OUT/$log"
    case $status in
        0) ;;
        143) echo "stopped after $seconds s, as planned (checkpoint written)" ;;
        *) failed+=("training $name (exit $status)") ;;
    esac
}

timed_run seqmnist-bnlstm "$TRAIN_SECONDS" train.log model=bnlstm
RUN=$last_run
if [ -f "$RUN/metrics.jsonl" ]; then
    cp "$RUN/metrics.jsonl" "$OUT/metrics.jsonl"
    python3 -m bnrnn.cli report "$RUN" --out "$OUT/report" || failed+=("report")
else
    failed+=("training wrote no metrics.jsonl")
fi
if [ "$STACK_SECONDS" -gt 0 ]; then
    timed_run seqmnist-bnlstm-2x2 "$STACK_SECONDS" train-stack.log model=bnlstm model.num_layers=2 \
        model.bidirectional=true
    if [ -f "$last_run/metrics.jsonl" ]; then
        cp "$last_run/metrics.jsonl" "$OUT/metrics-stack.jsonl"
    else
        failed+=("the stacked run wrote no metrics.jsonl")
    fi
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu_check: failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu_check: all parts ran; results in $OUT"
