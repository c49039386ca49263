"""How the chunked path (chunked.py) splits a call's tokens within a memory budget. No Triton here:
the memory preflight and bench/roofline.py use the same plan as the kernels, on any machine.

Two buffers: fp32 logits of C_l tokens (4 V bytes a token, alive until their row is processed) and
the 16-bit logit gradient of C_g tokens (2 V bytes a token, alive until the group's dH/dW GEMMs).
Every group but the first re-reads and re-writes dW (4 V H bytes in bf16), so the budget buys the
largest groups: the logits get a quarter of it, at most MAX_LOGIT_ROWS rows, the gradient rows the
rest.

DEFAULT_CHUNK_BYTES, 1 GiB, from bench/roofline.py's model (bench/results/roofline.md, MODELLED with
its stated assumptions, among them GEMM efficiency falling for thin token dimensions): at 16384 x
4096 x 128256 (bf16) it gives 512-token sub-chunks and 3072-token groups, six passes over dW, and
models 2.3% slower on an H200 than an unbounded budget (768 MiB: 4.8%, 2 GiB: 0.1%). With it the
whole call takes 2.37 GB beyond its inputs there (`loss_memory_bytes`); 1.3% of an 80 GB H100.
`model.loss_chunk_mib` changes it for a run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CHUNK_BYTES = 1 << 30
MAX_LOGIT_ROWS = 1024
ROW_ALIGN = 128  # sub-chunk and group sizes are multiples of a GEMM tile when the budget allows


@dataclass(frozen=True)
class ChunkPlan:
    """How one call splits N tokens: logit_rows x V fp32 logits and grad_rows x V gradient rows."""

    logit_rows: int  # C_l: tokens whose fp32 logits exist at once (a sub-chunk)
    grad_rows: int  # C_g: tokens whose logit gradient feeds one dH/dW GEMM pair (0: no gradients)
    logits_bytes: int
    grad_bytes: int

    @property
    def bytes(self) -> int:
        """Transient memory of the two buffers (what the budget bounds)."""
        return self.logits_bytes + self.grad_bytes

    def groups(self, n: int) -> int:
        """Passes over the fp32 dW accumulator for n tokens (0 without gradients)."""
        return -(-n // self.grad_rows) if self.grad_rows else 0

    def sub_chunks(self, n: int) -> int:
        """Logits GEMMs (and row-kernel launches) for n tokens."""
        if not self.grad_rows:
            return -(-n // self.logit_rows)
        full, rest = divmod(n, self.grad_rows)
        return full * -(-self.grad_rows // self.logit_rows) + -(-rest // self.logit_rows)


def _round_down(x: int, multiple: int) -> int:
    return x // multiple * multiple if x >= multiple else x


def plan_chunks(n: int, vocab: int, dtype: torch.dtype, need_grad: bool, chunk_bytes: int | None = None,
                chunk_size: int | None = None) -> ChunkPlan:
    """Sub-chunk and group sizes for n tokens of a vocab-wide head in `dtype` within `chunk_bytes`.

    chunk_bytes: budget of both buffers (None: DEFAULT_CHUNK_BYTES); chunk_size: fixes C_l instead.
    Each buffer holds at least one row, so a budget below one row of each is exceeded (`bytes` says
    by how much). Without gradients the whole budget goes to the logits.
    """
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    n = max(n, 1)
    logit_row = 4 * vocab
    grad_row = torch.finfo(dtype).bits // 8 * vocab
    if chunk_size is not None:
        logit_rows = chunk_size
    elif need_grad:
        logit_rows = min(MAX_LOGIT_ROWS, _round_down(max(1, budget // 4 // logit_row), ROW_ALIGN))
    else:
        logit_rows = _round_down(max(1, budget // logit_row), ROW_ALIGN)
    logit_rows = min(logit_rows, n)
    grad_rows = 0
    if need_grad:
        fit = max(logit_rows, (budget - logit_rows * logit_row) // grad_row)
        grad_rows = min(n, fit // logit_rows * logit_rows)
    return ChunkPlan(logit_rows, grad_rows, logit_rows * logit_row, grad_rows * grad_row)
