"""The loss's roofline model (bench/roofline.py): its arithmetic (FLOPs and bytes against a hand count,
the same assumptions for every path), and the loss benchmark's GPU cases run at a tiny shape under the
Triton interpreter (what bench/gpu_check.sh --cpu times)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import roofline  # noqa: E402

from msft_fast.kernels import plan_chunks  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return roofline.model()


def _row(model, shape, gpu):
    (row,) = [r for r in model["rows"] if r["shape"] == shape and r["gpu"] == gpu]
    return row


def test_flops_are_6nhv_for_the_chunked_path_and_liger_8nhv_for_the_tiled_one():
    n, h, v = roofline.SHAPES[roofline.ANCHOR]
    gpu = roofline.GPUS["H200"]
    flops = {name: roofline.totals(ops, gpu)["tflop"] * 1e12 for name, ops in (
        ("chunked", roofline.chunked_ops(n, h, v)), ("liger", roofline.liger_ops(n, h, v)),
        ("tiled", roofline.tiled_ops(n, h, v)))}
    assert flops["chunked"] == pytest.approx(6 * n * h * v, rel=1e-12)
    assert flops["liger"] == pytest.approx(6 * n * h * v, rel=1e-12)
    assert flops["tiled"] == pytest.approx(8 * n * h * v, rel=1e-12)
    # The model walks the chunks the code plans: one logits GEMM per sub-chunk, one dW GEMM per group.
    plan = plan_chunks(n, v, torch.bfloat16, True)
    ops = roofline.chunked_ops(n, h, v)
    assert sum(o.name.startswith("logits GEMM") for o in ops) == plan.sub_chunks(n) == 32
    assert sum(o.name.startswith("dW GEMM") for o in ops) == plan.groups(n) == 6


def test_hbm_bytes_of_each_path_are_the_hand_count():
    """The model's bytes, summed over its ops, against the count written out by hand: every GEMM reads
    its operands and writes its output once; the row kernel reads each fp32 logit twice and writes a
    bf16 gradient; dW (bf16) is written by the first group and read and written by every later one;
    backward scales dH and dW in place; Liger does the same per chunk with bf16 logits."""
    n, h, v, b = 16384, 4096, 128256, 2
    gpu = roofline.GPUS["H200"]
    plan = plan_chunks(n, v, torch.bfloat16, True)
    s, g = plan.sub_chunks(n), plan.groups(n)
    chunked = (s * b * v * h + n * (b * h + 4 * v)  # logits GEMMs
               + n * (8 * v + b * v)  # row kernel
               + g * b * v * h + n * (b * v + b * h)  # dH GEMMs
               + n * (b * v + b * h) + (2 * g - 1) * b * v * h  # dW GEMMs
               + 2 * 32 * n + 2 * b * n * h + 2 * b * v * h)  # sums, backward scaling
    assert roofline.totals(roofline.chunked_ops(n, h, v), gpu)["hbm_gb"] * 1e9 == pytest.approx(chunked, rel=1e-12)
    chunk = 512  # next_pow2(16384 / ceil(128256 / 4096)) = next_pow2(512)
    k = n // chunk
    liger = k * (b * v * h + b * v * h + 2 * b * v * h) + n * (b * h + b * v) + n * 3 * b * v \
        + n * (b * v + b * h) + n * (b * v + b * h)
    assert roofline.totals(roofline.liger_ops(n, h, v), gpu)["hbm_gb"] * 1e9 == pytest.approx(liger, rel=1e-12)


def test_every_path_is_priced_by_the_same_assumptions(model):
    """No path carries a factor of its own: the published times are shown beside the model, never
    multiplied into it; GEMM efficiency depends on the GEMM's token dimension, for every path alike."""
    assert not any("calibrat" in key for row in model["rows"] for key in row)
    assert "calibration" not in model and "published_comparison" in model
    eff = roofline.cublas_efficiency
    assert eff(64) == 0.50 and eff(128) == 0.50 and eff(1024) == 0.80 and eff(8192) == 0.80
    assert eff(256) == pytest.approx(0.65) and 0.65 < eff(384) < 0.75
    ops = roofline.chunked_ops(1024, 512, 4096) + roofline.liger_ops(1024, 512, 4096)
    assert all(op.tokens > 0 for op in ops if op.engine == "cublas")
    row = _row(model, roofline.ANCHOR, "H200")
    assert row["chunked_over_liger"] == pytest.approx(row["paths"]["chunked"]["ms"] / row["paths"]["liger"]["ms"])
    assert row["paths"]["chunked"]["ms"] < row["paths"]["tiled"]["ms"]  # why chunked is the default
    assert 0.0 < row["cce_beats_chunked_below_kept"] < 1.0
    # The default budget is within a few percent of an unbounded one at the anchor, as chunk_plan says.
    budgets = model["anchor_budgets_h200"]
    assert budgets[1024]["h200_ms"] <= 1.03 * budgets[8192]["h200_ms"]
    assert budgets[1024]["loss_memory_bytes"] <= 2.4e9


def test_cce_is_fitted_to_its_own_published_times(model):
    assert model["published_comparison"]["cce_kept_fraction"] == pytest.approx((95 - 43) / (324 - 43))
    a100 = model["published_comparison"]["points"]["cce_paper_a100"]
    # With that fit the model lands near CCE's published total; Liger runs far below its roofline.
    assert 0.8 < a100["published_over_modelled"]["cce"] < 1.25
    assert a100["published_over_modelled"]["liger"] > 1.3


def test_roofline_writes_its_tables_marked_as_modelled(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "roofline.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / "roofline.md").read_text()
    assert "MODELLED, not measured" in md and md.count("| H200 |") == len(roofline.SHAPES)
    data = json.loads((tmp_path / "roofline.json").read_text())
    assert {"assumptions", "published_comparison", "rows", "anchor_budgets_h200"} <= data.keys()
    assert "calibrat" not in md


@pytest.mark.slow
def test_loss_bench_interpret_runs_the_gpu_cases(tmp_path):
    """bench_loss.py --interpret: the GPU cases' Python (chunked, tiled and its variants, materialised) at a
    tiny shape under the Triton interpreter, as gpu_check.sh --cpu runs its loss_timing part."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its cases
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_loss.py"), "--interpret",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (shape,) = json.loads((tmp_path / "loss_cpu_interpret.json").read_text())["shapes"]
    results = shape["results"]
    assert set(results) >= {"msft_fast_chunked", "msft_fast_chunked_no_tasks", "msft_fast_triton",
                            "msft_fast_triton_filtered", "msft_fast_triton_gemm_bwd", "materialised"}
    # Every exact path computes the same loss and gradients close to float64 (bf16 inputs: ~2**-9).
    losses = [r["loss"] for c, r in results.items() if c != "msft_fast_triton_filtered"]
    assert max(losses) == pytest.approx(min(losses), rel=1e-3)
    for case, r in results.items():
        e = r["grad_error"]
        assert e["grad_hidden"] < 1e-2 and e["grad_weight"] < 1e-2, (case, e)
        if case.startswith("msft_fast"):
            assert e["loss"] < 1e-5, (case, e)  # fp32 logits: no 16-bit rounding of the loss
    assert results["msft_fast_chunked"]["grad_error"]["bitwise_repeat"] is True
    assert (tmp_path / "loss_cpu_interpret.md").exists()
