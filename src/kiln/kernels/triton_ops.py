"""The Triton implementation of every op, bound by ``KernelOps`` where the kernel plan says "triton".

Each kernel lives beside its reference (norm.py, activation.py, rotary.py, attention.py; the e4m3
quantization the ``*_fp8`` ones end with is fp8.py's) and takes the reference's arguments plus its launch
config, which the plan supplies as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.kernels.activation import gelu_triton, silu_mul_fp8_triton, silu_mul_triton
from kiln.kernels.attention import paged_attention_triton
from kiln.kernels.fp8 import fp8_linear_triton
from kiln.kernels.gemv import dense_linear_triton
from kiln.kernels.norm import (add_layer_norm_triton, add_rms_norm_fp8_triton, add_rms_norm_triton, layer_norm_triton,
                               rms_norm_fp8_triton, rms_norm_linear_triton, rms_norm_triton)
from kiln.kernels.rotary import rotary_kv_write_triton
from kiln.kernels.weight_only import weight_only_linear_triton

IMPLS: dict[str, Callable] = {
    "rms_norm": rms_norm_triton,
    "add_rms_norm": add_rms_norm_triton,
    "rms_norm_fp8": rms_norm_fp8_triton,
    "add_rms_norm_fp8": add_rms_norm_fp8_triton,
    "layer_norm": layer_norm_triton,
    "add_layer_norm": add_layer_norm_triton,
    "silu_mul": silu_mul_triton,
    "silu_mul_fp8": silu_mul_fp8_triton,
    "gelu": gelu_triton,
    "rotary_kv_write": rotary_kv_write_triton,
    "attention": paged_attention_triton,
    "dense_linear": dense_linear_triton,
    "rms_norm_linear": rms_norm_linear_triton,
    "weight_only_linear": weight_only_linear_triton,
    "fp8_linear": fp8_linear_triton,
}
