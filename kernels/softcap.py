"""Gemma-2 logit soft-capping inside Triton kernels: softcap * tanh(x / softcap)."""
import triton
import triton.language as tl


@triton.jit
def softcap_tanh(x, softcap):
    """softcap * tanh(x / softcap), elementwise in fp32.

    Written through exp (1 - 2 / (exp(2u) + 1)) because tl has no tanh; it saturates cleanly at
    +-softcap (exp overflowing to inf gives 1, underflowing to 0 gives -1) instead of making NaN.
    """
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0))
