"""The decoder-only transformer shared by Llama, Mistral and Qwen2, in kiln's weight layout.

Weights arrive already fused by the converter (QKV in one matrix, gate/up in one). The forward takes a
padding-free packed batch: every token of every sequence in one [T] vector, context chunks and decode
tokens alike, with keys and values in the paged KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.kernels import AttentionMetadata, KernelOps
from kiln.kernels.rotary import rope_cos_sin
from kiln.models.config import ModelConfig


def weight_spec(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an engine holds, in file order, with its shape."""
    h, i = config.hidden_size, config.intermediate_size
    qkv = config.q_size + 2 * config.kv_size
    spec: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, h)}
    for n in range(config.num_layers):
        p = f"layers.{n}."
        spec[p + "attn_norm.weight"] = (h,)
        spec[p + "qkv.weight"] = (qkv, h)
        if config.qkv_bias:
            spec[p + "qkv.bias"] = (qkv,)
        spec[p + "o.weight"] = (h, config.q_size)
        if config.o_bias:
            spec[p + "o.bias"] = (h,)
        spec[p + "mlp_norm.weight"] = (h,)
        spec[p + "gate_up.weight"] = (2 * i, h)
        spec[p + "down.weight"] = (h, i)
    spec["norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        spec["lm_head.weight"] = (config.vocab_size, h)
    return spec


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class DecoderModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ops: KernelOps, max_positions: int):
        self.config = config
        self.ops = ops
        self.embed = weights["embed.weight"]
        self.norm = weights["norm.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
        self.layers = [
            LayerWeights(
                attn_norm=weights[f"layers.{n}.attn_norm.weight"],
                qkv=weights[f"layers.{n}.qkv.weight"],
                qkv_bias=weights.get(f"layers.{n}.qkv.bias"),
                o=weights[f"layers.{n}.o.weight"],
                o_bias=weights.get(f"layers.{n}.o.bias"),
                mlp_norm=weights[f"layers.{n}.mlp_norm.weight"],
                gate_up=weights[f"layers.{n}.gate_up.weight"],
                down=weights[f"layers.{n}.down.weight"],
            )
            for n in range(config.num_layers)
        ]
        self.cos_sin = rope_cos_sin(config.rope, config.head_dim, max_positions).to(self.embed.device)
        self.scale = config.head_dim ** -0.5

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor, attn: AttentionMetadata, logits_indices: torch.Tensor
                ) -> torch.Tensor:
        """Returns float32 logits for the tokens at logits_indices. kv_cache: [L, 2, blocks, block, Hkv, D]."""
        cfg, ops = self.config, self.ops
        hidden = F.embedding(input_ids, self.embed)
        residual = hidden
        x = ops.rms_norm(hidden, self.layers[0].attn_norm, cfg.rms_norm_eps) if self.layers else hidden
        num_tokens = input_ids.shape[0]
        for n, layer in enumerate(self.layers):
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.view(num_tokens, cfg.num_heads, cfg.head_dim)
            k = k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = kv_cache[n, 0], kv_cache[n, 1]
            q = ops.rotary_kv_write(q, k, v, positions, self.cos_sin, k_cache, v_cache, slot_mapping)
            attn_out = ops.attention(q, k_cache, v_cache, attn, self.scale)
            hidden = F.linear(attn_out.view(num_tokens, cfg.q_size), layer.o, layer.o_bias)
            x, residual = ops.add_rms_norm(hidden, residual, layer.mlp_norm, cfg.rms_norm_eps)
            hidden = F.linear(ops.silu_mul(F.linear(x, layer.gate_up)), layer.down)
            next_norm = self.layers[n + 1].attn_norm if n + 1 < len(self.layers) else self.norm
            x, residual = ops.add_rms_norm(hidden, residual, next_norm, cfg.rms_norm_eps)
        return F.linear(x[logits_indices], self.lm_head).float()
