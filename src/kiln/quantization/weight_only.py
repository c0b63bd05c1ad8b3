"""Weight-only INT8 and INT4 quantization of a linear weight W [N, K] (out x in features; y = x @ W.T).

Kiln's layouts, which the Triton matmuls in ``kiln.kernels.weight_only`` read. The dequantized weight is
always (q - z) * s, computed in float32, where it is exact (q - z is a small integer, s a 16-bit float).

INT8 (W8A16)::

    qweight  int8 [N, K]         q in [-127, 127] from quantize_int8 (-128 only from GPTQ 8-bit checkpoints)
    scales   [N]                 one per output channel (float32 by default: 4 bytes per row is nothing)
             or [N, G]           one per group of ``group_size`` input rows (GPTQ 8-bit checkpoints)
    zeros    None                symmetric (quantize_int8; GPTQ 8-bit with sym)
             or int8 [N, G]      GPTQ 8-bit zero points shifted by -128, as q is

INT4 (W4A16)::

    qweight  int32 [N, Kp / 8]   blocks of 128 inputs in 16 words, one 16-input run per nibble: input
                                 k = 128 * b + 16 * j + i of output channel n is nibble j of word
                                 16 * b + i, (qweight[n, 16 * b + i] >> 4 * j) & 0xF, a value in [0, 15]
    scales   [N, Kp / g]         float16 by default, as AutoAWQ and GPTQ checkpoints store them
    zeros    uint8 [N, Kp / g]   zero points in [0, 15], one byte each (not packed: 1/64 byte per
                                 weight at g = 64, and the kernels load them as they load scales)

    Kp is K rounded up to whole blocks and whole groups (stories260K's down projection has K = 172:
    Kp = 256); group sizes are multiples of 16. The padded inputs hold q = z, so they dequantize to
    exactly 0 (and the kernels also mask x there).

Either may carry ``input_order`` int32 [K] (GPTQ act-order, ``desc_act``): the stored weight's input
rows are the original ones reordered so that each group's rows are contiguous, stored row k being
original row input_order[k]; the matmul reads x[:, input_order[k]] for it. Permuting the previous
layer's outputs instead is not possible everywhere (q/k/v read a norm's output that the residual
stream also carries), and a per-row group index instead would break the contiguous groups the kernels
rely on (one scale per group per tile, loaded once, instead of one per weight).

Why this INT4 layout: output channels are rows, as in the float weight, so a program that owns a
tile of channels reads each one's words contiguously along K (16-byte vector loads of 4 words); no
word spans two channels, so N tiles need no masking inside a word (odd N: 72, 250). Within a block,
shifting all 16 words right by 4 * j yields the 16 consecutive inputs 16 * j .. 16 * j + 15 in word
order, one run of a single group: the kernels take the 8 runs of a block in turn (a shift and a mask
per weight, each run a tl.dot of K = 16 or a row of fused multiply-adds) instead of spreading every
word's 8 nibbles into a tile, which cost layout shuffles: on the H200, 8 nibbles per word in plain
order and an interleave-based unpack streamed batch-1 INT4 at ~0.3 TB/s where INT8 reached ~2.7 TB/s.
AutoAWQ packs along N (8 output channels per word, interleaved); GPTQ packs along K in plain order but
stores W transposed ([K / 8, N]). Zero points stay integers instead of being folded into a float
offset (-z * s) so that dequantization is exact and checkpoints repack losslessly
(``kiln.convert.int_checkpoints``).

Both quantizers round to nearest (ties to even) on a grid whose step is rounded *up* to the scale's
storage dtype, so no weight lies beyond the grid's end and every weight is within half a step of its
dequantized value. INT4 groups always include 0 in their range (as GPTQ's quantizer does), which keeps
z in [0, 15] and makes 0 (the padding, pruned weights) exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT8_MAX = 127
INT4_MAX = 15
INT4_PER_WORD = 8
INT4_RUN = 16  # inputs per nibble run: a word's position in its block; tl.dot's smallest K for 16-bit floats
INT4_BLOCK = INT4_PER_WORD * INT4_RUN  # 128 inputs in 16 words
INT4_GROUP_SIZES = (32, 64, 128)  # the ones AutoAWQ and GPTQ checkpoints use; any multiple of 16 works


def _round_scale_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` (float32, >= 0) in ``dtype``, rounded up where rounding to nearest went down: the next
    representable value is one ulp up, the bit pattern plus one, for positive finite floats."""
    stored = scale.to(dtype)
    if not torch.isfinite(stored).all():
        raise ValueError(f"weights too large for {dtype} scales (largest step {scale.max().item():.3g})")
    int_view = {2: torch.int16, 4: torch.int32}[stored.element_size()]
    next_up = (stored.view(int_view) + 1).view(dtype)
    return torch.where(stored.float() < scale, next_up, stored)


