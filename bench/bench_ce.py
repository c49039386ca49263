"""Loss benchmark over a grid of shapes: our fused linear + cross-entropy against materialised
logits + `F.cross_entropy` (what HF models run) and, on a GPU, Liger's
`LigerFusedLinearCrossEntropyLoss` and Cut Cross-Entropy's `linear_cross_entropy` (default gradient
filter, and `filter_eps=None` for exact gradients) when they are importable; plus the cost of the
per-task statistics (16 tasks vs no task ids). Forward + backward, median time, extra peak memory.

The cases and their timing are bench_loss.py's (`run_cases`); this script only walks the grid and
writes the tables. On CUDA all cases of a shape share one process (peak allocated memory is reset per
case); on a CPU each case has its own process, so its peak RSS is its own.

    python bench/bench_ce.py --device cuda     # N {4096, 16384} x V {32000, 128256, 151936}, H 4096, bf16
    python bench/bench_ce.py                   # CPU: N {1024, 4096} x V {8000, 32000}, H 256, fp32, a few minutes
    python bench/bench_ce.py --quick           # one tiny shape on the CPU, seconds: checks that it runs

Writes bench/results/ce_<device>[_quick].json and .md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import peer_versions, run_cases  # noqa: E402
from bench_msft import machine_info, write_outputs  # noqa: E402

# (ours, ours without task ids, peers); "inputs_only" gives the CPU baseline RSS of each shape.
CASES = {"cpu": ("msft_fast", "msft_fast_no_tasks", ("materialised",)),
         "cuda": ("msft_fast_triton", "msft_fast_triton_no_tasks", ("materialised", "liger", "cce", "cce_exact"))}
GRID = {"cpu": dict(tokens=[1024, 4096], hidden=256, vocab=[8000, 32000], dtype="float32", repeats=3),
        "cuda": dict(tokens=[4096, 16384], hidden=4096, vocab=[32000, 128256, 151936], dtype="bfloat16", repeats=10),
        "quick": dict(tokens=[256], hidden=64, vocab=[2000], dtype="float32", repeats=1)}
PEER_PACKAGE = {"liger": "liger-kernel", "cce": "cut-cross-entropy", "cce_exact": "cut-cross-entropy"}


def bench_shape(device: str, n: int, h: int, v: int, dtype: str, repeats: int) -> dict:
    ours, ours_no_tasks, peers = CASES[device]
    cases = (("inputs_only",) if device == "cpu" else ()) + (ours, ours_no_tasks) + peers
    raw = run_cases(cases, device, n, h, v, dtype, repeats, one_process=device == "cuda")
    base = raw.get("inputs_only", {}).get("peak_rss_mb")
    results, skipped = {}, {}
    for case, r in raw.items():
        if case == "inputs_only":
            continue
        if "skipped" in r:
            skipped[case] = r["skipped"]
            continue
        extra = r["extra_peak_mb"] if device == "cuda" else r["peak_rss_mb"] - base
        results[case] = {"seconds": statistics.median(r["times"]), "min_seconds": min(r["times"]),
                         "extra_peak_mb": extra, "loss": r["loss"]}
    ratios = {}
    if ours in results:
        o = results[ours]
        for peer in peers:
            if peer in results:
                ratios[f"time_over_{peer}"] = o["seconds"] / results[peer]["seconds"]
                ratios[f"memory_over_{peer}"] = o["extra_peak_mb"] / max(1e-9, results[peer]["extra_peak_mb"])
        if ours_no_tasks in results:
            ratios["tasks_time_cost"] = o["seconds"] / results[ours_no_tasks]["seconds"] - 1
            ratios["tasks_memory_cost_mb"] = o["extra_peak_mb"] - results[ours_no_tasks]["extra_peak_mb"]
    return {"tokens": n, "hidden": h, "vocab": v, "dtype": dtype, "results": results, "ratios": ratios,
            "skipped": skipped}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="one tiny CPU shape, one repeat")
    p.add_argument("--tokens", type=int, nargs="+", help="N values (default: the device's grid)")
    p.add_argument("--hidden", type=int, help="H")
    p.add_argument("--vocab", type=int, nargs="+", help="V values")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16")
    p.add_argument("--repeats", type=int, help="timed steps per case (after two warm-up steps)")
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # accepted for the common bench test harness
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    if a.quick and a.device == "cuda":
        p.error("--quick is a CPU dry run")
    for key, value in GRID["quick" if a.quick else a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_ce.py --device cuda: no CUDA device is available here.")
    versions = peer_versions()
    if a.device == "cuda":
        for peer, package in PEER_PACKAGE.items():
            if package.replace("-", "_") not in versions:
                print(f"{peer}: not available ({package} is not installed)", flush=True)
    shapes = []
    t0 = time.time()
    for n in a.tokens:
        for v in a.vocab:
            s = bench_shape(a.device, n, a.hidden, v, a.dtype, a.repeats)
            shapes.append(s)
            print(f"N={n} H={a.hidden} V={v}: " + ", ".join(f"{k} {x:.3f}" for k, x in s["ratios"].items())
                  + "".join(f"; {c} skipped ({why})" for c, why in s["skipped"].items()
                            if c not in PEER_PACKAGE or "not installed" not in why), flush=True)
    ours = CASES[a.device][0]
    report = {
        "what": "fused linear + cross-entropy, forward + backward, summed loss, 30% of labels ignored; median of "
                "--repeats timed steps after 2 warm-up steps; extra peak memory above the inputs ("
                + ("peak RSS of the case's own process minus that of a process holding only the inputs"
                   if a.device == "cpu" else "CUDA max allocated minus allocated before the timed steps")
                + f"); ours = {ours} with 16 tasks; ratios are ours / peer (below 1 is better); tasks_time_cost = "
                  "time with 16 task ids / time without - 1",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info() | {"peers": versions},
        "setup": {"device": a.device, "quick": a.quick, "tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab,
                  "dtype": a.dtype, "repeats": a.repeats, "num_tasks": 16, "wall_seconds": time.time() - t0},
        "shapes": shapes,
    }
    m = report["machine"]
    where = m.get("gpu") or f"CPU ({m['cpu']}), {m['cores']} cores"
    unit, scale = ("ms", 1e3) if a.device == "cuda" else ("s", 1.0)
    peers = CASES[a.device][2]
    lines = [f"# Fused linear + cross-entropy, fwd+bwd, on {where}", "",
             f"{report['date']}, torch {m['torch']}" + "".join(f", {k} {x}" for k, x in versions.items())
             + f"; H={a.hidden}, {a.dtype}, median of {a.repeats}; ours = {ours} (16 tasks)", "",
             f"| N | V | ours {unit} | ours MB | no tasks {unit} | "
             + " | ".join(f"{peer} {unit} | {peer} MB" for peer in peers)
             + " | time / " + " | time / ".join(peers) + " | mem / " + " | mem / ".join(peers) + " | tasks cost |",
             "|" + "---|" * (5 + 4 * len(peers) + 1)]

    def cell(s, case, field):
        r = s["results"].get(case)
        if r is None:
            return "n/a"
        return f"{r['seconds'] * scale:.3g}" if field == "t" else f"{r['extra_peak_mb']:.0f}"

    for s in shapes:
        rt = s["ratios"]
        row = [str(s["tokens"]), str(s["vocab"]), cell(s, ours, "t"), cell(s, ours, "m"),
               cell(s, CASES[a.device][1], "t")]
        row += [c for peer in peers for c in (cell(s, peer, "t"), cell(s, peer, "m"))]
        row += [f"{rt[f'time_over_{peer}']:.2f}" if f"time_over_{peer}" in rt else "n/a" for peer in peers]
        row += [f"{rt[f'memory_over_{peer}']:.2f}" if f"memory_over_{peer}" in rt else "n/a" for peer in peers]
        row.append(f"{100 * rt['tasks_time_cost']:+.1f}%" if "tasks_time_cost" in rt else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    skipped = {c: why for s in shapes for c, why in s["skipped"].items()}
    lines += [""] + [f"- {c}: not measured ({why})" for c, why in skipped.items()]
    write_outputs(a.out, f"ce_{a.device}{'_quick' if a.quick else ''}", report, lines)
    return report


if __name__ == "__main__":
    main()
