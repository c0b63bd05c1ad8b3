"""Offline throughput: a dataset through a backend, all requests at once or under a concurrency cap.

kiln's backend drives the Executor: every request asks for exactly its ``output_tokens`` (EOS ignored;
greedy unless a ``BenchSampling`` says otherwise; token ids only, no text, as the hf backend) and its
responses come back through a callback; under a cap, the next request is enqueued when one finishes.
``run_throughput`` runs one or more backends at one or more concurrencies (a sweep, for the
latency-throughput curve), loading each backend once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import gc
import itertools
import multiprocessing
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from kiln.bench.dataset import BenchRequest
from kiln.bench.report import BenchRun, RequestRecord, build_report, engine_details, machine_details
from kiln.config import RuntimeConfig, SamplingParams
from kiln.errors import ConfigError, KilnError, RequestError
from kiln.runtime.executor import Executor, IterationStats
from kiln.runtime.request import Request, Response
from kiln.version import __version__

# Warmup requests keep their prompts but stop after this many tokens: a prompt and a few decode steps
# run every kernel and CUDA graph once, and long outputs would only lengthen the warmup.
WARMUP_OUTPUT_TOKENS = 8
STATS_POLL_SECONDS = 0.25  # the executor keeps its last 1000 iterations' stats; read them well before


@dataclass(frozen=True)
class BenchSampling:
    """How every request of a run samples: greedy by default. With a temperature each request is seeded
    (``seed`` + its task id), so two runs draw the same tokens (``--temperature 0.8 --top-p 0.95``: the
    sampled run to set beside a greedy one)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        try:
            self.params(0, 1)
        except RequestError as e:  # before any engine is loaded
            raise ConfigError(f"{e} (--temperature {self.temperature}, --top-p {self.top_p})") from None

    def params(self, task_id: int, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed + task_id, ignore_eos=True, detokenize=False)

    @property
    def is_greedy(self) -> bool:
        return self.params(0, 1).is_greedy

    def describe(self) -> str:
        return ("greedy" if self.is_greedy else
                f"temperature {self.temperature}, top_p {self.top_p}, seed {self.seed} + task id")


