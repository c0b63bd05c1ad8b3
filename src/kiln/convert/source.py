"""What a build starts from: a model's description (``config.json`` or a preset) and where its weights are.

``from_hugging_face`` reads only ``config.json`` and checks the checkpoint's tensor names and shapes
against it (from file metadata); weights are streamed later by the build. ``from_preset`` describes a
well-known architecture with random (dummy) weights.
"""

from __future__ import annotations

from pathlib import Path

from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.converter import check_checkpoint
from kiln.errors import ConfigError
from kiln.models import ModelConfig, ModelSource, model_skeleton, preset_hf_config


class AutoModelForCausalLM:
    """Picks the family from ``config.json``'s ``architectures`` (kiln.models.registry)."""

    @staticmethod
    def from_hugging_face(path: str | Path, architecture: str | None = None) -> ModelSource:
        """``architecture``, if given, must be the checkpoint's. The checkpoint's tensors are checked here, so
        a mismatch fails at once (the builder checks again before converting)."""
        source = ModelSource.from_hugging_face(path)
        if architecture is not None and source.config.architecture != architecture:
            raise ConfigError(f"{path} holds a {source.config.architecture}, not a {architecture}")
        check_source(source)
        return source

    @staticmethod
    def from_preset(name: str) -> ModelSource:
        """A preset's architecture with random (dummy) weights."""
        config = ModelConfig.from_hf_config(preset_hf_config(name))
        return ModelSource(config=config, checkpoint_dir=None, tokenizer_dir=None, name=name)


def check_source(source: ModelSource) -> None:
    """The checkpoint's tensor names and shapes against the model's declarations (file metadata only)."""
    if not source.is_dummy:
        check_checkpoint(model_skeleton(source.config), CheckpointReader(source.checkpoint_dir))
