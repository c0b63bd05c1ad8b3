"""Latency: one request at a time, streaming, so TTFT, TPOT and end-to-end latency are those of an
otherwise idle engine (the runtime batch size is lowered to 1, which also keeps CUDA graph capture short)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kiln.bench.dataset import BenchRequest
from kiln.bench.throughput import BenchSampling, KilnBackend, benchmark
from kiln.config import RuntimeConfig


def run_latency(engine_dir: str | Path, requests: list[BenchRequest], *, config: RuntimeConfig | None = None,
                warmup: int = 0, dataset_path: str | Path | None = None, progress: bool = True,
                sampling: BenchSampling = BenchSampling()) -> dict[str, Any]:
    backend = KilnBackend(engine_dir, dataclasses.replace(config or RuntimeConfig(), max_batch_size=1), progress,
                          sampling)
    try:
        return benchmark(backend, requests, concurrency=1, streaming=True, warmup=warmup,
                         dataset_path=dataset_path, progress=progress)
    finally:
        backend.close()
