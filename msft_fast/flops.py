"""FLOPs accounting, so that methods that train and evaluate different amounts compare on one axis.

Training: 6 x N per token (N = parameters outside the input embedding table; the LM head counts,
it is a matmul) plus causal attention over each packed document's own length, x3 for backward.
Evaluation: 2 x N per token plus the forward attention. Packed documents never attend to each
other, so attention is counted per document, not per packed row.
"""
from __future__ import annotations

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
