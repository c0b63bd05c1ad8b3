"""ModelConfig: the architecture facts kiln needs, parsed from a Hugging Face ``config.json``.

Both layouts transformers writes are accepted: 4.x (``rope_theta`` + ``rope_scaling``) and 5.x
(``rope_parameters``). Anything kiln cannot run exactly fails here, before any weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

# HF architecture name -> kiln family. The three share one decoder (models/decoder.py); Qwen2 differs
# only by its QKV bias, Mistral by its (optional) sliding window.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    checkpoint_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_supported_positions(self) -> int:
        """Longest sequence the position encoding is defined for (rope scaling may extend it)."""
        if self.rope.rope_type == "linear":
            return int(self.max_position_embeddings * self.rope.factor)
        if self.rope.rope_type == "llama3" and self.rope.original_max_position_embeddings:
            return max(self.max_position_embeddings,
                       int(self.rope.original_max_position_embeddings * self.rope.factor))
        return self.max_position_embeddings

    def num_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        qkv = self.q_size + 2 * self.kv_size
        per_layer = h * qkv + self.q_size * h + 3 * h * i + 2 * h
        per_layer += (qkv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + head + self.num_layers * per_layer + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path}: no config.json; point kiln at a Hugging Face model folder")
        hf = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_hf_config(hf, gen)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                              f"kiln supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r}; kiln supports 'silu'")
        if hf.get("mlp_bias"):
            raise ConfigError("unsupported mlp_bias=true; kiln supports MLPs without bias")
        num_heads = _required(hf, "num_attention_heads")
        hidden = _required(hf, "hidden_size")
        head_dim = hf.get("head_dim") or hidden // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = arch == "Qwen2ForCausalLM" or attention_bias
        o_bias = arch != "Qwen2ForCausalLM" and attention_bias
        sliding_window = _sliding_window(arch, hf)
        gen = generation_config or {}
        eos = gen.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=_required(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required(hf, "intermediate_size"),
            num_layers=_required(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_parse_rope(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            sliding_window=sliding_window,
            bos_token_id=gen.get("bos_token_id", hf.get("bos_token_id")),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            checkpoint_dtype=str(dtype).replace("torch.", ""),
        )


def _required(hf: dict[str, Any], key: str):
    if key not in hf:
        raise ConfigError(f"config.json has no {key!r}; is this a decoder-only causal LM checkpoint?")
    return hf[key]


def _sliding_window(arch: str, hf: dict[str, Any]) -> int | None:
    """The window every layer attends within, as transformers applies it: Mistral slides on every layer
    when ``sliding_window`` is set; Qwen2 only with ``use_sliding_window``, and then only on the layers
    ``layer_types`` marks "sliding_attention" (by default those from ``max_window_layers`` on)."""
    window = hf.get("sliding_window")
    if arch == "LlamaForCausalLM" or window is None:
        return None
    if arch == "Qwen2ForCausalLM":
        if not hf.get("use_sliding_window", False):
            return None
        num_layers = _required(hf, "num_hidden_layers")
        first = hf.get("max_window_layers", 28)  # transformers' Qwen2Config default
        layer_types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                                for i in range(num_layers)]
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


def _parse_rope(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5.x: rope_parameters holds theta and scaling together; 4.x: rope_theta + rope_scaling.
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported rope scaling type {rope_type!r}; kiln supports "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "llama3" and not params.get("original_max_position_embeddings"):
        raise ConfigError("rope scaling type 'llama3' needs original_max_position_embeddings (the context the "
                          "model was trained with); add it to config.json")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    factor = float(params.get("factor", 1.0))
    if rope_type != "default" and not (factor >= 1.0 and math.isfinite(factor)):
        raise ConfigError(f"rope scaling factor must be >= 1, got {factor}")
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=factor if rope_type != "default" else 1.0,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
    )
