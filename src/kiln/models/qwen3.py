"""Qwen3 (Yang et al., 2025): Llama's architecture with each head's query and key RMS-normalized before
the rotary embedding, and an explicit head_dim (128 where config.json gives none). Attention biases
follow ``attention_bias``; the sliding window follows ``use_sliding_window`` as in Qwen2."""

from __future__ import annotations

from typing import Any

from kiln.models import qwen2
from kiln.models.llama import HF_CONFIG, HF_IGNORED, LlamaForCausalLM
from kiln.models.llama import HF_NAMES as LLAMA_NAMES

HF_NAMES = {
    **LLAMA_NAMES,
    "layers.{n}.attn.q_norm.weight": "model.layers.{n}.self_attn.q_norm.weight",
    "layers.{n}.attn.k_norm.weight": "model.layers.{n}.self_attn.k_norm.weight",
}


def config_from_hf(hf: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return {**qwen2.config_from_hf(hf, fields), "head_dim": hf.get("head_dim") or 128,
            "qkv_bias": fields.get("qkv_bias", False), "o_bias": fields.get("o_bias", False)}


config_to_hf = qwen2.config_to_hf


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


Model = Qwen3ForCausalLM
__all__ = ["HF_CONFIG", "HF_IGNORED", "HF_NAMES", "Model", "config_from_hf", "config_to_hf"]
