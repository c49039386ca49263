"""The chunked path (impl="chunked": cuBLAS logits, one Triton row kernel, cuBLAS dH/dW) under the
Triton interpreter (TRITON_INTERPRET=1, set in conftest.py): against float64 PyTorch on materialised
logits on awkward shapes, and inside CausalLMWithTaskLoss against the PyTorch reference path."""

import re

import pytest
import torch
from conftest import tiny_llama

from msft_fast.config import ConfigError, load_config
from msft_fast.kernels import DEFAULT_CHUNK_BYTES, fused_linear_cross_entropy, loss_memory_bytes, plan_chunks
from msft_fast.kernels import chunked
from msft_fast.kernels.chunked import is_interpreting, linear_cross_entropy_chunked
from test_loss_reference import IGN, plain
from test_loss_triton import (
    T, as64, check_16bit_against_float64, check_fp32_against_float64, check_stats, make_inputs, run,
)


def budget_for(logit_rows, grad_rows, v, dtype):
    """A chunk_bytes budget that plans exactly these rows (with chunk_size=logit_rows)."""
    return 4 * v * logit_rows + torch.finfo(dtype).bits // 8 * v * grad_rows


def test_runs_under_the_interpreter():
    assert is_interpreting(), "tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported"


# "small": 8-token logits sub-chunks in 16-token groups (3 groups for 37 tokens, the last one partial)
# and 32-column row blocks (4 per row of 103, the last one partial): every loop of the path runs.
CHUNKINGS = {"one-chunk": {}, "small": dict(chunk_size=8, row_block=32)}


@pytest.mark.stack
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=list(CHUNKINGS))
@pytest.mark.parametrize("options", [{}, dict(bias=True, softcap=2.0, z_loss=1e-2)], ids=["plain", "bias-cap-z"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fp32_matches_float64(reduction, options, chunking):
    hidden, weight, bias, labels, task_ids = make_inputs(bias=options.get("bias", False))
    opts = dict(softcap=options.get("softcap"), z_loss=options.get("z_loss", 0.0))
    kw = dict(CHUNKINGS[chunking])
    if chunking == "small":
        kw["chunk_bytes"] = budget_for(8, 16, 103, torch.float32)
        plan = plan_chunks(37, 103, torch.float32, True, kw["chunk_bytes"], 8)
        assert (plan.logit_rows, plan.grad_rows, plan.groups(37), plan.sub_chunks(37)) == (8, 16, 3, 5)
    check_fp32_against_float64(
        lambda: linear_cross_entropy_chunked(hidden, weight, labels, task_ids, T, IGN, reduction, bias=bias, **opts,
                                             **kw),
        (hidden, weight, bias), labels, task_ids, reduction, opts)


@pytest.mark.stack
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_16bit_inputs_close_to_float64(dtype, tol, reduction):
    hidden, weight, bias, labels, task_ids = make_inputs(dtype=dtype, seed=1, bias=True)
    check_16bit_against_float64(
        lambda: linear_cross_entropy_chunked(hidden, weight, labels, task_ids, T, IGN, reduction, bias=bias,
                                             softcap=3.0, z_loss=1e-3, chunk_size=8, row_block=32,
                                             chunk_bytes=budget_for(8, 16, 103, dtype)),
        (hidden, weight, bias), labels, task_ids, reduction, dtype, tol)


def test_many_tasks_and_another_ignore_index():
    """300 tasks (two task tiles of the per-task sums), ignore_index=5 (a real class id), via the public API."""
    n, v, num_tasks, ign = 64, 97, 300, 5
    hidden, weight, _, labels, _ = make_inputs(n=n, h=16, v=v, seed=3, ignore_index=ign, num_tasks=num_tasks)
    task_ids = torch.arange(n) * 37 % num_tasks  # spread over both tiles, some tasks twice
    upstream = torch.randn(n, dtype=torch.float64)
    got = run(lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, num_tasks, ignore_index=ign,
                                                 reduction="none", impl="chunked", return_z_loss=True, z_loss=1e-2,
                                                 chunk_size=16),
              (hidden, weight), "none", upstream.float())
    h64, w64 = as64((hidden, weight))
    ref = run(lambda: plain(h64, w64, labels, task_ids, num_tasks, "none", z_loss=1e-2, with_z=True,
                            ignore_index=ign),
              (h64, w64), "none", upstream)
    assert (labels == ign).sum() > 5 and (task_ids[labels != ign] >= 256).sum() >= 4
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    assert torch.all(got[0][labels == ign] == 0)
    check_stats(got[1], ref[1], atol=1e-4, num_tasks=num_tasks)
    torch.testing.assert_close(got[2].double(), ref[2], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[3], ref[3]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_public_api_drops_ignored_tokens_before_the_backend(monkeypatch):
    hidden, weight, bias, labels, task_ids = make_inputs(bias=True)
    seen = []
    backend = chunked.linear_cross_entropy_chunked

    def spy(hidden, *args, **kw):
        seen.append(hidden.shape[0])
        return backend(hidden, *args, **kw)

    monkeypatch.setattr(chunked, "linear_cross_entropy_chunked", spy)
    upstream = torch.randn(labels.shape[0])
    upstream[labels == IGN] = float("nan")  # must not reach any gradient
    got = run(lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, reduction="none",
                                                 impl="chunked", bias=bias, softcap=4.0, return_z_loss=True),
              (hidden, weight, bias), "none", torch.nan_to_num(upstream))
    assert seen == [int((labels != IGN).sum())] and seen[0] < labels.shape[0]
    loss, _, _ = fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, reduction="none", impl="chunked",
                                            bias=bias, softcap=4.0, return_z_loss=True)
    assert loss.shape == labels.shape and torch.all(loss[labels == IGN] == 0)
    loss.backward(upstream)
    for t, g in zip((hidden, weight, bias), got[3]):
        assert torch.isfinite(t.grad).all()
        torch.testing.assert_close(t.grad, g)
        t.grad = None
    ref = run(lambda: fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, reduction="none", impl="torch",
                                                 bias=bias, softcap=4.0, return_z_loss=True),
              (hidden, weight, bias), "none", torch.nan_to_num(upstream))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[3], ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_row_kernel_ignored_rows_give_zeros(reduction):
    """Called directly (the public API drops them first), ignored rows read no logits and get zero gradient rows,
    even among the rows of a chunk that carry a loss."""
    hidden, weight, bias, labels, task_ids = make_inputs(n=12, h=20, v=40, bias=True)
    labels[:6] = IGN
    loss, stats, _ = linear_cross_entropy_chunked(hidden, weight, labels, task_ids, T, IGN, reduction, bias=bias,
                                                  z_loss=0.1)
    loss.sum().backward()
    valid = labels != IGN
    assert hidden.grad[~valid].abs().sum() == 0 and hidden.grad[valid].abs().sum(1).min() > 0
    assert stats.tokens.sum() == valid.sum() > 0 and (reduction == "sum" or torch.all(loss[~valid] == 0))


