"""Weight conversion: HF checkpoint (or random dummy weights) -> kiln tensors, one at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.name_map import IGNORED, hf_sources
from kiln.errors import CheckpointError
from kiln.models.config import ModelConfig
from kiln.models.decoder import weight_spec


def check_checkpoint(config: ModelConfig, reader: CheckpointReader) -> None:
    """Fails before any conversion, naming missing and unexpected checkpoint tensors, then tensors whose
    shapes (read from file metadata) do not fit config.json."""
    spec = weight_spec(config)
    needed = {src for name in spec for src in hf_sources(name)}
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
    for name, shape in spec.items():
        sources = hf_sources(name)
        shapes = [reader.shape(src) for src in sources]
        if any(s[1:] != shape[1:] for s in shapes) or sum(s[0] for s in shapes) != shape[0]:
            found = ", ".join(f"{src} {list(s)}" for src, s in zip(sources, shapes))
            raise CheckpointError(f"{reader.path}: {found} do not fit config.json, which implies {name} "
                                  f"{list(shape)}; the config does not describe these weights")


def convert_checkpoint(config: ModelConfig, reader: CheckpointReader, dtype: torch.dtype
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (kiln name, tensor) in weight_spec order: fused, cast, contiguous, on the host.
    Shapes were checked by check_checkpoint."""
    for name in weight_spec(config):
        parts = [reader.get(src) for src in hf_sources(name)]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
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
