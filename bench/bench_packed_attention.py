"""Packed attention on a CPU: how to keep a packed row's documents apart, and how to bucket them.

One layer's attention, forward + backward, over packed rows of generated document lengths, for:
  dense_mask  HF's `sdpa` path for packed rows: one [N, N] document-causal mask (built once per row,
              shared by the layers; its cost is shown apart), k and v repeated to every head
  pow2        `packed_sdpa`'s gather / causal SDPA / scatter with power-of-two bucket lengths
  exact       the same with one bucket per distinct document length (no padding at all)
  planned     the same with `plan_buckets` (what `model.attn_implementation: packed_sdpa` runs)
Time is this process's CPU time (the machine is shared: other processes move the wall clock more),
the median over repeats that interleave the strategies. The bucket plan and its index tensors are
built once per row and shared by every layer: their cost is shown apart too.

It also fits the cost model that `plan_buckets` minimises, t = c0 + n W (a L + b L^2) for one bucket
of n documents padded to L tokens (W = heads x head_dim), over a grid of (n, L), and prints
c0 / b and a / b beside BUCKET_OVERHEAD and TOKEN_COST in msft_fast/attention.py.

    python bench/bench_packed_attention.py            # about 3 minutes on one core
    python bench/bench_packed_attention.py --quick    # seconds: checks that it runs

Writes bench/results/packed_attention_cpu[_quick].json and .md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_msft import REPO, machine_info, write_outputs  # noqa: E402

from msft_fast import attention  # noqa: E402
from msft_fast.attention import DocumentBuckets, packed_sdpa_attention, plan_buckets  # noqa: E402

# name: (row tokens, shortest and longest document, heads, kv heads, head_dim); lengths log-uniform
ROWS = {
    "short_docs": (512, 10, 40, 4, 2, 32),  # bench_train.py's small setting
    "long_docs": (2048, 34, 512, 4, 2, 64),  # bench_train.py's large setting
    "mixed_5_510": (2048, 5, 510, 4, 2, 64),  # the mixed lengths
}
QUICK_ROWS = {"short_docs": (256, 3, 40, 4, 2, 8), "mixed": (512, 1, 200, 4, 2, 8)}


def doc_lengths(total: int, lo: int, hi: int, seed: int) -> list[int]:
    """Log-uniform lengths in [lo, hi] until the row is full (the last one cut to fit)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while sum(out) < total:
        out.append(min(int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))), hi, total - sum(out)))
    return out


def power_of_two_plan(lengths: list[int]) -> list[tuple[int, np.ndarray]]:
    """Each document in the bucket of the next power of two at least its length."""
    sizes = np.array([1 << int(max(0, n - 1)).bit_length() for n in lengths])
    return [(int(s), np.flatnonzero(sizes == s)) for s in np.unique(sizes)]


def exact_plan(lengths: list[int]) -> list[tuple[int, np.ndarray]]:
    """One bucket per distinct length."""
    arr = np.asarray(lengths)
    return [(int(n), np.flatnonzero(arr == n)) for n in np.unique(arr)]


