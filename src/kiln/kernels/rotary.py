"""Rotary position embedding (default, linear and llama3 variants) fused with the paged KV write.

HF convention: the two halves of each head are rotated against each other ("rotate_half"),
so kiln stores weights exactly as the checkpoint has them.
"""

from __future__ import annotations

import math

import torch

from kiln.kernels.triton_jit import jit, next_power_of_2, tl
from kiln.models.config import RopeConfig


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


def rope_cos_sin(rope: RopeConfig, head_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each frequency in the first half, sin in the second."""
    inv_freq = rope_inv_freq(rope, head_dim)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim] float32 (see rope_cos_sin_rows). Hugging Face's
    form, x * cos + rotate_half(x) * sin: the first half is x1 * cos - x2 * sin, the second x2 * cos + x1 * sin
    (the negation is exact, so these are the products and sums the Triton kernel rounds)."""
    half = x.shape[-1] // 2
    xf = x.float()
    return (xf * cos + torch.cat([xf[..., half:], xf[..., :half]], dim=-1) * sin).to(x.dtype)


def rope_cos_sin_rows(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin rows [T, 1, head_dim] of each position for apply_rope_ref: each half of the cache
    row repeated, the sin of the first half negated (rotate_half)."""
    cos_sin = cos_sin_cache[positions][:, None]
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rotary_kv_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotates q and k; writes rotated k and v into the paged cache at slot_mapping; returns rotated q.

    q: [T, Hq, D], k / v: [T, Hkv, D], k_cache / v_cache: [num_blocks, block_size, Hkv, D],
    slot_mapping: [T] flat slot (block * block_size + offset); a negative slot writes nothing (padding).
    """
    cos, sin = rope_cos_sin_rows(cos_sin_cache, positions)
    q_rot = apply_rope_ref(q, cos, sin)
    k_rot = apply_rope_ref(k, cos, sin)
    valid = slot_mapping >= 0
    if not valid.all():  # padding rows (CUDA-graph batches only): one test, not three boolean indexings
        slot_mapping, k_rot, v = slot_mapping[valid], k_rot[valid], v[valid]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k_rot.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return q_rot


@jit(do_not_specialize_on_alignment=["positions_ptr", "slot_mapping_ptr"])  # views of the runtime's buffers
def _rotary_kv_write_kernel(
        q_ptr, q_row_stride, q_head_stride, k_ptr, k_row_stride, k_head_stride, v_ptr, v_row_stride, v_head_stride,
        positions_ptr, cos_sin_ptr, cos_sin_row_stride, slot_mapping_ptr,
        k_cache_ptr, v_cache_ptr, cache_block_stride, cache_slot_stride, cache_head_stride, kv_block_size,
        q_out_ptr, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Program (token, 0) rotates the token's query heads into q_out; program (token, 1) rotates its key
    heads and copies its value heads into the cache slot, unless the slot is negative (padding)."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    half = tl.arange(0, BLOCK_HALF)[None, :]
    position = tl.load(positions_ptr + token)
    cos = tl.load(cos_sin_ptr + position * cos_sin_row_stride + half, mask=half < HEAD_DIM // 2)
    sin = tl.load(cos_sin_ptr + position * cos_sin_row_stride + HEAD_DIM // 2 + half, mask=half < HEAD_DIM // 2)
    if tl.program_id(1) == 0:
        src = q_ptr + token * q_row_stride + heads * q_head_stride + half
        dst = q_out_ptr + token * (NUM_Q_HEADS * HEAD_DIM) + heads * HEAD_DIM + half
        mask = (heads < NUM_Q_HEADS) & (half < HEAD_DIM // 2)
    else:
        slot = tl.load(slot_mapping_ptr + token)
        block = slot // kv_block_size
        slot_offset = block * cache_block_stride + (slot - block * kv_block_size) * cache_slot_stride
        src = k_ptr + token * k_row_stride + heads * k_head_stride + half
        dst = k_cache_ptr + slot_offset + heads * cache_head_stride + half
        mask = (heads < tl.where(slot >= 0, NUM_KV_HEADS, 0)) & (half < HEAD_DIM // 2)  # padding writes nothing
        for part in tl.static_range(2):
            value = tl.load(v_ptr + token * v_row_stride + heads * v_head_stride + part * (HEAD_DIM // 2) + half,
                            mask=mask)
            tl.store(v_cache_ptr + slot_offset + heads * cache_head_stride + part * (HEAD_DIM // 2) + half,
                     value, mask=mask)
    x1 = tl.load(src, mask=mask).to(tl.float32)
    x2 = tl.load(src + HEAD_DIM // 2, mask=mask).to(tl.float32)
    # The reference's operation order; built without FMA contraction (rotary_kv_write_triton), so the
    # rotated keys written to the cache are bit-identical to it.
    tl.store(dst, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HEAD_DIM // 2, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)


# Warps before tuning: 4 warps (128 threads) for a token's 32 query heads x 64 rotated pairs of an 8B
# model is 16 pairs per thread, two 16-byte loads of each half; chosen by that arithmetic, not timed.
DEFAULT_ROTARY_CONFIG = {"num_warps": 4}


def rotary_kv_write_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, num_warps: int = DEFAULT_ROTARY_CONFIG["num_warps"]
                           ) -> torch.Tensor:
    """As rotary_kv_write_ref, reading q / k / v in place (strided views of the fused QKV output)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _rotary_kv_write_kernel[(num_tokens, 2)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        positions, cos_sin_cache, cos_sin_cache.stride(0), slot_mapping,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[1],
        q_out, NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(max(num_q_heads, num_kv_heads)), BLOCK_HALF=next_power_of_2(head_dim // 2),
        num_warps=num_warps, enable_fp_fusion=False)
    return q_out
