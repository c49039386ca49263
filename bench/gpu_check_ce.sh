#!/usr/bin/env bash
# Loss kernels on one GPU, within 5 minutes on one H200 (after the carried wheels are installed):
#   1. correctness: every Triton path of ours (chunked, tiled with fused and GEMM backward) against
#      the float64 reference on the device (bench/bench_loss.py --check: awkward and Llama-3-sized
#      shapes, softcap/z-loss, sum/none);
#   2. the benchmark at issue 11's shapes (16384 x 4096 x 128256; Qwen2.5-0.5B's and Qwen2.5-7B's heads
#      at 8192 and 16384 tokens), bf16, fwd+bwd time and peak memory of every path (chunked, tiled,
#      tiled + gradient filter, tiled + GEMM backward) against Liger and CCE when importable, each
#      path's error against float64 on a 256-token slice, and the roofline's modelled times beside
#      the measured ones (bench/bench_ce.py --device cuda -> bench/results/ce_<gpu>.{json,md});
#   3. the roofline model itself (bench/roofline.py, seconds).
# liger-kernel and cut-cross-entropy are not on the device machine unless their wheels are carried
# and installed first ($PEER_WHEELS: a folder of wheels, installed with --no-deps); a missing one
# prints "not available". Each part has its own time limit. Status JSON goes under $OUT (default
# bench/results/gpu, /tmp/bench_work/gpu_check_ce_cpu for --cpu); scratch: $BENCH_WORK.
#
#   bench/gpu_check_ce.sh            # on a GPU machine (python: $PYTHON, else .venv/bin/python, else python3)
#   bench/gpu_check_ce.sh --cpu      # dry run here: the same Python at tiny shapes under the Triton interpreter
NAME=gpu_check_ce BUDGET_DEFAULT=290 PART_RESERVE=5 PART_MIN=15
source "$(dirname "$0")/gpu_check_lib.sh"
require_cuda
install_carried
show_log() { tail -n 30 "$1"; }

"$PYTHON" - <<'PY' | tee "$OUT/machine_ce.txt"
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
PY

if [ "$MODE" = gpu ]; then
    BENCH_OUT=bench/results   # ce_<gpu>.{json,md}, committed
    part ce_check 75 "$PYTHON" bench/bench_loss.py --device cuda --check
    part ce_bench 200 "$PYTHON" bench/bench_ce.py --device cuda --out "$BENCH_OUT"
else
    BENCH_OUT="$OUT"
    # Under the Triton interpreter the check runs only its smallest shape.
    part ce_check 150 env TRITON_INTERPRET=1 OMP_NUM_THREADS=1 "$PYTHON" bench/bench_loss.py --device cpu --check
    part ce_bench 150 env OMP_NUM_THREADS=1 "$PYTHON" bench/bench_ce.py --interpret --out "$BENCH_OUT"
fi
part roofline 30 "$PYTHON" bench/roofline.py --out "$OUT"

"$PYTHON" - "$OUT" "$STATUS" "$MODE" "$BENCH_OUT" <<'PY'
import glob, json, os, sys
out, status, mode, bench_out = sys.argv[1:]
rows = [json.loads(line) for line in open(status)]
pattern = "ce_cpu_interpret.json" if mode == "cpu" else "ce_*.json"
paths = [p for p in sorted(glob.glob(os.path.join(bench_out, pattern)), key=os.path.getmtime)
         if not os.path.basename(p).startswith("ce_cpu") or mode == "cpu"]
bench = json.load(open(paths[-1])) if paths else None
summary = {"parts": rows, "bench_file": paths[-1] if paths else None, "bench": bench}
json.dump(summary, open(os.path.join(out, "gpu_check_ce.json"), "w"), indent=2)
print("\n| part | status | detail |\n|---|---|---|")
for r in rows:
    print(f"| {r['part']} | {r['status']} | {r['detail']} |")
if bench:
    for s in bench["shapes"]:
        print(f"N={s['tokens']} H={s['hidden']} V={s['vocab']}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in s["ratios"].items()))
PY
echo "gpu_check_ce ($MODE): $((SECONDS - START))s; JSON under $OUT"
