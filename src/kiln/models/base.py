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
from kiln.errors import ConfigError
from kiln.models.config import ModelConfig
from kiln.models.registry import family
from kiln.models.source import ModelSource


class CausalLM(nn.Module):
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module

    def __init__(self, config: ModelConfig, ctx: LayerContext):
        super().__init__()
        self.config, self.dtype, self.device, self.tp = config, ctx.dtype, ctx.device, ctx.tp
        self.kv_cache_dtype = ctx.kv_cache_dtype or ctx.dtype  # what allocate_kv_cache makes the cache of
        first, last = ctx.tp.share(config.num_kv_heads)
        self.num_local_kv_heads = last - first  # the KV heads of this tensor-parallel rank's cache

    @classmethod
    def from_hugging_face(cls, path) -> ModelSource:
        """TensorRT-LLM's entry point (``LlamaForCausalLM.from_hugging_face(dir)``): the checkpoint folder as a
        ModelSource for ``Builder.build``, if its architecture is one this class runs."""
        source = ModelSource.from_hugging_face(path)
        if not issubclass(family(source.config.architecture).Model, cls):
            raise ConfigError(f"{path} holds a {source.config.architecture}, which {cls.__name__} does not run; "
                              f"use kiln.models.{source.config.architecture} or AutoModelForCausalLM")
        return source

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor, attn: AttentionMetadata, logits_indices: torch.Tensor,
                logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Returns float32 logits for the tokens at logits_indices (written into ``logits_out`` where given:
        [len(logits_indices), vocab] float32). kv_cache: [L, 2, blocks, block, Hkv, D]."""
        hidden, residual = self.embed(input_ids), None
        for n, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, positions, kv_cache[n], slot_mapping, attn)
        x, _ = self.norm(hidden, residual)
        logits = self.lm_head(x[logits_indices])
        return logits.float() if logits_out is None else logits_out.copy_(logits)
