"""Weight-only INT8 and INT4 linear methods (W8A16, W4A16): weights stored as integers in the layouts of
``kiln.quantization.weight_only``, activations and outputs in the engine dtype.

* ``int8_wo``: symmetric INT8, one float32 scale per output channel (``quantize_int8``).
* ``int4_wo``: asymmetric INT4 in groups of 128 inputs, a float16 scale and a uint8 zero point per group
  (``quantize_int4``), K padded to whole 128-input blocks (stories260K's down projection: 172 -> 256).
  128 is fixed: BuildConfig has no group-size field; it is the size AutoAWQ and GPTQ use by default.

The matmul: on CUDA tensors the Triton kernels of ``kiln.kernels.weight_only`` (which pick the GEMV or
the tiled path from the number of rows); elsewhere their plain-PyTorch references (dequantize to
float32, matmul in float32, round to x's dtype), which are also the tests' oracle.
"""

from __future__ import annotations

import torch

from kiln.kernels.weight_only import w4a16_matmul_ref, w4a16_matmul_triton, w8a16_matmul_ref, w8a16_matmul_triton
from kiln.layers.linear import LinearMethod
from kiln.quantization.weight_only import INT4_PER_WORD, padded_in_features, quantize_int4, quantize_int8


def _with_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


class Int8WeightOnlyMethod(LinearMethod):
    """qweight int8 [N, K], scales float32 [N]."""

    def tensors(self, out_features, in_features, dtype):
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features,), torch.float32)}

    def convert(self, weight, dtype):
        qweight, scales = quantize_int8(weight, torch.float32)
        return {"qweight": qweight, "scales": scales}

    def apply(self, layer, x):
        matmul = w8a16_matmul_triton if x.is_cuda else w8a16_matmul_ref
        return _with_bias(matmul(x.contiguous(), layer.qweight, layer.scales), layer.bias)


class Int4WeightOnlyMethod(LinearMethod):
    """qweight int32 [N, Kp / 8], scales float16 [N, Kp / 128], zeros uint8 [N, Kp / 128]."""

    group_size = 128

    def tensors(self, out_features, in_features, dtype):
        padded = padded_in_features(in_features, self.group_size)
        groups = (out_features, padded // self.group_size)
        return {"qweight": ((out_features, padded // INT4_PER_WORD), torch.int32),
                "scales": (groups, torch.float16), "zeros": (groups, torch.uint8)}

    def convert(self, weight, dtype):
        qweight, scales, zeros = quantize_int4(weight, self.group_size, torch.float16)
        return {"qweight": qweight, "scales": scales, "zeros": zeros}

    def apply(self, layer, x):
        matmul = w4a16_matmul_triton if x.is_cuda else w4a16_matmul_ref
        out = matmul(x.contiguous(), layer.qweight, layer.scales, layer.zeros, self.group_size)
        return _with_bias(out, layer.bias)


