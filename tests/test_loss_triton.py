"""Triton fused linear cross-entropy under the interpreter (TRITON_INTERPRET=1, set in conftest.py)
vs plain float64 PyTorch on materialised logits, and vs the chunked reference."""

import json
import os
import subprocess
import sys

from dataclasses import replace

import pytest
import torch

from msft_fast.kernels import TaskStats, fused_linear_cross_entropy
from msft_fast.kernels.fused_linear_cross_entropy import choose_backend
from msft_fast.kernels.fp32_gemm import addmm_fp32_
from msft_fast.kernels.triton_flce import (
    INTERPRETER_BLOCKS, TritonBlocks, is_interpreting, linear_cross_entropy_triton,
)
from test_loss_reference import IGN, plain

T = 4  # the last task never gets a token
INTERP_GEMM = replace(INTERPRETER_BLOCKS, backward="gemm")
# Tiny tiles so that awkward shapes span several row blocks, V tiles, H steps and vocabulary slices,
# in groups of two token blocks (the grouped program order, its last group partial).
SMALL = TritonBlocks(block_m=16, block_v=32, block_k=16, group_m=2, v_splits=3, block_n=16, num_warps=4,
                     num_stages=1)
# The GEMM backward, in dlogits chunks of 16 tokens (3 chunks for N=37: the fp32 dW accumulation).
SMALL_GEMM = replace(SMALL, backward="gemm", gemm_chunk_bytes=16 * 103 * 4)


def test_runs_under_the_interpreter():
    assert is_interpreting(), "tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported"


