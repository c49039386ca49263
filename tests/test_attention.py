"""Packed attention backends: each gives every document of a packed row its own logits, the flash-attn
varlen arguments come from the batch's cu_seqlens, SDPA over length buckets (packed_sdpa) matches each
document run alone in float64, forward and gradients, and choose_attention picks what the README says.

The reference is each document run alone through an eager-attention copy of the same model (float32),
or through plain SDPA in float64 (HF's eager attention takes its softmax in float32).
flash-attn cannot run here; bench/attention_check.py covers it (and compiled FlexAttention with its
backward) on a GPU.
"""
from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, MistralConfig
from conftest import demo_tasks

from msft_fast import attention as attention_mod
from msft_fast import model as model_mod
from msft_fast.attention import (FLEX_ATTENTION, PACKED_SDPA, DocumentBuckets, flash_varlen_kwargs,
                                 packed_attention_inputs, plan_buckets)
from msft_fast.data.formats import IGNORE_INDEX
from msft_fast.data.packing import _to_batch
from msft_fast.errors import ConfigError
from msft_fast.model import CausalLMWithTaskLoss, choose_attention

# Awkward lengths: one-token documents, one crossing FlexAttention's 128-token block, a row that is
# not a multiple of the block size.
DOC_LENGTHS = [1, 7, 130, 2, 1, 33, 19]
VOCAB = 61


def _batch(lengths=DOC_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, VOCAB, n).astype(np.int32) for n in lengths]
    return _to_batch(ids, [np.full(n, IGNORE_INDEX, np.int32) for n in lengths],
                     [np.arange(n, dtype=np.int64) for n in lengths], [np.zeros(n, np.int64) for n in lengths],
                     list(lengths))


def _config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "mistral":  # every layer attends to a sliding window shorter than most documents
        return MistralConfig(sliding_window=5, **common)
    return LlamaConfig(**common)


def _model(kind: str, attn: str, dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(kind), attn_implementation=attn, dtype=dtype).eval()


def _reference_logits(kind: str, batch) -> list[torch.Tensor]:
    """Each document alone, through eager attention: no packing involved."""
    lm = _model(kind, "eager")
    cu = batch.cu_seqlens.tolist()
    with torch.no_grad():
        return [lm(input_ids=batch.input_ids[None, a:b], use_cache=False).logits[0] for a, b in zip(cu, cu[1:])]


def _packed_logits(lm, batch) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return lm.lm_head(CausalLMWithTaskLoss(lm, num_tasks=1).hidden_states(batch))


def _assert_matches_reference(packed, reference, batch):
    cu = batch.cu_seqlens.tolist()
    for d, (a, b) in enumerate(zip(cu, cu[1:])):
        torch.testing.assert_close(packed[a:b], reference[d], atol=2e-5, rtol=1e-5,
                                   msg=lambda m: f"document {d} (tokens {a}:{b}): {m}")


@pytest.fixture(scope="module")
def batch():
    return _batch()


@pytest.fixture(scope="module")
def references(batch):
    return {kind: _reference_logits(kind, batch) for kind in ("llama", "mistral")}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", FLEX_ATTENTION, PACKED_SDPA])
def test_every_cpu_backend_gives_each_packed_document_its_own_logits(attn, kind, batch, references):
    """FlexAttention runs forward only here (PyTorch has no FlexAttention backward on CPU)."""
    lm = _model(kind, attn)
    assert lm.config._attn_implementation == attn
    _assert_matches_reference(_packed_logits(lm, batch), references[kind], batch)


def test_flash_varlen_route_keeps_documents_apart_by_cu_seqlens_alone(monkeypatch, batch, references):
    """flash-attn is not installed here: a stand-in varlen kernel that sees only cu_seq_lens_q/k and
    max_length_q/k (SDPA per segment) takes its place, which checks that our arguments reach every
    layer through HF's decoder and describe the documents exactly."""
    calls = []

    def varlen_stand_in(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cu, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        assert cu is cu_k and cu.dtype == torch.int32 and attention_mask is None
        assert isinstance(kwargs["max_length_q"], int) and kwargs["max_length_q"] == int(cu.diff().max())
        calls.append(module.layer_idx)
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        bounds = cu.tolist()
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
            for a, b in zip(bounds, bounds[1:])], dim=2)
        return out.transpose(1, 2).contiguous(), None

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", varlen_stand_in)
    lm = _model("llama", "sdpa")
    lm.config._attn_implementation = "flash_attention_2"  # HF would refuse to load it without flash-attn
    _assert_matches_reference(_packed_logits(lm, batch), references["llama"], batch)
    assert calls == [0, 1]


