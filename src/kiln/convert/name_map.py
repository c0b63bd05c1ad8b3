"""Hugging Face tensor names -> kiln tensor names, as data.

Each kiln tensor lists the HF tensors it is made of, concatenated along dim 0 in that order
(Q, K, V into ``qkv``; gate, up into ``gate_up``). ``{n}`` is the layer index.
"""

from __future__ import annotations

import re

GLOBAL_NAMES: dict[str, tuple[str, ...]] = {
    "embed.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}

LAYER_NAMES: dict[str, tuple[str, ...]] = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "o.weight": ("self_attn.o_proj.weight",),
    "o.bias": ("self_attn.o_proj.bias",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down.weight": ("mlp.down_proj.weight",),
}

# Checkpoint entries that carry no weights kiln needs (recomputed buffers).
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_sources(kiln_name: str) -> tuple[str, ...]:
    if kiln_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[kiln_name]
    m = _LAYER.match(kiln_name)
    if not m or m.group(2) not in LAYER_NAMES:
        raise KeyError(kiln_name)
    prefix = f"model.layers.{m.group(1)}."
    return tuple(prefix + s for s in LAYER_NAMES[m.group(2)])
