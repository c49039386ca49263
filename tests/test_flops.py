"""FLOPs count each layer's real attention span: full causal, a sliding window (Gemma 2's
alternating layers, Mistral's every layer, Qwen2's upper layers), chunks, or none; against hand counts."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from msft_fast.flops import AttentionSpan, FlopCounter, layer_spans

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def test_attention_pairs_by_hand():
    # (query, key) pairs of one document of 10 tokens.
    assert AttentionSpan("full").pairs(10) == 55
    # window 4: queries 0..3 see 1, 2, 3, 4 keys; queries 4..9 see 4 each.
    assert AttentionSpan("sliding", 4).pairs(10) == 1 + 2 + 3 + 4 + 6 * 4 == 34
    assert AttentionSpan("sliding", 4).pairs(3) == 6  # shorter than the window: causal
    assert AttentionSpan("sliding", 10).pairs(10) == 55
    # chunks of 4: 4 + 4 + 2 tokens, causal inside each.
    assert AttentionSpan("chunked", 4).pairs(10) == 10 + 10 + 3
    assert AttentionSpan("none").pairs(10) == 0


def test_gemma2_alternates_sliding_and_global_layers():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(head_dim=8, sliding_window=4, **SMALL)
    assert layer_spans(config) == (AttentionSpan("sliding", 4), AttentionSpan("full"))
    torch.manual_seed(0)
    counter = FlopCounter.for_model(Gemma2ForCausalLM(config))
    assert counter.attn_dim == 4 * 8 and counter.num_layers == 2
    # documents of 3 and 10 tokens: full layer 6 + 55 pairs, sliding layer 6 + 34.
    pairs = (6 + 55) + (6 + 34)
    assert counter.attention_forward([3, 10]) == 2 * 2 * 32 * pairs
    assert counter.train(13, [3, 10]) == 6 * counter.matmul_params * 13 + 3 * 2 * 2 * 32 * pairs
    assert counter.eval(13, [3, 10]) == 2 * counter.matmul_params * 13 + 2 * 2 * 32 * pairs
    # the same model counted as if every layer were global costs more
    full = FlopCounter(counter.matmul_params, (AttentionSpan("full"),) * 2, counter.attn_dim)
    assert full.attention_forward([3, 10]) - counter.attention_forward([3, 10]) == 2 * 2 * 32 * (55 - 34)


def test_mistral_windows_every_layer_and_qwen2_only_when_it_uses_its_window():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    assert layer_spans(MistralConfig(sliding_window=5, **SMALL)) == (AttentionSpan("sliding", 5),) * 2
    assert layer_spans(MistralConfig(sliding_window=None, **SMALL)) == (AttentionSpan("full"),) * 2
    assert layer_spans(LlamaConfig(**SMALL)) == (AttentionSpan("full"),) * 2
    # Qwen2 keeps a sliding_window it does not use unless use_sliding_window; then layers from
    # max_window_layers on are windowed.
    assert layer_spans(Qwen2Config(sliding_window=5, **SMALL)) == (AttentionSpan("full"),) * 2
    assert layer_spans(Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1, **SMALL)) == (
        AttentionSpan("full"), AttentionSpan("sliding", 5))


def test_declared_layer_types_decide_each_layers_span():
    config = SimpleNamespace(num_hidden_layers=4, sliding_window=3, attention_chunk_size=4,
                             layer_types=["chunked_attention", "linear_attention", "sliding_attention",
                                          "full_attention"])
    assert layer_spans(config) == (AttentionSpan("chunked", 4), AttentionSpan("none"), AttentionSpan("sliding", 3),
                                   AttentionSpan("full"))
    counter = FlopCounter(1000, layer_spans(config), attn_dim=16)
    # one document of 10 tokens: chunked 23, linear 0, window 3 (1 + 2 + 8 x 3 = 27), full 55
    assert counter.attention_forward([10]) == 2 * 2 * 16 * (23 + 0 + 27 + 55)
    # an attention kind we do not model is counted as full causal attention (an upper bound)
    odd = SimpleNamespace(num_hidden_layers=1, layer_types=["indexed_attention"])
    assert layer_spans(odd) == (AttentionSpan("full"),)


@pytest.mark.parametrize("lengths", [[1], [7, 130, 2], [64] * 5])
def test_packing_never_changes_the_count(lengths):
    counter = FlopCounter(10, (AttentionSpan("sliding", 16), AttentionSpan("full")), attn_dim=8)
    assert counter.attention_forward(lengths) == sum(counter.attention_forward([n]) for n in lengths)
