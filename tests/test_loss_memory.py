"""The chunked loss's memory and precision claims: `loss_memory_bytes` is what a real call allocates
(read from torch's memory profiler on the CPU path, fp32, where CPU and GPU take the same buffers),
the anchor shape fits the 2.4 GB it promises, dW accumulated in 16 bits is no worse than
Liger-Kernel's per-chunk accumulation, and the incoming gradient scales in fp32."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msft_fast.kernels import fused_linear_cross_entropy, loss_memory_bytes, plan_chunks
from msft_fast.kernels.fused_linear_cross_entropy import CHUNKED_PER_TOKEN, GATHER_PER_TOKEN, SMALL_BYTES

IGN = -100


def test_the_anchor_shape_needs_at_most_2_4_gb_and_every_buffer_is_counted():
    n, h, v = 16384, 4096, 128256
    total = loss_memory_bytes(n, h, v, torch.bfloat16)
    plan = plan_chunks(n, v, torch.bfloat16, True)
    # chunk buffers + dW and dH in bf16 + gathered hidden rows (+ their ids) + per-token vectors
    assert total == plan.bytes + 2 * v * h + 2 * n * h + (2 * n * h + GATHER_PER_TOKEN * n) \
        + CHUNKED_PER_TOKEN * n + SMALL_BYTES
    assert total <= 2.4e9  # was 4.6e9 with an fp32 dW accumulator beside its bf16 copy and 1 GiB of chunks
    assert loss_memory_bytes(n, h, v, torch.bfloat16, ignored=False) == total - 2 * n * h - GATHER_PER_TOKEN * n
    assert loss_memory_bytes(n, h, v, torch.bfloat16, bias=True) == total + 4 * v
    assert loss_memory_bytes(n, h, v, torch.bfloat16, training=False) == \
        plan_chunks(n, v, torch.bfloat16, False).bytes + 2 * n * h + GATHER_PER_TOKEN * n + CHUNKED_PER_TOKEN * n \
        + SMALL_BYTES


def _peak_bytes(fn) -> int:
    """Peak of the bytes torch allocated during fn() (CPU, from the profiler's memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("ignored", [False, True], ids=["all_labelled", "some_ignored"])
def test_loss_memory_bytes_is_what_a_call_allocates(ignored):
    """Forward and backward of the chunked path, fp32 under the interpreter: the profiler's peak is
    the model's figure, less at most the slack the model keeps for per-token vectors."""
    n, h, v, budget = 300, 64, 1000, 48 * 1000 * 4 + 144 * 1000 * 4
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    if ignored:
        labels[::3] = IGN
    tasks = torch.randint(0, 3, (n,), generator=g)

    def call():
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, tasks, 3, impl="chunked", chunk_bytes=budget)
        loss.backward()

    call()  # the interpreter's first launch sets itself up
    hidden.grad = weight.grad = None
    measured = _peak_bytes(call)
    modelled = loss_memory_bytes(n, h, v, torch.float32, impl="chunked", chunk_bytes=budget, ignored=ignored)
    assert measured <= modelled, (measured, modelled)
    if not ignored:  # every buffer counted, no more than the per-token slack over
        assert modelled <= measured + CHUNKED_PER_TOKEN * n + SMALL_BYTES, (measured, modelled)
    else:  # an upper bound for any share of ignored tokens; at least the kept tokens' buffers are there
        kept = int((labels != IGN).sum())
        least = loss_memory_bytes(kept, h, v, torch.float32, impl="chunked", chunk_bytes=budget, ignored=False) \
            + 4 * kept * h - CHUNKED_PER_TOKEN * kept - SMALL_BYTES
        assert least <= measured, (least, measured)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def test_dw_accumulated_in_bf16_is_no_worse_than_liger_per_chunk_accumulation():
    """Small shape, 8 gradient groups (our chunk plan) against Liger-Kernel's construction at its own
    chunking (next_pow2(N / ceil(V / H)) tokens: bf16 logits, the gradient formed from them in bf16,
    dW += G.T @ h rounded to bf16 per chunk): the relative error of dW against float64."""
    n, h, v = 256, 32, 300
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.25).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g)
    budget = 32 * v * 4 + 32 * v * 2  # 32-token sub-chunks and groups: 8 groups, 8 roundings of dW
    assert plan_chunks(n, v, torch.bfloat16, True, budget, 32).groups(n) == 8
    w = weight.clone().requires_grad_()
    loss, _ = fused_linear_cross_entropy(hidden, w, labels, impl="chunked", chunk_bytes=budget, chunk_size=32)
    loss.backward()
    h64, w64 = hidden.double(), weight.double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, labels, reduction="sum").backward()
    exact = w64.grad

    chunk = 2 ** math.ceil(math.log2(math.ceil(n / math.ceil(v / h))))
    liger = torch.zeros(v, h, dtype=torch.float64)
    for c0 in range(0, n, chunk):
        hc = hidden[c0:c0 + chunk].double()
        logits = _bf16(hc @ weight.double().T)  # bf16 logits
        grad = _bf16(torch.softmax(logits, -1) - F.one_hot(labels[c0:c0 + chunk], v))
        liger = _bf16(liger + grad.T @ hc)

    def error(dw):
        return ((dw.double() - exact).norm() / exact.norm()).item()

    assert error(w.grad) <= error(liger), (error(w.grad), error(liger))
    assert error(w.grad) < 1e-2


def test_the_incoming_gradient_scales_in_fp32_not_rounded_to_bf16():
    """loss * (1/3): every bf16 gradient is the unscaled one times 1/3, rounded once. Rounding 1/3 to
    bf16 first (0.333984375) would bias them all by +0.2%."""
    n, h, v = 64, 16, 200
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, h, generator=g).to(torch.bfloat16)
    weight = torch.randn(v, h, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g)
    grads = []
    for scale in (1.0, 1 / 3):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = fused_linear_cross_entropy(hh, ww, labels, impl="chunked")
        (loss * torch.tensor(scale)).backward()
        grads.append((hh.grad.double(), ww.grad.double()))
    for unscaled, scaled in zip(*grads):
        want = _bf16(unscaled / 3)
        nonzero = unscaled != 0
        ratio = (scaled[nonzero] / (unscaled[nonzero] / 3))
        assert ratio.mean().item() == pytest.approx(1.0, abs=2e-4)  # no systematic bias
        assert (scaled - want).abs().max() <= (want.abs() * 2**-8).max()  # within one bf16 rounding
