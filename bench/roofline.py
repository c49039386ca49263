"""Roofline model of the fused linear + cross-entropy loss on H100 SXM and H200: every figure is
MODELLED from data-sheet peaks and the assumptions below, the same for every path, never measured
(bench/README.md says how; `bench_loss.py --device cuda` measures the same paths). Each path is a list
of kernel launches with their FLOPs and HBM bytes; one takes max(FLOPs / achievable FLOP/s, bytes /
achievable bandwidth) plus a launch, in sequence. Published times are shown beside, never used to adjust it.

    python bench/roofline.py          # writes bench/results/roofline.{json,md}
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # msft_fast from this tree
from common import table, write_outputs  # noqa: E402 - bench/ is first on sys.path: this script's folder
from msft_fast.kernels import DEFAULT_CHUNK_BYTES, loss_memory_bytes, plan_chunks  # noqa: E402
from msft_fast.kernels.triton_flce import BWD_CONFIGS, FWD_CONFIGS  # noqa: E402

# ---- the assumptions, in one place ------------------------------------------------------------------
# cuBLAS bf16 GEMMs: an 8192^3 product ran at 788 TFLOP/s on one of the H200s this project can borrow
# (/work/.library/device/KINDS.md, random data: 80% of 989). A GEMM whose token dimension is thin
# (a chunk of few tokens) fills fewer tiles and amortises its operand loads over less work: ASSUMED,
# not measured, piecewise linear in log2(tokens) through these points, flat outside them.
CUBLAS_EFFICIENCY_BY_TOKENS = ((128, 0.50), (256, 0.65), (512, 0.75), (1024, 0.80))
# Triton tile kernels with a fused epilogue (online softmax, atomics) reach less: an assumption.
TRITON_EFFICIENCY = 0.65
# HBM: a device-to-device copy moved about 4.3 TB/s of the H200's 4.8 (KINDS.md): 90%.
HBM_EFFICIENCY = 0.90
# Relaxed fp32 atomic reductions are counted as moving their payload at the achievable HBM rate
# (they resolve in L2, which is faster, but serialise on hot lines): unmeasured, an assumption.
ATOMIC_RATE_OF_HBM = 1.0
LAUNCH_SECONDS = 5e-6  # per kernel launch and its tail
DTYPE_BYTES = 2  # bf16 inputs


def cublas_efficiency(tokens: int) -> float:
    """The assumed fraction of the dense peak a cuBLAS GEMM reaches with `tokens` rows on the token side."""
    points = CUBLAS_EFFICIENCY_BY_TOKENS
    if tokens <= points[0][0]:
        return points[0][1]
    for (t0, e0), (t1, e1) in zip(points, points[1:]):
        if tokens <= t1:
            return e0 + (e1 - e0) * (math.log2(tokens) - math.log2(t0)) / (math.log2(t1) - math.log2(t0))
    return points[-1][1]


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense, data sheet
    hbm_tbs: float  # data sheet


GPUS = {
    "H100 SXM": Gpu("H100 SXM", 989.4, 3.35),
    "H200": Gpu("H200", 989.4, 4.8),
    "A100 SXM4 80GB": Gpu("A100 SXM4 80GB", 312.0, 2.039),  # the CCE paper's GPU, for the comparison only
}
SHAPES = {  # (tokens N, hidden H, vocabulary V)
    "Llama-3 head, 16k tokens": (16384, 4096, 128256),
    "Qwen2.5-0.5B head, 8k": (8192, 896, 151936),
    "Qwen2.5-0.5B head, 16k": (16384, 896, 151936),
    "Qwen2.5-7B head, 8k": (8192, 3584, 152064),
    "Qwen2.5-7B head, 16k": (16384, 3584, 152064),
}
ANCHOR = "Llama-3 head, 16k tokens"
PUBLISHED = {
    "cce_paper_a100": dict(gpu="A100 SXM4 80GB", shape=(8192, 2304, 256000),
                           source="Wijmans et al. ICLR 2025, Table 1 (loss + gradient)",
                           ms=dict(cce=135.0, cce_exact=362.0, liger=303.0),
                           # CCE's forward alone and its backward with and without the filter
                           parts_ms=dict(cce_loss=43.0, cce_gradient=95.0, cce_exact_gradient=324.0)),
    "issue_11_h100": dict(gpu="H100 SXM", shape=(16384, 2048, 248320), source="as quoted in issue 11 (not re-checked)",
                          ms=dict(cce=93.0, liger=321.0)),
}


@dataclass
class Op:
    name: str
    flops: float
    bytes: float
    engine: str  # "cublas", "triton" or "memory"
    atomic_bytes: float = 0.0
    count: int = 1  # identical launches
    tokens: int = 0  # a cuBLAS GEMM's token dimension, which sets its assumed efficiency

    def efficiency(self) -> float:
        return cublas_efficiency(self.tokens) if self.engine == "cublas" else TRITON_EFFICIENCY

    def seconds(self, gpu: Gpu) -> float:
        compute = self.flops / (gpu.bf16_tflops * 1e12 * self.efficiency()) if self.flops else 0.0
        bw = gpu.hbm_tbs * 1e12 * HBM_EFFICIENCY
        memory = self.bytes / bw + self.atomic_bytes / (bw * ATOMIC_RATE_OF_HBM)
        return self.count * (max(compute, memory) + LAUNCH_SECONDS)


def chunked_ops(n: int, h: int, v: int, chunk_bytes: int | None = None) -> list[Op]:
    """Our chunked path, with the sub-chunks and groups the code plans."""
    b = DTYPE_BYTES
    plan = plan_chunks(n, v, torch.bfloat16, True, chunk_bytes)
    ops = []
    for g0 in range(0, n, plan.grad_rows):
        g = min(plan.grad_rows, n - g0)
        for c0 in range(0, g, plan.logit_rows):
            c = min(plan.logit_rows, g - c0)
            ops.append(Op("logits GEMM (fp32 out)", 2 * c * h * v, b * c * h + b * v * h + 4 * c * v, "cublas",
                          tokens=c))
            ops.append(Op("row kernel (2 reads fp32, write bf16 grad)", 0, 4 * c * v * 2 + b * c * v, "memory"))
        ops.append(Op("dH GEMM", 2 * g * v * h, b * g * v + b * v * h + b * g * h, "cublas", tokens=g))
        first = g0 == 0
        ops.append(Op("dW GEMM (bf16 accumulate)", 2 * g * v * h,
                      b * g * v + b * g * h + (0 if first else b * v * h) + b * v * h, "cublas", tokens=g))
    ops.append(Op("per-task sums, loss", 0, 32 * n, "memory", count=2))
    ops.append(Op("backward: scale dH by the incoming gradient (fp32 product)", 0, 2 * b * n * h, "memory"))
    ops.append(Op("backward: scale dW by the incoming gradient (fp32 product)", 0, 2 * b * v * h, "memory"))
    return ops


def liger_ops(n: int, h: int, v: int) -> list[Op]:
    """Liger-Kernel's fused linear cross-entropy as it chunks: next_pow2(N / ceil(V/H)) tokens."""
    b = DTYPE_BYTES
    chunk = min(n, 2 ** math.ceil(math.log2(math.ceil(n / math.ceil(v / h)))))
    ops = []
    for c0 in range(0, n, chunk):
        c = min(chunk, n - c0)
        ops += [Op("logits GEMM (bf16 out)", 2 * c * h * v, b * c * h + b * v * h + b * c * v, "cublas", tokens=c),
                Op("CE kernel (2 reads, in-place grad)", 0, 3 * b * c * v, "memory"),
                Op("dH mm", 2 * c * v * h, b * c * v + b * v * h + b * c * h, "cublas", tokens=c),
                Op("dW addmm (bf16 accumulate)", 2 * c * v * h, b * c * v + b * c * h + 2 * b * v * h, "cublas",
                   tokens=c)]
    return ops


