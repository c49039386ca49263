# Shared by bench/gpu_check*.sh (sourced, not run): mode, paths, the time-boxed `part` runner, the
# status lines each script turns into its table, and the install of carried wheels. The caller sets, before sourcing:
#   NAME (the script's name), BUDGET_DEFAULT (seconds), and may set BUDGET_CPU_DEFAULT (the budget of
#   --cpu runs), PART_RESERVE (seconds kept back at the end, default 10) and PART_MIN (skip a part
#   when fewer seconds are left, default 30);
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
[ "$MODE" = cpu ] && [ -n "${BUDGET_CPU_DEFAULT:-}" ] && BUDGET_DEFAULT=$BUDGET_CPU_DEFAULT
BUDGET="${BUDGET_S:-$BUDGET_DEFAULT}"   # the whole script; parts are skipped when too little time is left
PART_RESERVE="${PART_RESERVE:-10}"
PART_MIN="${PART_MIN:-30}"
mkdir -p "$OUT" "$WORK"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TMPDIR="$WORK" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" \
    TRITON_CACHE_DIR="$WORK/triton"
[ "$MODE" = gpu ] && export TRITON_INTERPRET=0   # tests/conftest.py would default it to 1
STATUS="$WORK/${NAME}_status.jsonl"  # $OUT keeps only the final tables (the device tool returns 8 files)
: > "$STATUS"
START=$SECONDS

note() {  # part, status, detail [, seconds]
    printf '%-28s %-14s %s\n' "$1" "$2" "$3"
    "$PYTHON" -c 'import json,sys; print(json.dumps({"part": sys.argv[1], "status": sys.argv[2], "detail": sys.argv[3],
                                                     "seconds": int(sys.argv[4]) if sys.argv[4] else None}))' \
        "$1" "$2" "$3" "${4:-}" >> "$STATUS"
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
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then note "$name" "ok" "${took}s, log $WORK/$name.log" "$took"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "$name" "timed out" "after ${limit}s, log $WORK/$name.log" "$took"
    else note "$name" "failed" "exit $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-160)" "$took"; fi
}

require_cuda() {  # a GPU run without a visible device stops here
    if [ "$MODE" = gpu ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "$NAME: no CUDA device visible to $PYTHON; use --cpu for the dry run" >&2
        exit 2
    fi
}

install_carried() {  # wheels carried in $PEER_WHEELS (default .whl, from bench/gather_wheels.sh), then this package
    # Both modes run this: on the GPU machine (no registry) it is how datasets & co. get there; with
    # --cpu it usually finds no wheels and an installed package. What was done is in $WORK/install.txt.
    local site="$WORK/site" wheels="${PEER_WHEELS:-.whl}" log="$WORK/install.txt"
    rm -rf "$site"
    mkdir -p "$site"
    : > "$log"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"  # carried versions first, for every part
    if ls "$wheels"/*.whl > /dev/null 2>&1; then
        local pip=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site")
        if ! "${pip[@]}" "$wheels"/*.whl >> "$log" 2>&1; then  # one at a time, so one bad wheel costs only itself
            for w in "$wheels"/*.whl; do
                "${pip[@]}" "$w" >> "$log" 2>&1 || echo "could not install $(basename "$w")" | tee -a "$log"
            done
        fi
        # A carried transformers may need newer libraries than the machine has: keep the machine's then.
        if [ -d "$site/transformers" ] && ! "$PYTHON" -c 'import transformers' >> "$log" 2>&1; then
            rm -rf "$site"/transformers "$site"/transformers-*.dist-info
            echo "the carried transformers does not import here; using the installed one" | tee -a "$log"
        fi
        echo "carried wheels installed into $site: $(cd "$wheels" && ls *.whl | tr '\n' ' ')" | tee -a "$log"
    else
        echo "no carried wheels in $wheels (bench/gather_wheels.sh gathers them)" | tee -a "$log"
    fi
    # This tree imports as it is from the repository root (msft_fast/kernels/__init__.py reaches kernels/).
}
