"""FLOPs accounting, so that methods that train and evaluate different amounts compare on one axis.

Training: 6 x N per token (N = parameters outside the input embedding table; the LM head counts,
it is a matmul) plus attention over each packed document's own length, x3 for backward.
Evaluation: 2 x N per token plus the forward attention. Packed documents never attend to each
other, so attention is counted per document, not per packed row, and per layer over the span that
layer really sees (full causal, a sliding window, a chunk, or none for linear-time layers).
Generation (exact match of generated answers) with a KV cache: a row of P prompt tokens that
generates G tokens runs the prompt through once and feeds back every generated token but the last,
each attending to all tokens before it, so it costs 2 x N x (P + G - 1) plus the forward attention
of one causal document of P + G - 1 tokens: exactly `eval` of that document. Padding and the steps
a row idles in its batch after its stop token are not useful work and are not counted.
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) from NVIDIA's data sheets, matched
# against torch.cuda.get_device_name(); the first matching entry wins, so the specific come first.
PEAK_FLOPS = (
    ("H200 NVL", 835e12),
    ("H200", 989.4e12),  # SXM
    ("GH200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM (HBM3)
    ("H800", 989.4e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)


# Layer types (HF `config.layer_types`) whose cost grows linearly with the sequence (recurrent or
# convolutional mixers, MLP-only layers): their matmuls are in 6N; they add no attention term.
LINEAR_TIME_LAYER_TYPES = ("linear_attention", "conv", "moe", "dense", "sparse")
# Windowed layer types: a query sees the last `sliding_window` keys of its own document.
SLIDING_LAYER_TYPES = ("sliding_attention", "hybrid_sliding")


@dataclass(frozen=True)
class AttentionSpan:
    """What one layer's queries attend to: `full` causal, a `sliding` window of the last `size`
    keys (HF: key k is seen by query q iff q - size < k <= q), `chunked` causal attention within
    aligned chunks of `size` tokens (Llama 4), or `none` (no softmax attention over the sequence)."""

    kind: str
    size: Optional[int] = None

    def pairs(self, n: int) -> int:
        """(query, key) dot products of one document of n tokens."""
        if self.kind == "none":
            return 0
        if self.kind == "sliding" and n > self.size:
            w = self.size
            return w * (w + 1) // 2 + (n - w) * w  # the first w queries see all before them, the rest w keys
        if self.kind == "chunked" and n > self.size:
            c = self.size
            full, rest = divmod(n, c)
            return full * (c * (c + 1) // 2) + rest * (rest + 1) // 2
        return n * (n + 1) // 2


def layer_spans(config) -> tuple[AttentionSpan, ...]:
    """Each layer's attention span, from the layer types an HF config declares (`layer_types`,
    e.g. Gemma 2's alternating sliding/global layers) or, without them, its `sliding_window`
    (Mistral: every layer). Attention kinds this does not know are counted as full causal
    attention, an upper bound."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2-style configs keep a window they do not use
        window = None
    chunk = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return tuple(AttentionSpan("sliding", window) if window else AttentionSpan("full") for _ in range(layers))
    spans = []
    for kind in types:
        if kind in LINEAR_TIME_LAYER_TYPES:
            spans.append(AttentionSpan("none"))
        elif kind in SLIDING_LAYER_TYPES and window:
            spans.append(AttentionSpan("sliding", window))
        elif kind == "chunked_attention" and chunk:
            spans.append(AttentionSpan("chunked", chunk))
        else:
            spans.append(AttentionSpan("full"))
    return tuple(spans)


@dataclass(frozen=True)
class FlopCounter:
    matmul_params: int  # N
    spans: tuple[AttentionSpan, ...]  # one per layer
    attn_dim: int  # num_attention_heads x head_dim

    @classmethod
    def for_model(cls, lm: nn.Module) -> "FlopCounter":
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        total = sum(p.numel() for p in lm.parameters())  # tied weights are yielded once
        embed = lm.get_input_embeddings().weight
        head = lm.get_output_embeddings()
        tied = head is not None and head.weight is embed
        matmul_params = total if tied else total - embed.numel()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(matmul_params, layer_spans(config), heads * head_dim)

    @property
    def num_layers(self) -> int:
        return len(self.spans)

    def attention_forward(self, doc_lengths: Iterable[int]) -> int:
        """QK^T and PV over each layer's span of each document: attn_dim MACs per (query, key) pair
        for each of the two products, 2 flops per MAC."""
        lengths = list(doc_lengths)
        pairs = sum(count * sum(span.pairs(n) for n in lengths) for span, count in self._distinct_spans)
        return 2 * 2 * self.attn_dim * pairs

    @functools.cached_property
    def _distinct_spans(self) -> tuple[tuple[AttentionSpan, int], ...]:
        """Layers grouped by span (a model has one or two kinds), so a step costs documents x kinds."""
        return tuple(collections.Counter(self.spans).items())

    def train(self, num_tokens: int, doc_lengths: Iterable[int]) -> int:
        return 6 * self.matmul_params * num_tokens + 3 * self.attention_forward(doc_lengths)

    def eval(self, num_tokens: int, doc_lengths: Iterable[int]) -> int:
        return 2 * self.matmul_params * num_tokens + self.attention_forward(doc_lengths)

    def generation(self, prompt_lengths: Iterable[int], new_tokens: Iterable[int]) -> int:
        """Greedy generation with a KV cache: row i has prompt_lengths[i] tokens and generated
        new_tokens[i] >= 1 (its stop token included); see the module docstring."""
        lengths = [int(p) + int(g) - 1 for p, g in zip(prompt_lengths, new_tokens)]
        return self.eval(sum(lengths), lengths)


def device_peak_flops(device: torch.device, compute_dtype: torch.dtype, override_tflops: Optional[float] = None
                      ) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: `override_tflops` (train.peak_tflops) if given, else the
    table for a CUDA device computing in bf16/fp16; None (no MFU) for a CPU, fp32 or an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or compute_dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)
