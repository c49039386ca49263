"""Memory preflight: the formulas on tiny Llamas, and the ConfigError when a run cannot fit."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from msft_fast.errors import ConfigError
from msft_fast.runtime.preflight import (
    CUDA_RESERVE_BYTES, FRAGMENTATION, GIB, ModelShape, check_memory, estimate_memory, preflight_memory,
)

CUDA = torch.device("cuda", 0)  # never touched: every check below is given its free memory
CPU = torch.device("cpu")


def _tiny(**kw) -> LlamaConfig:
    args = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024)
    args.update(kw)
    return LlamaConfig(**args)


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"num_key_value_heads": 4},
                                {"attention_bias": True, "mlp_bias": True}, {"head_dim": 32}])
def test_parameter_count_matches_the_model(kw):
    config = _tiny(**kw)
    model = LlamaForCausalLM(config)
    assert ModelShape.from_config(config).num_params == sum(p.numel() for p in model.parameters())


def test_llama2_7b_has_its_published_size():
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    assert ModelShape.from_config(config).num_params == 6_738_415_616


def _saved_bytes_per_token(config: LlamaConfig, dtype: torch.dtype, n: int, packed: bool) -> float:
    """Bytes autograd saves for backward in the decoder's forward over a row of n tokens: two packed
    documents (HF then isolates them with an [n, n] mask for SDPA), or one document (no mask, which
    keeps what flash-attn varlen keeps: q, k, v, output, log-sum-exp)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = "sdpa"
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (1, n))
    positions = torch.cat([torch.arange(n // 2), torch.arange(n - n // 2)]) if packed else torch.arange(n)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=ids, position_ids=positions[None], attention_mask=None, use_cache=False)
    return sum(seen.values()) / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 4, "intermediate_size": 96, "num_hidden_layers": 2}])
@pytest.mark.parametrize("attention, packed, n", [("flash_attention_2", False, 256), ("sdpa", True, 256),
                                                  ("sdpa", True, 384)])
def test_activation_formula_matches_saved_tensors(dtype, kw, attention, packed, n):
    config = _tiny(**kw)
    shape = ModelShape.from_config(config)
    c = torch.finfo(dtype).bits // 8
    measured = _saved_bytes_per_token(config, dtype, n, packed)
    one_layer = _saved_bytes_per_token(_tiny(**{**kw, "num_hidden_layers": 1}), dtype, n, packed)
    per_layer = (measured - one_layer) / (shape.layers - 1)
    assert per_layer == pytest.approx(shape.activation_bytes_per_token_per_layer(c, attention, n), rel=0.02)
    # The part outside the layers also counts the int64 ids, positions, labels and task ids of the
    # batch (32 bytes a token), which the decoder alone does not save.
    whole = shape.layers * shape.activation_bytes_per_token_per_layer(c, attention, n)
    whole += shape.activation_bytes_per_token_outside_layers(c) - 32
    assert measured == pytest.approx(whole, rel=0.03)


def test_estimate_parts_scale_as_fsdp_shards_them():
    config = _tiny()
    one = estimate_memory(config, tokens_per_batch=2048, world_size=1)
    four = estimate_memory(config, tokens_per_batch=2048, world_size=4)
    P = ModelShape.from_config(config).num_params
    assert (one.weights, one.grads, one.optimizer) == (4 * P, 4 * P, 8 * P)
    assert (four.weights, four.grads, four.optimizer) == (P, P, 2 * P)
    assert (four.activations, four.loss, four.gathered) == (one.activations, one.loss, one.gathered)
    assert one.total == one.model_state + one.gathered + one.activations + one.loss + one.workspace
    flash = estimate_memory(config, tokens_per_batch=2048, world_size=1, attention="flash_attention_2")
    flash2 = estimate_memory(config, tokens_per_batch=4096, world_size=1, attention="flash_attention_2")
    assert flash2.activations == 2 * flash.activations and flash.activations < one.activations
    twice = estimate_memory(config, tokens_per_batch=4096, world_size=1)  # SDPA's mask grows as N^2
    assert twice.activations > 2 * one.activations
    assert twice.again(2048, 4) == four
    fp32 = estimate_memory(config, tokens_per_batch=2048, world_size=1, compute_dtype=torch.float32)
    assert fp32.activations > one.activations and fp32.model_state == one.model_state
    ckpt = estimate_memory(config, tokens_per_batch=2048, world_size=1, activation_checkpointing=True)
    assert ckpt.activations < one.activations / 2
    assert estimate_memory(config, 2048, 1, num_params=12345).weights == 4 * 12345


