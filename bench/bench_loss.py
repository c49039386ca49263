"""Loss benchmark on this machine: our chunked loss vs the materialised-logits loss users would
otherwise run (HF-style `F.cross_entropy(hidden @ W.T)`) and, when installed, Apple's Cut
Cross-Entropy (`pip install cut-cross-entropy`; its torch.compile path is the one that runs on a
CPU). Forward + backward, side by side, same inputs.

Each case runs in its own subprocess so its peak resident memory is its own. Writes
bench/results/loss_<device>.json and .md.

    python bench/bench_loss.py [--tokens 4096 --hidden 256 --vocab 32000 --dtype float32 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CASES = ("inputs_only", "materialised", "cce_torch_compile", "msft_fast")


def run_case(case: str, n: int, h: int, v: int, dtype: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from msft_fast.kernels import fused_linear_cross_entropy

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, dtype=dt, requires_grad=True)
    weight = (torch.randn(v, h, dtype=dt) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < 0.3] = -100
    task_ids = torch.randint(0, 5, (n,))

    if case == "cce_torch_compile":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            return {"case": case, "skipped": "cut-cross-entropy is not installed"}

    def step():
        if case == "cce_torch_compile":
            loss = linear_cross_entropy(hidden, weight, labels, impl="torch_compile", reduction="sum")
        elif case == "materialised":
            loss = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100, reduction="sum")
        else:
            loss, _ = fused_linear_cross_entropy(hidden, weight, labels, task_ids, 5, impl="torch")
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    times, loss = [], None
    if case != "inputs_only":
        loss = step()  # warm-up (and compilation, for CCE)
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"case": case, "loss": loss, "seconds": min(times) if times else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case", choices=CASES)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args()
    if a.case:  # child process
        print(json.dumps(run_case(a.case, a.tokens, a.hidden, a.vocab, a.dtype, a.repeats)))
        return
    results = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--tokens", str(a.tokens), "--hidden", str(a.hidden),
               "--vocab", str(a.vocab), "--dtype", a.dtype, "--repeats", str(a.repeats)]
        results[case] = json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])
    base = results["inputs_only"]["peak_rss_mb"]
    import torch

    report = {
        "what": "fused linear + cross-entropy, forward + backward, best of repeats",
        "shape": {"tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "dtype": a.dtype},
        "machine": {"device": "cpu", "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "results": {
            c: {"seconds": results[c]["seconds"], "extra_peak_mb": results[c]["peak_rss_mb"] - base,
                "loss": results[c]["loss"]}
            for c in CASES[1:] if "skipped" not in results[c]
        },
        "skipped": {c: r["skipped"] for c, r in results.items() if "skipped" in r},
    }
    ours = report["results"]["msft_fast"]
    report["ratios"] = {
        f"{key}_msft_fast_over_{peer}": ours[field] / max(1e-9, r[field])
        for peer, r in report["results"].items() if peer != "msft_fast"
        for key, field in (("time", "seconds"), ("memory", "extra_peak_mb"))
    }
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, "loss_cpu")
    with open(stem + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    lines = [f"# Loss fwd+bwd on CPU ({a.tokens} tokens x {a.hidden} hidden x {a.vocab} vocab, {a.dtype})", "",
             f"{report['date']}, {os.cpu_count()} cores, torch {torch.__version__}", "",
             "| implementation | seconds | extra peak RSS (MB) | loss |", "|---|---|---|---|"]
    for c, r in report["results"].items():
        lines.append(f"| {c} | {r['seconds']:.3f} | {r['extra_peak_mb']:.0f} | {r['loss']:.3f} |")
    lines += ["", "Ratios (msft_fast / peer; below 1 is better):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in report["ratios"].items()]
    lines += [f"- {c} skipped: {why}" for c, why in report["skipped"].items()]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
