"""The Executor: in-flight batching over a background loop thread.

Clients enqueue Requests from any thread; the loop drains new requests and cancellations, asks the
scheduler for one batch plan, has the model runner execute it, then turns sampled tokens into
per-request responses (stop checks, detokenization, streaming deltas). A failure in one request's
work becomes an error response for that request alone; the loop and the other requests go on.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.config import RuntimeConfig, SamplingParams
from kiln.engine import EngineManifest
from kiln.errors import KilnError, RankFailure, RequestError
from kiln.runtime.distributed import is_torchrun_worker, run_worker, start_ranks
from kiln.runtime.kv_cache import BlockPool
from kiln.runtime.loader import LoadedEngine, load_engine, num_kv_blocks
from kiln.runtime.model_runner import LaunchedStep, ModelRunner, RunnerOutput, make_runner
from kiln.runtime.request import Request, Response, Result
from kiln.runtime.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from kiln.runtime.sequence import Sequence
from kiln.engine.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

ResponseCallback = Callable[[Response], None]


@dataclass
class IterationStats:
    iteration: int
    timestamp: float
    iteration_time_ms: float
    batch_size: int
    num_context_tokens: int
    num_decode_tokens: int
    num_preempted: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    num_waiting: int
    num_running: int


@dataclass
class _Sample:
    seq: Sequence | None  # None: a sample (n > 1) whose request ended before it was forked
    detok: IncrementalDetokenizer | None
    text: str = ""
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    log_probs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0  # output tokens accepted (the sequence may have pending ones after them)


@dataclass
class _RequestState:
    request_id: int
    request: Request
    params: SamplingParams
    prompt_ids: list[int]
    callback: ResponseCallback | None
    arrival_time: float
    samples: list[_Sample] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    schedule_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def is_finished(self) -> bool:
        return len(self.samples) == self.params.n and all(s.finish_reason for s in self.samples)


class Executor:
    def __init__(self, engine: str | Path | LoadedEngine, config: RuntimeConfig | None = None, progress: bool = False,
                 **options):
        config = config or RuntimeConfig(**options)
        manifest = None if isinstance(engine, LoadedEngine) else EngineManifest.read(engine)
        if manifest is not None and manifest.tp_size > 1 and is_torchrun_worker():
            # A script under torchrun: this rank runs rank 0's steps, then ends; the script goes on at rank 0.
            raise SystemExit(run_worker())
        # A tensor-parallel engine's other ranks (started here, or torchrun's); None at one rank.
        self.ranks = start_ranks(engine, manifest) if manifest is not None else None
        try:
            self._init(engine, config, progress)
        except BaseException:
            if self.ranks is not None:
                self.ranks.stop()
            raise

    def _init(self, engine: str | Path | LoadedEngine, config: RuntimeConfig, progress: bool) -> None:
        if isinstance(engine, LoadedEngine):
            self.engine = engine
        elif self.ranks is not None:
            self.engine = self.ranks.load_engine(engine, config, progress)
        else:
            self.engine = load_engine(engine, config.device, progress=progress)
        build = self.engine.build_config
        self.max_batch_size, self.max_num_tokens = config.resolve(build)
        self.config = config
        num_blocks = num_kv_blocks(self.engine, config.kv_cache_config)
        if self.ranks is not None:  # every rank's pool has the same blocks: the fewest any can hold
            num_blocks = self.ranks.min(num_blocks)
        self.pool = BlockPool(num_blocks, build.tokens_per_block, config.kv_cache_config.enable_block_reuse)
        self.runner: ModelRunner  # made by the loop thread (_run) before __init__ returns
        self.scheduler = Scheduler(self.pool, self.max_batch_size, self.max_num_tokens, build.max_seq_len,
                                   config.scheduler_config.capacity_scheduler_policy,
                                   config.scheduler_config.enable_chunked_context,
                                   self.engine.model_config.sliding_window)
        self.tokenizer = self.engine.tokenizer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._ready: collections.deque[Response] = collections.deque()
        self._ready_cv = threading.Condition()
        self._requests: dict[int, _RequestState] = {}
        self._seq_to_request: dict[int, _RequestState] = {}
        self._next_id = 0
        self._inbox_lock = threading.Lock()  # orders ids, and every add before the shutdown message
        self._accepting = True
        self._stats: collections.deque[IterationStats] = collections.deque(maxlen=1000)
        self._iteration = 0
        self._in_flight: LaunchedStep | None = None  # launched, its tokens not yet processed
        self._last_step_end = 0.0
        self._penalized: set[int] = set()  # requests whose penalties count token ids on the host
        self._shutdown = False
        self.counters = collections.Counter()  # prompt_tokens, generation_tokens, requests_*
        # Called in the loop thread with each step's stats, once its tokens are processed (responses sent);
        # the loop waits for it. Cancellations and requests enqueued from it are handled before the next
        # batch's tokens are processed, so a request cancelled here ends with exactly the tokens of the
        # steps so far, whatever the machine's speed: tests use it to act at a chosen step.
        self.on_step: Callable[[IterationStats], None] | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(num_blocks,), name="kiln-executor", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def _run(self, num_blocks: int) -> None:
        """The loop thread runs every torch op of serving, from the KV cache's allocation on. On the CPU, a
        thread that has run a parallel op keeps an OpenMP team; with a second team (the caller's: zeroing
        the KV cache there made one) on the same cores, OpenMP stops spinning between parallel regions and
        every op of the loop waits for its worker threads to wake. Measured on 2 cores (torch's 2 threads),
        stories260K, 64 requests of 128/128 at once: 4,030-4,180 output tok/s with the cache zeroed by the
        caller, 6,030-6,730 with it zeroed here (3-4 runs each)."""
        try:
            self.runner = make_runner(self.engine, num_blocks, self.max_batch_size, self.max_num_tokens,
                                      self.config.enable_cuda_graphs)
            self.runner.peers = self.ranks
        except BaseException as e:  # raised by __init__, in the caller's thread
            # Without the locals of the frames it passed through (the KV cache, captured graphs), so that a
            # caller who catches it can retry, e.g. with a smaller free_gpu_memory_fraction, in that memory.
            traceback.clear_frames(e.__traceback__)
            self._start_error = e
            return
        finally:
            self._started.set()
        self._loop()

    # ---- client API (any thread) ---------------------------------------------------------------
    def enqueue_request(self, request: Request, on_response: ResponseCallback | None = None) -> int:
        """Queues a request; returns its id. Invalid requests get an error response, never an exception
        that stops the caller's other requests."""
        with self._inbox_lock:
            if self.failure is not None:
                raise self.failure
            if not self._accepting:
                raise KilnError("executor is shut down; create a new one to serve more requests")
            request_id = self._next_id
            self._next_id += 1
            self._inbox.put(("add", request_id, request, on_response, time.time()))
        self._wakeup.set()
        return request_id

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        return [self.enqueue_request(r) for r in requests]

    def cancel_request(self, request_id: int) -> None:
        self._inbox.put(("cancel", request_id))
        self._wakeup.set()

    def await_responses(self, request_id: int | None = None, timeout: float | None = None) -> list[Response]:
        """Responses ready now (waiting up to ``timeout`` seconds for at least one); only those of
        ``request_id`` when given."""
        def pick() -> list[Response]:
            if request_id is None:
                out = list(self._ready)
                self._ready.clear()
                return out
            out = [r for r in self._ready if r.request_id == request_id]
            if out:
                keep = [r for r in self._ready if r.request_id != request_id]
                self._ready.clear()
                self._ready.extend(keep)
            return out

        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready_cv:
            while True:
                got = pick()
                if got or self._shutdown:
                    return got
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._ready_cv.wait(remaining)

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        """Stats of the iterations since the previous call."""
        out = []
        while self._stats:  # popleft, so stats the loop appends meanwhile are kept for the next call
            out.append(self._stats.popleft())
        return out

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + self._inbox.qsize()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._shutdown

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the loop; unfinished requests end with finish reason 'cancelled'."""
        with self._inbox_lock:
            if not self._accepting:
                return
            self._accepting = False
            self._inbox.put(("shutdown",))
        self._wakeup.set()
        self._thread.join(timeout)
        self._shutdown = True
        if not self._thread.is_alive():  # a loop still inside an iteration keeps its KV cache
            self.runner.release()
        if self.ranks is not None:  # a loop still inside a step could be sending: then no message, the ranks end
            self.ranks.stop(send_shutdown=not self._thread.is_alive())
        with self._ready_cv:
            self._ready_cv.notify_all()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if self.failure is not None:
                self._end_with(self.failure)
                return
            if not self._drain_inbox():
                break
            if not self.scheduler.has_work():
                if self._in_flight is not None:
                    self._complete(self._in_flight)
                    continue
                self._wakeup.wait(0.05)
                self._wakeup.clear()
                continue
            try:
                self._step()
            except RankFailure as e:
                self._end_with(e)
                return
            except Exception as e:  # a bug in the loop itself: fail what is in flight, keep serving
                logger.exception("executor iteration failed")
                for state in list(self._requests.values()):
                    self._fail(state, f"internal error: {e}")
        for state in list(self._requests.values()):
            self._finish_all(state, "cancelled")

    @property
    def failure(self) -> RankFailure | None:
        """Why a tensor-parallel engine stopped serving (a rank stopped or a step failed), or None."""
        return self.ranks.failure if self.ranks is not None else None

    def _end_with(self, failure: RankFailure) -> None:
        """A tensor-parallel engine that cannot go on: every request fails with why, every rank stops."""
        logger.error("%s", failure)
        self._drain_inbox()  # requests enqueued before the failure; enqueue_request refuses those after it
        for state in list(self._requests.values()):
            self._fail(state, str(failure))
        self.ranks.stop()

    def _drain_inbox(self) -> bool:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if msg[0] == "shutdown":
                return False
            if msg[0] == "add":
                self._add(*msg[1:])
            elif msg[0] == "cancel":
                state = self._requests.get(msg[1])
                if state is not None:
                    self._finish_all(state, "cancelled")

    def _step(self) -> None:
        """Plans and launches one step, then processes the previous step's tokens while the device runs
        this one: the host's work overlaps the GPU's. The step was planned with the previous step's
        sampled tokens still pending; the device feeds them in (ModelRunner.launch). Without overlap, and
        while penalties count token ids on the host, the previous step's tokens are processed first."""
        t0 = time.perf_counter()
        if self._in_flight is not None and (self._penalized or not self.config.enable_overlap):
            self._complete(self._in_flight)
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if self._in_flight is not None:
                self._complete(self._in_flight)
            else:
                self._wakeup.wait(0.005)
                self._wakeup.clear()
            return
        scheduled_at = time.time()
        try:
            step = self._launch(plan, scheduled_at, t0)
        except Exception as batch_error:
            if self.ranks is not None:  # the ranks may have parted ways mid-step: serving cannot go on
                raise self.ranks.failed(batch_error) from batch_error
            logger.warning("batch of %d failed (%s); isolating", len(plan.scheduled), batch_error)
            if self._in_flight is not None:
                self._complete(self._in_flight)  # single runs read their inputs from the host
            self._run_isolated(plan, scheduled_at)
            return
        previous, self._in_flight = self._in_flight, step
        if previous is not None:
            self._complete(previous)

    def _run_isolated(self, plan: SchedulerOutput, scheduled_at: float) -> None:
        """Runs each sequence of a failed batch alone, so only the failing ones get errors. Planned again: the
        inputs that were pending are on the host now."""
        for s in plan.scheduled:
            if s.seq.is_finished:
                continue
            alone = SchedulerOutput(scheduled=[ScheduledSequence.plan(s.seq, s.num_new_tokens)])
            try:
                step = self._launch(alone, scheduled_at, time.perf_counter())
            except Exception as e:
                state = self._seq_to_request.get(s.seq.seq_id)
                if state is not None:
                    self._fail(state, f"{type(e).__name__}: {e}")
                continue
            self._complete(step)

    def _launch(self, plan: SchedulerOutput, scheduled_at: float, started: float) -> LaunchedStep:
        """Queues the plan on the device and advances the scheduler past it (pending tokens appended)."""
        step = self.runner.launch(plan)
        step.plan, step.scheduled_at, step.started = plan, scheduled_at, started
        self.scheduler.advance(plan)
        return step

    def _complete(self, step: LaunchedStep) -> None:
        """Waits for a launched step's tokens, gives its pending ones their values, processes them."""
        if step is self._in_flight:
            self._in_flight = None
        out = self.runner.collect(step)
        for s in step.plan.scheduled:
            if s.samples:
                self.scheduler.resolve(s.seq, out.sampled[s.seq.seq_id])
        self._process(step.plan, out, step.scheduled_at)
        self._record_stats(step)

    # ---- requests ------------------------------------------------------------------------------
    def _add(self, request_id: int, request: Request, callback: ResponseCallback | None, arrival: float) -> None:
        try:
            params, prompt = self.validate_request(request)
            state = _RequestState(request_id, request, params, prompt, callback, arrival)
            seed = params.seed if params.seed is not None else random.getrandbits(62)
            seq = Sequence(self.scheduler.new_seq_id(), request_id, list(prompt), len(prompt), params, seed,
                           stop_ids=self._stop_ids(request, params))
            self._register(state, seq)  # last: registers nothing if it raises
        except Exception as e:  # whatever a request holds, it must not stop the loop
            message = str(e) if isinstance(e, (KilnError, ValueError, TypeError)) else f"{type(e).__name__}: {e}"
            self._emit(Response(request_id, error_msg=message), callback)
            self.counters["requests_rejected"] += 1
            return
        self._requests[request_id] = state
        if params.has_penalties:
            self._penalized.add(request_id)
        self.scheduler.add(seq)
        self.counters["prompt_tokens"] += len(prompt)

    def validate_request(self, request: Request) -> tuple[SamplingParams, list[int]]:
        """The request's effective sampling and prompt, or a RequestError naming the limit it breaks.
        Any thread: the loop runs it on each request it takes in, LLM.generate on all of a batch first."""
        if not isinstance(request, Request) or not isinstance(request.sampling_params, SamplingParams):
            raise RequestError("enqueue a kiln Request whose sampling_params is a SamplingParams")
        params = request.effective_sampling()
        build = self.engine.build_config
        ids = request.input_token_ids
        if not isinstance(ids, (list, tuple)) or not ids:
            raise RequestError("input_token_ids must be a non-empty list of token ids")
        vocab = self.engine.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise RequestError(f"input_token_ids must be integers in [0, {vocab})")
        if len(ids) > build.max_input_len:
            raise RequestError(f"prompt has {len(ids)} tokens but the engine's max_input_len is "
                               f"{build.max_input_len}; shorten the prompt or rebuild with a larger --max-input-len")
        if len(ids) + params.max_tokens > build.max_seq_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the engine's "
                               f"max_seq_len {build.max_seq_len}; lower max_tokens to "
                               f"{max(build.max_seq_len - len(ids), 0)} or rebuild with a larger --max-seq-len")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this engine has none; use stop_token_ids")
        # Any chunk size: a preempted sequence recomputes in chunks of up to max_num_tokens.
        need = self.scheduler.max_live_blocks(len(ids) + params.max_tokens, self.max_num_tokens) * params.n
        if need > self.pool.num_blocks:
            raise RequestError(f"request needs {need} KV blocks (prompt + max_tokens, n={params.n}) but the pool "
                               f"has {self.pool.num_blocks}; lower max_tokens or n, or give the KV cache more "
                               "memory (free_gpu_memory_fraction / max_tokens)")
        return params, list(ids)

    def _stop_ids(self, request: Request, params: SamplingParams) -> tuple[int, ...]:
        eos = () if params.ignore_eos else ((request.end_id,) if request.end_id is not None
                                            else self.engine.model_config.eos_token_ids)
        return tuple(dict.fromkeys((*eos, *params.stop_token_ids)))

    def _register(self, state: _RequestState, seq: Sequence) -> None:
        detok = (IncrementalDetokenizer(self.tokenizer, state.prompt_ids) if self.tokenizer and state.params.detokenize
                 else None)
        state.samples.append(_Sample(seq, detok))
        self._seq_to_request[seq.seq_id] = state

    # ---- outputs -------------------------------------------------------------------------------
    def _process(self, plan: SchedulerOutput, out: RunnerOutput, scheduled_at: float) -> None:
        now = time.time()
        touched: dict[int, _RequestState] = {}
        for s in plan.scheduled:
            seq = s.seq
            state = self._seq_to_request.get(seq.seq_id)
            if state is None or seq.is_finished:
                continue
            if state.schedule_time is None:
                state.schedule_time = scheduled_at
            try:
                if seq.seq_id in out.prompt_logprobs:
                    self._add_prompt_logprobs(state, *out.prompt_logprobs[seq.seq_id])
                if seq.seq_id not in out.sampled:
                    continue
                touched[state.request_id] = state
                if state.first_token_time is None:
                    state.first_token_time = now
                sample = state.samples[seq.sample_index]
                # Fork the other samples first: the parent's token may end it, freeing the prompt's blocks.
                for token, seed, entry in out.forked.get(seq.seq_id, ()):
                    child = self.scheduler.fork(seq, token, len(state.samples), seed)
                    self._register(state, child)
                    self._accept_token(state.samples[-1], token, entry)
                if out.forked.get(seq.seq_id):
                    seq.forks_pending = 0
                self._accept_token(sample, out.sampled[seq.seq_id], out.logprobs.get(seq.seq_id))
            except Exception as e:
                logger.exception("request %s failed in post-processing", seq.request_id)
                self._fail(state, f"{type(e).__name__}: {e}")
                touched.pop(state.request_id, None)
        for state in touched.values():
            self._respond(state)

    def _accept_token(self, sample: _Sample, token: int, logprob_entry: tuple | None) -> None:
        seq = sample.seq
        sample.num_tokens += 1
        count = sample.num_tokens  # the sequence may already hold the next token, pending
        params = seq.params
        self.counters["generation_tokens"] += 1
        if logprob_entry is not None:
            sample.log_probs.append(logprob_entry[0])
            sample.top_logprobs.append(logprob_entry[1])
        is_stop_token = token in seq.stop_ids and count >= params.min_tokens
        new_text_start = len(sample.text)
        if sample.detok is not None and not is_stop_token:
            sample.text += sample.detok.add(token)
        reason = None
        if is_stop_token:
            reason = "stop"
        elif params.stop and count >= params.min_tokens and self._trim_stop_string(sample, new_text_start):
            reason = "stop"
        elif count >= params.max_tokens or seq.num_prompt_tokens + count >= self.scheduler.max_seq_len:
            reason = "length"
        if reason:
            self._finish_sample(sample, reason)

    def _trim_stop_string(self, sample: _Sample, new_text_start: int) -> bool:
        """Ends the text at the first stop string that the text from ``new_text_start`` on completes
        (one that appeared earlier, before min_tokens, does not count)."""
        params = sample.seq.params
        longest = max(len(s) for s in params.stop)
        search_from = max(0, new_text_start - longest + 1)
        hits = [(i, stop) for stop in params.stop if (i := sample.text.find(stop, search_from)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        sample.text = sample.text[:index + len(stop)] if params.include_stop_str_in_output else sample.text[:index]
        return True

    def _add_prompt_logprobs(self, state: _RequestState, start: int, entries: list[dict[int, float]]) -> None:
        """entries score prompt tokens start+1 ...; a preempted sequence recomputes its prompt in other
        chunks, so only the part past what was collected is new."""
        if not state.prompt_logprobs:
            state.prompt_logprobs.append(None)  # the first prompt token has no predecessor
        num_known = len(state.prompt_logprobs) - (start + 1)
        if 0 <= num_known < len(entries):
            state.prompt_logprobs.extend(entries[num_known:])

    def _finish_sample(self, sample: _Sample, reason: str) -> None:
        sample.finish_reason = reason
        self.scheduler.finish(sample.seq, reason)

    def _finish_all(self, state: _RequestState, reason: str) -> None:
        for sample in state.samples:
            if sample.finish_reason is None:
                self._finish_sample(sample, reason)
        # Samples not forked yet (n > 1, prompt unfinished) end with the request, empty.
        while len(state.samples) < state.params.n:
            state.samples.append(_Sample(None, None, finish_reason=reason))
        self._respond(state)

    def _fail(self, state: _RequestState, message: str) -> None:
        for sample in state.samples:
            if sample.finish_reason is None:
                self._finish_sample(sample, "error")
        self._drop(state)
        self.counters["requests_failed"] += 1
        self._emit(Response(state.request_id, error_msg=message), state.callback)

    def _drop(self, state: _RequestState) -> None:
        self._requests.pop(state.request_id, None)
        self._penalized.discard(state.request_id)
        for sample in state.samples:
            if sample.seq is not None:
                self._seq_to_request.pop(sample.seq.seq_id, None)

    def _respond(self, state: _RequestState) -> None:
        finished = state.is_finished
        if finished:
            state.finish_time = time.time()
            self._drop(state)
            self.counters["requests_finished"] += 1
        elif not state.request.streaming:
            return
        holdback = 0 if finished else max((len(s) for s in state.params.stop), default=1) - 1
        tokens, texts, lps, tops = [], [], [], []
        for s in state.samples:
            n_tok = s.num_tokens
            start_tok = s.num_sent_tokens if state.request.streaming else 0
            start_chr = s.num_sent_chars if state.request.streaming else 0
            end_chr = len(s.text) if s.finish_reason else max(start_chr, len(s.text) - holdback)
            tokens.append(s.seq.output_token_ids[start_tok:n_tok] if s.seq is not None else [])
            texts.append(s.text[start_chr:end_chr])
            lps.append(s.log_probs[start_tok:])
            tops.append(s.top_logprobs[start_tok:])
            s.num_sent_tokens, s.num_sent_chars = n_tok, end_chr
        want_lp = state.params.logprobs is not None
        result = Result(
            output_token_ids=tokens, text=texts, finish_reasons=[s.finish_reason for s in state.samples],
            is_final=finished, log_probs=lps if want_lp else None, top_logprobs=tops if want_lp else None,
            prompt_logprobs=state.prompt_logprobs if state.params.prompt_logprobs is not None and finished else None,
            num_prompt_tokens=len(state.prompt_ids),
            num_cached_prompt_tokens=state.samples[0].seq.num_prefix_hit_tokens,
            arrival_time=state.arrival_time, schedule_time=state.schedule_time,
            first_token_time=state.first_token_time, finish_time=state.finish_time,
        )
        self._emit(Response(state.request_id, result=result), state.callback)

    def _emit(self, response: Response, callback: ResponseCallback | None) -> None:
        if callback is not None:
            try:
                callback(response)
            except Exception:
                logger.exception("response callback failed for request %s", response.request_id)
            return
        with self._ready_cv:
            self._ready.append(response)
            self._ready_cv.notify_all()

    def _record_stats(self, step: LaunchedStep) -> None:
        """When a step's tokens are processed. Its time runs from the previous step's end (steps overlap)
        or, after an idle spell, from when it was planned: in steady state, the time per step."""
        self._iteration += 1
        plan = step.plan
        decode = plan.num_decode_tokens
        now = time.perf_counter()
        started = max(step.started, self._last_step_end)
        self._last_step_end = now
        stats = IterationStats(
            iteration=self._iteration, timestamp=time.time(),
            iteration_time_ms=(now - started) * 1e3, batch_size=len(plan.scheduled),
            num_context_tokens=plan.num_tokens - decode, num_decode_tokens=decode,
            num_preempted=len(plan.preempted), kv_blocks_used=self.pool.num_used_blocks,
            kv_blocks_free=self.pool.num_free_blocks, kv_blocks_total=self.pool.num_blocks,
            prefix_cache_hit_rate=self.pool.hit_rate, num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running))
        self._stats.append(stats)
        if self.on_step is not None:
            self.on_step(stats)
