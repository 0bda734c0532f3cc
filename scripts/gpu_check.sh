#!/usr/bin/env bash
# The GPU check, prepared for one short lease of a GPU machine (about 15 minutes):
#   1. pytest -m gpu, then the stacked and layer-norm tests on the GPU -> $OUT/pytest-gpu.txt
#   2. bnrnn bench --device cuda          -> $OUT/bench.txt
#   3. a seqMNIST BN-LSTM run with the paper preset, stopped cleanly (SIGTERM: checkpoint,
#      exit 143) after TRAIN_SECONDS      -> $OUT/train.log, $OUT/metrics.jsonl,
#      then bnrnn report on it            -> $OUT/report/seqmnist.png, $OUT/report/report.md
#   4. the same with a 2-layer bidirectional BN-LSTM for STACK_SECONDS -> $OUT/train-stack.log
#   5. bf16 against float32 (issue 30): two seqMNIST BN-LSTM runs side by side on the aten
#      backend, trainer.precision=bf16 and 32, BF16_STEPS steps or BF16_SECONDS each, then
#      their validation accuracies step by step -> $OUT/bf16.md (train-bf16.log, train-fp32.log)
#
# usage: scripts/gpu_check.sh [OUT]      (OUT defaults to $OUT, else runs/gpu-check)
# settings (environment): DEVICE=cuda; STEPS=20000 (an H100 took about 21 ms a graphed
# step); BENCH=1 (0: skip part 2), BENCH_ARGS (extra bnrnn bench options); TRAIN_SECONDS=480
# (0: skip part 3); STACK_SECONDS=60 (0: skip part 4); BF16_STEPS=2000, BF16_SECONDS=240 (0:
# skip part 5), BF16_ARGS (overrides for both of part 5's runs); EVAL_EVERY=500; DATA_ROOT (a
# folder holding MNIST/raw/*.gz; default: the first of shared/data, ../shared/data, runs/data
# that has it).
# Try it on the CPU with small numbers first:
#   DEVICE=cpu STEPS=20 EVAL_EVERY=10 TRAIN_SECONDS=120 BENCH_ARGS="--shape seqmnist --repeats 1 --warmup 0" \
#       BF16_STEPS=2 BF16_ARGS="trainer.eval_batches=1 model.hidden_size=8" scripts/gpu_check.sh runs/gpu-check-cpu
# Exit status: 0 when every part ran and passed, 1 when a part failed (the others still run).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-${OUT:-runs/gpu-check}}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-20000}"
BENCH="${BENCH:-1}"
TRAIN_SECONDS="${TRAIN_SECONDS:-480}"
STACK_SECONDS="${STACK_SECONDS:-60}"
BF16_STEPS="${BF16_STEPS:-1000}"
BF16_SECONDS="${BF16_SECONDS:-450}"
BF16_EVAL_EVERY="${BF16_EVAL_EVERY:-250}"
PYTEST="${PYTEST:-1}"
BF16_ARGS="${BF16_ARGS:-}"
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

if [ "$DEVICE" = cuda ] && [ "$PYTEST" != 0 ]; then
    echo "== pytest -m gpu"
    python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee -a "$OUT/pytest-gpu.txt" || failed+=("pytest -m gpu")
    # The stacked layers' Triton cases run on CUDA where there is one (their cpu cases would
    # build the compiled CPU loops first: CPU work, CI's).
    echo "== stacked layers on the GPU"
    python3 -m pytest -q -p no:cacheprovider tests/test_stacked.py -k "not cpu" 2>&1 |
        tee -a "$OUT/pytest-gpu.txt" || failed+=("stacked-layer tests")
else
    echo "(DEVICE=$DEVICE, PYTEST=$PYTEST: pytest -m gpu skipped)" | tee -a "$OUT/pytest-gpu.txt"
fi

if [ "$BENCH" != 0 ]; then
    echo "== bnrnn bench --device $DEVICE $BENCH_ARGS"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    python3 -m bnrnn.cli bench --device "$DEVICE" $BENCH_ARGS 2>&1 | tee "$OUT/bench.txt" || failed+=("bench")
