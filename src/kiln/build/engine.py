"""The engine folder: ``manifest.json`` (versioned, JSON only) + ``rank0.safetensors`` + ``tokenizer/``
(+ ``triton_cache/``, the kernels compiled for a GPU target, which loading reuses).

Nothing in an engine is pickled. The manifest is written last, so a build that stops half-way leaves
no engine that looks complete. Loading checks the format version, the target GPU, that every tensor is
there with the manifest's shape and dtype, and each tensor's CRC32.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln.build.target import check_target_present
from kiln.config import BuildConfig
from kiln.convert.safetensors_io import DTYPE_NAMES, DTYPE_TO_ST, read_verified, write_streaming
from kiln.errors import EngineError
from kiln.models.config import ModelConfig
from kiln.models.decoder import weight_spec
from kiln.version import ENGINE_FORMAT_VERSION, __version__

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "rank0.safetensors"
TOKENIZER_DIR = "tokenizer"
COMPILE_CACHE_DIR = "triton_cache"  # the Triton kernels compiled for this engine (GPU targets)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class EngineManifest:
    model_config: ModelConfig
    build_config: BuildConfig  # dtype and target resolved (never "auto")
    target_device_name: str
    kernel_plan: dict[str, Any]
    memory_plan: dict[str, int]
    tensors: dict[str, dict[str, Any]]
    has_tokenizer: bool
    kiln_version: str = __version__
    format_version: int = ENGINE_FORMAT_VERSION
    created: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.build_config.dtype]

    @property
    def target(self) -> str:
        return self.build_config.target

    def to_json(self) -> str:
        return json.dumps({
            "format_version": self.format_version,
            "kiln_version": self.kiln_version,
            "created": self.created,
            "target": {"name": self.target, "device_name": self.target_device_name},
            "model_config": self.model_config.to_dict(),
            "build_config": self.build_config.to_dict(),
            "memory_plan": self.memory_plan,
            "kernel_plan": self.kernel_plan,
            "has_tokenizer": self.has_tokenizer,
            "files": {"weights": WEIGHTS_FILE},
            "tensors": self.tensors,
        }, indent=1)

    @classmethod
    def read(cls, engine_dir: str | Path) -> "EngineManifest":
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST_FILE
        if not engine_dir.is_dir():
            raise EngineError(f"{engine_dir}: no such engine folder; build one with kiln build")
        if not path.is_file():
            raise EngineError(f"{path}: missing (incomplete build, or not an engine folder); rebuild the engine")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"{path}: not valid JSON ({e}); rebuild the engine") from e
        version = d.get("format_version")
        if not isinstance(version, int):
            raise EngineError(f"{path}: field format_version missing; rebuild the engine")
        if version > ENGINE_FORMAT_VERSION:
            raise EngineError(f"{path}: format_version {version} is newer than this kiln reads "
                              f"({ENGINE_FORMAT_VERSION}, kiln {__version__}); upgrade kiln or rebuild the engine")
        if version < ENGINE_FORMAT_VERSION:
            raise EngineError(f"{path}: format_version {version} is older than this kiln's "
                              f"({ENGINE_FORMAT_VERSION}); rebuild the engine")
        try:
            build_config = BuildConfig.from_dict(d["build_config"])
            if d["target"]["name"] != build_config.target:
                raise EngineError(f"{path}: target.name {d['target']['name']!r} disagrees with build_config.target "
                                  f"{build_config.target!r} (manifest edited?); rebuild the engine")
            return cls(
                model_config=ModelConfig.from_dict(d["model_config"]),
                build_config=build_config,
                target_device_name=d["target"]["device_name"],
                kernel_plan=d["kernel_plan"],
                memory_plan=d["memory_plan"],
                tensors=d["tensors"],
                has_tokenizer=d["has_tokenizer"],
                kiln_version=d["kiln_version"],
                format_version=version,
                created=d.get("created", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path}: field {e} missing or invalid; rebuild the engine") from e


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
        dtype = m.dtype
        spec = {name: (shape, dtype) for name, shape in weight_spec(m.model_config).items()}
        total = m.memory_plan["weight_bytes"]
        with tqdm(total=total, unit="B", unit_scale=True, desc="build: writing weights", disable=not progress) as bar:
            checksums = write_streaming(engine_dir / WEIGHTS_FILE, spec, self.produce_weights(),
                                        metadata={"format": "pt", "kiln_version": __version__},
                                        on_tensor=lambda _n, nbytes: bar.update(nbytes))
        tensors = {name: {"shape": list(shape), "dtype": DTYPE_TO_ST[dtype], "crc32": checksums[name]}
                   for name, (shape, dtype) in spec.items()}
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