class Backend(Protocol):
    name: str
    device: torch.device

    def describe(self, concurrency: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(engine details, world + runtime information) for the report of a run at ``concurrency``."""

    def run(self, requests: list[BenchRequest], concurrency: int | None, streaming: bool,
            progress: bool) -> BenchRun: ...

    def close(self) -> None: ...


class KilnBackend:
    name = "kiln"

    def __init__(self, engine_dir: str | Path, config: RuntimeConfig, progress: bool = True,
                 sampling: BenchSampling = BenchSampling()):
        self.engine_dir = Path(engine_dir)
        self.sampling = sampling
        self.executor = Executor(engine_dir, config, progress=progress)
        self.device = self.executor.engine.device

    def describe(self, concurrency: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
        ex = self.executor
        manifest, config = ex.engine.manifest, ex.config
        build = manifest.build_config
        engine = engine_details(self.engine_dir, manifest, self.name, __version__, build.dtype)
        world = {
            "tp_size": build.tp_size, "pp_size": 1, "world_size": build.tp_size,
            "max_batch_size": ex.max_batch_size, "max_num_tokens": ex.max_num_tokens,
            "scheduling_policy": config.scheduler_config.capacity_scheduler_policy,
            "kv_cache_percentage": (config.kv_cache_config.free_gpu_memory_fraction if self.device.type == "cuda"
                                    else None),
            "kv_cache_blocks": ex.pool.num_blocks, "tokens_per_block": build.tokens_per_block,
            "enable_chunked_context": config.scheduler_config.enable_chunked_context,
            "sampling": self.sampling.describe(),
        }
        return engine, world

    def run(self, requests: list[BenchRequest], concurrency: int | None, streaming: bool,
            progress: bool) -> BenchRun:
        executor = self.executor
        events: queue.SimpleQueue[Response] = queue.SimpleQueue()
        waiting = collections.deque(requests)
        active: dict[int, _InFlight] = {}
        records: list[RequestRecord] = []
        totals = _IterationTotals(executor.pool.num_blocks)
        limit = concurrency or len(requests)

        def submit() -> None:
            while waiting and len(active) < limit:
                item = waiting.popleft()
                params = self.sampling.params(item.task_id, item.output_tokens)
                request = Request(list(item.input_ids), sampling_params=params, streaming=streaming)
                active[executor.enqueue_request(request, on_response=events.put)] = _InFlight(item)

        executor.get_latest_iteration_stats()  # drop the warmup's
        last_poll = time.monotonic()
        try:
            with tqdm(total=len(requests), desc=f"{self.name} requests", unit="req", disable=not progress) as bar:
                submit()
                while active:
                    if time.monotonic() - last_poll > STATS_POLL_SECONDS:
                        totals.add(executor.get_latest_iteration_stats())
                        last_poll = time.monotonic()
                    try:
                        response = events.get(timeout=1.0)
                    except queue.Empty:
                        if not executor.is_alive():
                            raise KilnError(f"the executor stopped with {len(active)} requests unfinished")
                        continue
                    record = _account(active, response)
                    if record is not None:
                        records.append(record)
                        bar.update(1)
                        submit()
        finally:
            for request_id in active:
                executor.cancel_request(request_id)
        totals.add(executor.get_latest_iteration_stats())
        return BenchRun(records, totals.as_dict())

    def close(self) -> None:
        self.executor.shutdown()
        del self.executor


@dataclass
class _InFlight:
    item: BenchRequest
    num_output_tokens: int = 0


def _account(active: dict[int, _InFlight], response: Response) -> RequestRecord | None:
    """Counts a response's tokens (streaming responses are deltas); a final one ends its request, which
    must have produced exactly its output_tokens."""
    state = active[response.request_id]
    item = state.item
    if response.has_error():
        raise KilnError(f"task {item.task_id} failed: {response.error_msg}")
    result = response.result
    state.num_output_tokens += len(result.output_token_ids[0])
    if not result.is_final:
        return None
    del active[response.request_id]
    if state.num_output_tokens != item.output_tokens:
        raise KilnError(f"task {item.task_id} produced {state.num_output_tokens} of its {item.output_tokens} "
                        f"output tokens (finish reason {result.finish_reasons[0]!r})")
    return RequestRecord(item.task_id, len(item.input_ids), state.num_output_tokens, result.arrival_time,
                         result.first_token_time, result.finish_time)


class _IterationTotals:
    """Batch sizes and KV use over a run, from the executor's iteration stats."""

    def __init__(self, kv_blocks_total: int):
        self.kv_blocks_total = kv_blocks_total
        self.num_iterations = self.batch_size_sum = self.max_batch_size = 0
        self.peak_kv_blocks_used = self.num_preempted = 0

    def add(self, stats: list[IterationStats]) -> None:
        for s in stats:
            self.num_iterations += 1
            self.batch_size_sum += s.batch_size
            self.max_batch_size = max(self.max_batch_size, s.batch_size)
            self.peak_kv_blocks_used = max(self.peak_kv_blocks_used, s.kv_blocks_used)
            self.num_preempted += s.num_preempted

    def as_dict(self) -> dict[str, Any]:
        return {"num_iterations": self.num_iterations,
                "avg_batch_size": self.batch_size_sum / max(self.num_iterations, 1),
                "max_batch_size": self.max_batch_size, "num_preempted": self.num_preempted,
                "peak_kv_blocks_used": self.peak_kv_blocks_used, "kv_blocks_total": self.kv_blocks_total}


def release_device_memory(device: torch.device) -> None:
    """Frees what a closed backend left cached, so the next backend of a sweep has the GPU to itself."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _open_kiln(engine_dir: Path, config: RuntimeConfig, hf_model: Path | None, progress: bool,
               sampling: BenchSampling) -> Backend:
    return KilnBackend(engine_dir, config, progress, sampling)


def _open_hf(engine_dir: Path, config: RuntimeConfig, hf_model: Path | None, progress: bool,
             sampling: BenchSampling) -> Backend:
    from kiln.bench.hf_backend import HFBackend  # imports transformers

    if not sampling.is_greedy:
        raise ConfigError(HF_GREEDY_ONLY)

    return HFBackend(engine_dir, hf_model, max_batch_size=config.max_batch_size, progress=progress)


BACKENDS = {"kiln": _open_kiln, "hf": _open_hf}
HF_GREEDY_ONLY = "the hf backend samples greedily only; leave out --temperature, or hf from --backend"


def open_backend(name: str, engine_dir: str | Path, config: RuntimeConfig, hf_model: str | Path | None = None,
                 progress: bool = True, sampling: BenchSampling = BenchSampling()) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name](Path(engine_dir), config, None if hf_model is None else Path(hf_model), progress, sampling)


def benchmark(backend: Backend, requests: list[BenchRequest], *, concurrency: int | None = None,
              streaming: bool = False, warmup: int = 0, dataset_path: str | Path | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Warms the backend up on ``warmup`` shortened requests, then runs and reports ``requests``."""
    if warmup:
        backend.run(warmup_requests(requests, warmup), concurrency, streaming, progress=False)
    run = backend.run(requests, concurrency, streaming, progress)
    engine, world = backend.describe(concurrency)
    return build_report(run, engine=engine, machine=machine_details(backend.device), world=world,
                        requests=requests, dataset_path=dataset_path, streaming=streaming, concurrency=concurrency)


def warmup_requests(requests: list[BenchRequest], count: int) -> list[BenchRequest]:
    return [BenchRequest(-1 - i, r.input_ids, min(r.output_tokens, WARMUP_OUTPUT_TOKENS))
            for i, r in zip(range(count), itertools.cycle(requests))]


def run_throughput(engine_dir: str | Path, requests: list[BenchRequest], *, backends: list[str],
                   config: RuntimeConfig, concurrencies: list[int | None], waves: int | None = None,
                   streaming: bool = False, warmup: int = 0, hf_model: str | Path | None = None,
                   dataset_path: str | Path | None = None, progress: bool = True,
                   sampling: BenchSampling = BenchSampling()) -> list[dict[str, Any]]:
    """One report per (backend, concurrency). With ``waves``, a run at concurrency c takes the first
    waves * c requests, so low concurrencies of a sweep stay short.

    With several backends each runs in a process of its own, so none measures in what another left:
    OpenMP thread teams (a second team on the same cores makes every parallel op of the other wait for
    its threads to wake), allocator state, GPU memory."""
    run = functools.partial(_run_backend, engine_dir=engine_dir, requests=requests, config=config,
                            concurrencies=concurrencies, waves=waves, streaming=streaming, warmup=warmup,
                            hf_model=hf_model, dataset_path=dataset_path, progress=progress, sampling=sampling)
    if len(backends) == 1:
        return run(backends[0])
    reports = []
    for name in backends:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                reports += pool.submit(run, name).result()
            except concurrent.futures.BrokenExecutor as e:
                raise KilnError(f"the {name} backend's process died ({e}); run it alone to see why") from e
    return reports


def _run_backend(name: str, *, engine_dir: str | Path, requests: list[BenchRequest], config: RuntimeConfig,
                 concurrencies: list[int | None], waves: int | None, streaming: bool, warmup: int,
                 hf_model: str | Path | None, dataset_path: str | Path | None, progress: bool,
                 sampling: BenchSampling) -> list[dict[str, Any]]:
    reports = []
    backend = open_backend(name, engine_dir, config, hf_model, progress, sampling)
    try:
        for concurrency in concurrencies:
            subset = requests if waves is None or concurrency is None else requests[:waves * concurrency]
            reports.append(benchmark(backend, subset, concurrency=concurrency, streaming=streaming,
                                     warmup=warmup, dataset_path=dataset_path, progress=progress))
    finally:
        backend.close()
        release_device_memory(backend.device)
    return reports