def test_flash_varlen_kwargs_are_built_from_cu_seqlens():
    b = _batch([3, 1, 8])
    kwargs = flash_varlen_kwargs(b)
    assert set(kwargs) == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 12] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 8 and type(kwargs["max_length_q"]) is int


def test_only_flash_attention_gets_the_varlen_kwargs_and_only_flex_gets_a_block_mask():
    from torch.nn.attention.flex_attention import BlockMask

    b = _batch([3, 1, 8])
    for name in ("flash_attention_2", "flash_attention_3"):
        assert packed_attention_inputs(name, b)["cu_seq_lens_q"].tolist() == [0, 3, 4, 12]
    for name in ("sdpa", "eager"):
        assert packed_attention_inputs(name, b) == {"attention_mask": None}
    flex = packed_attention_inputs(FLEX_ATTENTION, b)
    assert set(flex) == {"attention_mask"} and isinstance(flex["attention_mask"], BlockMask)
    assert set(packed_attention_inputs(FLEX_ATTENTION, b, sliding_window=4)) == {"attention_mask", "sliding_block_mask"}
    buckets = packed_attention_inputs(PACKED_SDPA, b)  # an empty 4-D mask, which HF passes on as it is
    assert buckets["attention_mask"].shape == (1, 1, 0, 0) and isinstance(buckets["document_buckets"], DocumentBuckets)


def test_document_block_mask_is_document_causal_with_the_sliding_window():
    from torch.nn.attention.flex_attention import create_mask

    b = _batch([3, 1, 5, 2])
    doc = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3])
    assert attention_mod.document_ids(b.cu_seqlens, b.num_tokens).tolist() == doc.tolist()
    q, k = torch.arange(11)[:, None], torch.arange(11)[None, :]
    for window in (None, 2):
        expect = (doc[:, None] == doc[None, :]) & (k <= q)
        if window:
            expect &= q - k < window
        mask = attention_mod.document_block_mask(b.cu_seqlens, b.num_tokens, window)
        dense = create_mask(mask.mask_mod, None, None, 11, 11, device="cpu")[0, 0]
        assert torch.equal(dense, expect)


def test_flex_block_mask_is_built_once_per_batch_and_shared_by_every_layer(monkeypatch, batch):
    built, seen = [], []
    real_build = attention_mod.document_block_mask
    monkeypatch.setattr(attention_mod, "document_block_mask",
                        lambda *a, **kw: built.append(real_build(*a, **kw)) or built[-1])
    real_flex = attention_mod.packed_flex_attention
    monkeypatch.setitem(AttentionInterface._global_mapping, FLEX_ATTENTION,
                        lambda module, q, k, v, attention_mask, **kw: seen.append(attention_mask)
                        or real_flex(module, q, k, v, attention_mask, **kw))
    _packed_logits(_model("llama", FLEX_ATTENTION), batch)
    assert len(built) == 1 and len(seen) == 2 and all(m is built[0] for m in seen)


# ---------------------------------------------------------------------------------------------
# packed_sdpa: causal SDPA per length bucket of documents


def _float64_rotary_free_reference(kind: str, lm, batch, upstream):
    """Each document alone through plain SDPA (no packing, no buckets) in float64, with the same
    weights: its logits, and the parameters' gradients of sum(logits * upstream) over all documents."""
    ref = _model(kind, "sdpa", torch.float64)
    ref.load_state_dict(lm.state_dict())
    cu = batch.cu_seqlens.tolist()
    logits = []
    for a, b in zip(cu, cu[1:]):
        out = ref(input_ids=batch.input_ids[None, a:b], use_cache=False).logits[0]
        (out * upstream[a:b]).sum().backward()
        logits.append(out.detach())
    return logits, {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_packed_sdpa_matches_each_document_alone_in_float64_forward_and_gradients(kind, batch):
    """GQA (4 query heads over 2 kv heads); mistral's window of 5 is shorter than most documents and
    than every bucket, so the window mask inside a bucket is exercised; lengths 1 to 130."""
    lm = _model(kind, PACKED_SDPA, torch.float64)
    hidden = CausalLMWithTaskLoss(lm, num_tasks=1).hidden_states(batch)
    packed = lm.lm_head(hidden)
    upstream = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (packed * upstream).sum().backward()
    logits, grads = _float64_rotary_free_reference(kind, lm, batch, upstream)
    cu = batch.cu_seqlens.tolist()
    for d, (a, b) in enumerate(zip(cu, cu[1:])):
        torch.testing.assert_close(packed[a:b].detach(), logits[d], atol=1e-12, rtol=1e-12,
                                   msg=lambda m: f"document {d} (tokens {a}:{b}): {m}")
    for name, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-11, rtol=1e-11, msg=lambda m: f"{name}: {m}")


