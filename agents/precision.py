"""Which training dtype a device runs fast: `native_bfloat16(device)` and the `train_dtype="auto"` choice built on it.
bfloat16 autocast pays only where the hardware multiplies bfloat16; elsewhere torch emulates it, many times slower.
"""

from __future__ import annotations

import torch

def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware. On CPU: AVX512-BF16 or AMX, as torch's own CPU
    kernels detect them (on a CPU without them, e.g. an AVX2-only AMD EPYC, one bfloat16 training step of the
    embedded default took 12x its float32 time: docs/benchmarks.md). On CUDA: compute capability 8 or more, or ROCm
    (`torch.cuda.is_bf16_supported(including_emulation=False)`; older GPUs only emulate it). Other devices, and CPUs
    whose bfloat16 support torch cannot report (ARM), count as not native."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if kind != "cpu":
        return False
    # Private, but the checks torch's CPU kernels dispatch on; a torch without them reports no native bfloat16.
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_train_dtype(train_dtype: str, device: str | torch.device = "cpu") -> str:
    """`train_dtype` with "auto" replaced by bfloat16 where `device` runs it natively, else float32; other values
    unchanged. The result is what a run records, so a run's identity says which dtype it trained in."""
    if train_dtype != "auto":
        return train_dtype
    return "bfloat16" if native_bfloat16(device) else "float32"


def emulated_bfloat16_warning(train_dtype: str, device: str | torch.device = "cpu") -> str | None:
    """A warning for bfloat16 training on a device that only emulates it (None otherwise), naming the cost and the
    way out."""
    if train_dtype != "bfloat16" or native_bfloat16(device):
        return None
    return (f"train_dtype='bfloat16' on {torch.device(device).type}, which has no bfloat16 matrix instructions "
            "(no AVX512-BF16 or AMX): autocast emulates them, and one training step of the embedded default took 12x "
            "its float32 time on such a CPU (docs/benchmarks.md). train_dtype='auto' (the cpu preset's) picks float32 "
            "here; keep bfloat16 only to reproduce rows made in bfloat16.")
