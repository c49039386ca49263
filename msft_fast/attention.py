"""Attention over packed rows: what each backend needs to keep documents apart, built once per batch.

Three backends, best first: flash-attn varlen (given our `cu_seqlens`/`max_seqlen` directly),
FlexAttention with a document-causal `BlockMask`, and SDPA/eager, where HF derives a dense
document mask from the per-document `position_ids`. The FlexAttention backend is our own HF
attention function, registered under `FLEX_ATTENTION`: HF's built-in `flex_attention` takes the
sliding window from the mask, and a mask handed to the decoder reaches every layer unchanged; it
also always compiles, which a CPU forward check cannot afford (about 30 s per shape).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.utils.generic import is_flash_attention_requested

from msft_fast.data.packing import PackedBatch

# The HF attn_implementation name of our FlexAttention backend (config value: flex_attention).
FLEX_ATTENTION = "packed_flex_attention"


def flash_varlen_kwargs(batch: PackedBatch) -> dict[str, Any]:
    """HF's FlashAttentionKwargs for one packed row: flash-attn's varlen kernel reads the document
    boundaries from these instead of re-deriving them from position_ids in every layer.

    cu_seqlens[D+1] int32 on the batch's device (flash-attn's layout); max_seqlen a Python int,
    as flash_attn_varlen_func requires.
    """
    cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": int(batch.max_seqlen), "max_length_k": int(batch.max_seqlen)}


def document_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[N] int32: the index of the document each token of the row belongs to."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    docs = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(docs, lengths, output_size=num_tokens)


def document_block_mask(cu_seqlens: torch.Tensor, num_tokens: int, sliding_window: int | None = None):
    """The FlexAttention BlockMask of a packed row: token q sees token k iff both are in the same
    document and k <= q (and, with a sliding window W, q - k < W, as HF's masks define it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(cu_seqlens, num_tokens)

    if sliding_window is None:
        def mask_mod(b, h, q, k):
            return (doc[q] == doc[k]) & (k <= q)
    else:
        def mask_mod(b, h, q, k):
            return (doc[q] == doc[k]) & (k <= q) & (q - k < sliding_window)

    # Compiled, the mask is built block by block; uncompiled it would materialise N x N booleans.
    # CPU builds stay uncompiled: rows there are small and inductor's compile time is not.
    return create_block_mask(mask_mod, None, None, num_tokens, num_tokens, device=doc.device,
                             _compile=doc.device.type == "cuda")


def packed_attention_inputs(attn_implementation: str, batch: PackedBatch,
                            sliding_window: int | None = None) -> dict[str, Any]:
    """The keyword arguments the HF decoder needs, besides input_ids and position_ids, so that the
    documents of `batch` never attend to each other under `attn_implementation`.

    Built once per batch and shared by every layer: flash-attn gets cu_seqlens, FlexAttention gets
    its BlockMask (plus one for the model's sliding window, if it has one). With SDPA and eager HF
    builds the document mask from position_ids, which needs attention_mask=None (and no cache).
    """
    if is_flash_attention_requested(requested_attention_implementation=attn_implementation):
        return {"attention_mask": None, **flash_varlen_kwargs(batch)}
    if attn_implementation == FLEX_ATTENTION:
        n = batch.num_tokens
        cu = batch.cu_seqlens.to(batch.input_ids.device)
        inputs: dict[str, Any] = {"attention_mask": document_block_mask(cu, n)}
        if sliding_window is not None:
            inputs["sliding_block_mask"] = document_block_mask(cu, n, sliding_window)
        return inputs
    return {"attention_mask": None}


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process: uncompiled, it materialises the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def packed_flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                          sliding_window: int | None = None, softcap: float | None = None,
                          sliding_block_mask: Any = None, **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention function (see AttentionInterface) running FlexAttention with the BlockMask of
    `packed_attention_inputs`.

    query[B, Hq, N, D], key/value[B, Hkv, N, D] (Hq a multiple of Hkv); returns out[B, N, Hq, D].
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    block_mask = sliding_block_mask if sliding_window is not None else attention_mask
    if not isinstance(block_mask, BlockMask):
        what = f"a sliding-window ({sliding_window}) BlockMask" if sliding_window is not None else "a BlockMask"
        raise ValueError(f"{FLEX_ATTENTION} needs {what} from msft_fast.attention.packed_attention_inputs")
    if dropout and module.training:
        raise ValueError(f"{FLEX_ATTENTION} does not support attention dropout; set the model's attention_dropout to 0")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{FLEX_ATTENTION} does not support attention sinks")

    score_mod = None
    if softcap:  # Gemma-2's attention logit soft-capping
        def score_mod(score, b, h, q, k):
            return softcap * torch.tanh(score / softcap)

    # Inside a compiled block dynamo traces flex_attention itself; outside, call the compiled one.
    # CPU (forward only, for checks) runs it uncompiled: exact, but it materialises the scores.
    if query.device.type == "cpu" or torch.compiler.is_compiling():
        flex = flex_attention
    else:
        flex = _compiled_flex_attention()
    out = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
               enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLEX_ATTENTION, packed_flex_attention)
