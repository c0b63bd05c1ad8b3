"""Llama (Touvron et al., 2023) and Mistral (Jiang et al., 2023): a pre-norm decoder of RMSNorm, rotary
attention with grouped KV heads and a SiLU-gated MLP. Mistral may add a sliding attention window."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.kernels import AttentionMetadata
from kiln.layers import Attention, Embedding, GatedMLP, LayerContext, LMHead, RMSNorm, Rotary
from kiln.layers.linear import PendingOutput
from kiln.models.base import CausalLM
from kiln.models.config import ModelConfig, check_activation, rope_from_hf, rope_to_hf

HF_CONFIG = {  # ModelConfig field -> config.json key
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "max_position_embeddings": "max_position_embeddings", "norm_eps": "rms_norm_eps",
    "hidden_act": "hidden_act", "qkv_bias": "attention_bias", "o_bias": "attention_bias",
    "sliding_window": "sliding_window",
}

HF_NAMES = {  # kiln tensor -> checkpoint tensors, concatenated along dim 0
    "embed.weight": "model.embed_tokens.weight",
    "layers.{n}.attn_norm.weight": "model.layers.{n}.input_layernorm.weight",
    "layers.{n}.attn.qkv.weight": tuple(f"model.layers.{{n}}.self_attn.{p}_proj.weight" for p in "qkv"),
    "layers.{n}.attn.qkv.bias": tuple(f"model.layers.{{n}}.self_attn.{p}_proj.bias" for p in "qkv"),
    "layers.{n}.attn.o.weight": "model.layers.{n}.self_attn.o_proj.weight",
    "layers.{n}.attn.o.bias": "model.layers.{n}.self_attn.o_proj.bias",
    # FP8 KV caches only; optional (kiln.convert: 1.0 where absent, other exporters' names too).
    "layers.{n}.attn.kv_scales.scale": ("model.layers.{n}.self_attn.k_scale", "model.layers.{n}.self_attn.v_scale"),
    "layers.{n}.mlp_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
    "layers.{n}.mlp.gate_up.weight": ("model.layers.{n}.mlp.gate_proj.weight", "model.layers.{n}.mlp.up_proj.weight"),
    "layers.{n}.mlp.down.weight": "model.layers.{n}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

HF_IGNORED = (r".*\.rotary_emb\.inv_freq$",)  # a buffer older checkpoints saved; recomputed


def config_from_hf(hf: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    check_activation(hf, "hidden_act", ("silu",))
    if hf.get("mlp_bias"):
        raise ConfigError("unsupported mlp_bias=true; kiln supports MLPs without bias")
    is_mistral = fields["architecture"] == "MistralForCausalLM"
    return {"norm_eps": 1e-6, **fields, "rope": rope_from_hf(hf),
            "sliding_window": fields.get("sliding_window") if is_mistral else None}


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return rope_to_hf(config.rope)


class LlamaLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: Rotary, ctx: LayerContext, qk_norm: bool):
        super().__init__()
        h, eps = config.hidden_size, config.norm_eps
        self.attn_norm = RMSNorm(h, eps, ctx)
        self.attn = Attention(h, config.num_heads, config.num_kv_heads, config.head_dim, rotary, ctx,
                              qkv_bias=config.qkv_bias, o_bias=config.o_bias, qk_norm_eps=eps if qk_norm else None)
        self.mlp_norm = RMSNorm(h, eps, ctx)
        self.mlp = GatedMLP(h, config.intermediate_size, ctx)
        # Each norm's output goes to one projection alone: an FP8 one may take it quantized by the norm.
        self.attn_norm.feeds(self.attn.qkv)
        self.mlp_norm.feeds(self.mlp.gate_up)
        self.attn.o.then(self.mlp_norm)  # where the norm folds (batch-1 decode), o adds the residual

    def forward(self, hidden: torch.Tensor | PendingOutput, residual: torch.Tensor | None, positions: torch.Tensor,
                kv_cache: torch.Tensor, slot_mapping: torch.Tensor, attn: AttentionMetadata
                ) -> tuple[torch.Tensor | PendingOutput, torch.Tensor]:
        """(hidden, residual) of the layer; hidden a PendingOutput where down leaves its product for the next
        layer's attn_norm to have added to the residual (batch-1 decode's norm fold)."""
        x, residual = self.attn_norm(hidden, residual)
        hidden = self.attn(x, positions, kv_cache, slot_mapping, attn)
        x, residual = self.mlp_norm(hidden, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(CausalLM):
    qk_norm = False  # Qwen3 normalizes each head's q and k

    def __init__(self, config: ModelConfig, ctx: LayerContext, max_positions: int):
        super().__init__(config, ctx)
        self.embed = Embedding(config.vocab_size, config.hidden_size, ctx)
        rotary = Rotary(config.rope, config.rotary_size, max_positions, ctx)
        self.layers = nn.ModuleList(LlamaLayer(config, rotary, ctx, self.qk_norm) for _ in range(config.num_layers))
        for before, after in zip(self.layers, self.layers[1:]):
            before.mlp.down.then(after.attn_norm)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, ctx)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, ctx,
                              tied=self.embed if config.tie_word_embeddings else None)


Model = LlamaForCausalLM
