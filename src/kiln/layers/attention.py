"""Attention over the paged KV cache: multi-head with grouped KV heads (GQA; MQA at one KV head)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import AttentionMetadata
from kiln.layers.context import LayerContext
from kiln.layers.linear import Linear
from kiln.layers.norm import RMSNorm
from kiln.layers.rotary import Rotary


class Attention(nn.Module):
    """Fused QKV projection, optional per-head RMSNorm of q and k (Qwen3), rotary + KV cache write,
    paged attention, output projection. A sliding window, where the model has one, reaches the kernel
    in AttentionMetadata (the runner sets it from the model config)."""

    kernel_ops = ("rotary_kv_write", "attention")

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary: Rotary,
                 ctx: LayerContext, qkv_bias: bool = False, o_bias: bool = False, qk_norm_eps: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv = Linear(hidden_size, self.q_size + 2 * self.kv_size, ctx, bias=qkv_bias, shard_dim=0)
        self.q_norm = None if qk_norm_eps is None else RMSNorm(head_dim, qk_norm_eps, ctx)
        self.k_norm = None if qk_norm_eps is None else RMSNorm(head_dim, qk_norm_eps, ctx)
        self.o = Linear(self.q_size, hidden_size, ctx, bias=o_bias, shard_dim=1)
        self.rotary = rotary
        self.ops = ctx.ops
        self.scale = head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        """x [T, hidden]; kv_cache [2, blocks, block_size, Hkv, D], this layer's keys and values."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # each head's head_dim values, read in place from the fused output
            q, k = self.q_norm.norm(q), self.k_norm.norm(k)
        q = self.rotary(q, k, v, positions, kv_cache, slot_mapping)
        out = self.ops.attention(q, kv_cache[0], kv_cache[1], attn, self.scale)
        return self.o(out.view(num_tokens, self.q_size))
