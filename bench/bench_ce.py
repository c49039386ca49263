"""Loss benchmark over a list of shapes: every path of our fused linear + cross-entropy against
materialised logits + `F.cross_entropy` (what HF models run) and, on a GPU, Liger's
`LigerFusedLinearCrossEntropyLoss` and Cut Cross-Entropy's `linear_cross_entropy` (default gradient
filter, and `filter_eps=None` for exact gradients) when they are importable; plus the cost of the
per-task statistics (16 tasks vs no task ids) and each path's error against float64 on a slice of
tokens. Forward + backward, median time, extra peak memory.

Our paths: chunked (the CUDA default: cuBLAS + Triton row kernel), tiled (impl="triton": fused
backward with relaxed atomics; its CCE-style gradient filter; its GEMM backward), and the PyTorch
reference on a CPU. On a GPU the modelled times of bench/roofline.py sit beside the measured ones.

The cases and their timing are bench_loss.py's (`run_cases`); this script walks the shapes and
writes the tables. On CUDA all cases of a shape share one process (peak allocated memory is reset
per case); on a CPU each case has its own process, so its peak RSS is its own.

    python bench/bench_ce.py --device cuda     # the issue's shapes (below), bf16, every label used
    python bench/bench_ce.py                   # CPU: the reference, N {1024, 4096} x V {8000, 32000}, H 256, fp32
    python bench/bench_ce.py --quick           # one tiny shape on the CPU, seconds: checks that it runs
    python bench/bench_ce.py --interpret       # the GPU cases' Python on a tiny shape, Triton interpreter

Writes bench/results/ce_<gpu>.json and .md on a GPU (ce_h200, ce_h100, ...), ce_cpu[_quick] and
ce_cpu_interpret on a CPU.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import peer_versions, run_cases  # noqa: E402
from bench_msft import machine_info, write_outputs  # noqa: E402

OURS_TRITON = ("msft_fast_triton", "msft_fast_triton_filtered", "msft_fast_triton_gemm_bwd")
# (ours, ours without task ids, our other paths, peers); "inputs_only" gives the CPU baseline RSS of each shape.
CASES = {"cpu": ("msft_fast", "msft_fast_no_tasks", (), ("materialised",)),
         "interpret": ("msft_fast_chunked", "msft_fast_chunked_no_tasks", OURS_TRITON + ("msft_fast_torch",),
                       ("materialised",)),
         "cuda": ("msft_fast_chunked", "msft_fast_chunked_no_tasks", OURS_TRITON,
                  ("materialised", "liger", "cce", "cce_exact"))}
# (tokens, hidden, vocab). cuda, in the order they run (a time-out keeps the first): issue 27's two
# (a Llama-3-vocabulary head at H 2048, the CCE paper's Gemma-2 point), then issue 11's: the Llama-3
# head at 16k tokens, Qwen2.5-0.5B's and Qwen2.5-7B's heads at 8k and 16k.
SHAPES = {"cuda": [(16384, 2048, 128256), (8192, 2304, 256000), (16384, 4096, 128256), (8192, 896, 151936),
                   (16384, 896, 151936), (8192, 3584, 152064), (16384, 3584, 152064)],
          "cpu": [(n, 256, v) for n in (1024, 4096) for v in (8000, 32000)],
          "quick": [(256, 64, 2000)],
          "interpret": [(64, 32, 500)]}
SETTINGS = {"cuda": dict(dtype="bfloat16", repeats=5, ignored=0.0, grad_slice=256),
            "cpu": dict(dtype="float32", repeats=3, ignored=0.3, grad_slice=0),
            "quick": dict(dtype="float32", repeats=1, ignored=0.3, grad_slice=0),
            "interpret": dict(dtype="bfloat16", repeats=1, ignored=0.0, grad_slice=16)}
PEER_PACKAGE = {"liger": "liger-kernel", "cce": "cut-cross-entropy", "cce_exact": "cut-cross-entropy"}
ROOFLINE_PATH = {"msft_fast_chunked": "chunked", "msft_fast_triton": "tiled", "liger": "liger", "cce": "cce"}


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'; otherwise the name, lowercased."""
    m = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")).lower()


