"""What the machine computes natively, for choices that only speed work up."""

from __future__ import annotations


def native_bfloat16(device: str) -> bool:
    """True where bfloat16 matmuls run in hardware: most GPUs, and CPUs with AVX512-BF16 or AMX.

    Elsewhere bfloat16 is emulated and slower than float32.
    """
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
