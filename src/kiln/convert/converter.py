"""Weight conversion: HF checkpoint (or random dummy weights) -> kiln tensors, one at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.name_map import IGNORED, hf_sources
from kiln.errors import CheckpointError
from kiln.models.config import ModelConfig
from kiln.models.decoder import weight_spec


def check_names(config: ModelConfig, reader: CheckpointReader) -> None:
    """Fails before any conversion, naming missing and unexpected checkpoint tensors."""
    needed = {src for name in weight_spec(config) for src in hf_sources(name)}
    present = {n for n in reader.names() if not IGNORED.match(n)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store a copy; the embedding is used
    missing = sorted(needed - present)
    unexpected = sorted(present - needed)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:4])})")
        raise CheckpointError(f"{reader.path}: checkpoint does not match config.json ({config.architecture}): "
                              f"{'; '.join(parts)}")


def convert_checkpoint(config: ModelConfig, reader: CheckpointReader, dtype: torch.dtype
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (kiln name, tensor) in weight_spec order: fused, cast, contiguous, on the host."""
    for name, shape in weight_spec(config).items():
        parts = [reader.get(src) for src in hf_sources(name)]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{reader.path}: {name} from {hf_sources(name)} has shape "
                                  f"{tuple(tensor.shape)}, config.json implies {shape}")
        yield name, tensor.to(dtype).contiguous()


def dummy_weights(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights of the right shapes, made on ``device`` (no checkpoint needed)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in weight_spec(config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        std = 0.02 if name.endswith(".bias") or name in ("embed.weight", "lm_head.weight") else shape[-1] ** -0.5
        t = torch.empty(shape, dtype=dtype, device=device)
        t.normal_(0.0, std, generator=gen)
        yield name, t
