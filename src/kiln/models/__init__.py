"""Model families kiln runs, and the entry points that read a checkpoint's description.

``from_hugging_face`` reads only ``config.json`` (and checks the weights' names and shapes against it);
weights are streamed later by the build. ``from_preset`` describes a well-known architecture with random
(dummy) weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.converter import check_checkpoint
from kiln.errors import ConfigError
from kiln.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from kiln.models.presets import PRESETS, preset_hf_config


@dataclass(frozen=True)
class ModelSource:
    """What the Builder consumes: an architecture and where its weights come from."""

    config: ModelConfig
    checkpoint_dir: Path | None  # None: dummy (random) weights
    tokenizer_dir: Path | None
    name: str

    @property
    def is_dummy(self) -> bool:
        return self.checkpoint_dir is None


class AutoModelForCausalLM:
    """Picks the family from ``config.json``'s ``architectures``."""

    architecture: str | None = None

    @classmethod
    def from_hugging_face(cls, path: str | Path) -> ModelSource:
        path = Path(path)
        config = ModelConfig.from_hf_dir(path)
        if cls.architecture is not None and config.architecture != cls.architecture:
            raise ConfigError(f"{path} holds a {config.architecture}, not a {cls.architecture}; "
                              "use AutoModelForCausalLM")
        check_checkpoint(config, CheckpointReader(path))
        return ModelSource(config=config, checkpoint_dir=path, tokenizer_dir=path, name=path.name)

    @classmethod
    def from_preset(cls, name: str) -> ModelSource:
        config = ModelConfig.from_hf_config(preset_hf_config(name))
        return ModelSource(config=config, checkpoint_dir=None, tokenizer_dir=None, name=name)


class LlamaForCausalLM(AutoModelForCausalLM):
    architecture = "LlamaForCausalLM"


class MistralForCausalLM(AutoModelForCausalLM):
    architecture = "MistralForCausalLM"


class Qwen2ForCausalLM(AutoModelForCausalLM):
    architecture = "Qwen2ForCausalLM"


__all__ = ["AutoModelForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
           "ModelConfig", "ModelSource", "PRESETS", "SUPPORTED_ARCHITECTURES"]
