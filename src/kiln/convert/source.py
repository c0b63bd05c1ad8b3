"""What a build starts from: a model's description (``config.json`` or a preset) and where its weights are.

``from_hugging_face`` reads only ``config.json`` and checks the checkpoint's tensor names and shapes
against it (from file metadata); weights are streamed later by the build. ``from_preset`` describes a
well-known architecture with random (dummy) weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.converter import check_checkpoint
from kiln.errors import ConfigError
from kiln.models import ModelConfig, model_skeleton, preset_hf_config


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
    """Picks the family from ``config.json``'s ``architectures`` (kiln.models.registry)."""

    @staticmethod
    def from_hugging_face(path: str | Path, architecture: str | None = None) -> ModelSource:
        """``architecture``, if given, must be the checkpoint's."""
        path = Path(path)
        config = ModelConfig.from_hf_dir(path)
        if architecture is not None and config.architecture != architecture:
            raise ConfigError(f"{path} holds a {config.architecture}, not a {architecture}")
        check_checkpoint(model_skeleton(config), CheckpointReader(path))
        return ModelSource(config=config, checkpoint_dir=path, tokenizer_dir=path, name=path.name)

    @staticmethod
    def from_preset(name: str) -> ModelSource:
        config = ModelConfig.from_hf_config(preset_hf_config(name))
        return ModelSource(config=config, checkpoint_dir=None, tokenizer_dir=None, name=name)
