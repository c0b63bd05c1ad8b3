"""Qwen2 (Yang et al., 2024): Llama's architecture with a bias on the query, key and value projections
(none on the output projection), and a sliding window only where ``use_sliding_window`` says so."""

from __future__ import annotations

from typing import Any

from kiln.errors import ConfigError
from kiln.models.config import ModelConfig, check_activation, rope_from_hf, rope_to_hf
from kiln.models.llama import HF_IGNORED, HF_NAMES, LlamaForCausalLM
from kiln.models.llama import HF_CONFIG as LLAMA_CONFIG

HF_CONFIG = {field: key for field, key in LLAMA_CONFIG.items() if key != "attention_bias"}


def config_from_hf(hf: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    check_activation(hf, "hidden_act", ("silu",))
    return {"norm_eps": 1e-6, **fields, "rope": rope_from_hf(hf), "qkv_bias": True, "o_bias": False,
            "sliding_window": _sliding_window(hf, fields)}


def _sliding_window(hf: dict[str, Any], fields: dict[str, Any]) -> int | None:
    """The window, as transformers applies it: only with ``use_sliding_window``, and then only on the layers
    ``layer_types`` marks "sliding_attention" (by default those from ``max_window_layers`` on). kiln runs one
    attention kind on every layer, so a model that slides on some layers only is refused."""
    window = fields.get("sliding_window")
    if window is None or not hf.get("use_sliding_window", False):
        return None
    first = hf.get("max_window_layers", 28)  # transformers' Qwen2Config default
    layer_types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                            for i in range(fields["num_layers"])]
    num_sliding = sum(kind == "sliding_attention" for kind in layer_types)
    if num_sliding == 0:
        return None
    if num_sliding < len(layer_types):
        raise ConfigError(f"Qwen2 config slides its window on {num_sliding} of {len(layer_types)} layers only "
                          "(use_sliding_window with max_window_layers or layer_types); kiln runs one attention "
                          "kind on every layer: if the model was trained with the window on every layer, set "
                          "max_window_layers to 0 and drop layer_types, if on none, set use_sliding_window to "
                          "false")
    return window


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    # kiln's window, if any, is on every layer.
    return {**rope_to_hf(config.rope), "use_sliding_window": config.sliding_window is not None, "max_window_layers": 0}


Model = LlamaForCausalLM
__all__ = ["HF_CONFIG", "HF_IGNORED", "HF_NAMES", "Model", "config_from_hf", "config_to_hf"]
