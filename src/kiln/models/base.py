"""CausalLM: what every family's model shares, the path from token ids to logits over a packed batch.

A family builds ``embed``, ``layers`` (each called as ``layer(hidden, residual, positions, kv_cache,
slot_mapping, attn) -> (hidden, residual)``), the final ``norm`` and the ``lm_head``. The batch is
padding-free: every token of every sequence in one [T] vector, context chunks and decode tokens alike,
with keys and values in the paged KV cache. The residual add before each norm is fused into it.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import AttentionMetadata
from kiln.layers import LayerContext
from kiln.models.config import ModelConfig


class CausalLM(nn.Module):
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module

    def __init__(self, config: ModelConfig, ctx: LayerContext):
        super().__init__()
        self.config, self.dtype, self.device = config, ctx.dtype, ctx.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor, attn: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits for the tokens at logits_indices. kv_cache: [L, 2, blocks, block, Hkv, D]."""
        hidden, residual = self.embed(input_ids), None
        for n, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, positions, kv_cache[n], slot_mapping, attn)
        x, _ = self.norm(hidden, residual)
        return self.lm_head(x[logits_indices]).float()
