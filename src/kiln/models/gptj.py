"""GPT-J (Wang & Komatsuzaki, 2021): each layer runs attention and the MLP side by side on the output
of one LayerNorm (with bias) and adds both to the residual. Rotary covers each head's first rotary_dim
dims in interleaved pairs; the MLP is fc_in -> GELU -> fc_out with biases; attention has no biases;
a final LayerNorm ln_f, and an untied LM head with a bias."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.kernels import AttentionMetadata
from kiln.layers import MLP, Attention, Embedding, LayerContext, LayerNorm, LMHead, Rotary
from kiln.models.base import CausalLM
from kiln.models.config import ModelConfig, check_activation

HF_CONFIG = {  # ModelConfig field -> config.json key
    "vocab_size": "vocab_size", "hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
    "max_position_embeddings": "n_positions", "norm_eps": "layer_norm_epsilon", "rotary_dim": "rotary_dim",
    "hidden_act": "activation_function",
}

HF_NAMES = {  # kiln tensor -> checkpoint tensors, concatenated along dim 0
    "embed.weight": "transformer.wte.weight",
    "layers.{n}.norm.weight": "transformer.h.{n}.ln_1.weight",
    "layers.{n}.norm.bias": "transformer.h.{n}.ln_1.bias",
    "layers.{n}.attn.qkv.weight": tuple(f"transformer.h.{{n}}.attn.{p}_proj.weight" for p in "qkv"),
    "layers.{n}.attn.o.weight": "transformer.h.{n}.attn.out_proj.weight",
    # FP8 KV caches only; optional (kiln.convert: 1.0 where absent, other exporters' names too).
    "layers.{n}.attn.kv_scales.scale": ("transformer.h.{n}.attn.k_scale", "transformer.h.{n}.attn.v_scale"),
    "layers.{n}.mlp.fc_in.weight": "transformer.h.{n}.mlp.fc_in.weight",
    "layers.{n}.mlp.fc_in.bias": "transformer.h.{n}.mlp.fc_in.bias",
    "layers.{n}.mlp.fc_out.weight": "transformer.h.{n}.mlp.fc_out.weight",
    "layers.{n}.mlp.fc_out.bias": "transformer.h.{n}.mlp.fc_out.bias",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}

HF_IGNORED = (r".*\.attn\.(masked_)?bias$",)  # the causal mask buffers older checkpoints saved

GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF name -> torch's


def config_from_hf(hf: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    check_activation(hf, "activation_function", tuple(GELU_APPROXIMATION))
    return {**fields, "intermediate_size": hf.get("n_inner") or 4 * fields["hidden_size"]}


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return {"n_inner": config.intermediate_size}


class GPTJLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: Rotary, ctx: LayerContext):
        super().__init__()
        h = config.hidden_size
        self.norm = LayerNorm(h, config.norm_eps, ctx)
        self.attn = Attention(h, config.num_heads, config.num_kv_heads, config.head_dim, rotary, ctx)
        self.mlp = MLP(h, config.intermediate_size, GELU_APPROXIMATION[config.hidden_act], ctx)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                kv_cache: torch.Tensor, slot_mapping: torch.Tensor, attn: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.norm(hidden, residual)
        return self.attn(x, positions, kv_cache, slot_mapping, attn) + self.mlp(x), residual


class GPTJForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, ctx: LayerContext, max_positions: int):
        super().__init__(config, ctx)
        self.embed = Embedding(config.vocab_size, config.hidden_size, ctx)
        rotary = Rotary(config.rope, config.rotary_size, max_positions, ctx, is_interleaved=True)
        self.layers = nn.ModuleList(GPTJLayer(config, rotary, ctx) for _ in range(config.num_layers))
        self.norm = LayerNorm(config.hidden_size, config.norm_eps, ctx)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, ctx, bias=True,
                              tied=self.embed if config.tie_word_embeddings else None)


Model = GPTJForCausalLM
