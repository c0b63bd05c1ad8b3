"""FP8 W8A8: e4m3 weights with a float32 scale per output channel (or one per tensor), activations
quantized per token at run time (kiln.quantization.fp8 holds the convention and the reference;
kiln.kernels.fp8 the GPU path, the kernel op ``fp8_linear``).

Build time: each float checkpoint weight [N, K] becomes ``weight`` (float8_e4m3fn [N, K]) and
``weight_scale`` (float32 [N, 1], amax of the row / 448; with ``BuildConfig.fp8_scaling="tensor"`` one
0-d scale, amax of the weight / 448). A fused weight (Q/K/V, gate/up) is quantized row by row, so
fusing costs nothing per channel; per tensor, the fused weight shares one scale. Run time: the kernel op
``fp8_linear``: on a GPU engine the W8A16 GEMV up to 16 rows (at 2-16 rows with the launch config the build
timed for the weight's shape), and row-wise ``torch._scaled_mm`` above where the target allows (see
``large_batch_kernel``); on a CPU engine ``fp8_linear_ref`` (the W8A8 arithmetic in float32), which is how
CI runs every FP8 engine. Which of the two runs is the plan's choice, not the device's: a CPU engine's
reference run on a GPU multiplies in float32 there, as the weight-only methods' references do. Where
``_scaled_mm`` runs, the input comes quantized already (``wants_fp8_input``): the RMSNorm or SiLU·up kernel
before the Linear writes it in e4m3 with its scales (an Fp8Activation), and ``apply`` multiplies it as it
is. The embedding and the LM head are not
``Linear``s: they stay in the engine dtype.
"""

from __future__ import annotations

import torch

from kiln.config import BuildConfig
from kiln.kernels.fp8 import MAX_GEMV_ROWS, fp8_matmul_gpu, scaled_mm_refusal, uses_scaled_mm
from kiln.layers.linear import Linear, LinearMethod
from kiln.quantization.fp8 import (FP8_DTYPE, Fp8Activation, Fp8Linear, fp8_matmul_ref, quantize_fp8_weight,
                                   requantize_fp8_per_tensor)

# FP8 tensor cores: Ada (sm89) and Hopper (sm90+). Below, no FP8 matmul and no e4m3 conversion in hardware.
MIN_FP8_CAPABILITY = 89


