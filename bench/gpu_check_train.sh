#!/usr/bin/env bash
# Trainer on one GPU, within about 6 minutes on one H200 (Llama-3.2-1B shape, random init, rows of
# 8192 packed tokens, bf16):
#   1. msft-fast train vs HF Trainer (padded batches, FlashAttention-2 and Liger when installed) on the
#      same model, documents and epochs: useful tokens/s and peak memory, ratios (bench/bench_train.py);
#   2. MFU per variant through `msft-fast train`: attention backend (flex_attention, sdpa,
#      flash_attention_2 when installed), torch.compile off/on, activation checkpointing off/full/selective
#      (bench/bench_train_gpu.py --variants, most valuable first; the ones that do not fit the budget are
#      recorded as skipped).
# msft-fast train needs `datasets`, HF Trainer `accelerate` (Liger and flash-attn are optional); what the
# device machine lacks must be carried as wheels in $PEER_WHEELS (default .whl: bench/gather_wheels.sh),
# installed with --no-deps into a folder put first on PYTHONPATH (gpu_check_lib.sh). A missing
# one prints "not available". $HF_PYTHONPATH: an extra import path for the HF side only. JSON goes under $OUT (default bench/results/gpu, /tmp/bench_work/gpu_check_train_cpu for
# --cpu); scratch (a 2.5 GB model folder): $BENCH_WORK.
#
#   bench/gpu_check_train.sh          # on a GPU machine (python: $PYTHON, else .venv/bin/python, else python3)
#   bench/gpu_check_train.sh --cpu    # dry run here with tiny shapes, about 2 minutes
NAME=gpu_check_train BUDGET_DEFAULT=340 PART_RESERVE=5
source "$(dirname "$0")/gpu_check_lib.sh"
require_cuda
install_carried
show_log() {  # without progress bars and warnings
    grep -v '^\s*$' "$1" | grep -v -i 'it/s\]\|warn' | tail -n 20
}

"$PYTHON" - <<'EOF' | tee "$OUT/machine_train.txt"
import importlib.metadata as md, platform, time, torch
def v(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "not available"
print("date", time.strftime("%Y-%m-%d %H:%M"), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "|", platform.platform())
for pkg in ("transformers", "accelerate", "flash-attn", "liger-kernel"):
    print(f"{pkg}: {v(pkg)}")
EOF

# Most valuable first: the default backend on a GPU without flash-attn (flex), then SDPA, compile,
# flash-attn, activation checkpointing.
if ! "$PYTHON" -c 'import datasets, yaml' > /dev/null 2>&1; then  # msft-fast's loader reads tasks with HF datasets
    note train_vs_hf "not available" "msft-fast train needs the datasets package: carry its wheels in \$PEER_WHEELS"
    note train_variants "not available" "msft-fast train needs the datasets package"
elif [ "$MODE" = gpu ]; then
    part train_vs_hf 150 "$PYTHON" bench/bench_train.py --device cuda --workdir "$WORK/train" --out "$OUT" --timeout 110 \
        ${HF_PYTHONPATH:+--hf-pythonpath "$HF_PYTHONPATH"}
    LEFT=$(( BUDGET - (SECONDS - START) - 15 ))
    part train_variants "$LEFT" "$PYTHON" bench/bench_train_gpu.py --workdir "$WORK/train" --out "$OUT" \
        --steps 12 --skip 4 --timeout 100 --budget "$LEFT" --variants flex_attention:off:off sdpa:off:off \
        flex_attention:on:off flash_attention_2:off:off flex_attention:off:full flex_attention:off:selective sdpa:on:off
else
    part train_vs_hf 120 "$PYTHON" bench/bench_train.py --quick --workdir "$WORK/train" --out "$OUT" --timeout 100 \
        ${HF_PYTHONPATH:+--hf-pythonpath "$HF_PYTHONPATH"}
    # torch.compile is left out here: inductor's CPU compile alone takes minutes on 2 cores.
    LEFT=$(( BUDGET - (SECONDS - START) - 15 ))
    part train_variants "$LEFT" "$PYTHON" bench/bench_train_gpu.py --cpu --workdir "$WORK/train" --out "$OUT" \
        --timeout 90 --budget "$LEFT" --variants sdpa:off:off flex_attention:off:off flash_attention_2:off:off \
        sdpa:off:full sdpa:off:selective
fi

"$PYTHON" - "$OUT" "$STATUS" "$MODE" <<'EOF'
import json, os, sys
out, status, mode = sys.argv[1:]
rows = [json.loads(line) for line in open(status)]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
dev = "cuda" if mode == "gpu" else "cpu"
summary = {"parts": rows, "train_vs_hf": load(f"train_{dev}{'' if mode == 'gpu' else '_quick'}.json"),
           "variants": load(f"step_train_{dev}.json")}
json.dump(summary, open(os.path.join(out, "gpu_check_train.json"), "w"), indent=2)
print("\n| part | status | detail |\n|---|---|---|")
for r in rows:
    print(f"| {r['part']} | {r['status']} | {r['detail']} |")
if summary["train_vs_hf"]:
    print("ours / HF Trainer:", ", ".join(f"{k} {v:.2f}" for k, v in summary["train_vs_hf"]["ratios"].items()
                                          if isinstance(v, float)) or "no ratio (a side did not run)")
if summary["variants"]:
    print("\n| variant | status | tokens/s | MFU | peak GiB |\n|---|---|---|---|---|")
    for x in summary["variants"]["results"]:
        ok = x["status"] == "ok"
        mfu = f"{100 * x['mfu']:.1f}%" if ok and x.get("mfu") else "-"
        print(f"| {x['variant']} | {x['status'] if ok else x['status'] + ': ' + x['why']} | "
              f"{x['tokens_per_s']:.0f} | {mfu} | {x['peak_mem_gib']:.2f} |" if ok else
              f"| {x['variant']} | {x['status']}: {x['why']} | | | |")
EOF
echo "gpu_check_train ($MODE): $((SECONDS - START))s; JSON under $OUT"