def cases_of(mode: str) -> tuple:
    return CASES["cpu" if mode == "quick" else mode]


def bench_shape(mode: str, device: str, n: int, h: int, v: int, s: dict, env=None, only=None) -> dict:
    """Every case of the mode at one shape (`only`: ours and these cases)."""
    ours, ours_no_tasks, others, peers = cases_of(mode)
    own_process = mode in ("cpu", "quick")  # CPU peak RSS per case needs a process per case
    cases = (("inputs_only",) if own_process else ()) + (ours,) + tuple(
        c for c in (ours_no_tasks,) + others + peers if only is None or c in only)
    raw = run_cases(cases, device, n, h, v, s["dtype"], s["repeats"], one_process=not own_process,
                    ignored=s["ignored"], env=env, grad_slice=s["grad_slice"])
    base = raw.get("inputs_only", {}).get("peak_rss_mb")
    results, skipped = {}, {}
    for case, r in raw.items():
        if case == "inputs_only":
            continue
        if "skipped" in r:
            skipped[case] = r["skipped"]
            continue
        extra = r["extra_peak_mb"] if device == "cuda" else (r["peak_rss_mb"] - base if base is not None else None)
        results[case] = {"seconds": statistics.median(r["times"]), "min_seconds": min(r["times"]),
                         "extra_peak_mb": extra, "loss": r["loss"]}
        if "grad_error" in r:
            results[case]["grad_error"] = r["grad_error"]
    ratios = {}
    if ours in results:
        o = results[ours]
        for other in others + peers:
            if other in results:
                ratios[f"time_over_{other}"] = o["seconds"] / results[other]["seconds"]
                if o["extra_peak_mb"] is not None and results[other]["extra_peak_mb"] is not None:
                    ratios[f"memory_over_{other}"] = o["extra_peak_mb"] / max(1e-9, results[other]["extra_peak_mb"])
        if ours_no_tasks in results:
            ratios["tasks_time_cost"] = o["seconds"] / results[ours_no_tasks]["seconds"] - 1
            if o["extra_peak_mb"] is not None:
                ratios["tasks_memory_cost_mb"] = o["extra_peak_mb"] - results[ours_no_tasks]["extra_peak_mb"]
    return {"tokens": n, "hidden": h, "vocab": v, "dtype": s["dtype"], "results": results, "ratios": ratios,
            "skipped": skipped}


