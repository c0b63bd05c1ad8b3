"""A built engine (manifest + a producer of its weights) saved to a folder, and its weights loaded back.

The manifest is written last, so a build that stops half-way leaves no engine that looks complete.
Loading checks that every tensor is there with the manifest's shape and dtype, and each tensor's CRC32.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kiln.engine.manifest import (COMPILE_CACHE_DIR, MANIFEST_FILE, TOKENIZER_DIR, TOKENIZER_FILES,
                                  WEIGHTS_FILE_PATTERN, EngineManifest, weights_file)
from kiln.engine.target import check_target_present
from kiln.engine.weights import ST_TO_DTYPE, read_verified, write_streaming
from kiln.errors import EngineError
from kiln.version import __version__

# What an engine folder holds (besides its ranks' weight files); save replaces these and nothing else.
ENGINE_ENTRIES = (MANIFEST_FILE, MANIFEST_FILE + ".partial", TOKENIZER_DIR, COMPILE_CACHE_DIR)


def is_engine_entry(name: str) -> bool:
    return name in ENGINE_ENTRIES or WEIGHTS_FILE_PATTERN.fullmatch(name.removesuffix(".partial")) is not None


@dataclass
class Engine:
    """A built engine: the manifest and a producer of each rank's weights, streamed to disk by ``save``."""

    manifest: EngineManifest
    produce_weights: Callable[[int], Iterator[tuple[str, torch.Tensor]]]  # rank -> its (name, tensor)s
    tokenizer_source: Path | None
    kernel_cache: tempfile.TemporaryDirectory | None = None  # Triton kernels compiled by the build

    def save(self, engine_dir: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
        """Writes the engine into ``engine_dir``: a new or empty folder, or one holding an engine when
        ``overwrite`` (check_output_dir says why not otherwise)."""
        engine_dir = Path(engine_dir)
        check_output_dir(engine_dir, overwrite)
        engine_dir.mkdir(parents=True, exist_ok=True)
        # The manifest first: a folder without one is never taken for an engine.
        old = sorted((engine_dir / n for n in os.listdir(engine_dir) if is_engine_entry(n)),
                     key=lambda p: p.name != MANIFEST_FILE)
        for path in old:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        m = self.manifest
        spec = {name: (tuple(t["shape"]), ST_TO_DTYPE[t["dtype"]]) for name, t in m.tensors.items()}
        total = m.memory_plan["weight_bytes"] * m.tp_size
        rank_checksums = []
        with tqdm(total=total, unit="B", unit_scale=True, desc="build: writing weights", disable=not progress) as bar:
            for rank in range(m.tp_size):
                rank_checksums.append(write_streaming(
                    engine_dir / weights_file(rank), spec, self.produce_weights(rank),
                    metadata={"format": "pt", "kiln_version": __version__, "rank": str(rank),
                              "tp_size": str(m.tp_size)},
                    on_tensor=lambda _n, nbytes: bar.update(nbytes)))
        tensors = {name: {**t, "crc32": [c[name] for c in rank_checksums] if m.tp_size > 1 else rank_checksums[0][name]}
                   for name, t in m.tensors.items()}
        has_tokenizer = self._copy_tokenizer(engine_dir)
        if self.kernel_cache is not None:
            shutil.copytree(self.kernel_cache.name, engine_dir / COMPILE_CACHE_DIR)
        final = EngineManifest(**{**m.__dict__, "tensors": tensors, "has_tokenizer": has_tokenizer,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        final.write(engine_dir)
        self.manifest = final
        return engine_dir

    def _copy_tokenizer(self, engine_dir: Path) -> bool:
        out = engine_dir / TOKENIZER_DIR
        if self.tokenizer_source is None:
            return False
        files = [self.tokenizer_source / f for f in TOKENIZER_FILES if (self.tokenizer_source / f).is_file()]
        if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
            return False
        out.mkdir()
        for f in files:
            shutil.copyfile(f, out / f.name)
        return True


def check_output_dir(engine_dir: str | Path, overwrite: bool = False) -> None:
    """An engine may be saved into ``engine_dir``: it is missing or empty, or holds an engine (complete or
    not) and ``overwrite`` is set. Files that are not an engine's are never replaced, as TensorRT-LLM's
    tools do not clobber unrelated files: a folder holding any refuses, overwrite or not."""
    engine_dir = Path(engine_dir)
    if engine_dir.exists() and not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: a file, not a folder; give a folder for the engine")
    names = sorted(p.name for p in engine_dir.iterdir()) if engine_dir.is_dir() else []
    others = [name for name in names if not is_engine_entry(name)]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise EngineError(f"{engine_dir} holds files that are not an engine's: {shown}; kiln does not replace "
                          "them: choose a new or empty folder")
    if names and not overwrite:
        raise EngineError(f"{engine_dir} already holds an engine; add --overwrite (overwrite=True) to replace it, "
                          "or choose another folder")


def load_weights(engine_dir: str | Path, manifest: EngineManifest, device: torch.device, verify: bool = True,
                 progress: bool = True, rank: int = 0) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank ``rank``'s weights (its own file), checked against the manifest."""
    path = Path(engine_dir) / weights_file(rank)
    if not path.is_file():
        raise EngineError(f"{path}: missing; rebuild the engine")
    total = manifest.memory_plan["weight_bytes"]
    with tqdm(total=total, unit="B", unit_scale=True, desc="load: weights", disable=not progress) as bar:
        return read_verified(path, manifest.rank_tensors(rank), device, verify=verify,
                             on_tensor=lambda _n, nbytes: bar.update(nbytes))


def engine_device(manifest: EngineManifest) -> torch.device:
    return check_target_present(manifest.target, manifest.target_device_name)
