# Shared by bench/gpu_check*.sh (sourced, not run): mode, paths, the time-boxed `part` runner and
# the status lines each script turns into its table. The caller sets, before sourcing:
#   NAME (the script's name), BUDGET_DEFAULT (seconds), and may set PART_RESERVE (seconds kept back
#   at the end, default 10) and PART_MIN (skip a part when fewer seconds are left, default 30);
# and may redefine show_log after sourcing.
set -u
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "$MODE" = gpu ]; then OUT="${OUT:-bench/results/gpu}"; else OUT="${OUT:-/tmp/bench_work/${NAME}_cpu}"; fi
WORK="${BENCH_WORK:-/tmp/bench_work/${NAME}_work_$MODE}"  # never under $OUT: it may hold a 2.5 GB model
BUDGET="${BUDGET_S:-$BUDGET_DEFAULT}"   # the whole script; parts are skipped when too little time is left
PART_RESERVE="${PART_RESERVE:-10}"
PART_MIN="${PART_MIN:-30}"
mkdir -p "$OUT" "$WORK"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TMPDIR="$WORK" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" \
    TRITON_CACHE_DIR="$WORK/triton"
[ "$MODE" = gpu ] && export TRITON_INTERPRET=0   # tests/conftest.py would default it to 1
STATUS="$OUT/${NAME}_status.jsonl"
: > "$STATUS"
START=$SECONDS

note() {  # part, status, detail
    printf '%-28s %-14s %s\n' "$1" "$2" "$3"
    "$PYTHON" -c 'import json,sys; print(json.dumps({"part": sys.argv[1], "status": sys.argv[2], "detail": sys.argv[3]}))' \
        "$1" "$2" "$3" >> "$STATUS"
}

show_log() {  # log file: what of a finished part's log is printed
    tail -n 25 "$1"
}

part() {  # name, seconds, command...: run with a limit that never passes the script's budget
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - (SECONDS - START) - PART_RESERVE ))
    if [ "$left" -lt "$PART_MIN" ]; then note "$name" "skipped" "out of time (${BUDGET}s budget)"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    show_log "$WORK/$name.log"
    if [ $rc -eq 0 ]; then note "$name" "ok" "$((SECONDS - t0))s, log $WORK/$name.log"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "$name" "timed out" "after ${limit}s, log $WORK/$name.log"
    else note "$name" "failed" "exit $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-160)"; fi
}

require_cuda() {  # a GPU run without a visible device stops here
    if [ "$MODE" = gpu ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "$NAME: no CUDA device visible to $PYTHON; use --cpu for the dry run" >&2
        exit 2
    fi
}

install_carried() {  # GPU machine: wheels carried in $PEER_WHEELS, then this package if not installed
    [ "$MODE" = gpu ] || return 0
    if [ -n "${PEER_WHEELS:-}" ] && ls "$PEER_WHEELS"/*.whl > /dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-deps --no-index "$PEER_WHEELS"/*.whl || echo "installing $PEER_WHEELS failed"
    fi
    # msft_fast.kernels is kernels/ only once the package is installed (pyproject's package-dir).
    if ! "$PYTHON" -c 'import msft_fast.kernels' > /dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "installing msft-fast failed"
    fi
}
