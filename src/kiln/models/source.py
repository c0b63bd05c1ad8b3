"""ModelSource: what a build starts from, a model's description and where its weights are (plain data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.models.config import ModelConfig


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

    @classmethod
    def from_hugging_face(cls, path: str | Path) -> "ModelSource":
        """The folder's config.json (its weights are checked by the builder, before any is converted)."""
        path = Path(path)
        return cls(config=ModelConfig.from_hf_dir(path), checkpoint_dir=path, tokenizer_dir=path, name=path.name)
