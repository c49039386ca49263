"""Loss benchmark: our fused linear + cross-entropy vs the materialised-logits loss users would
otherwise run (HF-style `F.cross_entropy(hidden @ W.T)`) and, when installed, Apple's Cut
Cross-Entropy (`cut-cross-entropy`) and Liger's fused linear cross-entropy (`liger-kernel`).
Forward + backward, side by side, same inputs.

On a CPU: our chunked reference vs materialised logits vs CCE's torch.compile path (its only CPU
path); best of repeats, peak resident memory. On CUDA: our default chunked path (16 tasks, and
without tasks: the cost of the per-task statistics), the tiled Triton kernel (fused backward, its
gradient filter, and the GEMM backward), our PyTorch reference, materialised logits, Liger, and CCE
(default gradient filter, and filter_eps=None for exact gradients); median CUDA time and peak
allocated memory above the inputs. A peer that is not importable is skipped with a printed note.
Labels: a fraction --ignored (default 0.3) is ignore_index; our paths drop those tokens before any
matmul, Liger does not (CCE does).

Each case runs in its own subprocess so its peak memory is its own (and an OOM stays its own).
Writes bench/results/loss_<device>.json and .md.

    python bench/bench_loss.py                     # CPU defaults: 4096 x 256 x 32000, float32
    python bench/bench_loss.py --device cuda       # Llama 3 head: 8192 x 4096 x 128256, bfloat16
    python bench/bench_loss.py --device cuda --check   # first: Triton vs float64 reference on the GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CPU_CASES = ("inputs_only", "materialised", "cce_torch_compile", "msft_fast")
CUDA_CASES = ("inputs_only", "materialised", "msft_fast_torch", "msft_fast_chunked", "msft_fast_chunked_no_tasks",
              "msft_fast_triton", "msft_fast_triton_filtered", "msft_fast_triton_gemm_bwd", "liger", "cce", "cce_exact")
OURS = {"cpu": "msft_fast", "cuda": "msft_fast_chunked"}
DEFAULTS = {"cpu": dict(tokens=4096, hidden=256, vocab=32000, dtype="float32", repeats=3),
            "cuda": dict(tokens=8192, hidden=4096, vocab=128256, dtype="bfloat16", repeats=10)}
NUM_TASKS = 16


def make_inputs(n: int, h: int, v: int, dtype: str, device: str, ignored: float = 0.3):
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, dtype=dt, device=device, requires_grad=True)
    weight = (torch.randn(v, h, device=device) * h**-0.5).to(dt).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignored] = -100
    task_ids = torch.randint(0, NUM_TASKS, (n,), device=device)
    return hidden, weight, labels, task_ids


def gemm_blocks(dtype):
    from dataclasses import replace

    from msft_fast.kernels.triton_flce import GPU_BLOCKS, INTERPRETER_BLOCKS, is_interpreting

    return replace(INTERPRETER_BLOCKS if is_interpreting() else GPU_BLOCKS[dtype], backward="gemm")


def loss_fn(case: str):
    """fn(hidden, weight, labels, task_ids) -> summed loss, or a str saying why the case is skipped."""
    import torch.nn.functional as F

    from msft_fast.kernels import fused_linear_cross_entropy

    if case == "msft_fast_triton_gemm_bwd":
        from msft_fast.kernels.triton_flce import linear_cross_entropy_triton
    if case in ("cce_torch_compile", "cce", "cce_exact"):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            return "cut-cross-entropy is not installed"
        kw = {"cce_torch_compile": dict(impl="torch_compile"), "cce": {}, "cce_exact": dict(filter_eps=None)}[case]
        return lambda h, w, y, t: linear_cross_entropy(h, w, y, reduction="sum", **kw)
    if case == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return "liger-kernel is not installed"
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
        return lambda h, w, y, t: liger(w, h, y)
    if case == "materialised":
        return lambda h, w, y, t: F.cross_entropy((h @ w.T).float(), y, ignore_index=-100, reduction="sum")
    if case == "msft_fast_triton_gemm_bwd":  # the tiled forward, dlogits chunks + cuBLAS GEMMs in backward
        return lambda h, w, y, t: linear_cross_entropy_triton(h, w, y, t, NUM_TASKS, -100, "sum",
                                                              blocks=gemm_blocks(h.dtype))[0]
    if case == "msft_fast_triton_filtered":  # CCE's gradient filter on our tiled kernel (approximate)
        return lambda h, w, y, t: fused_linear_cross_entropy(h, w, y, t, NUM_TASKS, impl="triton", filter_eps="auto")[0]
    impl = ("triton" if case.startswith("msft_fast_triton") else "chunked" if case.startswith("msft_fast_chunked")
            else "torch")
    if case.endswith("_no_tasks"):  # the same kernel without per-task statistics
        return lambda h, w, y, t: fused_linear_cross_entropy(h, w, y, impl=impl)[0]
    return lambda h, w, y, t: fused_linear_cross_entropy(h, w, y, t, NUM_TASKS, impl=impl)[0]


def run_case(case: str, device: str, n: int, h: int, v: int, dtype: str, repeats: int, ignored: float = 0.3,
             grad_slice: int = 0) -> dict:
    """Time fwd+bwd of one case (median on CUDA, best on CPU) and its extra peak memory; with grad_slice,
    also its errors against float64 on that many tokens (grad_error)."""
    import torch

    hidden, weight, labels, task_ids = make_inputs(n, h, v, dtype, device, ignored)
    fn = loss_fn(case) if case != "inputs_only" else None
    if isinstance(fn, str):
        return {"case": case, "skipped": fn}
    cuda = device == "cuda"

    def step():
        loss = fn(hidden, weight, labels, task_ids)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    if fn is None:
        return {"case": case, "loss": None, "seconds": None,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    loss = step()  # warm-up: Triton compilation, autotuning, torch.compile
    step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()  # .item() synchronises
        times.append(time.perf_counter() - t0)
    out = {"case": case, "loss": loss, "seconds": statistics.median(times) if cuda else min(times), "times": times}
    if cuda:
        out["extra_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if grad_slice:
        hidden = weight = labels = task_ids = None  # the timed inputs go before the float64 check
        out["grad_error"] = grad_error(fn, grad_slice, h, v, dtype, device, ignored)
    return out


def grad_error(fn, n: int, h: int, v: int, dtype: str, device: str, ignored: float) -> dict:
    """Relative errors of one case against float64 PyTorch on materialised logits, on n tokens:
    max |x - x64| / max |x64| for the summed loss, dL/dhidden and dL/dweight; and whether a second
    run gave the same bits."""
    import torch
    import torch.nn.functional as F

    hidden, weight, labels, task_ids = make_inputs(n, h, v, dtype, device, ignored)
    runs = []
    for _ in range(2):  # twice: is the result the same bits?
        loss = fn(hidden, weight, labels, task_ids)
        loss.backward()
        runs.append((loss.detach().clone(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    loss, (_, grad_hidden, grad_weight) = runs[0][0], runs[0]
    repeat = all(torch.equal(a, b) for a, b in zip(*runs))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = F.cross_entropy(h64 @ w64.T, labels, ignore_index=-100, reduction="sum")
    ref.backward()

    def rel(x, r):
        return float(((x.double() - r).abs().max() / r.abs().max().clamp(min=1e-30)).cpu())

    return {"tokens": n, "loss": rel(loss, ref.detach()), "grad_hidden": rel(grad_hidden, h64.grad),
            "grad_weight": rel(grad_weight, w64.grad), "bitwise_repeat": repeat}


def check(device: str) -> bool:
    """Our Triton paths (chunked, tiled with fused and GEMM backward) vs the float64 reference on awkward
    shapes; True when everything matches."""
    import torch

    from msft_fast.kernels import fused_linear_cross_entropy
    from msft_fast.kernels.triton_flce import linear_cross_entropy_triton

    ok = True
    variants = (("sum", "fused"), ("none", "fused"), ("sum", "gemm"), ("none", "gemm"), ("sum", "chunked"),
                ("none", "chunked"))
    for n, h, v, dtype, tol in [(37, 48, 101, torch.float32, 1e-4), (1000, 512, 32003, torch.float32, 1e-4),
                                (1000, 512, 32003, torch.bfloat16, 3e-2), (4096, 2048, 128256, torch.bfloat16, 3e-2)]:
        if device == "cpu" and n > 100:
            continue  # the interpreter: only the smallest shape
        for opts in ({}, dict(softcap=30.0, z_loss=1e-4)):
            for reduction, backward in variants:
                g = torch.Generator(device="cpu").manual_seed(n + v)
                hid = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
                w = (torch.randn(v, h, generator=g) * h**-0.5 * 4).to(device, dtype).requires_grad_()
                y = torch.randint(0, v, (n,), generator=g).to(device)
                y[torch.rand(n, generator=g).to(device) < 0.3] = -100
                t = torch.randint(0, 3, (n,), generator=g).to(device)
                up = torch.randn(n, generator=g).to(device)
                res = {}
                for impl, (hh, ww) in (("ours", (hid, w)),
                                       ("torch", [x.detach().double().requires_grad_() for x in (hid, w)])):
                    if impl == "ours" and backward == "chunked":
                        loss, st = fused_linear_cross_entropy(hh, ww, y, t, 3, reduction=reduction, impl="chunked",
                                                              **opts)
                    elif impl == "ours":
                        loss, st, _ = linear_cross_entropy_triton(hh, ww, y, t, 3, -100, reduction, **opts,
                                                                  blocks=gemm_blocks(dtype) if backward == "gemm" else None)
                    else:
                        loss, st = fused_linear_cross_entropy(hh, ww, y, t, 3, reduction=reduction, impl=impl,
                                                              chunk_size=512, **opts)
                    (loss.double() * up.double() if reduction == "none" else loss).sum().backward()
                    res[impl] = (loss.detach().double(), st, hh.grad.double(), ww.grad.double())
                a, b = res["ours"], res["torch"]
                errs = {name: float(((x - r).abs().max() / r.abs().max().clamp(min=1)).cpu())
                        for name, x, r in (("loss", a[0], b[0]), ("grad_hidden", a[2], b[2]),
                                           ("grad_weight", a[3], b[3]),
                                           ("loss_sum", a[1].loss_sum.double(), b[1].loss_sum.double()))}
                counts = torch.equal(a[1].tokens, b[1].tokens) and int((a[1].correct - b[1].correct).abs().sum()) <= 1
                passed = counts and all(e <= tol for e in errs.values())
                ok &= passed
                path = "chunked" if backward == "chunked" else f"tiled/{backward}"
                print(f"{'ok  ' if passed else 'FAIL'} N={n} H={h} V={v} {str(dtype)[6:]} {reduction} {path} {opts} "
                      f"counts_match={counts} " + " ".join(f"{k}={e:.1e}" for k, e in errs.items()), flush=True)
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tokens", type=int, help="N (default: 4096 on cpu, 8192 on cuda)")
    p.add_argument("--hidden", type=int, help="H (default: 256 on cpu, 4096 on cuda)")
    p.add_argument("--vocab", type=int, help="V (default: 32000 on cpu, 128256 on cuda)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--repeats", type=int, help="timed steps per case (default: 3 on cpu, 10 on cuda)")
    p.add_argument("--ignored", type=float, default=0.3, help="fraction of labels that are ignore_index (default 0.3)")
    p.add_argument("--grad-slice", type=int, default=0, help=argparse.SUPPRESS)  # child: float64 check on N tokens
    p.add_argument("--check", action="store_true", help="only check the Triton kernel against the float64 reference "
                   "(on cpu it needs TRITON_INTERPRET=1)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args()
    for key, value in DEFAULTS[a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.check:
        sys.exit(0 if check(a.device) else 1)
    if a.case:
        for case in a.case.split(","):
            print(json.dumps(run_case_guarded(case, a.device, a.tokens, a.hidden, a.vocab, a.dtype, a.repeats,
                                              a.ignored, a.grad_slice)), flush=True)
        return
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available here.")
    cases = CPU_CASES if a.device == "cpu" else CUDA_CASES
    results = run_cases(cases, a.device, a.tokens, a.hidden, a.vocab, a.dtype, a.repeats, ignored=a.ignored)
    for case, r in results.items():
        if "skipped" in r:
            print(f"note: {case} skipped ({r['skipped']})", flush=True)
    write_report(a, results)


def run_case_guarded(case: str, device: str, n: int, h: int, v: int, dtype: str, repeats: int,
                     ignored: float = 0.3, grad_slice: int = 0) -> dict:
    """run_case, with a failure (an OOM, a missing kernel) recorded as the case's result."""
    try:
        return run_case(case, device, n, h, v, dtype, repeats, ignored, grad_slice)
    except Exception as e:  # noqa: BLE001 - one case must not stop the others sharing its process
        why = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if device == "cuda":  # once the traceback (and the failed case's tensors) is gone
        import torch

        torch.cuda.empty_cache()
    return {"case": case, "skipped": why}


