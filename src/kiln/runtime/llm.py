"""The LLM API: prompts in, RequestOutputs out, on top of the Executor.

``LLM(path)`` takes an engine folder, a Hugging Face folder (built once and cached per build config in
the user cache folder) or nothing (the bundled stories260K model).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from kiln.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE, EngineManifest
from kiln.config import BuildConfig, KvCacheConfig, RuntimeConfig, SamplingParams, SchedulerConfig
from kiln.errors import ConfigError, KilnError, RequestError
from kiln.runtime.executor import Executor
from kiln.runtime.request import Request, Response
from kiln.version import ENGINE_FORMAT_VERSION, __version__

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "stories260K"
DEFAULT_MODEL_NAME = "stories260K"
CACHE_DIR_ENV = "KILN_CACHE_DIR"

logger = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None  # per token: top-k ids -> logprob (sampled token included)
    cumulative_logprob: float | None = None
    text_diff: str = ""
    token_ids_diff: list[int] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None


def cache_root() -> Path:
    """Where engines built from Hugging Face folders are kept: $KILN_CACHE_DIR/engines if set, else
    $XDG_CACHE_HOME/kiln/engines, else ~/.cache/kiln/engines."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser() / "engines"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kiln" / "engines"


def ensure_engine(model: str | Path | None, build_config: BuildConfig | dict | None = None,
                  progress: bool = True) -> Path:
    """An engine folder for ``model``: itself if it is one, else built (once) into the user cache,
    saying so on stderr."""
    from kiln.builder import Builder, resolve_build_config
    from kiln.convert import AutoModelForCausalLM

    path = Path(model) if model is not None else DEFAULT_MODEL_DIR
    if (path / MANIFEST_FILE).is_file():
        if build_config is not None:
            raise ConfigError(f"{path} is already an engine; build options apply to Hugging Face folders only")
        return path
    if (path / WEIGHTS_FILE).is_file() and not (path / "config.json").is_file():
        EngineManifest.read(path)  # an engine folder without its manifest: says so, and how to fix it
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: neither an engine folder ({MANIFEST_FILE}) nor a Hugging Face model folder "
                          "(config.json)")
    source = AutoModelForCausalLM.from_hugging_face(path)
    if build_config is None and path == DEFAULT_MODEL_DIR:
        build_config = BuildConfig(max_batch_size=64, max_input_len=256, max_seq_len=512, max_num_tokens=2048)
    resolved = resolve_build_config(source.config, BuildConfig.of(build_config), source.checkpoint_dir)
    stamp = [__version__, ENGINE_FORMAT_VERSION, str(path.resolve()), resolved.to_dict()]
    stamp += [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file()]
    if resolved.calibration_data is not None:  # int4_awq: an edited calibration file makes another engine
        calibration = Path(resolved.calibration_data).stat()
        stamp.append((calibration.st_size, calibration.st_mtime_ns))
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    engine_dir = cache_root() / f"{path.name}-{key}"
    if (engine_dir / MANIFEST_FILE).is_file():
        try:
            EngineManifest.read(engine_dir)
            return engine_dir
        except KilnError:
            pass  # stale or damaged cache entry: rebuild it
    _check_writable(engine_dir.parent)
    print(f"kiln: building an engine for {path} (first use; cached in {engine_dir})", file=sys.stderr, flush=True)
    Builder().build(source, resolved).save(engine_dir, overwrite=True, progress=progress)  # a stale entry goes
    return engine_dir


def _with_tp_size(model: str | Path | None, build_config: BuildConfig | dict | None, tp_size: int
                  ) -> BuildConfig | dict | None:
    """LLM(tensor_parallel_size=N): the build's tp_size for a Hugging Face folder; for an engine folder, it
    must be the one the engine was built for."""
    if model is not None and (Path(model) / MANIFEST_FILE).is_file():
        built = EngineManifest.read(model).tp_size
        if tp_size != built:
            raise ConfigError(f"tensor_parallel_size={tp_size}, but {model} is built for tp_size={built}; leave "
                              f"tensor_parallel_size out, or rebuild the engine with --tp-size {tp_size}")
        return build_config
    config = BuildConfig.of(build_config)
    if config.tp_size not in (1, tp_size):
        raise ConfigError(f"tensor_parallel_size={tp_size} disagrees with build_config.tp_size={config.tp_size}; "
                          "give one of them")
    return config.replace(tp_size=tp_size)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ConfigError(f"engine cache {folder} is not writable ({e.strerror or e}); set {CACHE_DIR_ENV} to a "
                          "writable folder, or build with kiln build --output DIR and load DIR") from None


