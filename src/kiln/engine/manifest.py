"""The engine folder's format: file names and ``manifest.json`` (versioned, JSON only).

An engine folder holds ``manifest.json`` + one ``rank{i}.safetensors`` per tensor-parallel rank +
``tokenizer/`` (+ ``triton_cache/``, the kernels compiled for a GPU target, which loading reuses). Nothing
in an engine is pickled. The manifest lists every tensor (shape, dtype, CRC32) in file order; it is the
contract between the builder, which writes it, and the runtime, which reads it. Every rank's file holds
the same names and shapes (its slices); a tensor's ``crc32`` is one number at one rank, else a list with
one per rank, and ``sharding`` records which slice of each checkpoint tensor every rank holds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.config import BuildConfig
from kiln.engine.weights import DTYPE_NAMES
from kiln.errors import EngineError
from kiln.models.config import ModelConfig
from kiln.version import ENGINE_FORMAT_VERSION, __version__

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE_PATTERN = re.compile(r"rank\d+\.safetensors")


def weights_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


WEIGHTS_FILE = weights_file(0)
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
    tensors: dict[str, dict[str, Any]]  # name -> {shape, dtype (safetensors name), crc32 once saved}, file order
    has_tokenizer: bool
    kiln_version: str = __version__
    format_version: int = ENGINE_FORMAT_VERSION
    created: str = ""
    # False for an engine built for a GPU the build machine lacks: its kernel plan is made (and saved in the
    # folder) by the first load on such a GPU.
    is_kernel_plan_tuned: bool = True
    # checkpoint tensor -> {dim, padded, ranks: per rank the [start, stop) ranges it holds}; empty at one rank
    sharding: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tp_size(self) -> int:
        return self.build_config.tp_size

    def rank_tensors(self, rank: int) -> dict[str, dict[str, Any]]:
        """The tensor table of rank ``rank``'s weight file: its own CRC32 per tensor."""
        if self.tp_size == 1:
            return self.tensors
        return {name: {**t, "crc32": t["crc32"][rank]} if "crc32" in t else t for name, t in self.tensors.items()}

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
            "kernel_plan_tuned": self.is_kernel_plan_tuned,
            "has_tokenizer": self.has_tokenizer,
            "files": {"weights": [weights_file(rank) for rank in range(self.tp_size)]},
            "tensors": self.tensors,
            "sharding": self.sharding,
        }, indent=1)

    def write(self, engine_dir: str | Path) -> None:
        """Atomically: a reader sees the old manifest or the new one, never a part."""
        tmp = Path(engine_dir) / (MANIFEST_FILE + ".partial")
        tmp.write_text(self.to_json())
        tmp.replace(Path(engine_dir) / MANIFEST_FILE)

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
                is_kernel_plan_tuned=d.get("kernel_plan_tuned", True),
                sharding=d.get("sharding", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path}: field {e} missing or invalid; rebuild the engine") from e