def test_no_grad_partial_grads_and_a_single_backward():
    hidden, weight, bias, labels, task_ids = make_inputs(bias=True)
    with torch.no_grad():
        loss, stats = fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, impl="chunked", bias=bias)
    assert loss.grad_fn is None and stats.tokens.sum() == (labels != IGN).sum()
    weight.requires_grad_(False)
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, task_ids, T, impl="chunked", bias=bias)
    loss.backward(retain_graph=True)
    assert weight.grad is None and bias.grad is not None
    h64 = hidden.detach().double().requires_grad_()
    plain(h64, weight.double(), labels, task_ids, T, "sum", bias=bias.detach().double())[0].backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    # The gradients were formed in forward and handed out: a second backward says so instead of
    # returning them scaled twice.
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


def test_plan_chunks_within_the_budget():
    # The default at the Llama-3 head and 16384 tokens: 512-token logits, 3072-token groups, 1 GiB.
    p = plan_chunks(16384, 128256, torch.bfloat16, True)
    assert (p.logit_rows, p.grad_rows, p.groups(16384), p.sub_chunks(16384)) == (512, 3072, 6, 32)
    assert p.bytes <= DEFAULT_CHUNK_BYTES == 1 << 30 and p.logits_bytes == 512 * 128256 * 4
    for n, v, dtype, budget in [(16384, 151936, torch.bfloat16, 1 << 30), (8192, 152064, torch.float16, 3 << 29),
                                (5000, 32000, torch.float32, 1 << 28), (300, 50000, torch.bfloat16, 1 << 30)]:
        for grad in (True, False):
            p = plan_chunks(n, v, dtype, grad, budget)
            assert p.bytes <= budget and 1 <= p.logit_rows <= n
            if grad:
                assert p.logit_rows <= 1024 and p.grad_rows % p.logit_rows == 0 or p.grad_rows == n
                assert p.grad_rows >= p.logit_rows
            else:
                assert p.grad_rows == 0 and p.groups(n) == 0
            if p.logit_rows < n and p.logit_rows >= 128:
                assert p.logit_rows % 128 == 0
    # A budget below one row of each buffer still plans one row of each, and says how much it takes.
    tiny = plan_chunks(100, 1000, torch.bfloat16, True, 10)
    assert (tiny.logit_rows, tiny.grad_rows, tiny.bytes) == (1, 1, 4000 + 2000)
    # A small vocabulary: a quarter of the budget would hold 2048 logits rows; a sub-chunk stops at 1024.
    assert plan_chunks(16384, 32000, torch.bfloat16, True, 1 << 30).logit_rows == 1024
    # No gradients: the whole budget is logits.
    assert plan_chunks(16384, 128256, torch.bfloat16, False).logit_rows == 2048


