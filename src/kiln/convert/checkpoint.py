"""Reading Hugging Face checkpoint folders lazily, one tensor at a time.

Safetensors (single file or sharded with ``model.safetensors.index.json``) are memory-mapped;
``pytorch_model*.bin`` files are read only with ``torch.load(weights_only=True)`` (memory-mapped
where the file's format allows), never unpickled freely.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open

from kiln.errors import CheckpointError


class CheckpointReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        files = self._weight_files()
        for file in files:
            for name in self._names_in(file):
                self._file_of[name] = file

    def _weight_files(self) -> list[Path]:
        p = self.path
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = p / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                files = sorted({p / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"{index}: shard files missing: {', '.join(missing[:3])}")
                return files
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            files = sorted(p.glob(pattern))
            if files:
                return files
        raise CheckpointError(f"{p}: no weights found (model.safetensors, sharded safetensors or "
                              "pytorch_model*.bin)")

    def _names_in(self, file: Path) -> list[str]:
        return list(self._open(file).keys())

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                if file.suffix == ".safetensors":
                    self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
                else:
                    self._handles[file] = _load_bin(file)
            except CheckpointError:
                raise
            except Exception as e:  # damaged files come in many shapes; name the file, keep one line
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{file}: cannot read weights ({reason})") from e
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        handle = self._open(self._file_of[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file's metadata, without reading its data."""
        handle = self._open(self._file_of[name])
        return tuple(handle.get_slice(name).get_shape() if hasattr(handle, "get_slice") else handle[name].shape)


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (non-zip) files cannot be memory-mapped; still restricted to weights only.
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(f"{file}: holds Python objects besides tensors"
                              f"{f' ({culprit.group(1)})' if culprit else ''}; kiln reads .bin files with "
                              "torch.load(weights_only=True) only and never unpickles arbitrary objects: "
                              "convert it to safetensors") from e