def tiled_ops(n: int, h: int, v: int, kept: float = 1.0) -> list[Op]:
    """Our tiled kernel (and, with kept < 1, CCE's filtered backward): grouped order, relaxed atomics."""
    b = DTYPE_BYTES
    fwd, bwd = FWD_CONFIGS[0], BWD_CONFIGS[0]
    group_rows = fwd["BLOCK_M"] * fwd["GROUP_M"]
    # Grouped order: the weight is read once per group of token blocks, the hidden rows about once.
    fwd_bytes = b * v * h * math.ceil(n / group_rows) + b * n * h + 16 * 64 * n
    bwd_group = bwd["BLOCK_M"] * bwd["GROUP_M"]
    recompute_bytes = b * v * h * math.ceil(n / bwd_group) + b * n * h
    atomic = 4 * n * v * h * (1 / bwd["BLOCK_M"] + 1 / bwd["BLOCK_V"])
    return [Op("forward (logits tiles, online lse)", 2 * n * h * v, fwd_bytes, "triton"),
            Op("combine", 0, 16 * 64 * n + 32 * n, "memory"),
            Op("per-task sums", 0, 32 * n, "memory"),
            Op("backward recompute", 2 * n * h * v, recompute_bytes, "triton"),
            Op(f"backward dH, dW on {kept:.0%} of tiles (relaxed atomics)", kept * 4 * n * h * v,
               kept * 2 * b * (n * h + v * h), "triton", atomic_bytes=kept * atomic),
            Op("zero the fp32 gradient buffers", 0, 4 * (n * h + v * h), "memory", count=2),
            Op("fp32 gradients -> bf16", 0, (4 + b) * (n * h + v * h), "memory", count=2)]