def modelled(gpu_name: str | None) -> dict:
    """{(n, h, v): {roofline path: modelled ms}} for the GPU this runs on, if the roofline knows it."""
    if not gpu_name:
        return {}
    key = "H200" if "H200" in gpu_name else "H100 SXM" if "H100" in gpu_name else None
    if key is None:
        return {}
    import roofline

    gpu = roofline.GPUS[key]
    out = {}
    for n, h, v in SHAPES["cuda"]:
        out[(n, h, v)] = {"chunked": 1e3 * roofline.seconds(roofline.chunked_ops(n, h, v), gpu),
                          "tiled": 1e3 * roofline.seconds(roofline.tiled_ops(n, h, v), gpu),
                          "liger": 1e3 * roofline.seconds(roofline.liger_ops(n, h, v), gpu),
                          "cce": 1e3 * roofline.seconds(roofline.tiled_ops(n, h, v, roofline.fit_cce_kept()), gpu)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="one tiny CPU shape, one repeat")
    p.add_argument("--interpret", action="store_true",
                   help="the GPU cases (chunked, tiled) on a tiny CPU shape under the Triton interpreter")
    p.add_argument("--tokens", type=int, nargs="+", help="N values (with --hidden and --vocab: replaces the shapes)")
    p.add_argument("--hidden", type=int, help="H")
    p.add_argument("--vocab", type=int, nargs="+", help="V values")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16")
    p.add_argument("--repeats", type=int, help="timed steps per case (after two warm-up steps)")
    p.add_argument("--ignored", type=float, help="fraction of labels that are ignore_index (cuda default 0)")
    p.add_argument("--grad-slice", type=int, help="tokens of the float64 error check per case (0: none)")
    p.add_argument("--cases", nargs="+", help="only these cases beside ours (default: every case of the mode)")
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # accepted for the common bench test harness
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--stem", help="output file names (default ce_<gpu>, ce_cpu, ce_cpu_quick, ce_cpu_interpret)")
    a = p.parse_args(argv)
    if (a.quick or a.interpret) and a.device == "cuda":
        p.error("--quick and --interpret are CPU dry runs")
    mode = "interpret" if a.interpret else "quick" if a.quick else a.device
    s = dict(SETTINGS[mode])
    for key in ("dtype", "repeats", "ignored", "grad_slice"):
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    shapes = SHAPES[mode]
    if a.tokens or a.hidden or a.vocab:  # a grid; what is not given comes from the mode's shapes
        hidden = a.hidden or shapes[0][1]
        shapes = [(n, hidden, v) for n in (a.tokens or sorted({x[0] for x in shapes}))
                  for v in (a.vocab or sorted({x[2] for x in shapes}))]
    env = None
    if mode == "interpret":
        env = dict(os.environ, TRITON_INTERPRET="1")
    elif a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_ce.py --device cuda: no CUDA device is available here.")
        env = dict(os.environ, TRITON_INTERPRET="0")
    versions = peer_versions()
    if a.device == "cuda":
        for peer, package in PEER_PACKAGE.items():
            if package.replace("-", "_") not in versions:
                print(f"{peer}: not available ({package} is not installed)", flush=True)
    results = []
    t0 = time.time()
    for n, h, v in shapes:
        r = bench_shape(mode, a.device, n, h, v, s, env, a.cases)
        results.append(r)
        print(f"N={n} H={h} V={v}: " + ", ".join(f"{k} {x:.3f}" for k, x in r["ratios"].items())
              + "".join(f"; {c} skipped ({why})" for c, why in r["skipped"].items()
                        if c not in PEER_PACKAGE or "not installed" not in why), flush=True)
    machine = machine_info() | {"peers": versions}
    ours = cases_of(mode)[0]
    report = {
        "what": f"fused linear + cross-entropy, forward + backward, summed loss, {s['ignored']:.0%} of labels ignored; "
                "median of --repeats timed steps after 2 warm-up steps; extra peak memory above the inputs ("
                + ("peak RSS of the case's own process minus that of a process holding only the inputs"
                   if mode in ("cpu", "quick") else "CUDA max allocated minus allocated before the timed steps"
                   if a.device == "cuda" else "not measured under the interpreter")
                + f"); ours = {ours} with 16 tasks; ratios are ours / other (below 1 is better); tasks_time_cost = "
                  "time with 16 task ids / time without - 1; grad_error: max |x - x64| / max |x64| against float64 "
                  f"on {s['grad_slice']} tokens"
                + ("; timings under the Triton interpreter measure nothing but that the code runs"
                   if mode == "interpret" else ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "setup": {"device": a.device, "mode": mode, "quick": a.quick, "shapes": shapes, **s, "num_tasks": 16,
                  "wall_seconds": time.time() - t0},
        "shapes": results,
    }
    model = modelled(machine.get("gpu"))
    if model:
        report["modelled_ms"] = {f"{n}x{h}x{v}": m for (n, h, v), m in model.items()}
    stem = f"ce_{gpu_slug(machine['gpu'])}" if a.device == "cuda" else \
        {"cpu": "ce_cpu", "quick": "ce_cpu_quick", "interpret": "ce_cpu_interpret"}[mode]
    write_outputs(a.out, a.stem or stem, report, markdown(report, mode, model))
    return report


def markdown(report: dict, mode: str, model: dict) -> list[str]:
    m, s = report["machine"], report["setup"]
    ours, ours_no_tasks, others, peers = cases_of(mode)
    where = m.get("gpu") or f"CPU ({m['cpu']}), {m['cores']} cores" + (", Triton interpreter" if mode == "interpret" else "")
    unit, scale = ("ms", 1e3) if s["device"] == "cuda" else ("s", 1.0)
    cases = (ours,) + others + peers
    lines = [f"# Fused linear + cross-entropy, fwd+bwd, on {where}", "",
             f"{report['date']}, torch {m['torch']}" + "".join(f", {k} {x}" for k, x in m["peers"].items())
             + f"; {s['dtype']}, median of {s['repeats']}, {s['ignored']:.0%} of labels ignored; ours = {ours} "
               "(16 tasks). MEASURED" + (" (under the interpreter: proves the code runs, times mean nothing)"
                                          if mode == "interpret" else "") + ".", "",
             f"| N x H x V | " + " | ".join(f"{c} {unit}" for c in cases) + f" | no tasks {unit} | tasks cost | "
             + " | ".join(f"time / {c}" for c in cases[1:]) + " |",
             "|" + "---|" * (2 * len(cases) + 2)]

    def cell(shape, case):
        r = shape["results"].get(case)
        return "n/a" if r is None else f"{r['seconds'] * scale:.3g}"

    for shape in report["shapes"]:
        rt = shape["ratios"]
        lines.append(f"| {shape['tokens']} x {shape['hidden']} x {shape['vocab']} | "
                     + " | ".join(cell(shape, c) for c in cases) + f" | {cell(shape, ours_no_tasks)} | "
                     + (f"{100 * rt['tasks_time_cost']:+.1f}%" if "tasks_time_cost" in rt else "n/a") + " | "
                     + " | ".join(f"{rt[f'time_over_{c}']:.2f}" if f"time_over_{c}" in rt else "n/a"
                                  for c in cases[1:]) + " |")
    if s["device"] == "cuda" or mode in ("cpu", "quick"):
        lines += ["", "Extra peak memory (MB):", "", "| N x H x V | " + " | ".join(cases) + " |",
                  "|" + "---|" * (len(cases) + 1)]
        for shape in report["shapes"]:
            lines.append(f"| {shape['tokens']} x {shape['hidden']} x {shape['vocab']} | " + " | ".join(
                "n/a" if c not in shape["results"] or shape["results"][c]["extra_peak_mb"] is None
                else f"{shape['results'][c]['extra_peak_mb']:.0f}" for c in cases) + " |")
    if any("grad_error" in r for shape in report["shapes"] for r in shape["results"].values()):
        lines += ["", f"Error against float64 on {s['grad_slice']} tokens (max |x - x64| / max |x64|: loss, "
                      "dL/dhidden, dL/dweight; a second run on the same inputs compared bit for bit):", "", "| N x H x V | " + " | ".join(cases) + " |",
                  "|" + "---|" * (len(cases) + 1)]
        for shape in report["shapes"]:
            row = []
            for c in cases:
                e = shape["results"].get(c, {}).get("grad_error")
                row.append("n/a" if e is None else f"{e['loss']:.0e} / {e['grad_hidden']:.0e} / {e['grad_weight']:.0e}"
                           + ("" if e.get("bitwise_repeat", True) else " (not bitwise repeatable)"))
            lines.append(f"| {shape['tokens']} x {shape['hidden']} x {shape['vocab']} | " + " | ".join(row) + " |")
    if model:
        lines += ["", "Measured vs MODELLED (bench/roofline.py) ms:", "",
                  "| N x H x V | " + " | ".join(f"{c} measured / modelled" for c in ROOFLINE_PATH) + " |",
                  "|" + "---|" * (len(ROOFLINE_PATH) + 1)]
        for shape in report["shapes"]:
            key = (shape["tokens"], shape["hidden"], shape["vocab"])
            if key not in model:
                continue
            lines.append(f"| {key[0]} x {key[1]} x {key[2]} | " + " | ".join(
                f"{cell(shape, c)} / {model[key][path]:.1f}" for c, path in ROOFLINE_PATH.items()) + " |")
    skipped = {c: why for shape in report["shapes"] for c, why in shape["skipped"].items()}
    lines += [""] + [f"- {c}: not measured ({why})" for c, why in skipped.items()]
    return lines


if __name__ == "__main__":
    main()
