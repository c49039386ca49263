"""Matrix products of 16-bit operands with fp32 results, as cuBLAS forms them on a GPU.

cuBLAS multiplies bf16/fp16 operands on the tensor cores and accumulates in fp32; asking torch for
an fp32 *output* (`out_dtype`, torch >= 2.8 on CUDA) keeps that accumulator instead of rounding it
to 16 bits. Elsewhere (CPU tensors under the Triton interpreter, older torch) the operands are
upcast, which gives the same exact products and fp32 sums in another order; on a GPU whose torch
lacks `out_dtype` the product is rounded to 16 bits first (said once with a warning).
"""
from __future__ import annotations

import warnings

import torch

_OUT_DTYPE_WORKS: dict[str, bool] = {}  # device type -> torch.mm(..., out_dtype=fp32) is implemented


def _out_dtype_works(device: torch.device) -> bool:
    if device.type not in _OUT_DTYPE_WORKS:
        ok = device.type == "cuda"
        if ok:
            a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
            try:
                torch.mm(a, a, out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
                warnings.warn("this torch has no fp32-output 16-bit matmul (torch >= 2.8 has): the fused loss "
                              "rounds its 16-bit logits products to 16 bits before the fp32 softmax", stacklevel=3)
        _OUT_DTYPE_WORKS[device.type] = ok
    return _OUT_DTYPE_WORKS[device.type]


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[M, K] (fp32) = a[M, N] @ b[N, K] for a, b of one dtype (fp32, bf16 or fp16); returns out."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if _out_dtype_works(a.device):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    if a.device.type == "cuda":
        return out.copy_(torch.mm(a, b))
    return torch.mm(a.float(), b.float(), out=out)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc[M, K] (fp32) += a[M, N] @ b[N, K], with the product kept in fp32 (see the module docstring)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _out_dtype_works(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.device.type == "cuda":
        acc += torch.mm(a, b)
    else:
        acc.addmm_(a.float(), b.float())