def test_loss_memory_bytes_counts_the_chunk_budget():
    n, h, v = 16384, 4096, 128256
    small = loss_memory_bytes(n, h, v, torch.bfloat16, chunk_bytes=1 << 28)
    default = loss_memory_bytes(n, h, v, torch.bfloat16)
    assert default - small == plan_chunks(n, v, torch.bfloat16, True).bytes - \
        plan_chunks(n, v, torch.bfloat16, True, 1 << 28).bytes > 0
    # bf16 dW and dH, the gathered hidden rows (tests/test_loss_memory.py checks every term)
    assert default - plan_chunks(n, v, torch.bfloat16, True).bytes - 2 * v * h - 4 * n * h < 64 * n + 8192
    assert loss_memory_bytes(n, h, v, torch.bfloat16, training=False) < default
    # The CPU reference keeps its old accounting (an fp32 head copy for 16-bit weights, 64 MiB chunks).
    ref = loss_memory_bytes(n, h, v, torch.bfloat16, device_type="cpu")
    assert ref > 10 * v * h


def test_config_keys_reach_the_loss():
    cfg = load_config(None, ["output_dir=/tmp/x", "data.tasks=[{name: a, train: a.jsonl, val_fraction: 0.1}]",
                             "model.loss_impl=chunked", "model.loss_chunk_mib=64"])
    assert (cfg.model.loss_impl, cfg.model.loss_chunk_mib) == ("chunked", 64)
    for bad, key in (("model.loss_chunk_mib=0", "model.loss_chunk_mib"), ("model.loss_impl=cce", "model.loss_impl")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ["output_dir=/tmp/x", "data.tasks=[{name: a, train: a.jsonl, val_fraction: 0.1}]",
                               bad])


def test_a_triton_loss_on_a_cpu_run_is_refused_before_anything_loads(monkeypatch):
    from msft_fast.config import ModelConfig
    from msft_fast.model import load_model_spec

    monkeypatch.delenv("TRITON_INTERPRET")  # a real CPU run: the Triton paths cannot run there
    for impl in ("chunked", "triton"):
        with pytest.raises(ConfigError, match=rf"config key 'model.loss_impl' \({impl}\) .* use auto or torch"):
            load_model_spec(ModelConfig(loss_impl=impl), "fp32", torch.device("cpu"))
    assert load_model_spec(ModelConfig(loss_impl="torch"), "fp32", torch.device("cpu")).tokenizer is not None


def test_a_torch_without_fp32_output_matmuls_is_refused_not_rounded(monkeypatch):
    """A CUDA torch whose 16-bit matmuls cannot give fp32 results (torch < 2.8): the fused loss refuses,
    naming the torch version and the key, instead of rounding the logits to 16 bits with a warning.
    (No GPU here: the probe's answer for CUDA is set by hand.)"""
    from msft_fast.kernels import fp32_gemm
    from msft_fast.model import check_loss_impl

    cuda = torch.device("cuda")
    monkeypatch.setattr(fp32_gemm, "_SUPPORT", {"cuda": (False, False)})
    version = re.escape(torch.__version__)
    with pytest.raises(RuntimeError, match=rf"out_dtype.*torch >= 2.8.*torch {version} lacks it on CUDA"):
        fp32_gemm.require_fp32_output(cuda)
    for impl in ("auto", "chunked", "triton"):
        with pytest.raises(ConfigError, match=rf"'model.loss_impl' \({impl}\): .*torch >= 2.8.*torch {version} "
                                              rf"lacks.*model.loss_impl=torch"):
            check_loss_impl(impl, cuda, torch.bfloat16)
    check_loss_impl("torch", cuda, torch.bfloat16)   # the plain path rounds nothing of ours
    check_loss_impl("chunked", cuda, torch.float32)  # fp32 operands give fp32 products anyway
    monkeypatch.setattr(fp32_gemm, "_SUPPORT", {"cuda": (True, False)})
    check_loss_impl("chunked", cuda, torch.bfloat16)