def test_packed_sdpa_builds_no_row_by_row_mask(batch):
    """No tensor of any op, forward or backward, is [..., N, N] for the packed row's N tokens; the
    same probe finds the dense document mask that plain SDPA builds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n = batch.num_tokens

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.square = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (n, n):
                    self.square.append(str(func))
            return out

    found = {}
    for attn in (PACKED_SDPA, "sdpa"):
        lm = _model("llama", attn)
        with Shapes() as probe:
            lm.lm_head(CausalLMWithTaskLoss(lm, num_tasks=1).hidden_states(batch)).sum().backward()
        found[attn] = probe.square
    assert found[PACKED_SDPA] == [] and found["sdpa"]


def test_document_buckets_are_built_once_per_batch_and_shared_by_every_layer(monkeypatch, batch):
    built, seen = [], []
    real_of = DocumentBuckets.of
    monkeypatch.setattr(DocumentBuckets, "of", classmethod(lambda cls, *a, **kw: built.append(real_of(*a, **kw))
                                                           or built[-1]))
    real = attention_mod.packed_sdpa_attention
    monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_SDPA,
                        lambda module, q, k, v, mask, **kw: seen.append(kw["document_buckets"])
                        or real(module, q, k, v, mask, **kw))
    lm = _model("llama", PACKED_SDPA)
    lm.lm_head(CausalLMWithTaskLoss(lm, num_tasks=1).hidden_states(batch)).sum().backward()
    assert len(built) == 1 and len(seen) == 2 and all(b is built[0] for b in seen)
    # a window no shorter than a bucket needs no mask; a shorter one is built once per bucket
    b = built[0]
    assert b.window_mask(0, b.lengths[0]) is None and b.window_mask(0, None) is None
    assert b.window_mask(len(b.lengths) - 1, 3) is b.window_mask(len(b.lengths) - 1, 3)


def test_packed_sdpa_passes_attention_dropout_and_refuses_what_sdpa_cannot_do(monkeypatch, batch):
    import types

    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(kw["dropout_p"]) or real_sdpa(*a, **kw))
    buckets = DocumentBuckets.of(batch.doc_lengths, torch.device("cpu"))
    q = torch.randn(1, 4, batch.num_tokens, 8)
    kv = torch.randn(1, 2, batch.num_tokens, 8)
    for training in (True, False):
        module = types.SimpleNamespace(training=training, is_causal=True)
        attention_mod.packed_sdpa_attention(module, q, kv, kv, None, dropout=0.25, document_buckets=buckets)
    assert seen == [0.25] * len(buckets.lengths) + [0.0] * len(buckets.lengths)
    module = types.SimpleNamespace(training=True, is_causal=True)
    with pytest.raises(ValueError, match="soft-capping"):
        attention_mod.packed_sdpa_attention(module, q, kv, kv, None, softcap=50.0, document_buckets=buckets)
    with pytest.raises(ValueError, match="takes no mask"):
        attention_mod.packed_sdpa_attention(module, q, kv, kv, torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                            document_buckets=buckets)
    with pytest.raises(ValueError, match="causal"):
        attention_mod.packed_sdpa_attention(types.SimpleNamespace(training=False, is_causal=False), q, kv, kv, None,
                                            document_buckets=buckets)


def test_evaluation_runs_through_packed_sdpa_and_scores_each_document_alone(tmp_path, demo_dir, monkeypatch):
    """The trainer's packed evaluation pass (auto picks packed_sdpa on a CPU) gives each task the
    loss its validation documents get one at a time from the plain HF model."""
    from test_step_loop import _finish, _train_with

    from msft_fast.data.formats import IGNORE_INDEX as IGNORE

    calls, checked = [], []
    real = attention_mod.packed_sdpa_attention
    monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_SDPA,
                        lambda *a, **kw: calls.append(torch.is_grad_enabled()) or real(*a, **kw))

    def method(trainer, history, metric):
        trainer.train_step()
        calls.clear()
        result = trainer.evaluate()
        assert calls and not any(calls)  # every layer of every evaluation batch, without autograd
        lm = trainer.model.lm
        for task in trainer.tasks:
            docs, total, count = task.val, 0.0, 0
            for a, n in zip(docs.starts.tolist(), docs.lengths.tolist()):
                with torch.no_grad():
                    logits = lm(input_ids=torch.tensor(docs.input_ids[a:a + n], dtype=torch.long)[None],
                                use_cache=False).logits[0]
                labels = torch.tensor(docs.labels[a:a + n], dtype=torch.long)
                total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
                count += int((labels != IGNORE).sum())
            assert result.tasks[task.name].loss == pytest.approx(total / count, rel=1e-5)
            checked.append(task.name)
        return _finish(trainer, history, metric)

    history, _ = _train_with(tmp_path, demo_dir, monkeypatch, method)
    assert history["attn_implementation"] == PACKED_SDPA and checked == ["upper", "sort"]


def test_outside_a_packed_row_packed_sdpa_is_hf_sdpa():
    """The same model object serves HF calls too (a user metric's `generate`, a padded batch): there
    packed_sdpa is HF's SDPA with HF's own masks, left padding included."""
    packed, plain = _model("llama", PACKED_SDPA), _model("llama", "sdpa")
    ids = torch.tensor([[0, 0, 5, 9, 11, 4], [7, 3, 8, 2, 6, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask).logits for m in (packed, plain)]
    assert torch.equal(logits[0], logits[1])
    generated = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
                 for m in (packed, plain)]
    assert torch.equal(generated[0], generated[1]) and generated[0].shape == (2, 10)


def _modelled_cost(plan, width):
    return sum(attention_mod.BUCKET_OVERHEAD / width + len(docs) * size * (size + attention_mod.TOKEN_COST)
               for size, docs in plan)


def test_plan_buckets_is_the_cheapest_contiguous_split_and_covers_every_document():
    import itertools

    rng = np.random.default_rng(0)
    for trial in range(40):
        lengths = rng.integers(1, rng.choice([8, 60, 600]), rng.integers(1, 12)).tolist()
        width = int(rng.choice([16, 128, 4096]))
        plan = plan_buckets(lengths, width)
        placed = np.sort(np.concatenate([docs for _, docs in plan]))
        assert placed.tolist() == list(range(len(lengths)))  # every document once
        for size, docs in plan:
            assert all(lengths[d] <= size for d in docs) and size in lengths  # padded to a real length
        # brute force: every way to cut the sorted distinct lengths into contiguous buckets
        distinct = sorted(set(lengths))
        best = math.inf
        for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
            bounds = [x for x, cut in zip(distinct, cuts) if cut] + [distinct[-1]]
            split = {b: [] for b in bounds}
            for d, n in enumerate(lengths):
                split[next(b for b in bounds if b >= n)].append(d)
            best = min(best, _modelled_cost([(b, docs) for b, docs in split.items() if docs], width))
        assert _modelled_cost(plan, width) == pytest.approx(best, rel=1e-12), (trial, lengths, width)


def test_plan_buckets_pads_short_documents_together_and_keeps_long_ones_apart():
    assert [size for size, _ in plan_buckets([7] * 5)] == [7]  # one length: one exact bucket
    assert [size for size, _ in plan_buckets([10, 12, 11, 9, 12, 10])] == [12]  # short: one call beats padding
    # long: padding 3 to 260 would cost more than a call, 498 to 500 less
    plan = plan_buckets([500, 3, 3, 260, 3, 498], width=256)
    assert [size for size, _ in plan] == [3, 260, 500] and plan[-1][1].tolist() == [0, 5]


def test_document_buckets_gather_and_scatter_invert_each_other():
    lengths = [1, 7, 130, 2, 1, 33, 19]
    rows = torch.arange(sum(lengths))
    for plan in (plan_buckets(lengths), [(130, np.arange(len(lengths)))], [(n, np.array([d])) for d, n in
                                                                           enumerate(lengths)]):
        b = DocumentBuckets.from_plan(lengths, plan, torch.device("cpu"))
        flat = torch.cat([rows[g] for g in b.gather])
        assert torch.equal(flat[b.scatter], rows)  # each row position comes back from its own slot
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for (size, docs), g in zip(plan, b.gather):  # a slot holds its document's token, or its last one
            slots = g.view(len(docs), size)
            for i, d in enumerate(docs):
                expect = starts[d] + np.minimum(np.arange(size), lengths[d] - 1)
                assert slots[i].tolist() == expect.tolist()


def test_flex_attention_refuses_to_run_without_its_block_mask():
    lm = _model("llama", FLEX_ATTENTION)
    with pytest.raises(ValueError, match="needs a BlockMask"), torch.no_grad():
        lm(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)


def test_choose_attention_follows_device_dtype_and_what_is_installed(monkeypatch):
    cuda, cpu, bf16, fp32 = torch.device("cuda", 0), torch.device("cpu"), torch.bfloat16, torch.float32
    installed = set()
    real = importlib.util.find_spec

    def find_spec(name):
        if name in ("flash_attn", "triton"):
            return object() if name in installed else None
        return real(name)

    monkeypatch.setattr(model_mod.importlib.util, "find_spec", find_spec)

    # Nothing installed: SDPA over length buckets everywhere, and FlexAttention is refused (it needs
    # Triton on CUDA).
    assert choose_attention("auto", cuda, bf16) == choose_attention("auto", cpu, fp32) == PACKED_SDPA
    with pytest.raises(ConfigError, match="flex_attention needs CUDA and Triton"):
        choose_attention("flex_attention", cuda, bf16)
    # Triton (which comes with PyTorch's CUDA wheels), no flash-attn: still bucketed SDPA on CUDA,
    # which compiles nothing (FlexAttention recompiles per shape); FlexAttention when asked for.
    installed.add("triton")
    assert choose_attention("auto", cuda, bf16) == choose_attention("auto", cuda, fp32) == PACKED_SDPA
    assert choose_attention("flex_attention", cuda, fp32) == FLEX_ATTENTION
    assert choose_attention("auto", cpu, bf16) == PACKED_SDPA
    # Training needs a backward, which FlexAttention lacks on CPU: refused in one sentence.
    with pytest.raises(ConfigError, match="model.attn_implementation.*no FlexAttention backward on CPU"):
        choose_attention("flex_attention", cpu, fp32)
    # flash-attn installed: its varlen kernel in bf16; it has no fp32 kernels, so bucketed SDPA there.
    installed.add("flash_attn")
    assert choose_attention("auto", cuda, bf16) == "flash_attention_2"
    assert choose_attention("auto", cuda, fp32) == PACKED_SDPA
    assert choose_attention("flex_attention", cuda, bf16) == FLEX_ATTENTION
    assert choose_attention("sdpa", cuda, bf16) == "sdpa" and choose_attention("eager", cpu, fp32) == "eager"
    assert choose_attention("packed_sdpa", cuda, bf16) == choose_attention("packed_sdpa", cpu, fp32) == PACKED_SDPA
    with pytest.raises(ConfigError, match="flash_attention_2 needs CUDA"):
        choose_attention("flash_attention_2", cpu, bf16)


def test_packed_sdpa_is_refused_where_its_masking_would_be_wrong():
    """Bucketed SDPA knows causal masking and sliding windows: models with soft-capping, chunked
    attention, attention kinds it does not know, or attention that bypasses HF's interface get the
    next backend under auto, and a one-sentence refusal by name."""
    from transformers import Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    cpu, fp32 = torch.device("cpu"), torch.float32

    class OwnAttention(LlamaForCausalLM):  # attention code that never calls the registered function
        _supports_attention_backend = False

    cases = [
        # (transformers 5.0 still marks Gemma 2 as SDPA-capable; its soft-capping refuses it there)
        (Gemma2ForCausalLM, None, "packed_sdpa (is not supported by Gemma2ForCausalLM \\(HF marks it so\\)|has no "
                                  "attention logit soft-capping)", "eager"),
        (OwnAttention, None, "packed_sdpa is not supported by OwnAttention", "sdpa"),
        (LlamaForCausalLM, LlamaConfig(attn_logit_softcapping=30.0), "packed_sdpa has no attention logit soft-capping",
         "eager"),  # nor has dense SDPA
        (LlamaForCausalLM, LlamaConfig(attention_chunk_size=8), "packed_sdpa has no chunked attention", "sdpa"),
        (LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"]),
         "packed_sdpa does not know the attention of LlamaForCausalLM's chunked_attention layers", "sdpa"),
    ]
    for model_class, config, why, fallback in cases:
        assert choose_attention("auto", cpu, fp32, model_class, config) == fallback
        with pytest.raises(ConfigError, match=f"'model.attn_implementation': {why}.*auto \\(picks {fallback}\\)"):
            choose_attention("packed_sdpa", cpu, fp32, model_class, config)
    mixed = LlamaConfig(num_hidden_layers=3, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "linear_attention"])
    assert choose_attention("auto", cpu, fp32, LlamaForCausalLM, mixed) == PACKED_SDPA


@pytest.mark.parametrize("requested", ["auto", "eager"])
def test_the_logged_backend_is_the_one_the_model_runs(requested):
    from msft_fast.config import ModelConfig

    loaded = model_mod.load_model(ModelConfig(attn_implementation=requested), "fp32", torch.device("cpu"), seed=0)
    assert loaded.attn_implementation == loaded.model.config._attn_implementation
    assert loaded.attn_implementation == (PACKED_SDPA if requested == "auto" else requested)
    assert {m.config._attn_implementation for m in loaded.model.modules() if hasattr(m, "config")} == {
        loaded.attn_implementation}


def test_a_cpu_run_asking_for_flex_attention_stops_with_one_config_error(tmp_path, demo_dir):
    from msft_fast.config import load_config
    from msft_fast.run import train

    tasks = demo_tasks(demo_dir, ("upper", "sort"))
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.attn_implementation=flex_attention",
                             f"data.tasks=[{tasks}]", "data.max_seq_len=64", "data.tokens_per_batch=256",
                             f"data.cache_dir={tmp_path / 'c'}", "train.progress=false"])
    with pytest.raises(ConfigError, match="'model.attn_implementation': flex_attention needs CUDA"):
        train(cfg)


def test_the_attention_bench_check_runs_on_cpu_and_passes(tmp_path, monkeypatch):
    import importlib.util as ilu
    import json
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "attention_check.py")
    spec = ilu.spec_from_file_location("attention_check", path)
    bench = ilu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["attention_check.py", "--cpu", "--out", str(tmp_path)])
    with warnings.catch_warnings():
        assert bench.main() == 0
    report = json.loads((tmp_path / "attention_check.json").read_text())
    status = {(c["model"], c["backend"]): c["status"] for c in report["checks"]}
    for kind in ("llama", "mistral"):
        assert status[(kind, "leak_control")] == status[(kind, "flex")] == status[(kind, "sdpa")] == "ok"
        assert status[(kind, "flash_attention_2")] == "not available"


@pytest.mark.slow
@pytest.mark.parametrize("static", [True, False])
def test_compiled_blocks_compile_once_over_the_packers_micro_batches(tmp_path, tokenizer, static):
    """train.compile's decoder blocks over 20 micro-batches of the real packer on the demo mixture:
    under static shapes (what `data.static_shapes: null` turns on wherever something is compiled)
    every micro-batch has the one shape the GPU would see, and nothing is compiled after the first;
    without them each new row length compiles again (dynamo's backend here counts graphs instead of
    running inductor, whose CPU compile takes minutes; what triggers a compile is the same)."""
    import torch._dynamo

    from msft_fast.config import DataConfig, TaskConfig
    from msft_fast.data.loader import MixtureLoader
    from msft_fast.data.packing import static_length
    from msft_fast.data.tasks import load_tasks
    from msft_fast.demo_data import write_demo_mixture
    from msft_fast.model import decoder_blocks
    from conftest import tiny_llama

    entries = write_demo_mixture(tmp_path / "demo", seed=0, variant="calibrated")
    cfg = DataConfig(tasks=[TaskConfig(e["name"], e["train"], e["val"]) for e in entries], max_seq_len=64,
                     tokens_per_batch=250, cache_dir=str(tmp_path / "cache"))
    tasks = load_tasks(cfg, tokenizer)
    loader = MixtureLoader(tasks, 250, 0, 0, 1, 1, static_tokens=static_length(250) if static else None)
    batches = [b for s in range(loader.steps_in_epoch(0)) for b in loader.step_batches(0, s)][:20]
    assert len(batches) == 20
    shapes = {tuple(b.input_ids.shape) for b in batches}
    assert shapes == {(256,)} if static else len(shapes) > 1

    lm = tiny_llama(tokenizer)
    lm.config._attn_implementation = PACKED_SDPA  # the GPU default without flash-attn
    wrapper = CausalLMWithTaskLoss(lm, len(tasks)).train()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for block in decoder_blocks(lm):
        block.compile(backend=counting_backend)  # as parallelize() does, with the counting backend
    compiled = []
    try:
        for batch in batches:
            loss, _ = wrapper(batch)
            loss.backward()
            compiled.append(len(graphs))
    finally:
        torch._dynamo.reset()
    assert compiled[0] > 0
    if static:
        assert compiled == [compiled[0]] * len(batches), compiled
    else:
        assert compiled[-1] > compiled[0], compiled