fi

# A seqMNIST run of at most $STEPS steps stopped after $2 seconds, logged to $OUT/$3; the
# rest of the arguments are overrides. Sets last_run to the run folder.
timed_run() {
    local name=$1 seconds=$2 log=$3 status
    shift 3
    local run
    run="runs/gpu-check-runs/$name-$(date +%Y%m%d-%H%M%S)"
    last_run=$run
    run_to "$run" "$seconds" "$log" "$STEPS" "$@"
}

# run_to RUN SECONDS LOG STEPS OVERRIDES...: the seqMNIST preset into RUN, stopped after
# SECONDS (SIGTERM: checkpoint, exit 143), its output in $OUT/LOG.
run_to() {
    local run=$1 seconds=$2 log=$3 steps=$4 status
    shift 4
    echo "== training $run for at most $steps steps or $seconds s"
    timeout --preserve-status --signal=TERM "$seconds" python3 -m bnrnn.cli train experiment=paper_seqmnist \
        "data.root=$DATA_ROOT" data.download=false "device=$DEVICE" "trainer.max_steps=$steps" \
        "trainer.eval_every=$EVAL_EVERY" trainer.test_at_end=false trainer.progress=off "hydra.run.dir=$run" "$@" \
        > "$OUT/$log" 2>&1
    status=$?
    tail -n 5 "$OUT/$log"
    case $status in
        0) ;;
        143) echo "stopped after $seconds s, as planned (checkpoint written)" ;;
        *) failed+=("training $run (exit $status)") ;;
    esac
}

if [ "$TRAIN_SECONDS" -gt 0 ]; then
    timed_run seqmnist-bnlstm "$TRAIN_SECONDS" train.log model=bnlstm
    RUN=$last_run
    if [ -f "$RUN/metrics.jsonl" ]; then
        cp "$RUN/metrics.jsonl" "$OUT/metrics.jsonl"
        python3 -m bnrnn.cli report "$RUN" --out "$OUT/report" || failed+=("report")
    else
        failed+=("training wrote no metrics.jsonl")
    fi
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

if [ "$BF16_SECONDS" -gt 0 ]; then
    # Both on aten, the backend that runs bf16 GEMMs, so that the precision is the only change.
    # shellcheck disable=SC2086  # BF16_ARGS is a list of overrides
    stamp=$(date +%Y%m%d-%H%M%S)
    run_to "runs/gpu-check-runs/bf16-$stamp" "$BF16_SECONDS" train-bf16.log "$BF16_STEPS" model=bnlstm \
        model.backend=aten trainer.precision=bf16 "trainer.eval_every=$BF16_EVAL_EVERY" $BF16_ARGS &
    run_to "runs/gpu-check-runs/fp32-$stamp" "$BF16_SECONDS" train-fp32.log "$BF16_STEPS" model=bnlstm \
        model.backend=aten trainer.precision=32 "trainer.eval_every=$BF16_EVAL_EVERY" $BF16_ARGS &
    wait
    python3 - "runs/gpu-check-runs/bf16-$stamp" "runs/gpu-check-runs/fp32-$stamp" > "$OUT/bf16.md" <<'PY' ||
import json, sys
def valid(run):
    rows = (json.loads(line) for line in open(f"{run}/metrics.jsonl"))
    return {r["step"]: r["accuracy"] for r in rows if r.get("split") == "valid"}
bf16, fp32 = map(valid, sys.argv[1:3])
if not set(bf16) & set(fp32):
    sys.exit("the bf16 and float32 runs share no validated step")
print("| step | float32 | bf16 GEMMs | difference (points) |\n|---:|---:|---:|---:|")
for step in sorted(set(bf16) & set(fp32)):
    print(f"| {step} | {100 * fp32[step]:.2f} % | {100 * bf16[step]:.2f} % | {100 * (bf16[step] - fp32[step]):+.2f} |")
PY
        failed+=("the bf16 comparison")
    cat "$OUT/bf16.md"
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu_check: failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu_check: all parts ran; results in $OUT"
