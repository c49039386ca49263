"""Attention over packed rows: what each backend needs to keep documents apart, built once per batch.

Four backends, best first: flash-attn varlen (given our `cu_seqlens`/`max_seqlen` directly),
FlexAttention with a document-causal `BlockMask`, SDPA over length buckets of documents
(`PACKED_SDPA`, for devices where neither of the first two applies, such as CPUs), and SDPA/eager,
where HF derives a dense [N, N] document mask from the per-document `position_ids`.
The FlexAttention backend is our own HF attention function, registered under `FLEX_ATTENTION`:
HF's built-in `flex_attention` takes the sliding window from the mask, and a mask handed to the
decoder reaches every layer unchanged; it also always compiles, which a CPU forward check cannot
afford (about 30 s per shape). The bucketed SDPA backend is registered under `PACKED_SDPA`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils.generic import is_flash_attention_requested

from msft_fast.data.packing import PackedBatch, static_length

# The HF attn_implementation name of our FlexAttention backend (config value: flex_attention).
FLEX_ATTENTION = "packed_flex_attention"
# The HF attn_implementation name (and config value) of SDPA over length buckets of documents.
PACKED_SDPA = "packed_sdpa"


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


# ---------------------------------------------------------------------------------------------
# SDPA over length buckets: the packed row's documents, grouped by length once per batch

# The cost model that places bucket boundaries (`plan_buckets`), in units of one (query, key) score
# of one channel: a bucket of n documents padded to length L costs BUCKET_OVERHEAD / width +
# n L (L + TOKEN_COST), width = heads x head_dim. Fitted to one layer's gather + causal SDPA +
# scatter, forward and backward, on a CPU core (the removed bench/bench_packed_attention.py refitted it: 1.43e6
# and 123 in one fit, 1.16e6 and 106 in bench/results/packed_attention_cpu.md on a loaded machine;
# the plan moves little within that range): each SDPA call costs about as much as 1.5e6 / width
# scores, each padded token as 125 scores. On a GPU the per-call cost is a few
# kernel launches; the plan stays sound there, only less tight.
BUCKET_OVERHEAD = 1.5e6
TOKEN_COST = 125.0


def plan_buckets(doc_lengths: Sequence[int], width: int = 128) -> list[tuple[int, np.ndarray]]:
    """Group documents by length into buckets that minimise the modelled cost of attending to them.

    A bucket pads its documents to its longest, so fewer, wider buckets waste compute on padding
    (quadratic in the padded length) while more buckets pay per SDPA call; an exact dynamic
    programme over the sorted distinct lengths (O(K^2) for K distinct lengths) picks the best
    contiguous split. Returns [(L_b, doc indices [n_b] in row order)], shortest bucket first.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    distinct, counts = np.unique(lengths, return_counts=True)
    k = len(distinct)
    before = np.concatenate([[0], np.cumsum(counts)])  # documents shorter than distinct[i]: before[i]
    overhead = BUCKET_OVERHEAD / max(1, width)
    best = np.zeros(k + 1)  # best[j]: cheapest split of the j shortest distinct lengths
    start = np.zeros(k + 1, dtype=np.int64)  # where the last bucket of that split starts
    for j in range(1, k + 1):
        length = float(distinct[j - 1])
        # the last bucket holds distinct lengths i .. j-1, padded to distinct[j-1]
        cost = best[:j] + overhead + (before[j] - before[:j]) * length * (length + TOKEN_COST)
        i = int(np.argmin(cost))
        best[j], start[j] = cost[i], i
    bounds, j = [], k
    while j > 0:
        bounds.append(int(distinct[j - 1]))
        j = int(start[j])
    bounds.reverse()
    which = np.searchsorted(np.asarray(bounds), lengths)  # the first bucket at least as long
    return [(length, np.flatnonzero(which == b)) for b, length in enumerate(bounds)]


@dataclass
class DocumentBuckets:
    """A packed row's documents in length buckets, for attention one bucket at a time.

    Bucket b holds n_b documents right-padded to L_b tokens: `gather[b]` [n_b * L_b] gives the row
    position of each (document, offset) slot (padding slots repeat the document's last token, which
    no real query sees under causal masking); `scatter` [N] gives, for each row position, its slot
    in the concatenation of all buckets' slots. Built once per batch, shared by every layer.
    """

    lengths: list[int]  # [B] L_b
    counts: list[int]  # [B] n_b
    gather: list[torch.Tensor]  # [B] int64 [n_b * L_b]
    scatter: torch.Tensor  # [N] int64
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, doc_lengths: Sequence[int], device: torch.device, width: int = 128) -> "DocumentBuckets":
        """The buckets `plan_buckets` chooses for these documents (lengths in row order)."""
        return cls.from_plan(doc_lengths, plan_buckets(doc_lengths, width), device)

    @classmethod
    def from_plan(cls, doc_lengths: Sequence[int], plan: Sequence[tuple[int, np.ndarray]],
                  device: torch.device) -> "DocumentBuckets":
        """Index tensors for a given plan: [(L_b, doc indices)], every document in one bucket at
        least as long as it."""
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        scatter = np.empty(int(lengths.sum()), dtype=np.int64)
        gathers, sizes, counts, offset = [], [], [], 0
        for size, docs in plan:
            t = np.arange(size)
            gather = starts[docs, None] + np.minimum(t, lengths[docs, None] - 1)  # [n_b, L_b]
            real = t < lengths[docs, None]
            scatter[gather[real]] = (offset + np.arange(len(docs))[:, None] * size + t)[real]
            gathers.append(torch.from_numpy(gather.reshape(-1)).to(device, non_blocking=True))
            sizes.append(int(size))
            counts.append(len(docs))
            offset += len(docs) * size
        return cls(sizes, counts, gathers, torch.from_numpy(scatter).to(device, non_blocking=True))

    def padded_tokens(self) -> int:
        return sum(n * size for n, size in zip(self.counts, self.lengths))

    def window_mask(self, b: int, sliding_window: Optional[int]) -> Optional[torch.Tensor]:
        """[L_b, L_b] bool: query q sees key k iff k <= q and q - k < sliding_window (HF's window);
        None where plain causal masking is the same (no window, or one no shorter than the bucket).
        Built once per (bucket, window) and batch."""
        size = self.lengths[b]
        if sliding_window is None or sliding_window >= size:
            return None
        key = (b, sliding_window)
        if key not in self._masks:
            device = self.scatter.device
            q = torch.arange(size, device=device)[:, None]
            k = torch.arange(size, device=device)[None, :]
            self._masks[key] = (k <= q) & (q - k < sliding_window)
        return self._masks[key]


