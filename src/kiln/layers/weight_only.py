"""Weight-only INT8 and INT4 linear methods (W8A16, W4A16): weights stored as integers in the layouts of
``kiln.quantization.weight_only``, activations and outputs in the engine dtype.

* ``int8_wo``: symmetric INT8, one float32 scale per output channel (``quantize_int8``).
* ``int4_wo``: asymmetric INT4 in groups of ``group_size`` inputs (``BuildConfig.group_size``: 32, 64 or
  128, default 128), a float16 scale and a uint8 zero point per group (``quantize_int4``), K padded to
  whole 128-input blocks (stories260K's down projection: 172 -> 256).
* ``int4_awq``: int4_wo of the weight times AWQ's per-input-channel scales s (searched on calibration
  activations at build: ``kiln.convert.calibration``), and ``pre_quant_scale`` = 1 / s [K], which
  multiplies the input first.
* ``int4_gptq`` / ``int8_gptq``: what GPTQ checkpoints hold beyond int4_wo / int8_wo: the act-order
  input permutation ``input_order`` [K], and for 8 bits, scales and zero points per group.

AutoAWQ and GPTQ checkpoints (``kiln.convert.int_checkpoints``) come as an ``UnpackedWeight``, repacked
without loss (``takes_int_weights``); float checkpoints are quantized by rounding to nearest. The
matmul is the kernel op ``weight_only_linear``: on GPUs the Triton kernels of ``kiln.kernels.weight_only``
(which pick the GEMV or the tiled path from the number of rows, with the launch configs the build timed
for the weight's shape, and from DEQUANT_MIN_ROWS rows dequantize the weight into a scratch that cuBLAS
multiplies: ``workspace_bytes`` tells the memory plan its size); on the CPU their plain-PyTorch references
(dequantize to float32, matmul in float32, round to x's dtype), which are also the tests' oracle.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from kiln.config import GROUP_SIZES
from kiln.errors import CheckpointError
from kiln.kernels.weight_only import dequantize_min_rows, dequantize_workspace_bytes
from kiln.layers.linear import LinearMethod
from kiln.quantization.weight_only import (INT4_PER_WORD, ActivationScaledWeight, UnpackedWeight, clip_groups,
                                           padded_in_features, quantize_int4, quantize_int8)

DEFAULT_GROUP_SIZE = 128  # what AutoAWQ and GPTQ checkpoints use by default


class WeightOnlyMethod(LinearMethod):
    """What the INT8 / INT4 methods share: the matmul through ``weight_only_linear``, whose arguments after
    x each method names (``operands``)."""

    kernel_ops = ("weight_only_linear",)

    @abstractmethod
    def operands(self, tensors) -> tuple:
        """weight_only_linear's arguments after x (bits, qweight, scales, zeros, group size, input order),
        from the stored tensors: attributes of ``tensors`` (the layer, or the build's timing inputs)."""

    def apply(self, layer, x):
        out = layer.ops.weight_only_linear(x.contiguous(), *self.operands(layer))
        return out if layer.bias is None else out + layer.bias


def _identity_order(in_features: int, device: torch.device) -> torch.Tensor:
    return torch.arange(in_features, dtype=torch.int32, device=device)


def _kernels(bits: int, target: str) -> str | None:
    """What the matmuls of kiln.kernels.weight_only run on a GPU, by batch size."""
    if target == "cpu":
        return None
    min_rows = dequantize_min_rows(None, bits)
    return (f"W{bits}A16 Triton: GEMV for 1 row, tensor-core tiles up to {min_rows - 1} rows; from {min_rows} rows "
            "the weight dequantized into a scratch, then cuBLAS")


class Int8WeightOnlyMethod(WeightOnlyMethod):
    """qweight int8 [N, K], scales float32 [N]."""

    takes_int_weights = True  # a symmetric GPTQ 8-bit checkpoint with one group per channel, no act-order

    def tensors(self, out_features, in_features, dtype):
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features,), torch.float32)}

    def convert(self, weight, dtype):
        if isinstance(weight, UnpackedWeight):
            quantized = weight.to_int8(None)
            return {"qweight": quantized.qweight, "scales": quantized.scales}
        qweight, scales = quantize_int8(weight, torch.float32)
        return {"qweight": qweight, "scales": scales}

    def kernels(self, target, dtype):
        return _kernels(8, target)

    def workspace_bytes(self, out_features, in_features, dtype, max_rows):
        return dequantize_workspace_bytes(8, out_features, in_features, dtype, max_rows)

    def operands(self, tensors) -> tuple:
        return 8, tensors.qweight, tensors.scales, None, None, None