def _per_weight(per_group: torch.Tensor, num_cols: int, group_size: int | None) -> torch.Tensor:
    """[N, G] per-group values -> [N, num_cols] per-weight values; [N] per-channel ones -> [N, 1]."""
    if group_size is None:
        return per_group[:, None]
    return per_group.repeat_interleave(group_size, dim=1)[:, :num_cols]


def _to_input_order(stored: torch.Tensor, input_order: torch.Tensor | None) -> torch.Tensor:
    """Stored input rows (columns of [N, K]) back in the checkpoint's original order."""
    if input_order is None:
        return stored
    weight = torch.empty_like(stored)
    weight[:, input_order.long()] = stored
    return weight


# ---- INT8 -----------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: w [N, K] float -> (qweight int8 [N, K], scales [N])."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {list(w.shape)}")
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scales = _round_scale_up(amax / INT8_MAX, scale_dtype)
    scales = torch.where(amax == 0, torch.ones_like(scales), scales)  # an all-zero row: any step will do
    qweight = torch.round(wf / scales.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return qweight, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                    group_size: int | None = None, input_order: torch.Tensor | None = None) -> torch.Tensor:
    """(q - z) * s in float32, [N, K], input rows in their original order. Per-channel scales [N], or
    per group of ``group_size`` input rows [N, G]."""
    num_cols = qweight.shape[1]
    q = qweight.float()
    if zeros is not None:
        q = q - _per_weight(zeros.float(), num_cols, group_size)
    return _to_input_order(q * _per_weight(scales.float(), num_cols, group_size), input_order)