def seconds(ops: list[Op], gpu: Gpu) -> float:
    return sum(op.seconds(gpu) for op in ops)


def totals(ops: list[Op], gpu: Gpu) -> dict:
    return dict(tflop=sum(o.flops * o.count for o in ops) / 1e12,
                hbm_gb=sum((o.bytes + o.atomic_bytes) * o.count for o in ops) / 1e9,
                ms=1e3 * seconds(ops, gpu),
                compute_bound_ms=1e3 * sum(o.count * o.flops / (gpu.bf16_tflops * 1e12 * o.efficiency())
                                           for o in ops if o.flops))


def fit_cce_kept() -> float:
    """CCE's kept fraction of backward tile work, from its own published times: the filtered and the
    unfiltered backward both recompute the logits (about the forward's 43 ms); the rest of the
    backward, the dH/dW matmuls and atomics, shrinks from 324 - 43 to 95 - 43 ms with the filter."""
    parts = PUBLISHED["cce_paper_a100"]["parts_ms"]
    recompute = parts["cce_loss"]
    return (parts["cce_gradient"] - recompute) / (parts["cce_exact_gradient"] - recompute)


def published_comparison() -> dict:
    """Published against modelled times at each published point, for the reader: the model is not
    adjusted by them (CCE's kept fraction aside, which is read off the same table)."""
    kept = fit_cce_kept()
    out = {"cce_kept_fraction": kept, "points": {}}
    for key, p in PUBLISHED.items():
        gpu, (n, h, v) = GPUS[p["gpu"]], p["shape"]
        model = {"liger": 1e3 * seconds(liger_ops(n, h, v), gpu), "cce": 1e3 * seconds(tiled_ops(n, h, v, kept), gpu),
                 "cce_exact": 1e3 * seconds(tiled_ops(n, h, v, 1.0), gpu),
                 "chunked": 1e3 * seconds(chunked_ops(n, h, v), gpu)}
        out["points"][key] = dict(gpu=p["gpu"], shape=p["shape"], source=p["source"], published_ms=p["ms"],
                                  modelled_ms=model,
                                  published_over_modelled={k: p["ms"][k] / model[k] for k in p["ms"]})
    return out


def kept_to_match(n: int, h: int, v: int, gpu: Gpu, target_s: float) -> float | None:
    """The kept-tile fraction at which the modelled filtered tiled kernel takes target_s (None: never)."""
    if seconds(tiled_ops(n, h, v, 0.0), gpu) >= target_s:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if seconds(tiled_ops(n, h, v, mid), gpu) < target_s else (lo, mid)
    return lo


BUDGETS_MIB = (512, 640, 768, 896, 1024, 2048, 4096, 8192)


def model(chunk_bytes: int | None = None) -> dict:
    comparison = published_comparison()
    kept = comparison["cce_kept_fraction"]
    rows = []
    for shape_name, (n, h, v) in SHAPES.items():
        for gpu in (GPUS["H100 SXM"], GPUS["H200"]):
            paths = {"chunked": totals(chunked_ops(n, h, v, chunk_bytes), gpu),
                     "liger": totals(liger_ops(n, h, v), gpu),
                     "tiled": totals(tiled_ops(n, h, v), gpu),
                     "cce": totals(tiled_ops(n, h, v, kept), gpu)}
            ours = paths["chunked"]["ms"]
            rows.append(dict(
                shape=shape_name, tokens=n, hidden=h, vocab=v, gpu=gpu.name, paths=paths,
                chunked_over_liger=ours / paths["liger"]["ms"],
                chunked_over_cce=ours / paths["cce"]["ms"],
                # Below this fraction of kept backward tiles a filtered tiled kernel beats the chunked path.
                cce_beats_chunked_below_kept=kept_to_match(n, h, v, gpu, ours / 1e3),
            ))
    budgets = {}
    n, h, v = SHAPES[ANCHOR]
    for mib in BUDGETS_MIB:
        plan = plan_chunks(n, v, torch.bfloat16, True, mib << 20)
        budgets[mib] = dict(logit_rows=plan.logit_rows, grad_rows=plan.grad_rows, groups=plan.groups(n),
                            bytes=plan.bytes, loss_memory_bytes=loss_memory_bytes(n, h, v, torch.bfloat16,
                                                                                  chunk_bytes=mib << 20),
                            h200_ms=1e3 * seconds(chunked_ops(n, h, v, mib << 20), GPUS["H200"]))
    return dict(
        what="MODELLED (roofline from data-sheet peaks and stated efficiencies, the same for every path), not "
             "measured: bf16 forward + backward of a summed loss, every token labelled",
        assumptions=dict(cublas_efficiency_by_tokens=CUBLAS_EFFICIENCY_BY_TOKENS, triton_efficiency=TRITON_EFFICIENCY,
                         hbm_efficiency=HBM_EFFICIENCY, atomic_rate_of_hbm=ATOMIC_RATE_OF_HBM,
                         launch_seconds=LAUNCH_SECONDS, gpus={k: asdict(g) for k, g in GPUS.items()},
                         left_out=["gathers of the labelled tokens", "wave quantisation", "overlap between kernels",
                                   "L2 hits", "clocks below boost"]),
        published_comparison=comparison, rows=rows, anchor_budgets_h200=budgets,
    )