def run_cases(cases, device: str, n: int, h: int, v: int, dtype: str, repeats: int,
              one_process: bool = False, ignored: float = 0.3, env: dict | None = None, grad_slice: int = 0) -> dict:
    """{case: run_case result} for one shape, each case in its own subprocess (so a CPU peak RSS is the
    case's own), or with `one_process` all in one (on CUDA, where peak allocated memory is reset per
    case: saves the start-up of a process per case)."""
    groups = [list(cases)] if one_process else [[c] for c in cases]
    results = {}
    for group in groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", ",".join(group), "--device", device,
               "--tokens", str(n), "--hidden", str(h), "--vocab", str(v), "--dtype", dtype, "--repeats", str(repeats),
               "--ignored", str(ignored), "--grad-slice", str(grad_slice)]
        proc = subprocess.run(cmd, text=True, capture_output=True, env=env)
        for line in proc.stdout.splitlines():
            if line.startswith('{"case"'):
                r = json.loads(line)
                results[r["case"]] = r
        for case in group:
            if case not in results:  # the process died before this case printed its result
                results[case] = {"case": case, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return results


def peer_versions() -> dict:
    """Versions of the installed peers (cut-cross-entropy, liger-kernel) and of triton."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("triton", "cut_cross_entropy", "liger_kernel"):
        try:
            out[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return out


def write_report(a, results: dict) -> None:
    import torch

    if a.device == "cpu":
        base = results["inputs_only"]["peak_rss_mb"]
        for r in results.values():
            if "peak_rss_mb" in r:
                r["extra_peak_mb"] = r["peak_rss_mb"] - base
    machine = {"device": a.device, "cores": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version(), "torch": torch.__version__}
    versions = peer_versions()
    if a.device == "cuda":
        machine.update(gpu=torch.cuda.get_device_name(), triton=versions.pop("triton", None))
    versions.pop("triton", None)
    machine.update(versions)
    cases = [c for c in results if c != "inputs_only"]
    report = {
        "what": f"fused linear + cross-entropy, forward + backward, {a.ignored:.0%} of labels ignored, "
                + ("best of repeats, peak RSS" if a.device == "cpu" else "median of repeats, peak allocated memory"),
        "shape": {"tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "dtype": a.dtype},
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "results": {c: {"seconds": results[c]["seconds"], "extra_peak_mb": results[c]["extra_peak_mb"],
                        "loss": results[c]["loss"]}
                    for c in cases if "skipped" not in results[c]},
        "skipped": {c: r["skipped"] for c, r in results.items() if "skipped" in r},
    }
    ours_name = OURS[a.device]
    ours = report["results"].get(ours_name)
    report["ratios"] = {} if ours is None else {
        f"{key}_{ours_name}_over_{peer}": ours[field] / max(1e-9, r[field])
        for peer, r in report["results"].items() if peer != ours_name
        for key, field in (("time", "seconds"), ("memory", "extra_peak_mb"))
    }
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"loss_{a.device}")
    with open(stem + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    where = f"on CPU, {os.cpu_count()} cores" if a.device == "cpu" else f"on {machine['gpu']}"
    memory = "extra peak RSS (MB)" if a.device == "cpu" else "extra peak allocated (MB)"
    lines = [f"# Loss fwd+bwd {where} ({a.tokens} tokens x {a.hidden} hidden x {a.vocab} vocab, {a.dtype})", "",
             f"{report['date']}, torch {torch.__version__}"
             + "".join(f", {k} {machine[k]}" for k in ("triton", "cut_cross_entropy", "liger_kernel") if k in machine),
             "", f"| implementation | {'seconds' if a.device == 'cpu' else 'ms'} | {memory} | loss |", "|---|---|---|---|"]
    for c, r in report["results"].items():
        t = f"{r['seconds']:.3f}" if a.device == "cpu" else f"{r['seconds'] * 1e3:.1f}"
        lines.append(f"| {c} | {t} | {r['extra_peak_mb']:.0f} | {r['loss']:.3f} |")
    lines += ["", f"Ratios ({ours_name} / peer; below 1 is better):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in report["ratios"].items()]
    lines += [f"- {c} skipped: {why}" for c, why in report["skipped"].items()]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