def mask_placeholder(device: torch.device) -> torch.Tensor:
    """An empty [1, 1, 0, 0] "mask": HF's mask builders hand a 4-D mask to every layer untouched, so
    for a packed row they build none (else they would derive a dense [N, N] one from the restarting
    position ids). `packed_sdpa_attention` ignores it when it has the row's document buckets."""
    return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)


@torch.compiler.disable  # per-batch bucket shapes: compiled blocks run this part eagerly, not recompiled
def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                          sliding_window: int | None = None, softcap: float | None = None,
                          document_buckets: Optional[DocumentBuckets] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention function (see AttentionInterface): causal SDPA over each length bucket of
    `document_buckets` (from `packed_attention_inputs`); no [N, N] mask exists.

    query[1, Hq, N, D], key/value[1, Hkv, N, D] (Hq a multiple of Hkv); returns out[1, N, Hq, D].
    Per bucket: gather [n_b, H, L_b, D], `is_causal` SDPA (or a sliding-window mask), and the real
    tokens' outputs go back to their row positions; padding slots get no gradient.

    Called without buckets (the model used as a plain HF model: `generate`, padded batches, a user
    metric), it is HF's SDPA with the mask HF built for it (`sdpa_mask` is registered for this name).
    """
    if document_buckets is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if attention_mask is not None and attention_mask.numel():
        raise ValueError(f"{PACKED_SDPA} keeps a packed row's documents apart by its buckets; it takes no mask")
    if softcap:
        raise ValueError(f"{PACKED_SDPA} does not support attention logit soft-capping")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{PACKED_SDPA} does not support attention sinks")
    if not getattr(module, "is_causal", True) or query.shape[0] != 1:
        raise ValueError(f"{PACKED_SDPA} runs causal attention over one packed row")
    buckets = document_buckets
    _, hq, _, d = query.shape
    hkv, dv = key.shape[1], value.shape[-1]
    p = dropout if module.training else 0.0
    outs = []
    for b, (size, n) in enumerate(zip(buckets.lengths, buckets.counts)):
        idx = buckets.gather[b]
        # [1, H, n L, D] -> [n, H, L, D]: the view keeps each slot's head_dim contiguous
        q = query.index_select(2, idx).view(hq, n, size, d).transpose(0, 1)
        k = key.index_select(2, idx).view(hkv, n, size, d).transpose(0, 1)
        v = value.index_select(2, idx).view(hkv, n, size, dv).transpose(0, 1)
        mask = buckets.window_mask(b, sliding_window)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, scale=scaling, enable_gqa=hq != hkv)
        outs.append(out.transpose(1, 2).reshape(n * size, hq, dv))  # [n L, Hq, D]
    flat = outs[0] if len(outs) == 1 else torch.cat(outs)
    return flat.index_select(0, buckets.scatter)[None], None


def packed_attention_inputs(attn_implementation: str, batch: PackedBatch,
                            sliding_window: int | None = None, attn_width: int = 128) -> dict[str, Any]:
    """The keyword arguments the HF decoder needs, besides input_ids and position_ids, so that the
    documents of `batch` never attend to each other under `attn_implementation`.

    Built once per batch and shared by every layer: flash-attn gets cu_seqlens, FlexAttention gets
    its BlockMask (plus one for the model's sliding window, if it has one), bucketed SDPA its
    DocumentBuckets (attn_width = heads x head_dim sizes the buckets). With SDPA and eager HF
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
    if attn_implementation == PACKED_SDPA:
        device = batch.input_ids.device
        return {"attention_mask": mask_placeholder(device),
                "document_buckets": DocumentBuckets.of(batch.doc_lengths, device, attn_width)}
    return {"attention_mask": None}


def needs_static_shapes(attn_implementation: str, compiled_blocks: bool) -> bool:
    """Whether micro-batches must all have one token count (`data.static_shapes: null`): where
    something is compiled, a new length means a recompile, and past dynamo's limit FlexAttention
    falls back to eager flex, which materialises the [N, N] scores of every head."""
    return compiled_blocks or attn_implementation == FLEX_ATTENTION


def run_static_tokens(static_shapes: Optional[bool], tokens_per_batch: int, attn_implementation: str,
                      compiled_blocks: bool) -> Optional[int]:
    """Every micro-batch's token count under `data.static_shapes` (None: each its own; null: where
    `needs_static_shapes`): what the loader pads to and the memory preflight budgets for."""
    if static_shapes is None:
        static_shapes = needs_static_shapes(attn_implementation, compiled_blocks)
    return static_length(tokens_per_batch) if static_shapes else None


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
AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # outside packed rows it is SDPA, masks included
