"""FP8 W8A8: e4m3 weights with a float32 scale per output channel, activations quantized per token at
run time (kiln.quantization.fp8 holds the convention and the reference; kiln.kernels.fp8 the GPU path).

Build time: each float checkpoint weight [N, K] becomes ``weight`` (float8_e4m3fn [N, K]) and
``weight_scale`` (float32 [N, 1], amax of the row / 448). A fused weight (Q/K/V, gate/up) is quantized
row by row, so fusing costs nothing. Run time: on CUDA ``fp8_linear`` (the W8A16 GEMV up to 16 rows,
row-wise ``torch._scaled_mm`` above where the target allows: see ``large_batch_kernel``); on the CPU
``fp8_linear_ref`` (the W8A8 arithmetic in float32), which is how CI runs every FP8 engine.
The embedding and the LM head are not ``Linear``s: they stay in the engine dtype.
"""

from __future__ import annotations

import torch

from kiln.kernels.fp8 import MAX_GEMV_ROWS, fp8_linear, scaled_mm_refusal
from kiln.layers.linear import Linear, LinearMethod
from kiln.quantization.fp8 import FP8_DTYPE, Fp8Linear, fp8_linear_ref, quantize_fp8_weight

# FP8 tensor cores: Ada (sm89) and Hopper (sm90+). Below, no FP8 matmul and no e4m3 conversion in hardware.
MIN_FP8_CAPABILITY = 89


class Fp8LinearMethod(LinearMethod):
    """"fp8": e4m3 weights, a float32 scale per output channel, activations per token (dynamic).

    A pre-quantized checkpoint's weights (an ``Fp8Linear`` from kiln.convert.fp8_checkpoints, Q/K/V fused
    with a scale per row) are stored as they come; a per-tensor scale is repeated per row, which changes
    nothing. Static input scales are not used: activations are always quantized per token (finer)."""

    takes_fp8_weights = True  # convert accepts an Fp8Linear as well as a float weight

    def tensors(self, out_features, in_features, dtype):
        return {"weight": ((out_features, in_features), FP8_DTYPE),
                "weight_scale": ((out_features, 1), torch.float32)}

    def convert(self, weight, dtype):
        if isinstance(weight, Fp8Linear):
            num_rows = weight.weight.shape[0]
            return {"weight": weight.weight, "weight_scale": weight.weight_scale.reshape(-1, 1).expand(num_rows, 1)}
        weight_fp8, weight_scale = quantize_fp8_weight(weight.float(), "channel")
        return {"weight": weight_fp8, "weight_scale": weight_scale}

    def target_refusal(self, target):
        if target == "cpu" or int(target.removeprefix("sm")) >= MIN_FP8_CAPABILITY:
            return None
        gpu = " (the A100)" if target == "sm80" else ""
        return (f"FP8 needs FP8 tensor cores (sm{MIN_FP8_CAPABILITY}+: Ada, Hopper); {target}{gpu} has none: use "
                "int8_wo or int4_wo (weight-only)")

    def kernels(self, target, dtype):
        return large_batch_kernel(target, dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return fp8_linear(x, layer.weight, layer.weight_scale, bias=layer.bias)
        return fp8_linear_ref(x, layer.weight, layer.weight_scale, bias=layer.bias)


def large_batch_kernel(target: str, dtype: torch.dtype) -> str:
    """What an fp8 engine for ``target`` in ``dtype`` multiplies more than MAX_GEMV_ROWS rows with: the
    choice ``fp8_linear`` makes at run time, said at build (kiln inspect prints it). Per-channel weight
    scales with per-token activations take row-wise ``_scaled_mm``, which needs sm90 and a bfloat16
    output; elsewhere (Ada, float16 or float32 engines) the W8A16 GEMV runs every batch size. Shapes not
    multiples of 16 take the GEMV too, layer by layer."""
    if target == "cpu":
        return "fp8_linear_ref (CPU reference: W8A8 arithmetic in float32)"
    if int(target.removeprefix("sm")) < 90:  # not scaled_mm_refusal's advice for Ada: per-tensor scales
        return "the W8A16 GEMV at every batch size (row-wise torch._scaled_mm needs Hopper (sm90+))"
    refusal = scaled_mm_refusal(16, 16, dtype, is_rowwise=True, capability=(9, 0))
    if refusal is None:
        return f"torch._scaled_mm row-wise W8A8 above {MAX_GEMV_ROWS} rows, the W8A16 GEMV below"
    return f"the W8A16 GEMV at every batch size ({refusal})"
