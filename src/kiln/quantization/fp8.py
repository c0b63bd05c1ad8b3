"""FP8 (e4m3) quantization and the plain-PyTorch reference of the FP8 linear layer.

Convention, for weights and activations alike: a scale is float32, it multiplies
(``w ≈ w_fp8.float() * scale``) and it broadcasts against the tensor it scales:

- per tensor: a 0-d tensor;
- per output channel of a weight [N, K]: [N, 1] (also what a fused QKV / gate-up weight with a
  different scale per part carries, one row per output channel);
- per token of activations [T, K]: [T, 1] (an ``Fp8Activation``: what a kernel before an FP8 matmul writes
  when it quantizes in its epilogue, kiln.kernels.norm / activation).

A scale is amax / 448 (448 is e4m3's largest finite value), so the largest magnitude maps to ±448;
an amax of 0 (an all-zero row) is raised to MIN_AMAX first.
Values are clamped to ±448 before the cast: the cast saturates on the GPU (cvt.rn.satfinite) but is not
promised to elsewhere, and a static activation scale can be exceeded at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kiln.config import FP8_SCALINGS

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# The amax floor: an all-zero row (a padded token, a pruned channel) gets a finite, nonzero scale and
# quantizes to zeros instead of 0 / 0. Far below any real amax; 1e-12 / 448 is still a normal float32,
# so no GPU flush-to-zero turns the scale into 0.
MIN_AMAX = 1e-12



class Fp8Linear(NamedTuple):
    """The tensors of one FP8 linear layer, in kiln's convention."""
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    weight_scale: torch.Tensor  # float32, 0-d or [N, 1]
    input_scale: torch.Tensor | None  # float32 0-d (static activation scale), None: quantized per token at run time


class Fp8Activation(NamedTuple):
    """Activations quantized per token: ``quantize_fp8_per_token``'s result, and what the norm or SiLU·up
    before an FP8 Linear hands it where that Linear's method wants its input so (``wants_fp8_input``)."""
    data: torch.Tensor  # float8_e4m3fn [..., K]
    scale: torch.Tensor  # float32 [..., 1], one per token (0-d for a static scale)


# Scales are computed as amax * fl(1 / 448): torch divides by a Python number as a multiplication by its
# reciprocal on the GPU but not on the CPU, so "amax / 448" would round differently across devices and
# against the Triton kernel. Multiplying by this float32 constant is one rounding, the same everywhere.
FP8_MAX_INV = 1.0 / FP8_MAX


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp(min=MIN_AMAX) * FP8_MAX_INV


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, clamped to ±448, rounded to nearest e4m3; ``scale`` broadcasts against ``x``."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x_fp8.float() * scale).to(dtype)


def quantize_fp8_weight(w: torch.Tensor, scaling: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] -> (w_fp8 [N, K], scale): [N, 1] per output channel, 0-d per tensor."""
    if scaling not in FP8_SCALINGS:
        raise ValueError(f"unknown FP8 weight scaling {scaling!r}; known: {', '.join(FP8_SCALINGS)}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    amax = w.abs().amax(dim=1, keepdim=True) if scaling == "channel" else w.abs().amax()
    scale = _scale_from_amax(amax)
    return quantize_fp8_static(w, scale), scale


def quantize_fp8_per_token(x: torch.Tensor) -> Fp8Activation:
    """Dynamic activation quantization: x [..., K] -> (x_fp8 [..., K], scale [..., 1]), one scale per token."""
    scale = _scale_from_amax(x.abs().amax(dim=-1, keepdim=True))
    return Fp8Activation(quantize_fp8_static(x, scale), scale)


def _row_scale(w_scale: torch.Tensor) -> torch.Tensor:
    """A weight scale ([N, 1] or 0-d) as it broadcasts against the [T, N] output."""
    return w_scale.reshape(1, -1) if w_scale.dim() else w_scale


def fp8_linear_ref(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: y = x @ w.T + bias, with x quantized to e4m3 per token (``x_scale`` None, dynamic) or with the
    checkpoint's static per-tensor ``x_scale``; the fp8 products are summed in float32 and scaled after,
    as ``torch._scaled_mm`` does. x: [..., K], w_fp8: [N, K]; returns [..., N] in x's dtype."""
    x_fp8 = quantize_fp8_per_token(x) if x_scale is None else Fp8Activation(quantize_fp8_static(x, x_scale), x_scale)
    return fp8_matmul_ref(x_fp8, w_fp8, w_scale, bias, x.dtype)


def fp8_matmul_ref(x: Fp8Activation, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_linear_ref's product of activations already quantized: [..., K] e4m3 with their scales, times
    w_fp8 [N, K]; returns [..., N] in ``out_dtype``."""
    y = (x.data.float() @ w_fp8.float().t()) * x.scale * _row_scale(w_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_w8a16_linear_ref(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16 (the batch-1 GEMV's arithmetic): y = x @ dequantize(w).T + bias, activations unquantized,
    summed in float32. x: [..., K], w_fp8: [N, K]; returns [..., N] in x's dtype."""
    y = (x.float() @ w_fp8.float().t()) * _row_scale(w_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fuse_fp8_linears(parts: Sequence[Fp8Linear]) -> Fp8Linear:
    """One linear layer of parts that share their input (q, k, v; gate, up), their outputs concatenated.

    The fp8 weights are concatenated as they are and each part's scale becomes the scale of its rows: an
    [N, 1] vector, unless every part has the same per-tensor scale (then 0-d). Nothing is requantized, so
    the fused layer dequantizes to exactly the parts' dequantized weights; kiln's FP8 matmuls (row-wise
    ``_scaled_mm``, the GEMV) take a scale per output column at no cost. Only a per-tensor kernel (Ada's
    tensor-wise ``_scaled_mm``) needs one scale: requantize_fp8_per_tensor, at a rounding's cost.

    Static input scales: the shared input is quantized once, with the largest of the parts' scales, so
    no part clips activations its calibration saw (ModelOpt's export unifies them the same way)."""
    if len({p.weight.shape[1] for p in parts}) != 1:
        raise ValueError(f"fused parts must share in_features, got weights {[tuple(p.weight.shape) for p in parts]}")
    weight = torch.cat([p.weight for p in parts])
    scales = [p.weight_scale for p in parts]
    if all(s.dim() == 0 for s in scales) and all(torch.equal(s, scales[0]) for s in scales):
        weight_scale = scales[0]
    else:
        weight_scale = torch.cat([s.reshape(-1, 1).expand(p.weight.shape[0], 1) for s, p in zip(scales, parts)])
    input_scales = [p.input_scale for p in parts]
    if all(s is None for s in input_scales):
        input_scale = None
    elif any(s is None for s in input_scales):
        raise ValueError("fused parts mix static and dynamic activation scales")
    else:
        input_scale = torch.stack(input_scales).amax()
    return Fp8Linear(weight, weight_scale.float().contiguous(), input_scale)


def requantize_fp8_per_tensor(w_fp8: torch.Tensor, w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a scale per row ([N, 1]) -> the same weight with one scale, the largest: rows that had
    it keep their bytes; the others are rounded again on the coarser grid (at most half its step of
    added error). For per-tensor kernels only: see fuse_fp8_linears."""
    scale = w_scale.amax()
    return quantize_fp8_static(w_fp8.float() * w_scale, scale), scale
