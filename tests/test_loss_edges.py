"""The loss at the edges of its shapes, on every backend, through the public function: one token
(trained, or ignored), and a single task (task_ids given with num_tasks=1, or left out), against
float64 materialised logits: loss, per-task statistics and both gradients."""
from __future__ import annotations

import pytest
import torch
from test_loss_reference import IGN, plain

from msft_fast.kernels import fused_linear_cross_entropy

IMPLS = ["torch", "chunked", "triton"]


def _inputs(n: int, h: int = 19, v: int = 53, seed: int = 0, ignored: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.25
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0] = (hidden[0] @ weight.T).argmax()  # one argmax hit: `correct` is exercised
    if ignored:
        labels[:] = IGN
    return hidden, weight, labels


def _check(impl, hidden64, weight64, labels, task_ids, num_tasks, reduction, call_tasks, call_num_tasks):
    hidden, weight = (t.float().requires_grad_() for t in (hidden64, weight64))
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, call_tasks, call_num_tasks, IGN, reduction,
                                             impl=impl)
    h64, w64 = (t.clone().requires_grad_() for t in (hidden64, weight64))
    ref_loss, ref_stats = plain(h64, w64, labels, task_ids, num_tasks, reduction)
    upstream = torch.randn(labels.shape, dtype=torch.float64) if reduction == "none" else torch.ones(())
    (loss * upstream.float()).sum().backward()
    (ref_loss * upstream).sum().backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    assert stats.loss_sum.shape == (num_tasks,)
    assert torch.equal(stats.tokens, ref_stats.tokens) and torch.equal(stats.correct, ref_stats.correct)
    torch.testing.assert_close(stats.loss_sum.double(), ref_stats.loss_sum, rtol=1e-5, atol=1e-5)
    for got, want in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert got is not None and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("ignored", [False, True], ids=["trained", "ignored"])
@pytest.mark.parametrize("impl", IMPLS)
def test_one_token(impl, ignored, reduction):
    hidden, weight, labels = _inputs(1, ignored=ignored)
    tasks = torch.tensor([2])
    _check(impl, hidden, weight, labels, tasks, 3, reduction, tasks, 3)
    if not ignored:
        _, stats = fused_linear_cross_entropy(hidden.float(), weight.float(), labels, tasks, 3, IGN, reduction,
                                              impl=impl)
        assert stats.tokens.tolist() == [0, 0, 1] and stats.correct.tolist() == [0, 0, 1]


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("given", [True, False], ids=["task_ids", "no_task_ids"])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_single_task(impl, given, reduction):
    hidden, weight, labels = _inputs(29, seed=1)
    labels[::4] = IGN
    zeros = torch.zeros(29, dtype=torch.long)
    _check(impl, hidden, weight, labels, zeros, 1, reduction, zeros if given else None, 1 if given else 0)