class Fp8LinearMethod(LinearMethod):
    """"fp8": e4m3 weights, a float32 scale per output channel (``scaling`` "channel") or one per weight
    ("tensor"), activations per token (dynamic) either way.

    A pre-quantized checkpoint's weights (an ``Fp8Linear`` from kiln.convert.fp8_checkpoints, Q/K/V fused
    with a scale per row) are stored as they come per channel (a per-tensor scale is repeated per row,
    which changes nothing); per tensor, parts with different scales are requantized to the largest (at
    most half an e4m3 step more error: requantize_fp8_per_tensor). Static input scales are not used:
    activations are always quantized per token (finer)."""

    takes_fp8_weights = True  # convert accepts an Fp8Linear as well as a float weight
    takes_fp8_input = True  # apply accepts an Fp8Activation where wants_fp8_input says so
    kernel_ops = ("fp8_linear",)

    def __init__(self, scaling: str = "channel"):
        self.scaling = scaling  # one of BuildConfig's FP8_SCALINGS

    @classmethod
    def from_build(cls, build: BuildConfig) -> "Fp8LinearMethod":
        return cls(build.fp8_scaling or "channel", **cls.group_options(build))

    def tensors(self, out_features, in_features, dtype):
        scale_shape = (out_features, 1) if self.scaling == "channel" else ()
        return {"weight": ((out_features, in_features), FP8_DTYPE), "weight_scale": (scale_shape, torch.float32)}

    def convert(self, weight, dtype):
        if isinstance(weight, Fp8Linear):
            weight_fp8, weight_scale = weight.weight, weight.weight_scale
            if self.scaling == "channel":
                weight_scale = weight_scale.reshape(-1, 1).expand(weight_fp8.shape[0], 1)
            elif weight_scale.dim():
                weight_fp8, weight_scale = requantize_fp8_per_tensor(weight_fp8, weight_scale)
            return {"weight": weight_fp8, "weight_scale": weight_scale}
        weight_fp8, weight_scale = quantize_fp8_weight(weight.float(), self.scaling)
        return {"weight": weight_fp8, "weight_scale": weight_scale}

    def shard(self, weight, shard):
        if not isinstance(weight, Fp8Linear):
            return shard.take(weight)
        scale = weight.weight_scale
        if shard.dim == 0 and scale.ndim:  # a scale per output row goes with its row
            scale = shard.take(scale.reshape(-1, 1))
        # Sliced as bytes: concatenation is not implemented for float8 on every device.
        return weight._replace(weight=shard.take(weight.weight.view(torch.uint8)).view(FP8_DTYPE), weight_scale=scale)

    def target_refusal(self, target):
        if target == "cpu" or int(target.removeprefix("sm")) >= MIN_FP8_CAPABILITY:
            return None
        gpu = " (the A100)" if target == "sm80" else ""
        return (f"FP8 needs FP8 tensor cores (sm{MIN_FP8_CAPABILITY}+: Ada, Hopper); {target}{gpu} has none: use "
                "int8_wo or int4_wo (weight-only)")

    def kernels(self, target, dtype):
        return large_batch_kernel(target, dtype, self.scaling)

    def wants_fp8_input(self, layer, num_rows, device):
        """Where apply's fp8_linear would quantize the rows itself: on CUDA, for _scaled_mm."""
        return device.type == "cuda" and uses_scaled_mm(num_rows, layer.out_features, layer.in_features,
                                                        layer.dtype, device)

    def folds_silu_mul(self, layer, x):
        """Where the fp8_linear op takes the GEMV (on CUDA, up to MAX_GEMV_ROWS rows): its epilogue takes SiLU·up."""
        return (isinstance(x, torch.Tensor) and x.is_cuda
                and not uses_scaled_mm(x.shape[0], layer.out_features, layer.in_features, x.dtype, x.device))

    def apply_silu_mul(self, layer, x):
        return layer.ops.fp8_linear(x, layer.weight, layer.weight_scale, layer.bias, silu_mul=True)

    def apply(self, layer: Linear, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        if isinstance(x, Fp8Activation):  # quantized by the kernel before (wants_fp8_input)
            if x.data.is_cuda:
                return fp8_matmul_gpu(x, layer.weight, layer.weight_scale, layer.bias, layer.dtype)
            return fp8_matmul_ref(x, layer.weight, layer.weight_scale, layer.bias, layer.dtype)
        return layer.ops.fp8_linear(x, layer.weight, layer.weight_scale, layer.bias)


def large_batch_kernel(target: str, dtype: torch.dtype, scaling: str = "channel") -> str:
    """What an fp8 engine for ``target`` in ``dtype`` with ``scaling`` weight scales multiplies more than
    MAX_GEMV_ROWS rows with: the choice ``fp8_linear`` makes at run time, said at build (kiln inspect
    prints it). Activations are quantized per token, so with per-channel and per-tensor weight scales
    alike ``_scaled_mm`` takes its row-wise kernel (a per-tensor weight scale broadcast to a row), which
    needs sm90 and a bfloat16 output; its tensor-wise kernel (Ada too) would need one activation scale
    for the whole batch, which kiln does not use (static input scales are ignored, dynamic ones are per
    token). Elsewhere (Ada, float16 or float32 engines) the W8A16 GEMV runs every batch size. Shapes not
    multiples of 16 take the GEMV too, layer by layer."""
    if target == "cpu":
        return "fp8_linear_ref (CPU reference: W8A8 arithmetic in float32)"
    per_tensor = (", per-tensor weight scales broadcast: activations are per token" if scaling == "tensor" else "")
    if int(target.removeprefix("sm")) < 90:  # not scaled_mm_refusal's per-tensor advice: activations are per token
        return ("the W8A16 GEMV at every batch size (row-wise torch._scaled_mm needs Hopper (sm90+); its "
                "tensor-wise kernel would need one activation scale per batch, and kiln's are per token)")
    refusal = scaled_mm_refusal(16, 16, dtype, is_rowwise=True, capability=(9, 0))
    if refusal is None:
        return f"torch._scaled_mm row-wise W8A8 above {MAX_GEMV_ROWS} rows{per_tensor}, the W8A16 GEMV below"
    return f"the W8A16 GEMV at every batch size ({refusal})"
