"""Chunked reference of fused_linear_cross_entropy vs plain PyTorch with materialised logits."""

import pytest
import torch
import torch.nn.functional as F

from msft_fast.kernels import TaskStats, fused_linear_cross_entropy

IGN = -100


def make_inputs(n, h, v, num_tasks=4, dtype=torch.float64, seed=0, ignore_frac=0.25):
    """Random inputs; the last task never gets a token, ~ignore_frac of labels are ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = IGN
    task_ids = torch.randint(0, num_tasks - 1, (n,), generator=g)
    return hidden, weight, labels, task_ids


def plain(hidden, weight, labels, task_ids, num_tasks, reduction, bias=None, softcap=None, z_loss=0.0,
          with_z=False, ignore_index=IGN):
    """Materialised-logits loss (float64) and an independent per-task loop for the stats.

    With ``with_z`` also returns the per-task z-loss sums (float64).
    """
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    per_tok = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    z_tok = torch.where(valid, z_loss * torch.logsumexp(logits, dim=-1) ** 2, 0.0)
    z_sums = torch.stack([z_tok[valid & (task_ids == t)].sum() for t in range(num_tasks)]).detach()
    stats = TaskStats(
        torch.stack([per_tok[valid & (task_ids == t)].sum() for t in range(num_tasks)]).detach(),
        torch.tensor([int((valid & (task_ids == t)).sum()) for t in range(num_tasks)]),
        torch.tensor([int((valid & (task_ids == t) & (logits.argmax(-1) == labels)).sum()) for t in range(num_tasks)]),
    )
    per_tok = per_tok + z_tok
    loss = {"sum": per_tok.sum(), "mean": per_tok.sum() / max(int(valid.sum()), 1), "none": per_tok}[reduction]
    return (loss, stats, z_sums) if with_z else (loss, stats)


def loss_and_grads(fn, hidden, weight, reduction, upstream):
    loss, stats = fn()
    (loss * upstream if reduction == "none" else loss).sum().backward()
    out = loss.detach(), stats, hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    return out


def assert_stats(stats, ref, atol=1e-5):
    assert stats.loss_sum.dtype == torch.float32 and stats.tokens.dtype == stats.correct.dtype == torch.int64
    assert not stats.loss_sum.requires_grad
    # loss_sum is float32 by contract, so it is compared at float32 precision even for float64 inputs.
    torch.testing.assert_close(stats.loss_sum.double(), ref.loss_sum, rtol=1e-6, atol=atol)
    assert torch.equal(stats.tokens, ref.tokens) and torch.equal(stats.correct, ref.correct)


@pytest.mark.stack
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("n,h,v,chunk", [(37, 19, 53, None), (37, 19, 53, 5), (130, 24, 257, 16)])
def test_matches_plain_torch_float64(n, h, v, chunk, reduction):
    hidden, weight, labels, task_ids = make_inputs(n, h, v)
    upstream = torch.randn(n, dtype=torch.float64)
    got = loss_and_grads(
        lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, 4, reduction=reduction, chunk_size=chunk),
        hidden, weight, reduction, upstream,
    )
    ref = loss_and_grads(lambda: plain(hidden, weight, labels, task_ids, 4, reduction), hidden, weight, reduction, upstream)
    assert got[0].dtype == torch.float64 and got[0].shape == ref[0].shape
    for a, b in [(got[0], ref[0]), (got[2], ref[2]), (got[3], ref[3])]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert_stats(got[1], ref[1])
    assert got[1].tokens[-1] == 0 and got[1].loss_sum[-1] == 0  # the empty task
    assert got[2].dtype == got[3].dtype == torch.float64


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradcheck(reduction):
    hidden, weight, labels, task_ids = make_inputs(6, 5, 7, num_tasks=3)
    fn = lambda h, w: fused_linear_cross_entropy(h, w, labels, task_ids, 3, reduction=reduction, chunk_size=4)[0]
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_chunk_size_invariance():
    n = 29
    hidden, weight, labels, task_ids = make_inputs(n, 11, 41)
    upstream = torch.randn(n, dtype=torch.float64)
    results = [
        loss_and_grads(
            lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, 4, reduction="none", chunk_size=c),
            hidden, weight, "none", upstream,
        )
        for c in (1, 7, n, None)
    ]
    for loss, stats, gh, gw in results[1:]:
        for a, b in [(loss, results[0][0]), (gh, results[0][2]), (gw, results[0][3]), (stats.loss_sum, results[0][1].loss_sum)]:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(stats.tokens, results[0][1].tokens) and torch.equal(stats.correct, results[0][1].correct)


@pytest.mark.parametrize(
    "dtype,loss_tol,grad_tol",
    [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-4, 2e-2), (torch.float16, 1e-4, 2e-3)],
)
def test_low_precision_close_to_float64(dtype, loss_tol, grad_tol):
    n = 70
    hidden, weight, labels, task_ids = make_inputs(n, 32, 300, dtype=dtype, seed=1)
    upstream = torch.randn(n, dtype=torch.float64)
    got = loss_and_grads(
        lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, 4, reduction="none", chunk_size=16),
        hidden, weight, "none", upstream.to(dtype),
    )
    # The reference sees the very same (rounded) input values in float64.
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = loss_and_grads(lambda: plain(h64, w64, labels, task_ids, 4, "none"), h64, w64, "none", upstream.to(dtype).double())
    assert got[0].dtype == torch.float32  # logits/lse/loss accumulate in fp32 even for 16-bit inputs
    assert got[2].dtype == got[3].dtype == dtype
    torch.testing.assert_close(got[0].double(), ref[0], rtol=loss_tol, atol=loss_tol)
    torch.testing.assert_close(got[2].double(), ref[2], rtol=grad_tol, atol=grad_tol)
    torch.testing.assert_close(got[3].double(), ref[3], rtol=grad_tol, atol=grad_tol)
    assert_stats(got[1], ref[1], atol=1e-3)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("n", [0, 9])
def test_all_ignored_and_empty(n, reduction):
    hidden, weight, _, task_ids = make_inputs(n, 5, 7, num_tasks=3)
    labels = torch.full((n,), IGN)
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, task_ids, 3, reduction=reduction)
    assert loss.shape == ((n,) if reduction == "none" else ())
    loss.sum().backward()
    assert not torch.isnan(loss).any() and torch.all(loss == 0)
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
    assert all(torch.all(s == 0) for s in stats) and stats.loss_sum.shape == (3,)


def test_no_grad_and_default_task():
    hidden, weight, labels, _ = make_inputs(20, 6, 13)
    with torch.no_grad():
        loss, stats = fused_linear_cross_entropy(hidden, weight, labels, num_tasks=3)
    assert not loss.requires_grad and loss.grad_fn is None
    ref_loss, ref_stats = plain(hidden, weight, labels, torch.zeros(20, dtype=torch.long), 3, "sum")
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-10)
    assert_stats(stats, ref_stats)
    assert stats.tokens[1:].sum() == 0  # everything lands in task 0
    assert fused_linear_cross_entropy(hidden, weight, labels)[1].tokens.shape == (1,)


def test_non_contiguous_and_ignored_task_ids_unchecked():
    hidden, weight, labels, task_ids = make_inputs(12, 8, 10, num_tasks=2)
    task_ids[labels == IGN] = 99  # out of range but ignored: allowed
    h_t = hidden.detach().T.contiguous().T  # same values, transposed strides
    loss, _ = fused_linear_cross_entropy(h_t, weight.detach()[:, ::1], labels[::1], task_ids, 2, impl="torch")
    ref, _ = plain(hidden, weight, labels, task_ids, 2, "sum")
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "change",
    [
        dict(task_ids=torch.tensor([0, 0, 5, 0])),  # task id out of range (non-ignored token)
        dict(labels=torch.tensor([0, 7, 1, 2])),  # label >= V
        dict(labels=torch.tensor([0, -1, 1, 2])),  # negative label that is not ignore_index
        dict(weight=torch.randn(7, 4, dtype=torch.float64)),  # H mismatch
        dict(hidden=torch.randn(4, 3, 1, dtype=torch.float64)),  # hidden not 2-D
        dict(labels=torch.tensor([0, 1, 2])),  # length mismatch
        dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])),  # float labels
        dict(weight=torch.randn(7, 3, dtype=torch.float32)),  # dtype mismatch
        dict(num_tasks=0),  # task_ids given but no tasks
        dict(reduction="avg"),
        dict(impl="cuda"),
        dict(chunk_size=0),
    ],
)
def test_validation_errors(change):
    args = dict(
        hidden=torch.randn(4, 3, dtype=torch.float64), weight=torch.randn(7, 3, dtype=torch.float64),
        labels=torch.tensor([0, IGN, 1, 2]), task_ids=torch.tensor([0, 1, 0, 1]), num_tasks=2,
    )
    fused_linear_cross_entropy(**args)  # the unchanged arguments are valid
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(**{**args, **change})


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("n,ignore_frac", [(37, 0.25), (23, 1.0), (0, 0.25), (19, 0.0)])
def test_a_known_label_count_gives_the_same_results_without_a_host_read(n, ignore_frac, reduction):
    """num_valid (the trainer's count from packing) skips the host sync, not the result: awkward N,
    ignored labels (all of them, none of them), an empty task, N = 0."""
    from msft_fast.training.step_audit import HostSyncAudit

    hidden, weight, labels, task_ids = make_inputs(n, 11, 29, num_tasks=4, ignore_frac=ignore_frac)
    count = int((labels != IGN).sum())
    upstream = torch.rand(n, dtype=torch.float64) if reduction == "none" else 1.0
    checked = loss_and_grads(lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, 4, reduction=reduction),
                             hidden, weight, reduction, upstream)
    with HostSyncAudit(torch.device("cpu")) as audit:
        counted = loss_and_grads(lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, 4,
                                                                    reduction=reduction, num_valid=count),
                                 hidden, weight, reduction, upstream)
    assert not [e for e in audit.events if e.came_through("kernels/")], audit.events
    for a, b in zip(checked, counted):
        if isinstance(a, TaskStats):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("change,error", [
    (dict(num_valid=2), RuntimeError),  # three labels are not ignore_index
    (dict(num_valid=4), RuntimeError),
    (dict(labels=torch.tensor([0, IGN, 7, 2])), RuntimeError),  # label >= V, with the right count
    (dict(task_ids=torch.tensor([0, 1, 0, 5])), RuntimeError),  # task id out of range
    (dict(num_valid=5), ValueError),  # more than N
    (dict(num_valid=-1), ValueError),
    (dict(num_valid=True), ValueError),
    (dict(num_valid=3.0), ValueError),
])
def test_a_known_label_count_is_checked_on_the_device(change, error):
    """Given num_valid, the range checks and the count become one device-side assertion: on a CPU
    it fails at once (a RuntimeError naming num_valid); arguments of the wrong kind stay ValueErrors."""
    args = dict(hidden=torch.randn(4, 3, dtype=torch.float64), weight=torch.randn(7, 3, dtype=torch.float64),
                labels=torch.tensor([0, IGN, 1, 2]), task_ids=torch.tensor([0, 1, 0, 1]), num_tasks=2, num_valid=3)
    fused_linear_cross_entropy(**args)  # the unchanged arguments are valid
    with pytest.raises(error, match="num_valid"):
        fused_linear_cross_entropy(**{**args, **change})


def test_triton_refuses_float64():
    with pytest.raises(ValueError, match="float64"):
        fused_linear_cross_entropy(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                                   torch.tensor([0, 1]), impl="triton")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("use_bias,softcap,z_loss", [(True, None, 0.0), (False, 2.5, 0.0), (False, None, 1e-2),
                                                     (True, 1.5, 3e-2)])
def test_options_match_plain_torch_float64(use_bias, softcap, z_loss, reduction):
    n, v = 37, 53
    hidden, weight, labels, task_ids = make_inputs(n, 19, v)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True) if use_bias else None
    upstream = torch.randn(n, dtype=torch.float64)
    opts = dict(bias=bias, softcap=softcap, z_loss=z_loss)

    def run(fn):
        loss, stats, z_sums = fn()
        (loss * upstream if reduction == "none" else loss).sum().backward()
        grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
        for t in (hidden, weight, bias):
            if t is not None:
                t.grad = None
        return loss.detach(), stats, z_sums, grads

    got = run(lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, 4, reduction=reduction,
                                                 chunk_size=16, return_z_loss=True, **opts))
    ref = run(lambda: plain(hidden, weight, labels, task_ids, 4, reduction, with_z=True, **opts))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    assert_stats(got[1], ref[1])
    assert got[2].dtype == torch.float32 and got[2].shape == (4,) and not got[2].requires_grad
    torch.testing.assert_close(got[2].double(), ref[2], rtol=1e-6, atol=1e-6)
    if z_loss == 0:
        assert torch.all(got[2] == 0)
    for a, b in zip(got[3], ref[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_with_options(reduction):
    hidden, weight, labels, task_ids = make_inputs(6, 5, 7, num_tasks=3)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    fn = lambda h, w, b: fused_linear_cross_entropy(h, w, labels, task_ids, 3, reduction=reduction, chunk_size=4,
                                                    bias=b, softcap=1.3, z_loss=0.1)[0]
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_default_return_is_a_pair_and_stats_exclude_z_loss():
    hidden, weight, labels, task_ids = make_inputs(20, 6, 13)
    out = fused_linear_cross_entropy(hidden, weight, labels, task_ids, 4)
    assert len(out) == 2 and isinstance(out[1], TaskStats)
    loss, stats, z_sums = fused_linear_cross_entropy(hidden, weight, labels, task_ids, 4, z_loss=0.5,
                                                     return_z_loss=True)
    torch.testing.assert_close(stats.loss_sum, out[1].loss_sum)  # cross-entropy only
    torch.testing.assert_close(loss.detach(), out[0].detach() + z_sums.sum().double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        dict(bias=torch.randn(6, dtype=torch.float64)),  # wrong length
        dict(bias=torch.randn(7, 1, dtype=torch.float64)),  # not 1-D
        dict(bias=torch.randn(7, dtype=torch.float32)),  # dtype mismatch
        dict(softcap=0.0),
        dict(softcap=-1.0),
        dict(softcap=float("inf")),
        dict(softcap="30"),
        dict(z_loss=-1e-4),
        dict(z_loss=float("nan")),
    ],
)
def test_option_validation_errors(change):
    args = dict(
        hidden=torch.randn(4, 3, dtype=torch.float64), weight=torch.randn(7, 3, dtype=torch.float64),
        labels=torch.tensor([0, IGN, 1, 2]), bias=torch.randn(7, dtype=torch.float64), softcap=30.0, z_loss=1e-4,
    )
    fused_linear_cross_entropy(**args)  # the unchanged arguments are valid
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(**{**args, **change})
