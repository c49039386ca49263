#!/usr/bin/env bash
# The trainer's CUDA paths on one GPU, checked and measured in one command (under 8 minutes on one H200,
# installs included). Parts, most valuable first, each with its own time limit (one that fails or runs
# out of time never stops the others):
#   setup             carried wheels (bench/gather_wheels.sh -> .whl/) installed; this tree importable
#   loss_check        the Triton loss kernel against the float64 reference, on the device
#                     (bench/bench_loss.py --device cuda --check)
#   trainer_check     gradient reductions once per step, host syncs per step and where from, the time
#                     split, pinned snapshots restored bitwise (weights + Adam) with capture/restore cost
#                     and s/GB, the memory preflight against torch.cuda.max_memory_allocated
#                     (bench/trainer_check.py: Llama-3.2-1B shape, rows of 8192 packed tokens, bf16)
#   train_throughput  tokens/s, MFU, peak memory and the preflight per variant: FlexAttention with
#                     torch.compile off/on and activation checkpointing off/selective, flash-attn when
#                     carried (bench/bench_train_gpu.py --variants; variants that do not fit what is left
#                     of the budget, less the roll-out's share, are recorded as skipped)
#   msft_rollout      a 2-task mSFT roll-out with one roll-back on that model: snapshot and restore share
#                     of training time (bench/bench_train_gpu.py --rollout)
# Output: $OUT/gpu_check.json and gpu_check.md (machine, GPU, driver, versions, every figure) and
# gpu_check_logs.txt (default OUT: bench/results/gpu; with --cpu /tmp/bench_work/gpu_check_cpu).
# The loss benchmark against Liger/CCE is bench/gpu_check_ce.sh's.
#
# --cpu runs every part's Python with the same code path on tiny shapes (the Triton interpreter for the
# kernel check, SDPA where FlexAttention has no CPU backward, no torch.compile variants: inductor's CPU
# compile takes minutes on 2 cores; tests/test_parallel_options.py covers compiled blocks). No part
# is skipped there; tests/test_bench.py runs it and requires every part "ok".
#
#   bench/gather_wheels.sh && bench/gpu_check.sh   # GPU machine: python $PYTHON, else .venv/bin/python, else python3
#   bench/gpu_check.sh --cpu                       # dry run here, about 2 minutes
NAME=gpu_check BUDGET_DEFAULT=470 BUDGET_CPU_DEFAULT=1500 PART_RESERVE=15 PART_MIN=30
source "$(dirname "$0")/gpu_check_lib.sh"
require_cuda
show_log() {  # without progress bars and warnings
    grep -v '^\s*$' "$1" | grep -v -i 'it/s\]\|warn' | tail -n 12
}
PARTS="$WORK/parts"
rm -rf "$PARTS"
mkdir -p "$PARTS"

echo "== setup"
SETUP_T0=$SECONDS
install_carried
note setup ok "$(tail -n 2 "$WORK/install.txt" | tr '\n' ' ' | cut -c1-200)" $((SECONDS - SETUP_T0))

if [ "$MODE" = gpu ]; then
    DEVICE=(); ATTN=flex_attention
    part loss_check 100 "$PYTHON" bench/bench_loss.py --device cuda --check
else
    DEVICE=(--cpu); ATTN=sdpa
    part loss_check 150 env TRITON_INTERPRET=1 "$PYTHON" bench/bench_loss.py --device cpu --check
fi

trainer_parts() {
    part trainer_check 150 "$PYTHON" bench/trainer_check.py "${DEVICE[@]}" --workdir "$WORK/train" \
        --out "$PARTS/trainer_check.json"
    # Most valuable first: the default backend without flash-attn (FlexAttention) eager, then compiled,
    # then with selective activation checkpointing, then flash-attn (when carried). The roll-out after
    # them keeps ROLLOUT seconds of the budget.
    local ROLLOUT=130 VARIANTS
    if [ "$MODE" = gpu ]; then
        VARIANTS=("$ATTN:off:off" "$ATTN:on:off" "$ATTN:off:selective" "flash_attention_2:off:off"
                  "$ATTN:on:selective" "flash_attention_2:on:off")
    else
        VARIANTS=("$ATTN:off:off" "$ATTN:off:selective" "flash_attention_2:off:off" "flex_attention:off:off")
    fi
    local left=$(( BUDGET - (SECONDS - START) - PART_RESERVE - ROLLOUT ))
    part train_throughput "$left" "$PYTHON" bench/bench_train_gpu.py "${DEVICE[@]}" --steps 10 --skip 3 \
        --timeout 150 --budget $((left - 10)) --workdir "$WORK/train" --out "$PARTS" --variants "${VARIANTS[@]}"
    part msft_rollout "$ROLLOUT" "$PYTHON" bench/bench_train_gpu.py "${DEVICE[@]}" --rollout --attn "$ATTN" \
        --steps 16 --skip 3 --timeout $((ROLLOUT - 10)) --workdir "$WORK/train" --out "$PARTS"
}

# msft-fast train reads tasks with HF datasets, which the GPU machine lacks unless its wheels are carried.
if "$PYTHON" -c 'import datasets, yaml' > /dev/null 2>&1; then
    trainer_parts
else
    for name in trainer_check train_throughput msft_rollout; do
        note "$name" "not available" "msft-fast train needs the datasets package: bench/gather_wheels.sh, then carry .whl"
    done
fi

"$PYTHON" bench/gpu_check_report.py --mode "$MODE" --work "$WORK" --status "$STATUS" --out "$OUT" \
    --budget "$BUDGET" --wall $((SECONDS - START))
echo "gpu_check ($MODE): $((SECONDS - START))s; $OUT/gpu_check.md, gpu_check.json, gpu_check_logs.txt"