class Int8GptqMethod(WeightOnlyMethod):
    """GPTQ 8-bit: qweight int8 [N, K] (q - 128), scales float16 and zeros int8 (z - 128) [N, ceil(K / g)],
    input_order int32 [K] (the identity without act-order). A float weight is quantized per channel
    (int8_wo's rounding), its scale repeated over the groups with zero points 0."""

    takes_int_weights = True
    group_sizes = GROUP_SIZES
    default_group_size = DEFAULT_GROUP_SIZE

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE):
        self.group_size = group_size

    def tensors(self, out_features, in_features, dtype):
        groups = (out_features, -(-in_features // self.group_size))
        return {"qweight": ((out_features, in_features), torch.int8), "scales": (groups, torch.float16),
                "zeros": (groups, torch.int8), "input_order": ((in_features,), torch.int32)}

    def convert(self, weight, dtype):
        if isinstance(weight, UnpackedWeight):
            quantized = weight.to_int8(self.group_size)
            qweight, scales, zeros, input_order = (quantized.qweight, quantized.scales, quantized.zeros,
                                                   quantized.input_order)
        else:
            qweight, per_channel = quantize_int8(weight, torch.float16)
            num_groups = -(-weight.shape[1] // self.group_size)
            scales = per_channel[:, None].expand(-1, num_groups).contiguous()
            zeros, input_order = torch.zeros(scales.shape, dtype=torch.int8, device=qweight.device), None
        if input_order is None:
            input_order = _identity_order(qweight.shape[1], qweight.device)
        return {"qweight": qweight, "scales": scales, "zeros": zeros, "input_order": input_order}

    def kernels(self, target, dtype):
        return _kernels(8, target)

    def workspace_bytes(self, out_features, in_features, dtype, max_rows):
        return dequantize_workspace_bytes(8, out_features, in_features, dtype, max_rows, has_input_order=True)

    def operands(self, tensors) -> tuple:
        return 8, tensors.qweight, tensors.scales, tensors.zeros, self.group_size, tensors.input_order


class Int4WeightOnlyMethod(WeightOnlyMethod):
    """qweight int32 [N, Kp / 8], scales float16 [N, Kp / g], zeros uint8 [N, Kp / g]."""

    takes_int_weights = True  # AutoAWQ GEMM and GPTQ 4-bit (without act-order) checkpoints
    group_sizes = GROUP_SIZES
    default_group_size = DEFAULT_GROUP_SIZE

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE):
        self.group_size = group_size

    def tensors(self, out_features, in_features, dtype):
        padded = padded_in_features(in_features, self.group_size)
        groups = (out_features, padded // self.group_size)
        return {"qweight": ((out_features, padded // INT4_PER_WORD), torch.int32),
                "scales": (groups, torch.float16), "zeros": (groups, torch.uint8)}

    def convert(self, weight, dtype):
        if isinstance(weight, UnpackedWeight):
            quantized = weight.to_int4(self.group_size)
            if quantized.input_order is not None:
                raise CheckpointError("this weight's checkpoint groups are in act-order (GPTQ desc_act), which "
                                      "int4_wo cannot store; build it as int4_gptq")
            return {"qweight": quantized.qweight, "scales": quantized.scales, "zeros": quantized.zeros}
        qweight, scales, zeros = quantize_int4(weight, self.group_size, torch.float16)
        return {"qweight": qweight, "scales": scales, "zeros": zeros}

    def kernels(self, target, dtype):
        return _kernels(4, target)

    def workspace_bytes(self, out_features, in_features, dtype, max_rows):
        return dequantize_workspace_bytes(4, out_features, in_features, dtype, max_rows)

    def operands(self, tensors) -> tuple:
        return 4, tensors.qweight, tensors.scales, tensors.zeros, self.group_size, None


class Int4GptqMethod(Int4WeightOnlyMethod):
    """int4_wo plus input_order int32 [K]: GPTQ act-order (desc_act) checkpoints, whose groups are not
    runs of consecutive inputs; the kernels read x through the permutation."""

    def tensors(self, out_features, in_features, dtype):
        return {**super().tensors(out_features, in_features, dtype), "input_order": ((in_features,), torch.int32)}

    def convert(self, weight, dtype):
        if isinstance(weight, UnpackedWeight):
            quantized = weight.to_int4(self.group_size)
            stored = {"qweight": quantized.qweight, "scales": quantized.scales, "zeros": quantized.zeros}
            input_order = quantized.input_order
        else:
            stored, input_order = super().convert(weight, dtype), None
        if input_order is None:
            input_order = _identity_order(weight.in_features if isinstance(weight, UnpackedWeight)
                                          else weight.shape[1], stored["qweight"].device)
        return {**stored, "input_order": input_order}

    def workspace_bytes(self, out_features, in_features, dtype, max_rows):
        return dequantize_workspace_bytes(4, out_features, in_features, dtype, max_rows, has_input_order=True)

    def operands(self, tensors) -> tuple:
        return 4, tensors.qweight, tensors.scales, tensors.zeros, self.group_size, tensors.input_order


class Int4AwqMethod(Int4WeightOnlyMethod):
    """int4_wo of W * s plus pre_quant_scale [K] = 1 / s in the engine dtype (AWQ, activation-aware): the
    input is multiplied by it before the matmul, so y = (x / s) @ Q(W * s).T ~ x @ W.T. A weight with no
    scales (dummy weights) takes s = 1: round to nearest."""

    takes_int_weights = False  # an AutoAWQ checkpoint's scales are folded into its weights: int4_wo stores it

    def tensors(self, out_features, in_features, dtype):
        return {**super().tensors(out_features, in_features, dtype), "pre_quant_scale": ((in_features,), dtype)}

    def convert(self, weight, dtype):
        clip = None
        if isinstance(weight, ActivationScaledWeight):
            weight, input_scales, clip = weight.weight, weight.input_scales.float(), weight.clip
        else:
            input_scales = torch.ones(weight.shape[1], device=weight.device)
        scaled = weight.float() * input_scales
        stored = super().convert(scaled if clip is None else clip_groups(scaled, clip, self.group_size), dtype)
        return {**stored, "pre_quant_scale": (1.0 / input_scales).to(dtype)}

    def apply(self, layer, x):
        return super().apply(layer, x * layer.pre_quant_scale)
