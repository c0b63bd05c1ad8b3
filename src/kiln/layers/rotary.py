"""Rotary position embedding, fused with the write of the new keys and values to the paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import RopeConfig
from kiln.kernels.rotary import KvWrite, rope_cos_sin
from kiln.layers.context import LayerContext


class Rotary(nn.Module):
    """Rotates each head's first ``rotary_dim`` dims (GPT-J: fewer than head_dim; the rest pass through):
    the two halves against each other (Llama), or adjacent pairs with ``is_interleaved`` (GPT-J). Frequencies
    follow ``rope`` (default, linear or llama3 scaling). One table serves every layer of a model."""

    def __init__(self, rope: RopeConfig, rotary_dim: int, max_positions: int, ctx: LayerContext,
                 is_interleaved: bool = False):
        super().__init__()
        self.register_buffer("cos_sin", rope_cos_sin(rope, rotary_dim, max_positions).to(ctx.device),
                             persistent=False)
        self.is_interleaved, self.ops = is_interleaved, ctx.ops

    def kv_write(self, positions: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_scale: torch.Tensor | None = None) -> KvWrite:
        """What rotating the tokens at ``positions`` and writing their keys and values to kv_cache [2, blocks,
        block_size, Hkv, D] at slot_mapping takes (an FP8 cache: quantized with kv_scale, the layer's (k_scale,
        v_scale)): for ``forward``, or for the QKV projection's kernel to do it (LinearMethod.folds_kv_write)."""
        return KvWrite(positions, self.cos_sin, kv_cache[0], kv_cache[1], slot_mapping, self.is_interleaved, kv_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write: KvWrite) -> torch.Tensor:
        """Writes rotated k and v to the cache as ``write`` says; returns rotated q."""
        return self.ops.rotary_kv_write(q, k, v, *write)