def test_a_7b_model_on_one_gpu_asks_for_more_gpus():
    """16 bytes per parameter of model state alone exceed an 80 GiB GPU; 8 ranks fit."""
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    est = estimate_memory(config, tokens_per_batch=8192, world_size=1)
    assert 100 * GIB < est.model_state < 101 * GIB  # 6.74e9 * 16 bytes
    with pytest.raises(ConfigError, match=r"train on at least \d+ GPUs") as info:
        check_memory(est, CUDA, free_bytes=80 * GIB, host_free_bytes=10**15, min_tokens_per_batch=4096)
    ranks = int(re.search(r"at least (\d+) GPUs", str(info.value)).group(1))
    fits = estimate_memory(config, tokens_per_batch=4096, world_size=ranks)
    check_memory(fits, CUDA, free_bytes=80 * GIB, host_free_bytes=10**15, min_tokens_per_batch=4096)
    short = estimate_memory(config, tokens_per_batch=4096, world_size=ranks - 1)
    with pytest.raises(ConfigError):
        check_memory(short, CUDA, free_bytes=80 * GIB, host_free_bytes=10**15, min_tokens_per_batch=4096)


def test_too_many_tokens_per_batch_names_a_value_that_fits():
    config = _tiny(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, vocab_size=32000)
    est = estimate_memory(config, tokens_per_batch=65536, world_size=1)
    free = int(CUDA_RESERVE_BYTES + FRAGMENTATION * est.total * 0.6)  # room for well under 65536 tokens
    with pytest.raises(ConfigError) as info:
        check_memory(est, CUDA, free_bytes=free, host_free_bytes=10**15, min_tokens_per_batch=512)
    msg = str(info.value)
    assert "\n" not in msg and "per GPU" in msg and "activations" in msg
    tokens = int(re.search(r"set data.tokens_per_batch to (\d+) or less \(now 65536", msg).group(1))
    assert 512 <= tokens < 65536
    check_memory(estimate_memory(config, tokens, 1), CUDA, free_bytes=free, host_free_bytes=10**15)
    with pytest.raises(ConfigError):  # the suggestion is tight: a quarter more does not fit
        check_memory(estimate_memory(config, int(tokens * 1.25), 1), CUDA, free_bytes=free, host_free_bytes=10**15)


def test_nothing_fits_says_so():
    est = estimate_memory(_tiny(vocab_size=32000), tokens_per_batch=4096, world_size=1)
    with pytest.raises(ConfigError, match="even one micro-batch of data.max_seq_len"):
        check_memory(est, CUDA, free_bytes=CUDA_RESERVE_BYTES + 2**20, host_free_bytes=10**15,
                     min_tokens_per_batch=4096)


def test_host_memory_for_loading_is_checked_on_gpus_too():
    est = estimate_memory(_tiny(), tokens_per_batch=1024, world_size=8)
    check_memory(est, CUDA, free_bytes=80 * GIB, host_free_bytes=8 * est.host, ranks_on_host=8)
    with pytest.raises(ConfigError, match=r"host memory \(8 rank\(s\) on this host"):
        check_memory(est, CUDA, free_bytes=80 * GIB, host_free_bytes=8 * est.host - 1, ranks_on_host=8)


def test_cpu_checks_host_memory_for_model_and_optimizer_only():
    config = _tiny()
    est = estimate_memory(config, tokens_per_batch=10**6, world_size=2, device_type="cpu")
    P = ModelShape.from_config(config).num_params
    assert est.host == 4 * P + est.grads + est.optimizer  # the loaded copy, its gradients and Adam state
    check_memory(est, CPU, host_free_bytes=2 * est.host, ranks_on_host=2)  # activations are not counted
    with pytest.raises(ConfigError, match="host memory for the weights, gradients and optimizer state"):
        check_memory(est, CPU, host_free_bytes=2 * est.host - 1, ranks_on_host=2)


def test_preflight_reads_the_run_config(monkeypatch):
    from msft_fast.config import load_config

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cfg = load_config(None, ["output_dir=o", "data.tasks=[{name: a, train: a.jsonl, val: b.jsonl}]",
                             "data.max_seq_len=512", "data.tokens_per_batch=4096"])
    est = preflight_memory(cfg, _tiny(), 2, CUDA, torch.bfloat16, free_bytes=80 * GIB, host_free_bytes=10**15)
    assert (est.tokens_per_batch, est.world_size, est.compute_bytes) == (4096, 2, 2)
    big = _tiny(hidden_size=512, intermediate_size=1536, vocab_size=32000)
    need = estimate_memory(big, 4096, 2).total
    with pytest.raises(ConfigError, match=r"set data.tokens_per_batch to \d+ or less \(now 4096"):
        preflight_memory(cfg, big, 2, CUDA, torch.bfloat16, free_bytes=CUDA_RESERVE_BYTES + int(need * 0.9),
                         host_free_bytes=10**15)


