#!/usr/bin/env bash
# The GPU check, one device call (docs/gpu.md): parts in priority order, each the most valuable of what
# is left, within BUDGET_S seconds of wall time (default 300, from a bare machine):
#   setup (carried wheels, versions, every import with its real error: OUT/imports.json), train_throughput
#   (msft-fast train, default attention, eager, Llama-3.2-1B shape, 8192 tokens, 8 steps), loss_timing
#   (16384 x 2048 x 128256 bf16: ours vs materialised vs Liger/CCE), trainer_check (snapshot restore first),
#   loss_check (Triton paths vs float64), then train_variants, msft_rollout and train_vs_hf (GPU only).
# OUT/gpu_check.json and .md are rewritten after every part: a call cut short returns every part that
# finished. Parts run under `timeout -s KILL` (SIGTERM makes the trainer write a 15 GB checkpoint); a
# part that would get less than PART_MIN seconds is recorded as "skipped: out of time", never started.
#
#   bash bench/gpu_check.sh          # a GPU machine; OUT: $OUT, else bench/results/gpu
#   bash bench/gpu_check.sh --cpu    # dry run: the same parts and Python on tiny shapes (Triton interpreter for
#                                    # the loss, packed SDPA, nothing compiled); OUT: $OUT, else /tmp/bench_work
# Python: $PYTHON, else .venv/bin/python, else python3. Scratch (a 2.5 GB model): $BENCH_WORK, never under OUT.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
case "${1:-}" in "") MODE=gpu ;; --cpu) MODE=cpu ;; *) echo "usage: bash bench/gpu_check.sh [--cpu]" >&2; exit 2 ;; esac
[ -n "${PYTHON:-}" ] || if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
if [ "$MODE" = gpu ]; then OUT="${OUT:-bench/results/gpu}"; else OUT="${OUT:-/tmp/bench_work/gpu_check_cpu}"; fi
WORK="${BENCH_WORK:-/tmp/bench_work/gpu_check_work_$MODE}"
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd) WORK=$(cd "$WORK" && pwd)
case "$WORK/" in "$OUT"/*)
    echo "gpu_check: the scratch folder $WORK is under OUT ($OUT); set BENCH_WORK elsewhere" >&2; exit 2 ;;
esac
# A GPU run has 5 minutes; the dry run gets more, so that a loaded machine still runs every part.
if [ "$MODE" = gpu ]; then BUDGET="${BUDGET_S:-300}"; else BUDGET="${BUDGET_S:-600}"; fi
RESERVE=5 PART_MIN=20  # seconds kept for the last report; the least a part is started with
START=$SECONDS
PARTS="$WORK/parts" STATUS="$WORK/status.jsonl"
rm -rf "$PARTS" "$WORK"/*.log && mkdir -p "$PARTS" && : > "$STATUS"

# The lent VM's memory grows on demand: MemAvailable says far less than it can give, and the
# snapshot pool's host-memory preflight would refuse the 1B model's states.
if [ -z "${MSFT_FAST_HOST_MEMORY_GIB:-}" ]; then
    MSFT_FAST_HOST_MEMORY_GIB=$(awk '/^MemTotal:/ {printf "%.1f", 0.9 * $2 / 1048576}' /proc/meminfo)
fi
export MSFT_FAST_HOST_MEMORY_GIB PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TMPDIR="$WORK" \
    TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton" HF_DATASETS_CACHE="$WORK/datasets"
# The interpreter only where asked for (the dry run's loss parts): tests/conftest.py exports it to children.
if [ "$MODE" = gpu ]; then export TRITON_INTERPRET=0; else unset TRITON_INTERPRET; fi
# Carried wheels first, then this tree (msft_fast/kernels/__init__.py reaches kernels/ from here).
SITE="$WORK/site"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

note() {  # part, status, detail [, seconds]: one line of the status file
    printf '%-18s %-14s %s\n' "$1" "$2" "$3"
    "$PYTHON" -c 'import json, sys; print(json.dumps({"part": sys.argv[1], "status": sys.argv[2],
        "detail": sys.argv[3], "seconds": int(sys.argv[4]) if sys.argv[4] else None}))' \
        "$1" "$2" "$3" "${4:-}" >> "$STATUS"
}

report() {  # OUT/gpu_check.{json,md} and the logs' tails from everything written so far
    "$PYTHON" bench/gpu_check_report.py render --mode "$MODE" --work "$WORK" --out "$OUT" --budget "$BUDGET" \
        --wall $((SECONDS - START)) "$@" > "$WORK/report.out" 2>&1 || tail -n 5 "$WORK/report.out"
}

part() {  # name, limit in seconds, command...: never past the budget, killed with SIGKILL at its limit
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    if [ "$left" -lt "$PART_MIN" ]; then
        note "$name" skipped "out of time: ${left}s of the ${BUDGET}s budget left"
        report
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS rc
    timeout -s KILL "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - t0))
    grep -v '^\s*$' "$WORK/$name.log" | grep -v -i 'warn\|it/s\]' | tail -n 12
    if [ $rc -eq 0 ]; then note "$name" ok "${took}s" "$took"
    elif [ $rc -eq 137 ] && [ $took -ge $((limit - 1)) ]; then
        note "$name" "timed out" "killed at its ${limit}s limit" "$took"
    elif [ $rc -eq 137 ]; then note "$name" failed "killed (SIGKILL) after ${took}s: out of memory?" "$took"
    else note "$name" failed "exit $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-200)" "$took"
    fi
    report
}

cap() {  # seconds: at most that many, and no more than the budget leaves
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    echo $(($1 < left ? $1 : left))
}

install_wheels() {  # $PEER_WHEELS (default .whl) into $SITE, one at a time if the batch fails
    local wheels="${PEER_WHEELS:-.whl}" log="$WORK/install.txt" w
    local pip=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    rm -rf "$SITE" && mkdir -p "$SITE" && : > "$log"
    if ! ls "$wheels"/*.whl > /dev/null 2>&1; then
        echo "no carried wheels in $wheels (bench/gather_wheels.sh gathers them)" | tee -a "$log"
        return
    fi
    "${pip[@]}" "$wheels"/*.whl >> "$log" 2>&1 || for w in "$wheels"/*.whl; do
        "${pip[@]}" "$w" >> "$log" 2>&1 || echo "could not install $(basename "$w")" | tee -a "$log"
    done
    # A carried transformers may need newer libraries than the machine has: the machine's then.
    if [ -d "$SITE/transformers" ] && ! "$PYTHON" -c 'import transformers' >> "$log" 2>&1; then
        rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
        echo "the carried transformers does not import here; using the machine's" | tee -a "$log"
    fi
    echo "carried wheels installed: $(cd "$wheels" && ls ./*.whl | tr '\n' ' ')" | tee -a "$log"
}

echo "== setup"
install_wheels
"$PYTHON" bench/gpu_check_report.py setup --mode "$MODE" --work "$WORK" --out "$OUT" > "$WORK/setup.log" 2>&1
rc=$?
cat "$WORK/setup.log"
if [ $rc -eq 0 ]; then note setup ok "$(tail -n 1 "$WORK/install.txt" | cut -c1-160)" $((SECONDS - START))
else note setup failed "exit $rc: $(tail -n 1 "$WORK/setup.log" | cut -c1-300)" $((SECONDS - START)); fi
report

if [ "$MODE" = gpu ]; then DEVICE=cuda; else DEVICE=cpu; fi
TRAIN=("$PYTHON" bench/bench_train.py --device $DEVICE --workdir "$WORK/train" --out "$PARTS")
LOSS=("$PYTHON" bench/bench_loss.py --out "$PARTS")
if [ "$MODE" = gpu ]; then
    STEPS=(--steps 8 --skip 3)
    VARIANTS=(flex_attention:off:off packed_sdpa:on:off packed_sdpa:off:selective flash_attention_2:off:off
              flex_attention:on:off)
    LOSS_TIMING=(--device cuda --shape 16384 2048 128256)
    LOSS_CHECK=(--device cuda --check)
else
    STEPS=(--steps 6 --skip 2)
    # No FlexAttention backward on a CPU, no flash-attn: both are reported as not available.
    VARIANTS=(packed_sdpa:off:selective flex_attention:off:off flash_attention_2:off:off)
    LOSS=(env OMP_NUM_THREADS=1 "${LOSS[@]}")
    LOSS_TIMING=(--interpret)
    LOSS_CHECK=(--interpret --check)
fi

# Every part runs even when setup found an import missing: it then fails at once with its own error.
# Training runs stop starting new variants 10 s before their part's limit; each also has its own limit.
LIMIT=$(cap 150)
part train_throughput "$LIMIT" "${TRAIN[@]}" "${STEPS[@]}" --stem throughput --timeout $((LIMIT - 5)) \
    --budget $((LIMIT - 5)) --variants auto:off:off
part loss_timing 90 "${LOSS[@]}" "${LOSS_TIMING[@]}" --cases msft_fast_chunked materialised liger cce --stem loss_timing
part trainer_check 100 "${TRAIN[@]}" --check --stem trainer_check
part loss_check 75 "${LOSS[@]}" "${LOSS_CHECK[@]}"
LIMIT=$(cap 240)
part train_variants "$LIMIT" "${TRAIN[@]}" "${STEPS[@]}" --stem variants --timeout 120 --budget $((LIMIT - 10)) \
    --variants "${VARIANTS[@]}"
LIMIT=$(cap 120)
part msft_rollout "$LIMIT" "${TRAIN[@]}" --stem rollout --rollout --steps 16 --skip 2 --timeout $((LIMIT - 5))
if [ "$MODE" = gpu ]; then  # HF gets one row a batch here: padded and padding-free are the same, one side runs
    LIMIT=$(cap 150)
    part train_vs_hf "$LIMIT" "${TRAIN[@]}" --sides ours,hf_flat --timeout $(((LIMIT - 30) / 2))
fi

report --final
echo "gpu_check ($MODE): $((SECONDS - START))s of ${BUDGET}s; results in $OUT"
