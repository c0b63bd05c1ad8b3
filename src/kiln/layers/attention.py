"""Attention over the paged KV cache: multi-head with grouped KV heads (GQA; MQA at one KV head); an FP8
KV cache with a scale per layer for K and for V."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import AttentionMetadata
from kiln.layers.base import ONES, Layer
from kiln.layers.context import LayerContext
from kiln.layers.linear import Linear, NormedInput, PendingOutput
from kiln.layers.norm import RMSNorm
from kiln.layers.rotary import Rotary
from kiln.quantization.fp8 import Fp8Activation


class KvCacheScales(Layer):
    """An FP8 KV cache's scales for one layer: ``scale`` float32 [2], (k_scale, v_scale); the cache
    holds k / k_scale and v / v_scale in e4m3. Made at build (kiln.convert): a pre-quantized checkpoint's
    k_scale / v_scale where it has them, else 1.0 (dummy weights too: ONES)."""

    def __init__(self):
        super().__init__()
        self.declare("scale", (2,), ONES, torch.float32)


class Attention(nn.Module):
    """Fused QKV projection, optional per-head RMSNorm of q and k (Qwen3), rotary + KV cache write (in the
    projection's own kernel where its method folds it in: the GEMV of a few rows, without per-head norms),
    paged attention, output projection. A sliding window, where the model has one, reaches the kernel
    in AttentionMetadata (the runner sets it from the model config). With an FP8 KV cache the block
    holds its scales (``kv_scales``); FP8 context attention is the context's choice too."""

    kernel_ops = ("rotary_kv_write", "attention")

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary: Rotary,
                 ctx: LayerContext, qkv_bias: bool = False, o_bias: bool = False, qk_norm_eps: float | None = None):
        super().__init__()
        # Tensor parallelism: each rank holds whole heads, its share of the query heads and of the KV heads
        # (or, with fewer KV heads than ranks, a copy of the one its query heads read).
        (q_first, q_last), (kv_first, kv_last) = ctx.tp.share(num_heads), ctx.tp.share(num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = q_last - q_first, kv_last - kv_first, head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        q_rows, kv_rows = (q_first * head_dim, q_last * head_dim), (kv_first * head_dim, kv_last * head_dim)
        q_full, kv_full = num_heads * head_dim, num_kv_heads * head_dim
        qkv_rows = (q_rows, tuple(q_full + r for r in kv_rows), tuple(q_full + kv_full + r for r in kv_rows))
        self.qkv = Linear(hidden_size, q_full + 2 * kv_full, ctx, bias=qkv_bias, shard_dim=0, shard_ranges=qkv_rows)
        self.q_norm = None if qk_norm_eps is None else RMSNorm(head_dim, qk_norm_eps, ctx)
        self.k_norm = None if qk_norm_eps is None else RMSNorm(head_dim, qk_norm_eps, ctx)
        self.o = Linear(q_full, hidden_size, ctx, bias=o_bias, shard_dim=1, shard_ranges=(q_rows,))
        self.kv_scales = KvCacheScales() if ctx.is_fp8_kv_cache else None
        self.rotary = rotary
        self.ops = ctx.ops
        self.scale = head_dim ** -0.5
        self.use_fp8_context_fmha = ctx.use_fp8_context_fmha

    def forward(self, x: torch.Tensor | Fp8Activation | NormedInput, positions: torch.Tensor,
                kv_cache: torch.Tensor, slot_mapping: torch.Tensor, attn: AttentionMetadata
                ) -> torch.Tensor | PendingOutput:
        """x [T, hidden] (an Fp8Activation where the norm before quantized it for an FP8 qkv, a NormedInput
        where qkv normalizes it); kv_cache [2, blocks, block_size, Hkv, D], this layer's keys and values. A
        PendingOutput where o adds its product to the residual for the norm after it (Linear.then)."""
        num_tokens = positions.shape[0]
        kv_scale = None if self.kv_scales is None else self.kv_scales.scale
        write = self.rotary.kv_write(positions, kv_cache, slot_mapping, kv_scale)
        if self.q_norm is None and self.qkv.method.folds_kv_write(self.qkv, x, write):
            q = self.qkv.method.apply_kv_write(self.qkv, x, write).view(num_tokens, self.num_heads, self.head_dim)
        else:
            q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(num_tokens, self.num_heads, self.head_dim)
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:  # each head's head_dim values, read in place from the fused output
                q, k = self.q_norm.norm(q), self.k_norm.norm(k)
            q = self.rotary(q, k, v, write)
        out = self.ops.attention(q, kv_cache[0], kv_cache[1], attn, self.scale, kv_scale=kv_scale,
                                 fp8_context=self.use_fp8_context_fmha)
        return self.o(out.view(num_tokens, self.q_size))