def make_inputs(n=37, h=24, v=103, dtype=torch.float32, seed=0, bias=False, num_tasks=T, ignore_index=IGN,
                hit_frac=0.4):
    """Random leaves in `dtype`; ~25% ignored labels, ~hit_frac of the others set to the argmax."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.25  # peaked softmax, some argmax hits
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    logits = hidden.to(dtype).double() @ weight.to(dtype).double().T + (0 if b is None else b.to(dtype).double())
    labels = torch.randint(0, v, (n,), generator=g)
    hit = torch.rand(n, generator=g) < hit_frac
    labels[hit] = logits.argmax(-1)[hit]
    labels[labels == ignore_index] = (ignore_index + 1) % v  # only the rows chosen below are ignored
    labels[torch.rand(n, generator=g) < 0.25] = ignore_index
    task_ids = torch.randint(0, num_tasks - 1, (n,), generator=g)
    task_ids[labels == ignore_index] = 10**6  # out of range but ignored: must not count anywhere
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return (*leaves, labels, task_ids)


def run(fn, leaves, reduction, upstream):
    """(loss, stats, z_sums, grads of the leaves) of one call, with a random upstream gradient for none."""
    loss, stats, z_sums = fn()
    (loss * upstream if reduction == "none" else loss).sum().backward()
    grads = []
    for t in leaves:
        if t is not None:
            grads.append(t.grad.clone())
            t.grad = None
    return loss.detach(), stats, z_sums, grads


def as64(leaves):
    return [None if t is None else t.detach().double().requires_grad_() for t in leaves]


def check_stats(stats, ref, atol, num_tasks=T):
    assert isinstance(stats, TaskStats) and stats.loss_sum.shape == (num_tasks,)
    assert stats.loss_sum.dtype == torch.float32 and stats.tokens.dtype == stats.correct.dtype == torch.int64
    assert torch.equal(stats.tokens, ref.tokens) and torch.equal(stats.correct, ref.correct)
    torch.testing.assert_close(stats.loss_sum.double(), ref.loss_sum, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("blocks", [None, SMALL, SMALL_GEMM], ids=["interp-blocks", "small-blocks", "small-gemm"])
@pytest.mark.parametrize("options", [{}, dict(bias=True, softcap=2.0, z_loss=1e-2)], ids=["plain", "bias-cap-z"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fp32_matches_float64(reduction, options, blocks):
    hidden, weight, bias, labels, task_ids = make_inputs(bias=options.get("bias", False))
    opts = dict(softcap=options.get("softcap"), z_loss=options.get("z_loss", 0.0))
    check_fp32_against_float64(
        lambda: linear_cross_entropy_triton(hidden, weight, labels, task_ids, T, IGN, reduction, bias=bias,
                                            blocks=blocks, **opts),
        (hidden, weight, bias), labels, task_ids, reduction, opts)


def check_fp32_against_float64(call, leaves, labels, task_ids, reduction, opts):
    """call() -> (loss, stats, z_sums) of fp32 leaves (hidden, weight, bias or None) against float64
    materialised logits: loss, per-task stats, z-loss and every gradient (random upstream for none)."""
    upstream = torch.randn(labels.shape[0], dtype=torch.float64)
    got = run(call, leaves, reduction, upstream.float())
    h64, w64, b64 = as64(leaves)
    ref = run(lambda: plain(h64, w64, labels, task_ids, T, reduction, bias=b64, with_z=True, **opts),
              (h64, w64, b64), reduction, upstream)
    assert got[0].dtype == torch.float32 and got[0].shape == ref[0].shape
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    check_stats(got[1], ref[1], atol=1e-4)
    assert got[1].correct.sum() >= 3  # the argmax path is exercised, not only misses
    assert got[1].tokens[-1] == 0 and got[1].loss_sum[-1] == 0  # the task without tokens
    torch.testing.assert_close(got[2].double(), ref[2], rtol=1e-5, atol=1e-5)
    assert len(got[3]) == len(ref[3]) == (3 if leaves[2] is not None else 2)
    for a, b in zip(got[3], ref[3]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_16bit_inputs_close_to_float64(dtype, tol, reduction):
    hidden, weight, bias, labels, task_ids = make_inputs(dtype=dtype, seed=1, bias=True)
    check_16bit_against_float64(
        lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, reduction=reduction, impl="triton",
                                           bias=bias, softcap=3.0, z_loss=1e-3, return_z_loss=True),
        (hidden, weight, bias), labels, task_ids, reduction, dtype, tol)


def check_16bit_against_float64(call, leaves, labels, task_ids, reduction, dtype, tol):
    """call() -> (loss, stats, z_sums) of 16-bit leaves (softcap 3, z-loss 1e-3) against float64 on the
    very same rounded inputs and upstream gradient: fp32 loss and stats, gradients in `dtype` within tol."""
    upstream = torch.randn(labels.shape[0], dtype=torch.float64)
    got = run(call, leaves, reduction, upstream.to(dtype))
    h64, w64, b64 = as64(leaves)
    ref = run(lambda: plain(h64, w64, labels, task_ids, T, reduction, bias=b64, softcap=3.0, z_loss=1e-3,
                            with_z=True),
              (h64, w64, b64), reduction, upstream.to(dtype).double())
    # fp32 logits and softmax: the loss of 16-bit inputs is exact to fp32, not to 16 bits.
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    check_stats(got[1], ref[1], atol=1e-3)
    for a, b in zip(got[3], ref[3]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.stack
def test_agrees_with_reference_backend_through_public_api():
    hidden, weight, bias, labels, task_ids = make_inputs(n=53, h=40, v=211, seed=2, bias=True)
    upstream = torch.randn(53)
    outs = {}
    for impl in ("triton", "torch"):
        fn = lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, reduction="none", impl=impl,
                                                bias=bias, softcap=5.0, z_loss=1e-3, return_z_loss=True)
        outs[impl] = run(fn, (hidden, weight, bias), "none", upstream)
    a, b = outs["triton"], outs["torch"]
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(a[1].tokens, b[1].tokens) and torch.equal(a[1].correct, b[1].correct)
    torch.testing.assert_close(a[1].loss_sum, b[1].loss_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-6)
    for ga, gb in zip(a[3], b[3]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.stack
@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("n", [0, 9])
def test_all_ignored_and_empty(n, reduction, impl):
    hidden, weight, bias, _, task_ids = make_inputs(n=n, h=20, v=40, bias=True)
    labels = torch.full((n,), IGN)
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, reduction=reduction, impl=impl,
                                             bias=bias, z_loss=0.1)
    assert loss.shape == ((n,) if reduction == "none" else ())
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert all(torch.all(t.grad == 0) for t in (hidden, weight, bias))
    assert all(torch.all(s == 0) for s in stats) and stats.loss_sum.shape == (T,)


def test_bad_upstream_at_ignored_tokens_does_not_leak():
    hidden, weight, _, labels, task_ids = make_inputs()
    upstream = torch.randn(labels.shape[0])
    upstream[labels == IGN] = float("nan")
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, reduction="none", impl="triton")
    (loss * torch.nan_to_num(upstream)).sum().backward()  # reference gradients at finite upstream values
    clean = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, reduction="none", impl="triton")
    loss.backward(upstream)
    torch.testing.assert_close(hidden.grad, clean[0])
    torch.testing.assert_close(weight.grad, clean[1], rtol=1e-5, atol=1e-6)


def test_partial_grads_and_no_grad():
    hidden, weight, bias, labels, task_ids = make_inputs(bias=True)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, impl="triton", bias=bias)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    plain(h64, weight.double(), labels, task_ids, T, "sum", bias=bias.double())[0].backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        loss, stats = fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, impl="triton", bias=bias)
    assert loss.grad_fn is None and stats.tokens.sum() == (labels != IGN).sum()


def test_gemm_backward_single_chunk_and_fp32_accumulation_of_16bit_products():
    hidden, weight, bias, labels, task_ids = make_inputs(bias=True)
    outs = []
    for blocks in (None, INTERP_GEMM):
        loss, _, _ = linear_cross_entropy_triton(hidden, weight, labels, task_ids, T, IGN, "mean", bias=bias,
                                                 softcap=4.0, blocks=blocks)
        loss.backward()
        outs.append([t.grad.clone() for t in (hidden, weight, bias)])
        for t in (hidden, weight, bias):
            t.grad = None
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # On CPU torch has no fp32-output 16-bit GEMM: the fallback upcasts, so the products stay exact in fp32.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 30, generator=g).bfloat16(), torch.randn(30, 20, generator=g).bfloat16()
    acc = torch.ones(40, 20)
    addmm_fp32_(acc, a, b)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, 1 + a.double().mm(b.double()).float(), rtol=1e-6, atol=1e-5)


def test_gradient_filter_is_off_by_default_and_skips_only_small_tiles():
    """filter_eps: a threshold below every gradient keeps the exact result; a large one skips whole
    (token block, vocabulary tile) pairs whose gradient is small, never one holding a label."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, 24, generator=g).requires_grad_()
    weight = (torch.randn(103, 24, generator=g) * 0.05).requires_grad_()  # flat softmax: every p near 1/103
    labels = torch.randint(0, SMALL.block_v, (37,), generator=g)  # every label in the first vocabulary tile
    labels[::5] = IGN
    task_ids = torch.zeros(37, dtype=torch.long)
    outs = {}
    for eps in (None, 1e-30, 0.5):
        loss, _, _ = linear_cross_entropy_triton(hidden, weight, labels, task_ids, T, IGN, "sum", blocks=SMALL,
                                                 filter_eps=eps)
        loss.backward()
        outs[eps] = (hidden.grad.clone(), weight.grad.clone())
        hidden.grad = weight.grad = None
    for a, b in zip(outs[None], outs[1e-30]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    exact, filtered = outs[None][1], outs[0.5][1]
    first = slice(0, SMALL.block_v)
    torch.testing.assert_close(filtered[first], exact[first])  # the label tile: kept whole
    rest = slice(SMALL.block_v, None)
    assert torch.all(filtered[rest] == 0) and exact[rest].abs().min() > 0  # the others: skipped


def test_filter_eps_is_refused_where_gradients_are_exact():
    hidden, weight, _, labels, task_ids = make_inputs()
    for impl in ("torch", "chunked", "auto"):
        with pytest.raises(ValueError, match="filter_eps applies to the tiled kernel"):
            fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, impl=impl, filter_eps="auto")
    with pytest.raises(ValueError, match="filter_eps must be"):
        fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, impl="triton", filter_eps=2.0)
    with pytest.raises(ValueError, match="fused backward"):
        linear_cross_entropy_triton(hidden, weight, labels, task_ids, T, IGN, "sum", blocks=SMALL_GEMM,
                                    filter_eps=1e-3)
    # "auto" resolves to eps / 32 of the input dtype: 2**-12 for bf16.
    from msft_fast.kernels.fused_linear_cross_entropy import resolve_filter_eps

    assert resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12


