"""Qwen2 (Yang et al., 2024): Llama's architecture with a bias on the query, key and value projections
(none on the output projection), and a sliding window only where ``use_sliding_window`` says so."""

from __future__ import annotations

from typing import Any

from kiln.models.config import ModelConfig, check_activation, rope_from_hf, rope_to_hf
from kiln.models.llama import HF_IGNORED, HF_NAMES, LlamaForCausalLM
from kiln.models.llama import HF_CONFIG as LLAMA_CONFIG

HF_CONFIG = {field: key for field, key in LLAMA_CONFIG.items() if key != "attention_bias"}


def config_from_hf(hf: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    check_activation(hf, "hidden_act", ("silu",))
    return {"norm_eps": 1e-6, **fields, "rope": rope_from_hf(hf), "qkv_bias": True, "o_bias": False,
            "sliding_window": fields.get("sliding_window") if hf.get("use_sliding_window") else None}


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return {**rope_to_hf(config.rope), "use_sliding_window": config.sliding_window is not None}


Model = LlamaForCausalLM
__all__ = ["HF_CONFIG", "HF_IGNORED", "HF_NAMES", "Model", "config_from_hf", "config_to_hf"]
