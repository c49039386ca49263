"""FLOPs accounting, so that methods that train and evaluate different amounts compare on one axis.

Training: 6 x N per token (N = parameters outside the input embedding table; the LM head counts,
it is a matmul) plus causal attention over each packed document's own length, x3 for backward.
Evaluation: 2 x N per token plus the forward attention. Packed documents never attend to each
other, so attention is counted per document, not per packed row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn


@dataclass(frozen=True)
class FlopCounter:
    matmul_params: int  # N
    num_layers: int
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
        return cls(matmul_params, config.num_hidden_layers, heads * head_dim)

    def attention_forward(self, doc_lengths: Iterable[int]) -> int:
        """QK^T and PV under a causal mask: L(L+1)/2 dot products of attn_dim each, 2 flops per MAC."""
        return sum(2 * 2 * self.num_layers * self.attn_dim * (n * (n + 1) // 2) for n in doc_lengths)

    def train(self, num_tokens: int, doc_lengths: Iterable[int]) -> int:
        return 6 * self.matmul_params * num_tokens + 3 * self.attention_forward(doc_lengths)

    def eval(self, num_tokens: int, doc_lengths: Iterable[int]) -> int:
        return 2 * self.matmul_params * num_tokens + self.attention_forward(doc_lengths)
