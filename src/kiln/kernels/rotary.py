"""Rotary position embedding (default, linear and llama3 variants) fused with the paged KV write.

HF conventions, so kiln stores weights exactly as the checkpoint has them: by default the two halves of
the rotated dims are rotated against each other ("rotate_half", Llama); interleaved, adjacent pairs
(0, 1), (2, 3), ... are, pair j at frequency j (GPT-J's "rotate_every_two"). With partial rotary only
each head's first rotary_dim dims are rotated (rotary_dim = the cos/sin table's width); the rest pass
through unchanged.

An FP8 KV cache (float8_e4m3fn) stores k / k_scale and v / v_scale, clamped to ±448 and rounded to
nearest even (kiln.quantization.fp8's convention); ``kv_scale`` [2] float32 holds the layer's (k_scale,
v_scale). The rotated key is rounded to the engine dtype first, so the bytes stored are exactly those
of quantizing what a 16-bit cache would hold.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kiln.kernels.triton_jit import jit, next_power_of_2, pdl_launch, tl, wait_for_producer
from kiln.config import RopeConfig
from kiln.quantization.fp8 import FP8_DTYPE, FP8_MAX, quantize_fp8_static


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(rope: RopeConfig, rotary_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, rotary_dim] float32: cos of each frequency in the first half, sin in the second.
    rotary_dim is head_dim, or fewer dims for partial rotary (GPT-J's rotary_dim)."""
    inv_freq = rope_inv_freq(rope, rotary_dim)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope_ref(x: torch.Tensor, cos_sin: torch.Tensor, is_interleaved: bool = False) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos_sin: [T, rotary_dim] (already gathered by position), rotary_dim <= head_dim."""
    rotary_dim = cos_sin.shape[-1]
    half = rotary_dim // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    x_rot = x[..., :rotary_dim].float()
    x1, x2 = (x_rot[..., 0::2], x_rot[..., 1::2]) if is_interleaved else (x_rot[..., :half], x_rot[..., half:])
    out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.stack([out1, out2], dim=-1).flatten(-2) if is_interleaved else torch.cat([out1, out2], dim=-1)
    if rotary_dim == x.shape[-1]:
        return rotated.to(x.dtype)
    return torch.cat([rotated.to(x.dtype), x[..., rotary_dim:]], dim=-1)


def rotary_kv_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, is_interleaved: bool = False,
                        kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotates q and k; writes rotated k and v into the paged cache at slot_mapping; returns rotated q.

    q: [T, Hq, D], k / v: [T, Hkv, D], cos_sin_cache: [max_positions, rotary_dim] (rope_cos_sin; the dims
    of each head beyond rotary_dim are not rotated), k_cache / v_cache: [num_blocks, block_size, Hkv, D],
    slot_mapping: [T] flat slot (block * block_size + offset); a negative slot writes nothing (padding).
    is_interleaved rotates adjacent pairs (GPT-J) instead of the two halves of the rotated dims. An FP8
    cache (float8_e4m3fn) takes k and v quantized with ``kv_scale`` [2] (k_scale, v_scale).
    """
    # q and k rotated as one tensor of Hq + Hkv heads: one pass of the rotation's dozen ops, not two.
    qk_rot = apply_rope_ref(torch.cat([q, k], dim=1), cos_sin_cache[positions], is_interleaved)
    q_rot, k_rot = qk_rot[:, :q.shape[1]], qk_rot[:, q.shape[1]:]
    valid = slot_mapping >= 0
    if not valid.all():  # padding rows (CUDA-graph batches only): one test, not three boolean indexings
        slot_mapping, k_rot, v = slot_mapping[valid], k_rot[valid], v[valid]
    if k_cache.dtype == FP8_DTYPE:  # copied as bytes: index_copy_ has no float8 kernels
        k_rot, v = quantize_fp8_static(k_rot, kv_scale[0]).view(torch.uint8), quantize_fp8_static(v, kv_scale[1]).view(
            torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k_rot.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return q_rot


class KvWrite(NamedTuple):
    """What rotary_kv_write takes besides q, k and v, for a kernel that makes them itself: the GEMV of a
    fused QKV projection rotates its q and k columns and writes k and v to the cache in its epilogue
    (kiln.kernels.gemv, ``kv_write``), so that no rotary kernel runs after it. The arguments are
    rotary_kv_write_ref's."""
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    is_interleaved: bool = False
    kv_scale: torch.Tensor | None = None

    @property
    def kv_size(self) -> int:
        """Columns of k (and of v) in a token's fused QKV output: KV heads x head_dim."""
        return self.k_cache.shape[2] * self.k_cache.shape[3]


def qkv_rotary_kv_write_ref(qkv: torch.Tensor, write: KvWrite) -> torch.Tensor:
    """rotary_kv_write_ref of a fused QKV output [T, q_size + 2 * kv_size]: writes rotated k and v to the
    cache; returns rotated q [T, q_size]."""
    num_tokens, head_dim = qkv.shape[0], write.k_cache.shape[3]
    q, k, v = qkv.split([qkv.shape[1] - 2 * write.kv_size, write.kv_size, write.kv_size], dim=-1)
    q = rotary_kv_write_ref(q.reshape(num_tokens, -1, head_dim), k.reshape(num_tokens, -1, head_dim),
                            v.reshape(num_tokens, -1, head_dim), *write)
    return q.reshape(num_tokens, -1)


@jit
def cache_slot_offset(slot, kv_block_size, cache_block_stride, cache_slot_stride):
    """Where a flat cache slot (block * block_size + offset) starts in a [blocks, block_size, ...] cache."""
    block = slot // kv_block_size
    return block * cache_block_stride + (slot - block * kv_block_size) * cache_slot_stride


@jit
def cache_value(x, scale, ROUND_DTYPE: tl.constexpr, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """x rounded to the engine dtype (ROUND_DTYPE); for an FP8 cache also divided by the layer's scale (IEEE
    division, as torch divides), clamped to ±FP8_MAX and rounded to nearest even e4m3: the reference's
    arithmetic, bit for bit."""
    x = x.to(ROUND_DTYPE)
    if IS_FP8:
        x = tl.minimum(tl.maximum(tl.div_rn(x.to(tl.float32), scale), -FP8_MAX), FP8_MAX)
        x = x.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return x


@jit
def _rotate_heads(src, dst, head_mask, first, second, pairs, cos, sin, scale, ROTARY_DIM: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_PASS: tl.constexpr, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """Rotates the heads at src (pair j: dims first[j], second[j], frequency j) into dst; dims from
    ROTARY_DIM to HEAD_DIM are copied unrotated. IS_FP8: dst is an FP8 cache quantized with ``scale``."""
    round_dtype = src.dtype.element_ty
    mask = head_mask & (pairs < ROTARY_DIM // 2)
    x1 = tl.load(src + first, mask=mask).to(tl.float32)
    x2 = tl.load(src + second, mask=mask).to(tl.float32)
    # The reference's operation order; built without FMA contraction (rotary_kv_write_triton), so the
    # rotated keys written to the cache are bit-identical to it.
    tl.store(dst + first, cache_value(x1 * cos - x2 * sin, scale, round_dtype, IS_FP8, FP8_MAX), mask=mask)
    tl.store(dst + second, cache_value(x2 * cos + x1 * sin, scale, round_dtype, IS_FP8, FP8_MAX), mask=mask)
    if ROTARY_DIM < HEAD_DIM:
        passed = ROTARY_DIM + tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = head_mask & (passed < HEAD_DIM)
        tl.store(dst + passed, cache_value(tl.load(src + passed, mask=pass_mask), scale, round_dtype, IS_FP8, FP8_MAX),
                 mask=pass_mask)


@jit(do_not_specialize_on_alignment=["positions_ptr", "slot_mapping_ptr"])  # views of the runtime's buffers
def _rotary_kv_write_kernel(
        q_ptr, q_row_stride, q_head_stride, k_ptr, k_row_stride, k_head_stride, v_ptr, v_row_stride, v_head_stride,
        positions_ptr, cos_sin_ptr, cos_sin_row_stride, slot_mapping_ptr,
        k_cache_ptr, v_cache_ptr, cache_block_stride, cache_slot_stride, cache_head_stride, kv_block_size,
        kv_scale_ptr, q_out_ptr, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        ROTARY_DIM: tl.constexpr, IS_INTERLEAVED: tl.constexpr, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
        PDL: tl.constexpr):
    """Program (token, 0) rotates the token's query heads into q_out; program (token, 1) rotates its key
    heads and copies its value heads into the cache slot (quantized with kv_scale for an FP8 cache),
    unless the slot is negative (padding). Pair j (dims j and j + ROTARY_DIM / 2, or 2j and 2j + 1
    interleaved) turns by frequency j; dims from ROTARY_DIM to HEAD_DIM are copied unrotated."""
    wait_for_producer(PDL)
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    pairs = tl.arange(0, BLOCK_PAIRS)[None, :]
    if IS_INTERLEAVED:
        first = 2 * pairs
        second = 2 * pairs + 1
    else:
        first = pairs
        second = pairs + ROTARY_DIM // 2
    position = tl.load(positions_ptr + token)
    cos = tl.load(cos_sin_ptr + position * cos_sin_row_stride + pairs, mask=pairs < ROTARY_DIM // 2)
    sin = tl.load(cos_sin_ptr + position * cos_sin_row_stride + ROTARY_DIM // 2 + pairs, mask=pairs < ROTARY_DIM // 2)
    if tl.program_id(1) == 0:
        _rotate_heads(q_ptr + token * q_row_stride + heads * q_head_stride,
                      q_out_ptr + token * (NUM_Q_HEADS * HEAD_DIM) + heads * HEAD_DIM, heads < NUM_Q_HEADS,
                      first, second, pairs, cos, sin, 1.0, ROTARY_DIM, HEAD_DIM, BLOCK_PASS, False, FP8_MAX)
    else:
        slot = tl.load(slot_mapping_ptr + token)
        slot_offset = cache_slot_offset(slot, kv_block_size, cache_block_stride, cache_slot_stride)
        head_mask = heads < tl.where(slot >= 0, NUM_KV_HEADS, 0)  # padding writes nothing
        k_scale = 1.0
        v_scale = 1.0
        if IS_FP8:
            k_scale = tl.load(kv_scale_ptr)
            v_scale = tl.load(kv_scale_ptr + 1)
        dims = tl.arange(0, BLOCK_D)[None, :]
        value_mask = head_mask & (dims < HEAD_DIM)
        value = tl.load(v_ptr + token * v_row_stride + heads * v_head_stride + dims, mask=value_mask)
        tl.store(v_cache_ptr + slot_offset + heads * cache_head_stride + dims,
                 cache_value(value, v_scale, value.dtype, IS_FP8, FP8_MAX), mask=value_mask)
        _rotate_heads(k_ptr + token * k_row_stride + heads * k_head_stride,
                      k_cache_ptr + slot_offset + heads * cache_head_stride, head_mask,
                      first, second, pairs, cos, sin, k_scale, ROTARY_DIM, HEAD_DIM, BLOCK_PASS, IS_FP8, FP8_MAX)


# Warps before tuning: 4 warps (128 threads) for a token's 32 query heads x 64 rotated pairs of an 8B
# model is 16 pairs per thread, two 16-byte loads of each half; chosen by that arithmetic, not timed.
DEFAULT_ROTARY_CONFIG = {"num_warps": 4}


def rotary_kv_write_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, is_interleaved: bool = False,
                           kv_scale: torch.Tensor | None = None,
                           num_warps: int = DEFAULT_ROTARY_CONFIG["num_warps"]) -> torch.Tensor:
    """As rotary_kv_write_ref, reading q / k / v in place (strided views of the fused QKV output)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, (rotary_dim, head_dim)
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    is_fp8 = k_cache.dtype == FP8_DTYPE
    assert q.dtype == k.dtype == v.dtype and k_cache.dtype == v_cache.dtype in (q.dtype, FP8_DTYPE)
    assert not is_fp8 or (kv_scale is not None and kv_scale.dtype == torch.float32 and kv_scale.numel() == 2)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _rotary_kv_write_kernel[(num_tokens, 2)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        positions, cos_sin_cache, cos_sin_cache.stride(0), slot_mapping,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[1],
        kv_scale if is_fp8 else positions,  # not read without IS_FP8
        q_out, NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim,
        IS_INTERLEAVED=is_interleaved, IS_FP8=is_fp8, FP8_MAX=FP8_MAX,
        BLOCK_H=next_power_of_2(max(num_q_heads, num_kv_heads)),
        BLOCK_PAIRS=next_power_of_2(rotary_dim // 2), BLOCK_PASS=next_power_of_2(max(head_dim - rotary_dim, 1)),
        BLOCK_D=next_power_of_2(head_dim), num_warps=num_warps, enable_fp_fusion=False, **pdl_launch(q.device))
    return q_out