def markdown(r: dict) -> list[str]:
    a, cmp_ = r["assumptions"], r["published_comparison"]
    h200 = [row for row in r["rows"] if row["gpu"] == "H200"]
    lines = ["# Fused linear + cross-entropy: roofline model (MODELLED, not measured)", "",
             "Written by `python bench/roofline.py`. bf16, forward + backward of a summed loss, every token with a "
             "label. Peaks from the data sheets (dense bf16 989 TFLOP/s on H100 SXM and H200; HBM 3.35 and 4.8 "
             "TB/s). Assumed, the same for every path: cuBLAS GEMMs reach "
             + ", ".join(f"{e:.0%} at {t}" for t, e in a["cublas_efficiency_by_tokens"]) + " tokens on the token side "
             "(piecewise linear in log2 between; 80% measured once on an 8192^3 product, the thinner points "
             f"assumed), Triton tile kernels {a['triton_efficiency']:.0%}, HBM {a['hbm_efficiency']:.0%} (measured "
             "once on an H200), relaxed atomics at the HBM rate, 5 us per launch, kernels in sequence. Left out "
             f"of every path: {', '.join(a['left_out'])}. `bench/bench_loss.py --device cuda` measures the same "
             "paths; its numbers replace these.", ""]
    lines += table(["shape (N x H x V)", "GPU", "chunked (ours, default) ms", "Liger ms", "tiled (ours) ms", "CCE ms",
                    "chunked / Liger", "chunked / CCE", "CCE beats chunked below kept tiles"],
                   [[f"{x['shape']} ({x['tokens']} x {x['hidden']} x {x['vocab']})", x["gpu"]]
                    + [f"{x['paths'][p]['ms']:.1f}" for p in ("chunked", "liger", "tiled", "cce")]
                    + [f"{x['chunked_over_liger']:.2f}", f"{x['chunked_over_cce']:.2f}", "never" if (
                        kept := x["cce_beats_chunked_below_kept"]) is None else f"{kept:.1%}"] for x in r["rows"]])
    lines += ["", "FLOPs and HBM bytes per path (H200 rows; the H100's are the same):", ""] + table(
        ["shape", "chunked TFLOP / GB", "Liger TFLOP / GB", "tiled TFLOP / GB (incl. atomic payload)"],
        [[x["shape"]] + [f"{x['paths'][p]['tflop']:.1f} / {x['paths'][p]['hbm_gb']:.0f}"
                         for p in ("chunked", "liger", "tiled")] for x in h200])
    lines += ["", "Published times against this model (shown, not used to adjust it; a path far above its roofline "
              "is limited by something the model leaves out):", ""]
    for pt in cmp_["points"].values():
        lines.append(f"- {pt['gpu']}, {' x '.join(map(str, pt['shape']))}, {pt['source']}: " + ", ".join(
            f"{k} {pt['published_ms'][k]:.0f} ms published vs {pt['modelled_ms'][k]:.0f} modelled "
            f"({pt['published_over_modelled'][k]:.2f}x)" for k in pt["published_ms"])
                     + f"; chunked (ours) modelled {pt['modelled_ms']['chunked']:.0f} ms.")
    lines += [f"- CCE's kept fraction of backward tile work, from its published backward times (95 ms filtered, "
              f"324 ms unfiltered, each recomputing the 43 ms forward): (95 - 43) / (324 - 43) = "
              f"{cmp_['cce_kept_fraction']:.1%}.", "",
              f"Chunk budget at the anchor shape on an H200 (the default is {DEFAULT_CHUNK_BYTES >> 20} MiB; "
              "`loss_memory_bytes`: everything the call allocates beyond its inputs):", ""]
    return lines + table(["budget MiB", "logits rows", "gradient rows", "passes over dW", "buffers GiB",
                          "loss_memory_bytes GB", "modelled ms"],
                         [[mib, b["logit_rows"], b["grad_rows"], b["groups"], f"{b['bytes'] / 2**30:.2f}",
                           f"{b['loss_memory_bytes'] / 1e9:.2f}", f"{b['h200_ms']:.1f}"]
                          for mib, b in r["anchor_budgets_h200"].items()])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    r = model()
    write_outputs(a.out, "roofline", r, markdown(r))
    return r


if __name__ == "__main__":
    main()
