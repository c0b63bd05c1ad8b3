"""LayerContext: what every block is built with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import BuildConfig
from kiln.kernels import KernelOps
from kiln.layers.linear import LinearMethod, linear_method
from kiln.layers.parallel import SINGLE, TensorParallel
from kiln.quantization.fp8 import FP8_DTYPE


@dataclass(frozen=True)
class LayerContext:
    """The kernel ops blocks call (bound from the engine's kernel plan), the method of every Linear (from
    the engine's build config; a model never names one), the engine dtype and the device of buffers
    computed at load (rotary tables), what the KV cache holds: the engine dtype (``kv_cache_dtype``
    None) or e4m3 (float8_e4m3fn: each attention block keeps its scales), whether context attention
    multiplies in FP8, and the tensor-parallel rank the blocks are sharded for (``tp``; one rank by
    default). Parameters are never allocated here: they come from the engine."""

    ops: KernelOps
    linear: LinearMethod
    dtype: torch.dtype
    device: torch.device
    kv_cache_dtype: torch.dtype | None = None
    use_fp8_context_fmha: bool = False
    tp: TensorParallel = SINGLE

    @property
    def is_fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype == FP8_DTYPE


def layer_context(build: BuildConfig, ops: KernelOps, dtype: torch.dtype, device: torch.device,
                  tp: TensorParallel = SINGLE) -> LayerContext:
    """The context of an engine's blocks from its (resolved) build config, for tensor-parallel rank ``tp``."""
    return LayerContext(ops, linear_method(build.quantization, build), dtype, device,
                        kv_cache_dtype=FP8_DTYPE if build.kv_cache_dtype == "fp8" else None,
                        use_fp8_context_fmha=build.use_fp8_context_fmha, tp=tp)