# ---- INT4 -----------------------------------------------------------------------------------------
def padded_in_features(in_features: int, group_size: int) -> int:
    """K rounded up to whole INT4 blocks (128 inputs) and whole groups."""
    multiple = math.lcm(INT4_BLOCK, group_size)
    return -(-in_features // multiple) * multiple


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in [0, 15], K a multiple of 128 -> int32 [N, K / 8] in kiln's INT4 order."""
    num_rows, num_cols = values.shape
    if num_cols % INT4_BLOCK:
        raise ValueError(f"INT4 packing needs a multiple of {INT4_BLOCK} values per row, got {num_cols}")
    runs = values.to(torch.int64).view(num_rows, -1, INT4_PER_WORD, INT4_RUN)  # [N, blocks, nibble j, word i]
    shifts = 4 * torch.arange(INT4_PER_WORD, device=values.device, dtype=torch.int64)[:, None]
    words = (runs << shifts).sum(dim=2).view(num_rows, -1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same 32 bits


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, W] -> uint8 [N, 8 * W], the inverse of pack_int4."""
    num_rows = qweight.shape[0]
    shifts = 4 * torch.arange(INT4_PER_WORD, device=qweight.device, dtype=torch.int32)[:, None]
    words = qweight.view(num_rows, -1, 1, INT4_RUN)
    return ((words >> shifts) & INT4_MAX).to(torch.uint8).view(num_rows, -1)


def quantize_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise INT4: w [N, K] float -> (qweight int32 [N, Kp / 8], scales [N, Kp / g],
    zeros uint8 [N, Kp / g]); K is padded with zero columns to whole blocks and groups."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {list(w.shape)}")
    if group_size <= 0 or group_size % INT4_RUN:
        raise ValueError(f"INT4 group size must be a positive multiple of {INT4_RUN} "
                         f"(checkpoints use {', '.join(map(str, INT4_GROUP_SIZES))}), got {group_size}")
    num_rows, in_features = w.shape
    padded = padded_in_features(in_features, group_size)
    groups = F.pad(w.float(), (0, padded - in_features)).view(num_rows, -1, group_size)
    low = groups.amin(dim=-1).clamp(max=0.0)
    high = groups.amax(dim=-1).clamp(min=0.0)
    scales = _round_scale_up((high - low) / INT4_MAX, scale_dtype)
    scales = torch.where(high == low, torch.ones_like(scales), scales)  # an all-zero group
    step = scales.float()
    zeros = torch.round(-low / step).clamp(0, INT4_MAX)
    values = (torch.round(groups / step[..., None]) + zeros[..., None]).clamp(0, INT4_MAX)
    return pack_int4(values.view(num_rows, padded)), scales, zeros.to(torch.uint8)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    in_features: int | None = None, input_order: torch.Tensor | None = None) -> torch.Tensor:
    """(q - z) * s in float32, [N, in_features] (default: all Kp rows, padding included), input rows in
    their original order."""
    values = unpack_int4(qweight)[:, :in_features].float()
    num_cols = values.shape[1]
    weight = (values - _per_weight(zeros.float(), num_cols, group_size)) * _per_weight(scales.float(), num_cols,
                                                                                          group_size)
    return _to_input_order(weight, input_order)


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear's weight in kiln's INT8 or INT4 layout (see the module docstring), as a checkpoint
    reader or a quantizer hands it to a linear method."""

    bits: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int | None  # None: one scale per output channel (INT8 only)
    in_features: int
    input_order: torch.Tensor | None = None

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"weight-only bits must be 4 or 8, got {self.bits}")
        if self.bits == 4 and (self.zeros is None or self.group_size is None):
            raise ValueError("INT4 weights need zero points and a group size")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K]."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, self.zeros, self.group_size, self.input_order)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, self.in_features,
                               self.input_order)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store, by name (zeros and input_order only where present)."""
        named = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros,
                 "input_order": self.input_order}
        return {name: tensor for name, tensor in named.items() if tensor is not None}


# ---- AWQ ------------------------------------------------------------------------------------------
def awq_scales(w: torch.Tensor, activations: torch.Tensor, group_size: int = 128, grid: int = 20,
               scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """AWQ's activation-aware per-input-channel scales s [K] (float32) for INT4 group quantization.

    ``w`` [N, K] is the weight of every linear that reads the same input, concatenated along N (q, k and
    v; gate and up), since they share the scales; ``activations`` [..., K] are calibration inputs to it.
    As in the AWQ paper (Lin et al., 2023, section 3.2): s = mean|x|^alpha per input channel, normalized
    by sqrt(max(s) * min(s)), with alpha on the grid 0, 1/grid, ..., (grid - 1)/grid chosen to minimise
    the mean squared error of x @ (Q(w * s) / s).T against x @ w.T. alpha = 0 is s = 1, plain
    round-to-nearest, so the result is never worse than RTN on the calibration set.

    The caller then quantizes w * s (quantize_int4) and folds 1 / s into the op that produces x, so the
    network computes the same function: for the attention and MLP input projections, the preceding
    RMSNorm's weight (norm.weight / s); for o_proj, the rows of v_proj (its output feeds o_proj linearly,
    per head); for down_proj, the rows of up_proj (silu(gate) * up is linear in up). An input that no
    op can absorb (a residual stream read directly) cannot take AWQ scales: use s = 1 there.
    """
    num_cols = w.shape[1]
    x = activations.reshape(-1, num_cols).float()
    wf = w.float()
    reference = x @ wf.T
    mean_abs = x.abs().mean(dim=0)
    best_scales, best_error = None, float("inf")
    for step in range(grid):
        scales = mean_abs.pow(step / grid).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        quantized = quantize_int4(wf * scales, group_size, scale_dtype)
        dequantized = dequantize_int4(*quantized, group_size, num_cols) / scales
        error = (x @ dequantized.T - reference).pow(2).mean().item()
        if error < best_error:
            best_scales, best_error = scales, error
    return best_scales
