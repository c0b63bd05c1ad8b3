"""A built engine (manifest + a producer of its weights) saved to a folder, and its weights loaded back.

The manifest is written last, so a build that stops half-way leaves no engine that looks complete.
Loading checks that every tensor is there with the manifest's shape and dtype, and each tensor's CRC32.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kiln.engine.manifest import (COMPILE_CACHE_DIR, MANIFEST_FILE, TOKENIZER_DIR, TOKENIZER_FILES, WEIGHTS_FILE,
                                  EngineManifest)
from kiln.engine.target import check_target_present
from kiln.engine.weights import ST_TO_DTYPE, read_verified, write_streaming
from kiln.errors import EngineError
from kiln.version import __version__


@dataclass
class Engine:
    """A built engine: the manifest and a producer of its weights, streamed to disk by ``save``."""

    manifest: EngineManifest
    produce_weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer_source: Path | None
    kernel_cache: tempfile.TemporaryDirectory | None = None  # Triton kernels compiled by the build

    def save(self, engine_dir: str | Path, progress: bool = True) -> Path:
        engine_dir = Path(engine_dir)
        engine_dir.mkdir(parents=True, exist_ok=True)
        (engine_dir / MANIFEST_FILE).unlink(missing_ok=True)
        m = self.manifest
        spec = {name: (tuple(t["shape"]), ST_TO_DTYPE[t["dtype"]]) for name, t in m.tensors.items()}
        total = m.memory_plan["weight_bytes"]
        with tqdm(total=total, unit="B", unit_scale=True, desc="build: writing weights", disable=not progress) as bar:
            checksums = write_streaming(engine_dir / WEIGHTS_FILE, spec, self.produce_weights(),
                                        metadata={"format": "pt", "kiln_version": __version__},
                                        on_tensor=lambda _n, nbytes: bar.update(nbytes))
        tensors = {name: {**t, "crc32": checksums[name]} for name, t in m.tensors.items()}
        has_tokenizer = self._copy_tokenizer(engine_dir)
        if self.kernel_cache is not None:
            shutil.copytree(self.kernel_cache.name, engine_dir / COMPILE_CACHE_DIR, dirs_exist_ok=True)
        final = EngineManifest(**{**m.__dict__, "tensors": tensors, "has_tokenizer": has_tokenizer,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        tmp = engine_dir / (MANIFEST_FILE + ".partial")
        tmp.write_text(final.to_json())
        tmp.replace(engine_dir / MANIFEST_FILE)
        self.manifest = final
        return engine_dir

    def _copy_tokenizer(self, engine_dir: Path) -> bool:
        out = engine_dir / TOKENIZER_DIR
        if out.exists():
            shutil.rmtree(out)
        if self.tokenizer_source is None:
            return False
        files = [self.tokenizer_source / f for f in TOKENIZER_FILES if (self.tokenizer_source / f).is_file()]
        if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
            return False
        out.mkdir()
        for f in files:
            shutil.copyfile(f, out / f.name)
        return True


def load_weights(engine_dir: str | Path, manifest: EngineManifest, device: torch.device, verify: bool = True,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    path = Path(engine_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise EngineError(f"{path}: missing; rebuild the engine")
    total = manifest.memory_plan["weight_bytes"]
    with tqdm(total=total, unit="B", unit_scale=True, desc="load: weights", disable=not progress) as bar:
        return read_verified(path, manifest.tensors, device, verify=verify,
                             on_tensor=lambda _n, nbytes: bar.update(nbytes))


def engine_device(manifest: EngineManifest) -> torch.device:
    return check_target_present(manifest.target, manifest.target_device_name)
