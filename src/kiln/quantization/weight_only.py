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

from kiln.config import GROUP_SIZES
from kiln.errors import CheckpointError

INT8_MAX = 127
INT4_MAX = 15
INT4_PER_WORD = 8
INT4_RUN = 16  # inputs per nibble run: a word's position in its block; tl.dot's smallest K for 16-bit floats
INT4_BLOCK = INT4_PER_WORD * INT4_RUN  # 128 inputs in 16 words


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
                         f"(checkpoints use {', '.join(map(str, GROUP_SIZES))}), got {group_size}")
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
    """One linear's weight in kiln's INT8 or INT4 layout (see the module docstring), as a linear method
    stores it."""

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


@dataclass(frozen=True)
class UnpackedWeight:
    """A pre-quantized checkpoint's weight (AutoAWQ, GPTQ: ``kiln.convert.int_checkpoints`` reads them) as
    plain integers in W's orientation [N, K]: w = (q - z) * s, per output channel and checkpoint group.
    ``to_int4`` / ``to_int8`` repack it, losslessly, into kiln's layouts at the engine's group size."""

    bits: int
    values: torch.Tensor  # int16 [N, K], q in [0, 2**bits)
    zeros: torch.Tensor  # int16 [N, G], z in [0, 2**bits)
    scales: torch.Tensor  # [N, G], the checkpoint's dtype
    group_index: torch.Tensor  # int64 [K], the checkpoint group of each input row

    @property
    def in_features(self) -> int:
        return self.values.shape[1]

    @property
    def is_act_order(self) -> bool:
        """Whether the checkpoint's groups are not runs of consecutive inputs (GPTQ desc_act)."""
        return bool((self.group_index[1:] < self.group_index[:-1]).any())

    def dequantize(self) -> torch.Tensor:
        """(q - z) * s in float32, [N, K]."""
        rows = self.group_index
        return (self.values.float() - self.zeros[:, rows].float()) * self.scales[:, rows].float()

    def _regrouped(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values with the input rows sorted by checkpoint group, zero points and scales per run of
        ``group_size`` sorted rows, the order or None where it is the identity). Each run must lie in one
        checkpoint group: a checkpoint group of a multiple of ``group_size`` rows (or one spanning all
        inputs) becomes several runs with its scale and zero point repeated, which changes nothing."""
        order = torch.sort(self.group_index, stable=True).indices
        sorted_groups = self.group_index[order]
        run_groups = sorted_groups[::group_size]  # the checkpoint group of each run's first row
        if not torch.equal(run_groups.repeat_interleave(group_size)[:self.in_features], sorted_groups):
            raise CheckpointError(f"the checkpoint's groups (g_idx) do not split into runs of {group_size} inputs "
                                  f"sharing a scale; build with the checkpoint's own group size")
        is_identity = torch.equal(order, torch.arange(self.in_features, device=order.device))
        values = self.values if is_identity else self.values[:, order]
        return (values, self.zeros[:, run_groups], self.scales[:, run_groups],
                None if is_identity else order.to(torch.int32))

    def to_int4(self, group_size: int) -> QuantizedWeight:
        """kiln's INT4 layout in groups of ``group_size``: K padded with q = z (dequantizes to 0), scales
        float16 (as the checkpoints store them), the act-order permutation as ``input_order``."""
        if self.bits != 4:
            raise CheckpointError(f"a {self.bits}-bit checkpoint weight cannot be stored as INT4")
        values, zeros, scales, input_order = self._regrouped(group_size)
        num_groups = padded_in_features(self.in_features, group_size) // group_size
        zeros = F.pad(zeros, (0, num_groups - zeros.shape[1]))
        scales = F.pad(scales.to(torch.float16), (0, num_groups - scales.shape[1]), value=1.0)
        padding = zeros.repeat_interleave(group_size, dim=1)[:, self.in_features:]
        qweight = pack_int4(torch.cat([values, padding], dim=1))
        return QuantizedWeight(4, qweight, scales.contiguous(), zeros.to(torch.uint8).contiguous(), group_size,
                               self.in_features, input_order)

    def to_int8(self, group_size: int | None) -> QuantizedWeight:
        """kiln's INT8 layout: q - 128 as int8; in groups of ``group_size`` with float16 scales and int8
        zero points z - 128, or (None) per output channel with float32 scales and no zero points, which
        only a symmetric checkpoint with one group per channel fits."""
        if self.bits != 8:
            raise CheckpointError(f"a {self.bits}-bit checkpoint weight cannot be stored as INT8")
        if group_size is not None:
            values, zeros, scales, input_order = self._regrouped(group_size)
            return QuantizedWeight(8, (values - 128).to(torch.int8), scales.to(torch.float16).contiguous(),
                                   (zeros - 128).to(torch.int8).contiguous(), group_size, self.in_features,
                                   input_order)
        if self.scales.shape[1] != 1 or not bool((self.zeros == 128).all()):
            raise CheckpointError("per-channel INT8 needs a symmetric checkpoint with one group per output channel")
        return QuantizedWeight(8, (self.values - 128).to(torch.int8), self.scales[:, 0].float().contiguous(), None,
                               None, self.in_features)


def fuse_unpacked(parts: list[UnpackedWeight]) -> UnpackedWeight:
    """Checkpoint weights that read the same input (Q/K/V, gate/up), concatenated along N: they must share
    their groups (GPTQ quantizes them from the same inputs, so act-order gives them one permutation)."""
    first = parts[0]
    if any(p.bits != first.bits or not torch.equal(p.group_index, first.group_index) for p in parts[1:]):
        raise CheckpointError("weights fused into one layer (Q/K/V, gate/up) have different bits or groups "
                              "(g_idx) in the checkpoint; kiln stores them as one matrix and cannot")
    return UnpackedWeight(first.bits, *(torch.cat([getattr(p, name) for p in parts])
                                        for name in ("values", "zeros", "scales")), first.group_index)


@dataclass(frozen=True)
class ActivationScaledWeight:
    """A float weight [N, K] with AWQ's per-input-channel scales s [K] (``awq_scales``): the int4_awq
    method stores Q(weight * s) and multiplies its input by 1 / s. s has the K dim, so a row-parallel
    shard of the weight takes the same slice of it."""

    weight: torch.Tensor
    input_scales: torch.Tensor
    clip: torch.Tensor | None = None  # [N, groups]: bounds on |weight * s| per group (``awq_clip``)


# ---- AWQ ------------------------------------------------------------------------------------------
def clip_groups(w: torch.Tensor, clip: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] with each group's weights clamped to [-clip, clip], clip [N, ceil(K / group_size)]."""
    bound = clip.float().repeat_interleave(group_size, dim=1)[:, :w.shape[1]]
    return torch.maximum(torch.minimum(w.float(), bound), -bound)