def _packed_batch(vocab, num_tasks=3, seed=0):
    """A packed row of four documents of three tasks; the last token of each document and a prompt are ignored."""
    from msft_fast.data.packing import PackedBatch

    g = torch.Generator().manual_seed(seed)
    lengths = [9, 14, 6, 11]
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    labels, positions, tasks = [], [], []
    start = 0
    for d, length in enumerate(lengths):
        doc = ids[start:start + length]
        lab = torch.cat([doc[1:], torch.tensor([IGN])])
        lab[:2] = IGN  # a prompt
        labels.append(lab)
        positions.append(torch.arange(length))
        tasks.append(torch.full((length,), d % num_tasks))
        start += length
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    labels = torch.cat(labels)
    return PackedBatch(ids, labels, torch.cat(positions), torch.cat(tasks), cu, max(lengths), lengths,
                       int((labels != IGN).sum()))


@pytest.mark.slow
def test_causal_lm_end_to_end_against_the_torch_path(tokenizer, monkeypatch):
    """CausalLMWithTaskLoss: loss, per-task stats and every parameter gradient, chunked vs the reference."""
    from msft_fast.config import ModelConfig
    from msft_fast.model import CausalLMWithTaskLoss, LossOptions

    calls = []
    backend = chunked.linear_cross_entropy_chunked
    monkeypatch.setattr(chunked, "linear_cross_entropy_chunked", lambda *a, **k: calls.append(1) or backend(*a, **k))

    assert LossOptions.from_config(ModelConfig(loss_impl="chunked", loss_chunk_mib=1)) == LossOptions("chunked", 2**20)
    lm = tiny_llama(tokenizer, seed=4)
    vocab = lm.config.vocab_size
    batch = _packed_batch(vocab)
    results = {}
    # The chunked run plans 8-token sub-chunks in 16-token groups: several of each for 40 tokens.
    for name, options in (("chunked", LossOptions("chunked", budget_for(8, 16, vocab, torch.float32))),
                          ("torch", LossOptions("torch"))):
        model = CausalLMWithTaskLoss(lm, num_tasks=3, loss_options=options)
        model.zero_grad(set_to_none=True)
        loss, stats = model(batch)
        loss.backward()
        results[name] = (loss.detach(), stats, {k: p.grad.clone() for k, p in model.named_parameters()
                                                if p.grad is not None})
    assert len(calls) == 1  # the chunked run really took the chunked path (and the reference run did not)
    (a_loss, a_stats, a_grads), (b_loss, b_stats, b_grads) = results["chunked"], results["torch"]
    assert batch.num_loss_tokens == int(a_stats.tokens.sum()) and a_stats.tokens.tolist()[2] > 0
    torch.testing.assert_close(a_loss, b_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(a_stats.tokens, b_stats.tokens) and torch.equal(a_stats.correct, b_stats.correct)
    torch.testing.assert_close(a_stats.loss_sum, b_stats.loss_sum, rtol=1e-5, atol=1e-5)
    assert a_grads.keys() == b_grads.keys() and "lm.lm_head.weight" in a_grads and len(a_grads) > 10
    for k in a_grads:
        torch.testing.assert_close(a_grads[k], b_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_a_run_with_model_loss_impl_chunked_trains_through_the_chunked_path(tmp_path, demo_dir, monkeypatch):
    """model.loss_impl reaches the trainer's loss: every training and evaluation pass takes the chunked path."""
    from msft_fast.config import load_config
    from msft_fast.run import train

    calls = []
    backend = chunked.linear_cross_entropy_chunked
    monkeypatch.setattr(chunked, "linear_cross_entropy_chunked", lambda *a, **k: calls.append(1) or backend(*a, **k))
    tasks = [f"{{name: {n}, train: {demo_dir / n / 'train.jsonl'}, val: {demo_dir / n / 'val.jsonl'}}}"
             for n in ("upper", "sort")]
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.path=builtin:tiny-llama",
                             f"data.tasks=[{', '.join(tasks)}]", "data.max_seq_len=64", "data.tokens_per_batch=2048",
                             f"data.cache_dir={tmp_path / 'c'}", "train.progress=false", "train.epochs=0.3",
                             "msft.evals_per_epoch=1", "method=sft", "model.loss_impl=chunked"])
    history = train(cfg)
    assert history["loss_implementation"] == "chunked"
    assert len(calls) >= history["totals"]["steps"] + len(history["evals"])  # a call per micro-batch and eval batch
