#!/usr/bin/env bash
# Loss kernel on one GPU, within about 6 minutes on one H200:
#   1. correctness: the compiled Triton path against the float64 reference on the device
#      (bench/bench_loss.py --check: awkward and Llama-3-sized shapes, softcap/z-loss, sum/none,
#      fused and GEMM backward);
#   2. the benchmark at N {4096, 16384} x V {32000, 128256, 151936}, H 4096, bf16: ours (16 tasks
#      and none) vs materialised logits, Liger and CCE when importable (bench/bench_ce.py).
# liger-kernel and cut-cross-entropy are not on the device machine unless their wheels are carried
# and installed first ($PEER_WHEELS: a folder of wheels, installed with --no-deps); a missing one
# prints "not available". Each part has its own time limit. JSON goes under $OUT (default
# bench/results/gpu, /tmp/bench_work/gpu_check_ce_cpu for --cpu); scratch: $BENCH_WORK.
#
#   bench/gpu_check_ce.sh            # on a GPU machine (python: $PYTHON, else .venv/bin/python, else python3)
#   bench/gpu_check_ce.sh --cpu      # dry run here: Triton interpreter check, one tiny shape, about a minute
NAME=gpu_check_ce BUDGET_DEFAULT=350 PART_RESERVE=5 PART_MIN=20
source "$(dirname "$0")/gpu_check_lib.sh"
require_cuda
install_carried
show_log() { tail -n 30 "$1"; }

"$PYTHON" - <<'EOF' | tee "$OUT/machine_ce.txt"
import importlib.metadata as md, platform, time, torch
def v(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "not available"
print("date", time.strftime("%Y-%m-%d %H:%M"), "| torch", torch.__version__, "| triton", v("triton"),
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "|", platform.platform())
for peer, pkg in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
    print(f"{peer}: {pkg} {v(pkg)}")
EOF

if [ "$MODE" = gpu ]; then
    part ce_check 120 "$PYTHON" bench/bench_loss.py --device cuda --check
    part ce_bench 330 "$PYTHON" bench/bench_ce.py --device cuda --out "$OUT"
else
    # Under the Triton interpreter the check runs only its smallest shape (16 combinations).
    part ce_check 150 env TRITON_INTERPRET=1 "$PYTHON" bench/bench_loss.py --device cpu --check
    part ce_bench 120 env OMP_NUM_THREADS=1 "$PYTHON" bench/bench_ce.py --quick --out "$OUT"
fi

"$PYTHON" - "$OUT" "$STATUS" "$MODE" <<'EOF'
import json, os, sys
out, status, mode = sys.argv[1:]
rows = [json.loads(line) for line in open(status)]
name = "ce_cuda.json" if mode == "gpu" else "ce_cpu_quick.json"
bench = os.path.join(out, name)
summary = {"parts": rows, "bench": json.load(open(bench)) if os.path.exists(bench) else None}
json.dump(summary, open(os.path.join(out, "gpu_check_ce.json"), "w"), indent=2)
print("\n| part | status | detail |\n|---|---|---|")
for r in rows:
    print(f"| {r['part']} | {r['status']} | {r['detail']} |")
if summary["bench"]:
    for s in summary["bench"]["shapes"]:
        print(f"N={s['tokens']} V={s['vocab']}: " + ", ".join(f"{k} {v:.2f}" for k, v in s["ratios"].items()))
EOF
echo "gpu_check_ce ($MODE): $((SECONDS - START))s; JSON under $OUT"