class LLM:
    def __init__(self, model: str | Path | None = None, *, max_batch_size: int | None = None,
                 max_num_tokens: int | None = None, kv_cache_config: KvCacheConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None, build_config: BuildConfig | dict | None = None,
                 enable_cuda_graphs: bool = True, enable_overlap: bool = True, device: str | None = None,
                 progress: bool = True, tensor_parallel_size: int | None = None):
        """``tensor_parallel_size``: ranks a Hugging Face folder's engine is built for (BuildConfig.tp_size);
        an engine folder runs on the ranks it was built for, which kiln starts itself (or torchrun's)."""
        if tensor_parallel_size is not None:
            build_config = _with_tp_size(model, build_config, tensor_parallel_size)
        self.engine_dir = ensure_engine(model, build_config, progress=progress)
        config = RuntimeConfig(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                               kv_cache_config=kv_cache_config or KvCacheConfig(),
                               scheduler_config=scheduler_config or SchedulerConfig(),
                               enable_cuda_graphs=enable_cuda_graphs, enable_overlap=enable_overlap, device=device)
        self.executor = Executor(self.engine_dir, config, progress=progress)
        self.tokenizer = self.executor.tokenizer

    # ---- prompts ----------------------------------------------------------------------------------
    def _to_request(self, prompt: Prompt, params: SamplingParams, streaming: bool) -> Request:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer; pass token ids instead of text")
            return Request(self.tokenizer.encode(prompt), sampling_params=params, streaming=streaming, prompt=prompt)
        return Request(list(prompt), sampling_params=params, streaming=streaming)

    @staticmethod
    def _as_batch(prompts) -> list[Prompt]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    # ---- generate ---------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt the engine cannot take (longer than
        max_input_len, prompt + max_tokens beyond max_seq_len, a token id outside the vocabulary, bad
        parameters) raises a RequestError naming the limit before any prompt runs. An error that strikes
        one request while it runs is logged as a warning and kept on its output (``error``, finish
        reason "error"); the other outputs are unaffected."""
        batch = self._as_batch(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise ConfigError(f"got {len(params)} SamplingParams for {len(batch)} prompts")
        requests = [self._to_request(p, sp, streaming=False) for p, sp in zip(batch, params)]
        for i, request in enumerate(requests):  # all of them, before any runs
            try:
                self.executor.validate_request(request)
            except RequestError as e:
                raise RequestError(f"prompts[{i}]: {e}" if len(requests) > 1 else str(e)) from None
        # Responses come through a callback of our own, so another client of the same executor (a
        # concurrent generate, await_responses) neither takes ours nor loses its own.
        finals: queue.SimpleQueue[Response] = queue.SimpleQueue()
        ids = [self.executor.enqueue_request(r, on_response=finals.put) for r in requests]
        by_id = dict(zip(ids, requests))
        done: dict[int, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                try:
                    resp = finals.get(timeout=1.0)
                except queue.Empty:
                    if not self.executor.is_alive():
                        stopped = KilnError("executor stopped before all requests finished")
                        raise (self.executor.failure or stopped) from None
                    continue
                if resp.has_error() and self.executor.failure is not None:  # a rank stopped: nothing finishes
                    raise self.executor.failure
                done[resp.request_id] = _to_output(resp, by_id[resp.request_id], None)
                if resp.has_error():
                    logger.warning("prompts[%d] failed while running: %s", ids.index(resp.request_id),
                                   resp.error_msg)
                bar.update(1)
        return [done[i] for i in ids]

    async def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                             streaming: bool = True) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs as tokens arrive (cumulative text, plus text_diff); the last is final.
        A request beyond the engine's limits raises a RequestError before it runs, as in generate; an
        error while it runs ends it with an output whose ``error`` says why."""
        loop = asyncio.get_running_loop()
        responses: asyncio.Queue[Response] = asyncio.Queue()
        request = self._to_request(prompt, sampling_params or SamplingParams(), streaming)
        self.executor.validate_request(request)

        def deliver(response: Response) -> None:
            try:
                loop.call_soon_threadsafe(responses.put_nowait, response)
            except RuntimeError:  # the consumer left and its event loop closed: the response has no reader
                pass

        request_id = self.executor.enqueue_request(request, on_response=deliver)
        previous = None
        try:
            while True:
                resp = await responses.get()
                previous = _to_output(resp, request, previous)
                previous.request_id = request_id
                yield previous
                if previous.finished:
                    return
        finally:
            if previous is None or not previous.finished:
                self.executor.cancel_request(request_id)

    def shutdown(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _to_output(resp: Response, request: Request, previous: RequestOutput | None) -> RequestOutput:
    """Folds one (possibly delta) response into a cumulative RequestOutput."""
    if resp.has_error():
        outputs = previous.outputs if previous else [CompletionOutput(i, "", [], "error")
                                                     for i in range(request.sampling_params.n)]
        for o in outputs:
            o.finish_reason = "error"
        return RequestOutput(resp.request_id, request.prompt, list(request.input_token_ids), outputs, True,
                             error=resp.error_msg)
    r = resp.result
    outputs = []
    for i, (tokens, text, reason) in enumerate(zip(r.output_token_ids, r.text, r.finish_reasons)):
        before = previous.outputs[i] if previous and i < len(previous.outputs) else None
        lps = cumulative = None
        if r.log_probs is not None:
            new = []
            for chosen, top, token in zip(r.log_probs[i], r.top_logprobs[i], tokens):
                entry = dict(top)
                entry[token] = chosen
                new.append(entry)
            lps = (before.logprobs if before and before.logprobs else []) + new
            # Summed over this response's tokens only: streaming stays linear in the output length.
            cumulative = (before.cumulative_logprob if before and before.cumulative_logprob else 0.0) \
                + sum(r.log_probs[i])
        all_tokens = (before.token_ids if before else []) + tokens
        outputs.append(CompletionOutput(i, (before.text if before else "") + text, all_tokens, reason, lps,
                                        cumulative, text_diff=text, token_ids_diff=tokens))
    metrics = RequestMetrics(r.arrival_time, r.first_token_time, r.finish_time, r.num_cached_prompt_tokens)
    return RequestOutput(resp.request_id, request.prompt, list(request.input_token_ids), outputs, r.is_final,
                         metrics, r.prompt_logprobs)