def test_accumulating_unsharded_gradients_is_costed_and_the_advice_names_grad_sync():
    """train.grad_sync=step (the default) keeps the whole model's gradients unsharded in fp32 while a
    step's micro-batches accumulate; micro_batch reduce-scatters each time and keeps them sharded."""
    config = _tiny(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, vocab_size=32000)
    P = ModelShape.from_config(config).num_params
    plain = estimate_memory(config, 1024, 8)
    step = estimate_memory(config, 1024, 8, grad_accum=4)
    micro = estimate_memory(config, 1024, 8, grad_accum=4, grad_sync="micro_batch")
    assert (plain.grads, step.grads, micro.grads) == (P / 2, 4 * P, P / 2)
    assert step.total - plain.total == 4 * P - P / 2 and micro == plain.changed(grad_accum=4, grad_sync="micro_batch")
    assert estimate_memory(config, 1024, 1, grad_accum=4).grads == 4 * P  # one rank: sharded is unsharded
    free = int(CUDA_RESERVE_BYTES + FRAGMENTATION * (micro.total + step.total) / 2)  # micro fits, step does not
    with pytest.raises(ConfigError, match=r"set train.grad_sync=micro_batch .*train.grad_accum=4"):
        check_memory(step, CUDA, free_bytes=free, host_free_bytes=10**15, min_tokens_per_batch=1024)
    check_memory(micro, CUDA, free_bytes=free, host_free_bytes=10**15, min_tokens_per_batch=1024)


def test_the_run_estimate_reads_accumulation_and_checkpointing_from_the_config():
    from msft_fast.config import load_config
    from msft_fast.runtime.preflight import estimate_run

    cfg = load_config(None, ["output_dir=o", "data.tasks=[{name: a, train: a.jsonl, val: b.jsonl}]",
                             "data.max_seq_len=512", "data.tokens_per_batch=2048", "train.grad_accum=3",
                             "train.activation_checkpointing=full", "model.loss_chunk_mib=256"])
    loss = dict(loss_impl="auto", loss_chunk_bytes=256 * 2**20)  # model.loss_impl and model.loss_chunk_mib
    est = estimate_run(cfg, _tiny(), 2, torch.bfloat16)
    assert est == estimate_memory(_tiny(), 2048, 2, grad_accum=3, activation_checkpointing=True, **loss)
    cfg.train.activation_checkpointing, cfg.train.grad_sync = "selective", "micro_batch"  # selective: costed as off
    assert estimate_run(cfg, _tiny(), 2, torch.bfloat16) == estimate_memory(_tiny(), 2048, 2, grad_accum=3,
                                                                           grad_sync="micro_batch", **loss)


def test_host_memory_can_be_given_for_machines_whose_memory_grows_on_demand(monkeypatch):
    from msft_fast.runtime.preflight import HOST_MEMORY_ENV, host_available_memory
    from msft_fast.state.snapshot import host_memory_available

    est = estimate_memory(_tiny(), tokens_per_batch=1024, world_size=1, device_type="cpu")
    monkeypatch.setenv(HOST_MEMORY_ENV, str(0.5 * est.host / GIB))
    assert host_available_memory() == host_memory_available() == int(0.5 * est.host)
    with pytest.raises(ConfigError, match="host memory"):
        check_memory(est, CPU)
    monkeypatch.setenv(HOST_MEMORY_ENV, "120")
    check_memory(est, CPU)
    for bad in ("lots", "-1", "0", "inf"):
        monkeypatch.setenv(HOST_MEMORY_ENV, bad)
        with pytest.raises(ConfigError, match=f"environment variable {HOST_MEMORY_ENV} must be a positive number"):
            host_available_memory()


def test_the_estimate_budgets_for_the_static_length_where_rows_are_padded():
    """Under static shapes every row is padded up to a multiple of 128 tokens: the estimate is that
    of the padded row wherever the run pads (asked for, or compiled attention or blocks)."""
    from msft_fast.attention import FLEX_ATTENTION, PACKED_SDPA
    from msft_fast.config import Config
    from msft_fast.runtime.preflight import estimate_run

    def tokens(static, attention, compile=False):
        cfg = Config(output_dir="x")
        cfg.data.tokens_per_batch, cfg.data.static_shapes, cfg.train.compile = 8000, static, compile
        return estimate_run(cfg, _tiny(), 1, torch.bfloat16, attention=attention).tokens_per_batch

    assert tokens(None, PACKED_SDPA) == tokens(False, FLEX_ATTENTION) == 8000
    assert tokens(None, FLEX_ATTENTION) == tokens(True, PACKED_SDPA) == tokens(None, PACKED_SDPA, True) == 8064