def dense_mask(lengths: list[int]) -> torch.Tensor:
    """[1, 1, N, N] bool: what HF's mask functions build for a packed row under SDPA."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    n = len(doc)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((doc[:, None] == doc[None, :]) & (k <= q))[None, None]


def cpu_time(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def measure_row(name: str, spec, repeats: int, seed: int = 0) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    total, lo, hi, heads, kv_heads, head_dim = spec
    lengths = doc_lengths(total, lo, hi, seed)
    n = sum(lengths)
    torch.manual_seed(seed)
    q = torch.randn(1, heads, n, head_dim, requires_grad=True)
    k = torch.randn(1, kv_heads, n, head_dim, requires_grad=True)
    v = torch.randn(1, kv_heads, n, head_dim, requires_grad=True)
    grad = torch.randn(1, n, heads, head_dim)
    module = types.SimpleNamespace(training=True, is_causal=True, num_key_value_groups=heads // kv_heads)
    width = heads * head_dim
    plans = {"pow2": power_of_two_plan(lengths), "exact": exact_plan(lengths),
             "planned": plan_buckets(lengths, width)}
    buckets = {s: DocumentBuckets.from_plan(lengths, p, torch.device("cpu")) for s, p in plans.items()}
    mask = dense_mask(lengths)

    def layer(strategy):
        def run():
            if strategy == "dense_mask":
                out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=head_dim ** -0.5)
            else:
                out, _ = packed_sdpa_attention(module, q, k, v, None, scaling=head_dim ** -0.5,
                                               document_buckets=buckets[strategy])
            out.backward(grad)
        return run

    strategies = ["dense_mask", *plans]
    for s in strategies:  # warm-up
        layer(s)()
    times: dict[str, list[float]] = {s: [] for s in strategies}
    for _ in range(repeats):
        for s in strategies:
            times[s].append(cpu_time(layer(s)))
    build = {"dense_mask": statistics.median(cpu_time(lambda: dense_mask(lengths)) for _ in range(repeats)),
             "planned": statistics.median(cpu_time(lambda: DocumentBuckets.of(lengths, torch.device("cpu"), width))
                                          for _ in range(repeats))}
    result = {"row_tokens": n, "documents": len(lengths), "min_len": min(lengths), "max_len": max(lengths),
              "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "strategies": {}}
    for s in strategies:
        entry = {"layer_fwd_bwd_ms": 1e3 * statistics.median(times[s])}
        if s != "dense_mask":
            b = buckets[s]
            entry.update(buckets=len(b.lengths), bucket_lengths=b.lengths,
                         padding=1 - n / b.padded_tokens(),
                         attention_area_over_exact=sum(c * L * L for c, L in zip(b.counts, b.lengths))
                         / sum(x * x for x in lengths))
        result["strategies"][s] = entry
    result["once_per_row_ms"] = {"dense_mask build": 1e3 * build["dense_mask"],
                                 "planned buckets + index tensors": 1e3 * build["planned"]}
    return result


def fit_cost_model(repeats: int, quick: bool) -> dict:
    """Least squares of t = c0 + n W (a L + b L^2) in relative error, over one bucket's gather, causal SDPA
    and scatter, forward + backward, for W in (128, 256)."""
    rows = []
    sizes = (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    for heads, kv_heads, head_dim in ((4, 2, 32), (4, 2, 64)):
        width = heads * head_dim
        for size in sizes:
            for count in sorted({1, max(1, 256 // size), max(1, 1024 // size)}):
                n = count * size
                lengths = [size] * count
                q = torch.randn(1, heads, n, head_dim, requires_grad=True)
                k = torch.randn(1, kv_heads, n, head_dim, requires_grad=True)
                v = torch.randn(1, kv_heads, n, head_dim, requires_grad=True)
                b = DocumentBuckets.from_plan(lengths, [(size, np.arange(count))], torch.device("cpu"))
                module = types.SimpleNamespace(training=True, is_causal=True)

                def run():
                    out, _ = packed_sdpa_attention(module, q, k, v, None, document_buckets=b)
                    out.sum().backward()

                run()
                rows.append((width, count, size, statistics.median(cpu_time(run) for _ in range(repeats))))
    arr = np.array(rows, dtype=float)
    width, count, size, t = arr.T
    design = np.stack([np.ones_like(t), count * width * size, count * width * size ** 2], 1)
    (c0, a, b), *_ = np.linalg.lstsq(design / t[:, None], np.ones_like(t), rcond=None)
    predicted = design @ np.array([c0, a, b])
    return {"c0_s": c0, "a_s_per_token_channel": a, "b_s_per_score_channel": b,
            "bucket_overhead_scores": c0 / b if b > 0 else None, "token_cost_scores": a / b if b > 0 else None,
            "in_use": {"BUCKET_OVERHEAD": attention.BUCKET_OVERHEAD, "TOKEN_COST": attention.TOKEN_COST},
            "median_abs_relative_error": float(np.median(np.abs(predicted / t - 1))),
            "points": [{"width": int(w), "docs": int(c), "length": int(s), "ms": 1e3 * x} for w, c, s, x in rows]}


def cost_model_line(model: dict) -> str:
    """The fitted model in words, beside the constants attention.py uses. b <= 0 (timings too noisy to
    fit: a loaded machine, --quick) leaves the ratios undefined, and the line says so."""
    ratio = lambda x: "undefined (fitted b <= 0)" if x is None else f"{x:.3g}"  # noqa: E731
    return (f"Cost model fitted over {len(model['points'])} buckets (widths 128 and 256): c0 = "
            f"{1e3 * model['c0_s']:.3f} ms per bucket, a = {model['a_s_per_token_channel']:.2e} s per padded "
            f"token and channel, b = {model['b_s_per_score_channel']:.2e} s per score and channel (median "
            f"error {100 * model['median_abs_relative_error']:.0f}%): c0/b = "
            f"{ratio(model['bucket_overhead_scores'])} and a/b = {ratio(model['token_cost_scores'])}, against "
            f"BUCKET_OVERHEAD = {attention.BUCKET_OVERHEAD:.3g} and TOKEN_COST = {attention.TOKEN_COST:.3g} "
            "in msft_fast/attention.py")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny rows and grid, seconds: checks that it runs")
    p.add_argument("--repeats", type=int, help="timed runs per strategy (default 15, quick 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # accepted for tests/test_bench.py's runner
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    repeats = a.repeats or (3 if a.quick else 15)
    rows = {name: measure_row(name, spec, repeats) for name, spec in (QUICK_ROWS if a.quick else ROWS).items()}
    model = fit_cost_model(max(3, repeats // 3), a.quick)
    report = {"what": "one attention layer, forward + backward, over a packed row (CPU time of this process, median "
                      "over interleaved repeats), by how its documents are kept apart; and the fitted bucket cost "
                      "model",
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "threads": a.threads,
              "loadavg_1min": os.getloadavg()[0], "repeats": repeats, "rows": rows, "cost_model": model}
    m = report["machine"]
    lines = [f"# Packed attention on CPU ({m['cpu']}), {a.threads} torch thread(s), torch {m['torch']}", "",
             f"{report['date']}; one layer's attention forward + backward over one packed row; CPU time of the "
             f"process, median of {repeats} interleaved repeats (1-minute load average {report['loadavg_1min']:.1f} "
             "on the shared machine); `planned` is what `model.attn_implementation: packed_sdpa` runs", "",
             "| row | docs | strategy | ms / layer | vs dense mask | buckets | padding | attention area vs exact |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        dense = r["strategies"]["dense_mask"]["layer_fwd_bwd_ms"]
        for s, e in r["strategies"].items():
            lines.append(f"| {name} ({r['row_tokens']} tokens, {r['min_len']}-{r['max_len']}) | {r['documents']} | "
                         f"{s} | {e['layer_fwd_bwd_ms']:.2f} | {dense / e['layer_fwd_bwd_ms']:.2f}x | "
                         f"{e.get('buckets', '-')} | "
                         + (f"{100 * e['padding']:.1f}% | {e['attention_area_over_exact']:.2f}x |" if "padding" in e
                            else "- | - |"))
        once = r["once_per_row_ms"]
        lines.append(f"| {name}: once per row | | | " + "; ".join(f"{k} {v:.2f} ms" for k, v in once.items())
                     + " | | | | |")
    lines += ["", cost_model_line(model)]
    write_outputs(a.out, "packed_attention_cpu" + ("_quick" if a.quick else ""), report, lines)
    return report


if __name__ == "__main__":
    main()
