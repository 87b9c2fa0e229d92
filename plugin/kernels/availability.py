"""Whether each kernel can run here: what the paths of :mod:`plugin.paths` ask before they accept a call."""

from __future__ import annotations

import torch

__all__ = [
    "TORCH_CHUNKED_MIN_SCORES",
    "c_kernel_available",
    "c_kernel_error",
    "structured_kernels_built",
    "triton_unavailable_reason",
]

# the torch-only chunked path pays off (in memory) when the score matrix would be this large
TORCH_CHUNKED_MIN_SCORES = 1 << 24


def c_kernel_available() -> bool:
    """True when the C row kernel of the chunked paths builds here (checked once)."""
    from . import chunked

    return chunked.c_kernel_available()


def c_kernel_error() -> str:
    """Why the C row kernel did not build ('' when it did)."""
    from . import chunked

    return chunked.c_kernel_error()


_STRUCTURED_BUILT: list[bool] = []


@torch.compiler.assume_constant_result
def structured_kernels_built() -> bool:
    """True when the fusedmax / oscarmax kernels build here (checked once; a constant when compiling)."""
    from .structured_chunked import structured_chunked_available

    if not _STRUCTURED_BUILT:
        _STRUCTURED_BUILT.append(structured_chunked_available())
    return _STRUCTURED_BUILT[0]


def triton_unavailable_reason(device: str, dtype: torch.dtype, head_dim: int, value_dim: int,
                              bias_grad: bool) -> str | None:
    """Why the Triton kernels cannot run a call with these properties, or None."""
    if device != "cuda":
        return f"tensors are on {device}, the Triton kernels need CUDA"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (the Triton kernels take float16, bfloat16, float32)"
    if head_dim > 256:
        return f"head dimension {head_dim} > 256"
    if value_dim != head_dim:
        return f"value dimension {value_dim} differs from the query/key dimension {head_dim}"
    if bias_grad:
        return "an additive mask that requires a gradient"
    from .triton_entmax import triton_available

    if not triton_available():
        return "triton is not installed"
    return None
