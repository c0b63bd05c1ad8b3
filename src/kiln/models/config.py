"""ModelConfig: the architecture facts kiln needs, parsed from a Hugging Face ``config.json``.

Each family file names its ``config.json`` keys (``HF_CONFIG``: ModelConfig field -> key) and turns them
into fields (``config_from_hf``) and back (``config_to_hf``); the fields every family shares (tokens,
tied embeddings, dtype) are read here. Both layouts transformers writes are accepted: 4.x (``rope_theta``
+ ``rope_scaling``) and 5.x (``rope_parameters``). Anything kiln cannot run exactly fails here, before any
weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import RopeConfig
from kiln.errors import ConfigError
from kiln.models.registry import FAMILIES, family

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Fields config.json must give, under the key the family's HF_CONFIG names (a family that names no key
# for one derives it in config_from_hf, as GPT-J does its MLP width).
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # the HF architecture; it picks the family (models/registry.py)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    rotary_dim: int | None = None  # dims of each head that are rotated; None: all of them
    hidden_act: str = "silu"  # the MLP's activation, as config.json names it
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
        if self.rotary_size % 2 or self.rotary_size > self.head_dim:
            raise ConfigError(f"model config: rotary dims ({self.rotary_size}) must be even and at most head_dim "
                              f"({self.head_dim})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_size(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def max_supported_positions(self) -> int:
        """Longest sequence the position encoding is defined for (rope scaling may extend it)."""
        if self.rope.rope_type == "linear":
            return int(self.max_position_embeddings * self.rope.factor)
        if self.rope.rope_type == "llama3" and self.rope.original_max_position_embeddings:
            return max(self.max_position_embeddings,
                       int(self.rope.original_max_position_embeddings * self.rope.factor))
        return self.max_position_embeddings

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
        hf = _read_json(cfg_file)
        gen_file = path / "generation_config.json"
        gen = _read_json(gen_file) if gen_file.is_file() else {}
        return cls.from_hf_config(hf, gen)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in FAMILIES), None)
        if arch is None:
            raise ConfigError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                              f"kiln supports {', '.join(sorted(FAMILIES))}")
        fam = family(arch)
        fields = {name: hf[key] for name, key in fam.HF_CONFIG.items() if hf.get(key) is not None}
        for name in REQUIRED_FIELDS:
            if name in fam.HF_CONFIG and name not in fields:
                raise ConfigError(f"config.json has no {fam.HF_CONFIG[name]!r}; is this a decoder-only causal LM "
                                  "checkpoint?")
        fields.setdefault("num_kv_heads", fields["num_heads"])
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_heads"])
        fields.setdefault("max_position_embeddings", 2048)
        fields["architecture"] = arch
        gen = generation_config or {}
        eos = gen.get("eos_token_id", hf.get("eos_token_id"))
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return cls(
            **fam.config_from_hf(hf, fields),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=gen.get("bos_token_id", hf.get("bos_token_id")),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            pad_token_id=hf.get("pad_token_id"),
            checkpoint_dtype=str(dtype).replace("torch.", ""),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """``config.json`` fields that describe this model (transformers 4.x layout, which 5.x also reads)."""
        fam = family(self.architecture)
        return {
            "architectures": [self.architecture],
            **{key: getattr(self, name) for name, key in fam.HF_CONFIG.items()},
            **fam.config_to_hf(self),
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) or None, "pad_token_id": self.pad_token_id,
            "torch_dtype": self.checkpoint_dtype,
        }

def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); fix the file or "
                          "download it again") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text; fix the file or download it again") from None


def check_activation(hf: dict[str, Any], key: str, supported: tuple[str, ...]) -> str:
    act = hf.get(key, supported[0])
    if act not in supported:
        raise ConfigError(f"unsupported {key} {act!r}; kiln supports {', '.join(repr(a) for a in supported)}")
    return act


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
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


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    scaling = None
    if rope.rope_type != "default":
        scaling = {"rope_type": rope.rope_type, "factor": rope.factor}
        if rope.rope_type == "llama3":
            scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                           original_max_position_embeddings=rope.original_max_position_embeddings)
    return {"rope_theta": rope.theta, "rope_scaling": scaling}
