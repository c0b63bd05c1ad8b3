"""Safetensors files written tensor by tensor and read back with per-tensor CRC32 checks.

The format is the standard one (8-byte header length, JSON header, raw little-endian bytes), so any
safetensors reader opens kiln engines. kiln writes it itself because the header can be laid out from
the weight spec before any tensor exists: each tensor is converted, written and dropped, so peak host
memory is one tensor group, not the whole model.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kiln.errors import EngineError

DTYPE_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
               torch.int64: "I64", torch.uint8: "U8", torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3"}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes (host, contiguous) without a copy beyond the device transfer."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # flattened first: a 0-d tensor has no byte view


def write_streaming(path: Path, spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
                    produce: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                    on_tensor: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Writes tensors in spec order as ``produce`` yields them; returns name -> crc32 of its bytes."""
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name, (shape, dtype) in spec.items():
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    checksums: dict[str, int] = {}
    expected = iter(spec.items())
    tmp = path.with_suffix(path.suffix + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for name, tensor in produce:
                want_name, (shape, dtype) = next(expected)
                if name != want_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise EngineError(f"internal: converter produced {name} {tuple(tensor.shape)} {tensor.dtype}, "
                                      f"expected {want_name} {tuple(shape)} {dtype}")
                data = tensor_bytes(tensor)
                f.write(data)
                checksums[name] = zlib.crc32(data)
                if on_tensor:
                    on_tensor(name, data.nbytes)
            leftover = [n for n, _ in expected]
            if leftover:
                raise EngineError(f"internal: converter did not produce {', '.join(leftover[:5])}")
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed or interrupted build leaves no half-written file behind
        raise
    os.replace(tmp, path)
    return checksums


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset); errors name the file when it is not a whole safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise EngineError(f"{path}: truncated (no safetensors header); rebuild the engine")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise EngineError(f"{path}: corrupt safetensors header length; rebuild the engine")
            body = f.read(n)
        if len(body) < n:
            raise EngineError(f"{path}: truncated inside its header; rebuild the engine")
        return json.loads(body), 8 + n
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: cannot read safetensors header ({e}); rebuild the engine") from e


def read_verified(path: Path, expected: dict[str, dict], device: torch.device, verify: bool = True,
                  num_threads: int = 16, on_tensor: Callable[[str, int], None] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Loads every tensor of ``expected`` (name -> {shape, dtype, crc32}) onto ``device``.

    Checks names, shapes, dtypes and file size against the manifest, and (verify=True) each tensor's
    CRC32 on the mapped bytes, in parallel threads (zlib releases the GIL).
    """
    header, start = read_header(path)
    header.pop("__metadata__", None)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise EngineError(f"{path}: tensors do not match the manifest (missing {missing[:3]}, unexpected "
                          f"{extra[:3]}); rebuild the engine")
    end = max((h["data_offsets"][1] for h in header.values()), default=0)
    size = path.stat().st_size
    if size != start + end:
        raise EngineError(f"{path}: file is {size} bytes, expected {start + end} (truncated or altered); "
                          "rebuild the engine")
    for name, want in expected.items():
        got = header[name]
        if list(got["shape"]) != list(want["shape"]) or got["dtype"] != want["dtype"]:
            raise EngineError(f"{path}: tensor {name} is {got['dtype']}{got['shape']}, manifest says "
                              f"{want['dtype']}{want['shape']}; rebuild the engine")
    with open(path, "rb") as f:
        # ACCESS_COPY: a writable (copy-on-write) mapping, so torch.frombuffer needs no warning or copy.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mm)

    def check(name: str) -> str | None:
        a, b = header[name]["data_offsets"]
        return None if zlib.crc32(view[start + a:start + b]) == expected[name]["crc32"] else name

    if verify:
        with ThreadPoolExecutor(num_threads) as pool:
            bad = [n for n in pool.map(check, expected) if n]
        if bad:
            raise EngineError(f"{path}: checksum mismatch in {', '.join(bad[:3])} (file altered or damaged); "
                              "rebuild the engine")
    def load(name: str) -> torch.Tensor:
        h = header[name]
        a, b = h["data_offsets"]
        dtype = ST_TO_DTYPE[h["dtype"]]
        if b == a:
            return torch.empty(h["shape"], dtype=dtype, device=device)
        host = torch.frombuffer(view[start + a:start + b], dtype=torch.uint8)
        return host.view(dtype).reshape(h["shape"]).to(device, copy=True)

    tensors: dict[str, torch.Tensor] = {}
    for name in expected:
        tensors[name] = load(name)
        if on_tensor:
            on_tensor(name, tensors[name].nbytes)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del view
    mm.close()
    return tensors
