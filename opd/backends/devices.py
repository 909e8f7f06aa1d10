"""Where models run: device names resolved once, and which devices compute bfloat16 natively."""

from __future__ import annotations

import functools
from pathlib import Path

from opd.errors import OpdError


def resolve_device(name: str = "auto"):
    """`auto` = the current CUDA GPU when there is one (a torchrun rank's own: cuda:LOCAL_RANK, else the
    first), else the CPU; `cuda:N` must exist on this machine."""
    import torch

    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OpdError(f"device {name}: this machine has no CUDA GPU (torch {torch.__version__}); "
                           "use device: cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise OpdError(f"device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0.."
                           f"cuda:{torch.cuda.device_count() - 1})")
        device = torch.device("cuda", index)
    return device


def model_device(model):
    """The device of a model's first parameter (a model split by device_map: where its input goes)."""
    return next(model.parameters()).device


def native_bf16(device="cpu") -> bool:
    """Whether `device` computes bfloat16 matmuls natively: a CUDA GPU of compute capability 8+ (Ampere
    or newer), or a CPU with AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than float32)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8
    return device.type == "cpu" and _cpu_bf16()


@functools.cache
def _cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to know, keep float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