def test_single_task_default():
    hidden, weight, _, labels, _ = make_inputs()
    got = fused_linear_cross_entropy(hidden.detach(), weight.detach(), labels, impl="triton")
    ref = fused_linear_cross_entropy(hidden.detach(), weight.detach(), labels, impl="torch")
    assert got[1].tokens.shape == (1,) and got[1].tokens.item() == (labels != IGN).sum()
    assert torch.equal(got[1].correct, ref[1].correct)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1].loss_sum, ref[1].loss_sum, rtol=1e-5, atol=1e-4)


def test_dispatch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", cpu, torch.float32) == "torch"
    assert choose_backend("auto", cuda, torch.bfloat16) == "chunked"
    assert choose_backend("auto", cuda, torch.float32) == "chunked"
    assert choose_backend("auto", cuda, torch.float64) == "torch"
    assert choose_backend("torch", cuda, torch.float16) == "torch"
    assert choose_backend("triton", cpu, torch.float32) == "triton"
    assert choose_backend("chunked", cpu, torch.bfloat16) == "chunked"
    for impl in ("triton", "chunked"):
        with pytest.raises(ValueError, match="float64"):
            choose_backend(impl, cuda, torch.float64)


def test_triton_on_cpu_without_interpreter_says_so():
    code = (
        "import torch\n"
        "from msft_fast.kernels import fused_linear_cross_entropy\n"
        "h, w = torch.randn(4, 8), torch.randn(5, 8)\n"
        "fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), impl='auto')\n"  # CPU: the reference
        "try:\n"
        "    fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), impl='triton')\n"
        "except RuntimeError as err:\n"
        "    print('ERROR', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout and 'impl="torch"' in out.stdout


# Compiles every kernel in every configuration a GPU launch can pick (the autotune lists, the fixed
# fp32 blocks, the chunked path's row kernel) for sm_90a, as a launch on an H100/H200 would, and reads
# ptxas's and nvdisasm's reports: catches GPU lowering errors, register spills, shared memory over
# the limit and ordered (acq_rel) atomics or GPU-scope fences, none of which the interpreter can see.
# Needs no GPU; the pinned triton wheel ships ptxas and nvdisasm, so their absence is a failure.
# It rewrites bench/results/kernels_sm90.md (deterministic: unchanged kernels leave it unchanged).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills_or_ordered_atomics():
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "nvdisasm"):
        assert os.path.exists(os.path.join(bin_dir, tool)), (
            f"triton {triton.__version__} ships no {tool} in {bin_dir}: the sm_90 compile check cannot run "
            "(install the pinned triton of requirements/dev-cpu.txt)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_md = os.path.join(REPO, "bench", "results", "kernels_sm90.md")
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "kernels_sm90.py"), "--out", out_md], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    from msft_fast.kernels import chunked, triton_flce

    kernels = {r["kernel"] for r in report}
    assert {"_fwd_kernel", "_bwd_kernel", "_dlogits_kernel", "_combine_kernel", "_task_sums_kernel",
            "_row_kernel"} <= kernels
    # Every autotune configuration of both 16-bit dtypes is in the report.
    for name, configs in (("_fwd_kernel", triton_flce.FWD_CONFIGS), ("_bwd_kernel", triton_flce.BWD_CONFIGS),
                          ("_dlogits_kernel", triton_flce.DLOGITS_CONFIGS)):
        assert sum(r["kernel"] == name and r["dtype"] == "bf16" for r in report) == len(configs)
        assert sum(r["kernel"] == name and r["dtype"] == "fp16" for r in report) == len(configs)
    assert sum(r["kernel"] == "_row_kernel" and r["config"].endswith("train") for r in report) == \
        3 * len(chunked.ROW_CONFIGS)
    for r in report:
        assert r["spills"] == 0, r
        assert r["shared"] <= 227 * 1024, r  # the most shared memory a block may use on H100/H200
        assert r["ordered_atomics"] == 0 and r["gpu_fences"] == 0 and r["sass_gpu_barriers"] == 0, r
        assert r["sass_returning_atomics"] == 0, r  # every atomic is a fire-and-forget reduction
        if r["kernel"] in ("_fwd_kernel", "_bwd_kernel", "_dlogits_kernel"):
            assert r["wgmma"] > 0 and r["cp_async"] > 0, r  # tensor cores, pipelined loads
    # The fused backward's atomics are there, and all of them are plain reductions (REDG).
    assert all(r["atomics"] > 0 and r["sass_reductions"] > 0 for r in report if r["kernel"] == "_bwd_kernel")
    with open(out_md) as f:
        assert f.read().count("\n| _") == len(report)
