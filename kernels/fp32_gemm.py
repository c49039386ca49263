"""Matrix products of 16-bit operands with fp32 results, as cuBLAS forms them on a GPU, and the
16-bit accumulation of such products with one rounding per product.

cuBLAS multiplies bf16/fp16 operands on the tensor cores and accumulates in fp32; asking torch for
an fp32 *output* (`out_dtype`, torch >= 2.8 on CUDA) keeps that accumulator instead of rounding it
to 16 bits. Elsewhere (CPU tensors under the Triton interpreter) the operands are upcast, which
gives the same exact products and fp32 sums in another order. On a GPU whose torch lacks
`out_dtype` the fused loss refuses to run: rounding the logits to 16 bits before the softmax would
lose precision silently.
"""
from __future__ import annotations

import torch

_SUPPORT: dict[str, tuple[bool, bool]] = {}  # device type -> (mm, addmm) take out_dtype=float32


def _support(device: torch.device) -> tuple[bool, bool]:
    """Whether torch.mm and torch.addmm take out_dtype=float32 for 16-bit operands on this device type."""
    if device.type not in _SUPPORT:
        ok = [False, False]
        if device.type == "cuda":
            a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
            acc = torch.zeros(16, 16, dtype=torch.float32, device=device)
            for i, call in enumerate((lambda: torch.mm(a, a, out_dtype=torch.float32),
                                      lambda: torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc))):
                try:
                    call()
                    ok[i] = True
                except (RuntimeError, TypeError, NotImplementedError):
                    pass
        _SUPPORT[device.type] = (ok[0], ok[1])
    return _SUPPORT[device.type]


def require_fp32_output(device: torch.device) -> None:
    """Raises RuntimeError where 16-bit operands on `device` cannot give an fp32 product (a CUDA device
    whose torch lacks `out_dtype`); CPUs upcast instead."""
    if device.type == "cuda" and not _support(device)[0]:
        raise RuntimeError(f"the fused loss needs fp32-output 16-bit matmuls (torch.mm(..., out_dtype=torch.float32), "
                           f"torch >= 2.8), which torch {torch.__version__} lacks it on CUDA")


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[M, K] (fp32) = a[M, N] @ b[N, K] for a, b of one dtype (fp32, bf16 or fp16); returns out."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    require_fp32_output(a.device)
    if _support(a.device)[0]:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc[M, K] (fp32) += a[M, N] @ b[N, K], with the product kept in fp32 (see the module docstring)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    require_fp32_output(a.device)
    mm_ok, addmm_ok = _support(a.device)
    if addmm_ok:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mm_ok:  # an fp32 product, added in a second pass
        acc += torch.mm(a, b, out_dtype=torch.float32)
    else:
        acc.addmm_(a.float(), b.float())


def mm_into_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out[M, K] (= or +=) a[M, N] @ b[N, K], all of one dtype: the product and the sum are formed in
    fp32 and rounded to out's dtype once (cuBLAS with fp32 compute: C = A B + C, one rounding). A
    16-bit accumulator thus takes one rounding per call, as Liger-Kernel's per-chunk addmm does."""
    if a.device.type == "cuda" or a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    # CPU tensors under the Triton interpreter: the same arithmetic on upcast operands.
    product = torch.mm(a.float(), b.float())
    out.copy_(product.add_(out.float()) if accumulate else product)
