"""Packed attention backends: each gives every document of a packed row its own logits, the flash-attn
varlen arguments come from the batch's cu_seqlens, and choose_attention picks what the README says.

The reference is each document run alone through an eager-attention copy of the same model.
flash-attn cannot run here; bench/attention_check.py covers it (and compiled FlexAttention with its
backward) on a GPU.
"""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, MistralConfig

from msft_fast import attention as attention_mod
from msft_fast import model as model_mod
from msft_fast.attention import FLEX_ATTENTION, flash_varlen_kwargs, packed_attention_inputs
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


def _model(kind: str, attn: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(kind), attn_implementation=attn, dtype=torch.float32).eval()


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
@pytest.mark.parametrize("attn", ["eager", "sdpa", FLEX_ATTENTION])
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

    # Nothing installed: SDPA everywhere, and FlexAttention is refused (it needs Triton on CUDA).
    assert choose_attention("auto", cuda, bf16) == choose_attention("auto", cpu, fp32) == "sdpa"
    with pytest.raises(ConfigError, match="flex_attention needs CUDA and Triton"):
        choose_attention("flex_attention", cuda, bf16)
    # Triton (which comes with PyTorch's CUDA wheels), no flash-attn: FlexAttention on CUDA.
    installed.add("triton")
    assert choose_attention("auto", cuda, bf16) == choose_attention("auto", cuda, fp32) == FLEX_ATTENTION
    assert choose_attention("flex_attention", cuda, fp32) == FLEX_ATTENTION
    assert choose_attention("auto", cpu, bf16) == "sdpa"
    # Training needs a backward, which FlexAttention lacks on CPU: refused in one sentence.
    with pytest.raises(ConfigError, match="model.attn_implementation.*no FlexAttention backward on CPU"):
        choose_attention("flex_attention", cpu, fp32)
    # flash-attn installed: its varlen kernel in bf16; it has no fp32 kernels, so Flex there.
    installed.add("flash_attn")
    assert choose_attention("auto", cuda, bf16) == "flash_attention_2"
    assert choose_attention("auto", cuda, fp32) == FLEX_ATTENTION
    assert choose_attention("flex_attention", cuda, bf16) == FLEX_ATTENTION
    assert choose_attention("sdpa", cuda, bf16) == "sdpa" and choose_attention("eager", cpu, fp32) == "eager"
    with pytest.raises(ConfigError, match="flash_attention_2 needs CUDA"):
        choose_attention("flash_attention_2", cpu, bf16)


@pytest.mark.parametrize("requested", ["auto", "eager"])
def test_the_logged_backend_is_the_one_the_model_runs(requested):
    from msft_fast.config import ModelConfig

    loaded = model_mod.load_model(ModelConfig(attn_implementation=requested), "fp32", torch.device("cpu"), seed=0)
    assert loaded.attn_implementation == loaded.model.config._attn_implementation
    assert loaded.attn_implementation == ("sdpa" if requested == "auto" else requested)
    assert {m.config._attn_implementation for m in loaded.model.modules() if hasattr(m, "config")} == {
        loaded.attn_implementation}


def test_a_cpu_run_asking_for_flex_attention_stops_with_one_config_error(tmp_path, demo_dir):
    from msft_fast.config import load_config
    from msft_fast.run import train

    tasks = ", ".join(f"{{name: {n}, train: {demo_dir / n / 'train.jsonl'}, val: {demo_dir / n / 'val.jsonl'}}}"
                      for n in ("upper", "sort"))
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
