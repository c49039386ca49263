"""Loss benchmark: our fused linear + cross-entropy against materialised logits + F.cross_entropy and, when
importable, Liger and Cut Cross-Entropy; forward + backward per shape: time, extra peak memory, the cost of
16 task ids, error against float64, the roofline's modelled time (bench/README.md says how).

    python bench/bench_loss.py                 # CPU: our PyTorch reference, fp32, N {1024, 4096} x V {8000, 32000}
    python bench/bench_loss.py --quick         # one tiny CPU shape, seconds
    python bench/bench_loss.py --interpret     # the GPU cases (chunked, tiled) on a tiny shape, Triton interpreter
    python bench/bench_loss.py --device cuda   # issue 27's and 11's shapes, bf16, every label used
    python bench/bench_loss.py --device cuda --check   # every Triton path vs float64 (CPU: --interpret --check)

Writes loss_<h100|h200|cpu|cpu_quick|cpu_interpret>.json and .md, rewritten after every shape.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, machine_info, table, write_outputs  # noqa: E402

NUM_TASKS = 16
TRITON = ("msft_fast_triton", "msft_fast_triton_filtered", "msft_fast_triton_gemm_bwd")
# mode: (ours, ours without task ids, our other paths, peers)
CASES = {"cpu": ("msft_fast", "msft_fast_no_tasks", (), ("materialised", "cce_torch_compile")),
         "interpret": ("msft_fast_chunked", "msft_fast_chunked_no_tasks", TRITON + ("msft_fast_torch",),
                       ("materialised",)),
         "cuda": ("msft_fast_chunked", "msft_fast_chunked_no_tasks", TRITON, ("materialised", "liger", "cce",
                                                                              "cce_exact"))}
CASES["quick"] = CASES["cpu"]
# (tokens, hidden, vocab), in the order they run: issue 27's two (a Llama-3 vocabulary at H 2048, the CCE
# paper's Gemma-2 point), then issue 11's (the Llama-3 head at 16k, Qwen2.5-0.5B's and -7B's at 8k, 16k).
SHAPES = {"cuda": [(16384, 2048, 128256), (8192, 2304, 256000), (16384, 4096, 128256), (8192, 896, 151936),
                   (16384, 896, 151936), (8192, 3584, 152064), (16384, 3584, 152064)],
          "cpu": [(n, 256, v) for n in (1024, 4096) for v in (8000, 32000)], "quick": [(256, 64, 2000)],
          "interpret": [(64, 32, 500)]}
SETTINGS = {"cuda": dict(dtype="bfloat16", repeats=5, ignored=0.0, grad_slice=256),
            "cpu": dict(dtype="float32", repeats=3, ignored=0.3, grad_slice=0),
            "quick": dict(dtype="float32", repeats=1, ignored=0.3, grad_slice=0),
            "interpret": dict(dtype="bfloat16", repeats=1, ignored=0.0, grad_slice=16)}
ROOFLINE_PATH = {"msft_fast_chunked": "chunked", "msft_fast_triton": "tiled", "liger": "liger", "cce": "cce"}


def make_inputs(n: int, h: int, v: int, dtype: str, device: str, ignored: float):
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, dtype=dt, device=device, requires_grad=True)
    weight = (torch.randn(v, h, device=device) * h**-0.5).to(dt).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignored] = -100
    return hidden, weight, labels, torch.randint(0, NUM_TASKS, (n,), device=device)


def gemm_blocks(dtype):
    from dataclasses import replace

    from msft_fast.kernels.triton_flce import GPU_BLOCKS, INTERPRETER_BLOCKS, is_interpreting

    return replace(INTERPRETER_BLOCKS if is_interpreting() else GPU_BLOCKS[dtype], backward="gemm")


def loss_fn(case: str):
    """fn(hidden, weight, labels, task_ids) -> summed loss (an ImportError when a peer is not installed)."""
    import torch.nn.functional as F

    from msft_fast.kernels import fused_linear_cross_entropy as flce

    if case.startswith("cce"):
        from cut_cross_entropy import linear_cross_entropy

        kw = {"cce_torch_compile": dict(impl="torch_compile"), "cce": {}, "cce_exact": dict(filter_eps=None)}[case]
        return lambda h, w, y, t: linear_cross_entropy(h, w, y, reduction="sum", **kw)
    if case == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
        return lambda h, w, y, t: liger(w, h, y)
    if case == "materialised":
        return lambda h, w, y, t: F.cross_entropy((h @ w.T).float(), y, ignore_index=-100, reduction="sum")
    if case == "msft_fast_triton_gemm_bwd":  # the tiled forward; dlogits chunks and cuBLAS GEMMs backward
        from msft_fast.kernels.triton_flce import linear_cross_entropy_triton

        return lambda h, w, y, t: linear_cross_entropy_triton(h, w, y, t, NUM_TASKS, -100, "sum",
                                                              blocks=gemm_blocks(h.dtype))[0]
    if case == "msft_fast_triton_filtered":  # CCE's gradient filter on our tiled kernel (approximate)
        return lambda h, w, y, t: flce(h, w, y, t, NUM_TASKS, impl="triton", filter_eps="auto")[0]
    impl = "triton" if "triton" in case else "chunked" if "chunked" in case else "torch"
    if case.endswith("_no_tasks"):
        return lambda h, w, y, t: flce(h, w, y, impl=impl)[0]
    return lambda h, w, y, t: flce(h, w, y, t, NUM_TASKS, impl=impl)[0]


def run_case(case: str, device: str, n: int, h: int, v: int, s: dict) -> dict:
    """Two warm-up steps, then `repeats` timed fwd+bwd steps; the extra peak memory; the error check."""
    import torch

    hidden, weight, labels, task_ids = make_inputs(n, h, v, s["dtype"], device, s["ignored"])
    if case == "inputs_only":  # the CPU baseline: a process holding only the inputs
        return {"case": case, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        fn = loss_fn(case)
    except ImportError as e:
        return {"case": case, "skipped": f"{e.name} is not installed"}
    cuda = device == "cuda"

    def step():
        loss = fn(hidden, weight, labels, task_ids)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()  # synchronises

    loss = step()  # compilation, autotuning
    step()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(s["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = {"extra_peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20} if cuda else \
        {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out = {"case": case, "loss": loss, "times": times, **peak}
    if s["grad_slice"]:
        hidden = weight = None  # the timed inputs go before the float64 check
        out["grad_error"] = grad_error(fn, s["grad_slice"], h, v, s["dtype"], device, s["ignored"])
    return out


def grad_error(fn, n: int, h: int, v: int, dtype: str, device: str, ignored: float) -> dict:
    """max |x - x64| / max |x64| of the loss, dL/dhidden and dL/dweight against float64 on materialised
    logits, on n tokens; and whether a second run gives the same bits."""
    import torch
    import torch.nn.functional as F

    hidden, weight, labels, task_ids = make_inputs(n, h, v, dtype, device, ignored)
    runs = []
    for _ in range(2):
        loss = fn(hidden, weight, labels, task_ids)
        loss.backward()
        runs.append((loss.detach().clone(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = F.cross_entropy(h64 @ w64.T, labels, ignore_index=-100, reduction="sum")
    ref.backward()

    def rel(x, r):
        return float(((x.double() - r).abs().max() / r.abs().max().clamp(min=1e-30)).cpu())

    loss, gh, gw = runs[0]
    return {"tokens": n, "loss": rel(loss, ref.detach()), "grad_hidden": rel(gh, h64.grad),
            "grad_weight": rel(gw, w64.grad), "bitwise_repeat": all(torch.equal(a, b) for a, b in zip(*runs))}


def check(device: str) -> bool:
    """Our Triton paths (chunked; tiled with fused and with GEMM backward) against the float64 reference
    at awkward and Llama-3-sized shapes, with softcap and z-loss, reductions sum and none; one line each."""
    import torch

    from msft_fast.kernels import fused_linear_cross_entropy as flce
    from msft_fast.kernels.triton_flce import linear_cross_entropy_triton

    ok, shapes = True, [(37, 48, 101, torch.float32, 1e-4), (1000, 512, 32003, torch.float32, 1e-4),
                        (1000, 512, 32003, torch.bfloat16, 3e-2), (4096, 2048, 128256, torch.bfloat16, 3e-2)]
    for (n, h, v, dtype, tol), opts, reduction, path in itertools.product(
            shapes[:1] if device == "cpu" else shapes,  # the interpreter: the smallest shape only
            ({}, dict(softcap=30.0, z_loss=1e-4)), ("sum", "none"), ("fused", "gemm", "chunked")):
        g = torch.Generator().manual_seed(n + v)
        hid = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
        w = (torch.randn(v, h, generator=g) * h**-0.5 * 4).to(device, dtype).requires_grad_()
        y = torch.randint(0, v, (n,), generator=g).to(device)
        y[torch.rand(n, generator=g).to(device) < 0.3] = -100
        t = torch.randint(0, 3, (n,), generator=g).to(device)
        up = torch.randn(n, generator=g).to(device)
        res = []
        for hh, ww in ((hid, w), [x.detach().double().requires_grad_() for x in (hid, w)]):
            if hh is not hid:  # the float64 reference
                loss, st = flce(hh, ww, y, t, 3, reduction=reduction, impl="torch", chunk_size=512, **opts)
            elif path == "chunked":
                loss, st = flce(hh, ww, y, t, 3, reduction=reduction, impl="chunked", **opts)
            else:
                loss, st, _ = linear_cross_entropy_triton(hh, ww, y, t, 3, -100, reduction, **opts, blocks=(
                    gemm_blocks(dtype) if path == "gemm" else None))
            (loss.double() * up.double() if reduction == "none" else loss).sum().backward()
            res.append((loss.detach().double(), st, hh.grad.double(), ww.grad.double()))
        a, b = res
        errs = {k: float(((x - r).abs().max() / r.abs().max().clamp(min=1)).cpu()) for k, x, r in (
            ("loss", a[0], b[0]), ("grad_hidden", a[2], b[2]), ("grad_weight", a[3], b[3]),
            ("loss_sum", a[1].loss_sum.double(), b[1].loss_sum.double()))}
        # The per-task counts agree (one argmax tie may go either way).
        counts = torch.equal(a[1].tokens, b[1].tokens) and int((a[1].correct - b[1].correct).abs().sum()) <= 1
        passed = counts and all(e <= tol for e in errs.values())
        ok &= passed
        print(f"{'ok  ' if passed else 'FAIL'} N={n} H={h} V={v} {str(dtype)[6:]} {reduction} "
              f"{'chunked' if path == 'chunked' else 'tiled/' + path} {opts} counts_match={counts} "
              + " ".join(f"{k}={e:.1e}" for k, e in errs.items()), flush=True)
    return ok


def run_cases(cases, device: str, n: int, h: int, v: int, s: dict, one_process: bool, env) -> dict:
    """{case: result} for one shape, from child processes (each prints one JSON line per case)."""
    results = {}
    for group in [list(cases)] if one_process else [[c] for c in cases]:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(
            dict(cases=group, device=device, n=n, h=h, v=v, s=s))], text=True, capture_output=True, env=env)
        for line in proc.stdout.splitlines():
            if line.startswith('{"case"'):
                results[json.loads(line)["case"]] = json.loads(line)
        for case in group:  # the child died before this case printed (an OOM, a crash)
            results.setdefault(case, {"case": case, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
    return results


def child(spec: dict) -> None:
    for case in spec["cases"]:
        try:
            r = run_case(case, spec["device"], spec["n"], spec["h"], spec["v"], spec["s"])
        except Exception as e:  # noqa: BLE001 - one case failing (an OOM) must not stop the others
            r = {"case": case, "skipped": f"failed: {type(e).__name__}: {(str(e) or ' ').splitlines()[0][:200]}"}
            if spec["device"] == "cuda":
                import torch

                torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)


def bench_shape(mode: str, device: str, shape: tuple, s: dict, env, only=None) -> dict:
    """Every case of the mode at one shape (`only`: ours and those cases); ratios are ours / other."""
    ours, no_tasks, others, peers = CASES[mode]
    per_case = mode in ("cpu", "quick")  # a CPU's peak RSS is per process
    cases = (("inputs_only",) if per_case else ()) + (ours,) + tuple(
        c for c in (no_tasks,) + others + peers if only is None or c in only)
    raw = run_cases(cases, device, *shape, s, one_process=not per_case, env=env)
    base = raw.pop("inputs_only", {}).get("peak_rss_mb")
    results = {c: {"seconds": statistics.median(r["times"]), "min_seconds": min(r["times"]), "loss": r["loss"],
                   "extra_peak_mb": r["extra_peak_mb"] if "extra_peak_mb" in r else
                   r["peak_rss_mb"] - base if base is not None else None,
                   **({"grad_error": r["grad_error"]} if "grad_error" in r else {})}
               for c, r in raw.items() if "skipped" not in r}
    ratios = {}
    o = results.get(ours)
    for other in (others + peers) if o else ():
        if other in results:
            ratios[f"time_over_{other}"] = o["seconds"] / results[other]["seconds"]
            if o["extra_peak_mb"] is not None and results[other]["extra_peak_mb"]:
                ratios[f"memory_over_{other}"] = o["extra_peak_mb"] / results[other]["extra_peak_mb"]
    if o and no_tasks in results:
        ratios["tasks_time_cost"] = o["seconds"] / results[no_tasks]["seconds"] - 1
    n, h, v = shape
    return {"tokens": n, "hidden": h, "vocab": v, "dtype": s["dtype"], "results": results, "ratios": ratios,
            "skipped": {c: r["skipped"] for c, r in raw.items() if "skipped" in r}}


def modelled(gpu: str | None, shapes) -> dict:
    """{"NxHxV": {roofline path: modelled ms}} on an H100 or H200 (bench/roofline.py), else {}."""
    key = "H200" if "H200" in (gpu or "") else "H100 SXM" if "H100" in (gpu or "") else None
    if key is None:
        return {}
    import roofline

    g, kept = roofline.GPUS[key], roofline.fit_cce_kept()
    return {f"{n}x{h}x{v}": {"chunked": 1e3 * roofline.seconds(roofline.chunked_ops(n, h, v), g),
                             "tiled": 1e3 * roofline.seconds(roofline.tiled_ops(n, h, v), g),
                             "liger": 1e3 * roofline.seconds(roofline.liger_ops(n, h, v), g),
                             "cce": 1e3 * roofline.seconds(roofline.tiled_ops(n, h, v, kept), g)}
            for n, h, v in shapes}


def markdown(r: dict) -> list[str]:
    """One table per shape: a row per path, its time beside ours, memory, error and modelled time."""
    m, unit, scale = r["machine"], *(("ms", 1e3) if r["setup"]["device"] == "cuda" else ("s", 1.0))
    lines = [f"# Fused linear + cross-entropy, fwd+bwd, on {m.get('gpu') or m['cpu']}", "",
             f"{r['date']}, commit {m.get('git_commit', '?')}, torch {m['torch']}, {m['cores']} cores, "
             + ", ".join(f"{k} {x}" for k, x in m["versions"].items()) + f"; {r['what']}. Error: max |x - x64| / max "
             "|x64| of the loss / dL/dhidden / dL/dweight on the first tokens (* a second run gave other bits)."]
    for x in r["shapes"]:
        dims = f"{x['tokens']}x{x['hidden']}x{x['vocab']}"
        modelled = r["modelled_ms"].get(dims, {})
        lines += ["", f"N x H x V = {dims}, {x['dtype']}; 16 task ids cost "
                  + (f"{100 * x['ratios']['tasks_time_cost']:+.1f}%" if "tasks_time_cost" in x["ratios"] else "n/a")
                  + " of ours' time:", ""]
        rows = []
        for case, y in x["results"].items():
            e = y.get("grad_error")
            ratio = x["ratios"].get(f"time_over_{case}")
            rows.append([case, f"{y['seconds'] * scale:.3g}", "-" if ratio is None else f"{ratio:.2f}",
                         "n/a" if y["extra_peak_mb"] is None else f"{y['extra_peak_mb']:.0f}",
                         "-" if not e else f"{e['loss']:.0e} / {e['grad_hidden']:.0e} / {e['grad_weight']:.0e}"
                         + ("" if e["bitwise_repeat"] else " *"),
                         f"{modelled[ROOFLINE_PATH[case]]:.1f}" if case in ROOFLINE_PATH and modelled else "-"])
        rows += [[case, f"not measured: {why}", "", "", "", ""] for case, why in x["skipped"].items()]
        lines += table(["path", unit, "ours / this", "extra peak MB", "error vs float64", "MODELLED ms"], rows)
    return lines


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="one tiny CPU shape, one repeat")
    p.add_argument("--interpret", action="store_true", help="the GPU cases at a tiny CPU shape, Triton interpreter")
    p.add_argument("--check", action="store_true", help="only check our Triton paths against float64")
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "H", "V"), help="one shape instead of the mode's")
    p.add_argument("--repeats", type=int, help="timed steps per case (after two warm-up steps)")
    p.add_argument("--ignored", type=float, help="fraction of labels that are ignore_index")
    p.add_argument("--cases", nargs="+", help="only these cases beside ours (default: every case of the mode)")
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # accepted for the common bench test harness
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--stem", help="output file names (default loss_<gpu>, loss_cpu, loss_cpu_quick, ...)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(json.loads(a.child))
    if (a.quick or a.interpret) and a.device == "cuda":
        p.error("--quick and --interpret are CPU dry runs")
    # The interpreter runs Triton on CPU tensors: the --interpret cases, and the check on a CPU.
    env = dict(os.environ, TRITON_INTERPRET="1" if a.interpret or (a.check and a.device == "cpu") else "0")
    if a.device == "cuda" and not __import__("torch").cuda.is_available():  # (torch after TRITON_INTERPRET)
        sys.exit("bench_loss.py --device cuda: no CUDA device is available here.")
    if a.check:
        os.environ.update(TRITON_INTERPRET=env["TRITON_INTERPRET"])  # before triton is imported
        sys.exit(0 if check(a.device) else 1)
    mode = "interpret" if a.interpret else "quick" if a.quick else a.device
    s = dict(SETTINGS[mode], **{k: getattr(a, k) for k in ("repeats", "ignored") if getattr(a, k) is not None})
    shapes, machine, ours = [tuple(a.shape)] if a.shape else SHAPES[mode], machine_info(), CASES[mode][0]
    report = {"what": f"{s['dtype']}, summed loss, {s['ignored']:.0%} of labels ignored, median of {s['repeats']} "
                      f"after 2 warm-up steps; ours = {ours} with 16 tasks; ratios ours / other (below 1 is better)"
                      + ("; under the interpreter the times mean nothing, the code ran" if mode == "interpret" else ""),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine,
              "setup": {"device": a.device, "mode": mode, "shapes": shapes, "num_tasks": NUM_TASKS, **s},
              "shapes": [], "modelled_ms": modelled(machine.get("gpu"), shapes)}
    gpu = re.sub(r"[^a-z0-9]+", "_", machine.get("gpu", "").lower().removeprefix("nvidia ").split(" ")[0])
    stem = a.stem or "loss_" + (gpu if a.device == "cuda" else {"cpu": "cpu", "quick": "cpu_quick",
                                                                 "interpret": "cpu_interpret"}[mode])
    for shape in shapes:
        report["shapes"].append(bench_shape(mode, a.device, shape, s, env, a.cases))
        write_outputs(a.out, stem, report, markdown(report), quiet=shape != shapes[-1])
    return report


if __name__ == "__main__":
    main()
