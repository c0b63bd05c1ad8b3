"""Build targets: which GPU architecture (or the CPU) an engine is compiled for."""

from __future__ import annotations

import torch

from kiln.errors import ConfigError, EngineError


def detect_target() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm{major}{minor}"
    return "cpu"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def compute_capability(target: str) -> int:
    """sm90 -> 90; cpu -> 0."""
    return 0 if target == "cpu" else int(target[2:])


def resolve_dtype(dtype: str, checkpoint_dtype: str, target: str) -> str:
    if dtype == "auto":
        dtype = checkpoint_dtype if checkpoint_dtype in ("float32", "float16", "bfloat16") else "float32"
        if target == "cpu" and dtype == "float16":
            dtype = "float32"  # CPU float16 matmuls are slow or missing; float32 is exact for fp16 weights
    if dtype == "bfloat16" and target != "cpu" and compute_capability(target) < 80:
        raise ConfigError(f"bfloat16 needs compute capability 8.0 or newer (target {target}); "
                          "build with dtype='float16' (--dtype float16)")
    return dtype


def check_target_present(target: str, target_device_name: str) -> torch.device:
    """The device an engine of ``target`` runs on here, or a clear error when this machine differs."""
    here = detect_target()
    if target == "cpu":
        return torch.device("cpu")
    if here == "cpu":
        raise EngineError(f"engine was built for {target} ({target_device_name}) but this machine has no GPU; "
                          "rebuild it here with kiln build --target cpu")
    if here != target:
        raise EngineError(f"engine was built for {target} ({target_device_name}) but this GPU is {here} "
                          f"({device_name()}); rebuild the engine on this machine (kiln build ... --target auto)")
    return torch.device("cuda", torch.cuda.current_device())