def awq_clip(w: torch.Tensor, activations: torch.Tensor, group_size: int = 128, grid: int = 20,
             max_shrink: float = 0.5, num_tokens: int = 512, rows_per_step: int = 1024,
             scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """AWQ's weight clipping (AutoAWQ's auto_clip): per output channel and group, the bound
    clip = r * max|w| with r on the grid 1, 1 - 1/grid, ..., max_shrink that minimises the mean squared
    error of that group's part of the output, x_g @ (Q(clamp(w_g)) - w_g).T, on ``num_tokens`` of the
    calibration inputs. r = 1 changes nothing, so no group is made worse on them. Returns clip
    [N, ceil(K / group_size)] (float32)."""
    num_rows, num_cols = w.shape
    x = activations.reshape(-1, num_cols).float()
    x = x[torch.linspace(0, x.shape[0] - 1, min(num_tokens, x.shape[0]), device=x.device).long()]
    padded = padded_in_features(num_cols, group_size)
    x_groups = F.pad(x, (0, padded - num_cols)).view(x.shape[0], -1, group_size)  # [T, G, g]
    clips = []
    for start in range(0, num_rows, rows_per_step):
        part = w[start:start + rows_per_step].float()
        max_abs = F.pad(part.abs(), (0, padded - num_cols)).view(part.shape[0], -1, group_size).amax(dim=-1)
        best_clip, best_error = max_abs, None
        for step in range(int(round(grid * (1 - max_shrink))) + 1):
            clip = max_abs * (1 - step / grid)
            clipped = clip_groups(part, clip, group_size)
            quantized = quantize_int4(clipped, group_size, scale_dtype)
            diff = F.pad(dequantize_int4(*quantized, group_size, num_cols) - part, (0, padded - num_cols))
            error = torch.einsum("tgk,ngk->tng", x_groups, diff.view(part.shape[0], -1, group_size)).pow(2).mean(0)
            if best_error is None:
                best_error = error
            else:
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                best_clip = torch.where(better, clip, best_clip)
        clips.append(best_clip)
    return torch.cat(clips)[:, :-(-num_cols // group_size)]


def awq_scales(w: torch.Tensor, activations: torch.Tensor, group_size: int = 128, grid: int = 20,
               scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """AWQ's activation-aware per-input-channel scales s [K] (float32) for INT4 group quantization.

    ``w`` [N, K] is the weight of every linear that reads the same input, concatenated along N (q, k and
    v; gate and up), since they share the scales; ``activations`` [..., K] are calibration inputs to it.
    As AutoAWQ does by default ("duo scaling", a refinement of the paper's s = mean|x|^alpha: Lin et al.,
    2023, section 3.2): s = mean|x|^alpha / mean|w'|^(1 - alpha) per input channel, w' each weight over
    its group's largest magnitude, normalized by sqrt(max(s) * min(s)), with alpha on the grid 0, 1/grid,
    ..., (grid - 1)/grid, and s = 1 (plain round to nearest) as a candidate too; the one that minimises
    the mean squared error of x @ (Q(w * s) / s).T against x @ w.T wins, so the result is never worse
    than round to nearest on the calibration inputs. (On stories260K, duo scaling beats mean|x|^alpha
    alone on the perplexity of held-out text; see tests/test_weight_only_methods.py.)

    The int4_awq linear method (``kiln.layers.weight_only``) then stores Q(w * s) and multiplies its input
    by 1 / s (``pre_quant_scale``, TensorRT-LLM's name), so the network computes the same function with
    no other layer changed; folding 1 / s into the op that produces x (a norm, v_proj, up_proj) would
    save that multiply where such an op exists.
    """
    num_cols = w.shape[1]
    x = activations.reshape(-1, num_cols).float()
    wf = w.float()
    reference = x @ wf.T
    mean_abs = x.abs().mean(dim=0)
    padded = padded_in_features(num_cols, group_size)
    groups = F.pad(wf.abs(), (0, padded - num_cols)).view(wf.shape[0], -1, group_size)
    w_mean = (groups / (groups.amax(dim=-1, keepdim=True) + 1e-6)).view(wf.shape[0], -1)[:, :num_cols].mean(dim=0)
    candidates = [torch.ones_like(mean_abs)]
    for step in range(grid):
        alpha = step / grid
        scales = (mean_abs.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        candidates.append(scales / (scales.max() * scales.min()).sqrt())
    best_scales, best_error = None, float("inf")
    for scales in candidates:
        quantized = quantize_int4(wf * scales, group_size, scale_dtype)
        dequantized = dequantize_int4(*quantized, group_size, num_cols) / scales
        error = (x @ dequantized.T - reference).pow(2).mean().item()
        if error < best_error:
            best_scales, best_error = scales, error
    return best_scales
