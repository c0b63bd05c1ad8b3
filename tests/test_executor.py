"""The Executor on the bundled stories260K model: correctness under load, cancellation, errors, shutdown,
streaming and statistics; random load again on a tiny random Mistral with a 12-token sliding window.

The engines here have small limits (max_seq_len 128, 4-token blocks), so that a pool of 32 blocks is the
minimum the loader accepts for stories260K and a handful of requests runs it out of memory.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
import weakref
from collections import defaultdict
from concurrent.futures import Future

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import STORIES_DIR, build_engine, make_hf_model, save_hf_checkpoint
from kiln import Executor, KvCacheConfig, Request, RuntimeConfig, SamplingParams, SchedulerConfig
from kiln.config import CapacityPolicy
from kiln.errors import KilnError
from kiln.runtime.loader import load_engine
from kiln.runtime.request import Response

BLOCK = 4
MAX_SEQ_LEN = 128
EOS = 2
FREQUENT_TOKEN = 426  # "." in stories260K
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_engine(STORIES_DIR, tmp_path_factory.mktemp("stories_small_blocks"), max_batch_size=8,
                        max_input_len=64, max_seq_len=MAX_SEQ_LEN, max_num_tokens=128, tokens_per_block=BLOCK)
    return load_engine(path, progress=False)


@pytest.fixture(scope="module")
def windowed_engine(tmp_path_factory):
    model = make_hf_model("MistralForCausalLM", vocab_size=512, sliding_window=12, eos_token_id=EOS)
    checkpoint = save_hf_checkpoint(model, tmp_path_factory.mktemp("tiny_mistral_window"))
    path = build_engine(checkpoint, tmp_path_factory.mktemp("tiny_mistral_window_engine"), max_batch_size=8,
                        max_input_len=64, max_seq_len=MAX_SEQ_LEN, max_num_tokens=128, tokens_per_block=BLOCK)
    return load_engine(path, progress=False)


def make_executor(engine, policy: str = "guaranteed_no_evict", chunked: bool = True, reuse: bool = True,
                  kv_tokens: int | None = None, **limits) -> Executor:
    return Executor(engine, RuntimeConfig(
        kv_cache_config=KvCacheConfig(max_tokens=kv_tokens, enable_block_reuse=reuse),
        scheduler_config=SchedulerConfig(policy, chunked), **limits))


def collect(ex: Executor, ids: list[int], timeout: float = 60.0) -> dict[int, list[Response]]:
    """Every response of ``ids`` until each has its final (or error) one."""
    pending, got = set(ids), defaultdict(list)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"requests {sorted(pending)} never finished"
        for resp in ex.await_responses(timeout=1.0):
            got[resp.request_id].append(resp)
            if resp.has_error() or resp.result.is_final:
                pending.discard(resp.request_id)
    return got


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Waits for something another thread does; the deadline only stops a broken run from hanging."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def run_requests(ex: Executor, requests: list[Request]) -> list[Response]:
    """Final responses, in the order of ``requests``."""
    ids = ex.enqueue_requests(requests)
    got = collect(ex, ids)
    return [got[i][-1] for i in ids]


def joined(responses: list[Response]) -> tuple[list[list[int]], list[str]]:
    """Streamed deltas added up, per sample."""
    num_samples = len(responses[-1].result.output_token_ids)
    tokens, texts = [[] for _ in range(num_samples)], [""] * num_samples
    for r in responses:
        for i, (t, s) in enumerate(zip(r.result.output_token_ids, r.result.text)):
            tokens[i] += t
            texts[i] += s
    return tokens, texts


def assert_pool_full(ex: Executor) -> None:
    assert ex.pool.num_free_blocks == ex.pool.num_blocks
    assert ex.pool.ref_counts == [0] * ex.pool.num_blocks
    assert not ex.scheduler.running and not ex.scheduler.waiting


def prompts_with_shared_prefixes(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 512) for _ in range(24)]
    return [[1] + shared[:rng.randint(4, 24)] + [rng.randrange(3, 512) for _ in range(rng.randint(1, 36))]
            for _ in range(count)]


# ---- the same greedy tokens whatever else runs ----------------------------------------------------------

@pytest.fixture(scope="module")
def greedy_alone(engine):
    prompts = prompts_with_shared_prefixes(0, 10)
    with make_executor(engine) as ex:
        return prompts, [run_requests(ex, [Request(p, sampling_params=GREEDY)])[0].result.output_token_ids[0]
                         for p in prompts]


@pytest.mark.parametrize("setting", ["chunked", "prefix_reuse", "preemption", "no_chunking_no_reuse"])
def test_greedy_tokens_are_the_same_alone_and_in_a_crowded_batch(engine, greedy_alone, setting):
    prompts, alone = greedy_alone
    ex = {
        "chunked": lambda: make_executor(engine, reuse=False, max_num_tokens=16),
        "prefix_reuse": lambda: make_executor(engine, max_batch_size=3),
        "preemption": lambda: make_executor(engine, "max_utilization", kv_tokens=MAX_SEQ_LEN, max_num_tokens=32),
        "no_chunking_no_reuse": lambda: make_executor(engine, chunked=False, reuse=False, max_num_tokens=64),
    }[setting]()
    with ex:
        results = run_requests(ex, [Request(p, sampling_params=GREEDY) for p in prompts])
        assert [r.result.output_token_ids[0] for r in results] == alone
        stats = ex.get_latest_iteration_stats()
        assert max(s.batch_size for s in stats) > 1
        assert all(s.num_context_tokens + s.num_decode_tokens <= ex.max_num_tokens for s in stats)
        if setting == "chunked":  # prompts longer than 16 tokens ran in pieces
            assert max(len(p) for p in prompts) > 16 and max(s.num_context_tokens for s in stats) <= 16
        if setting == "prefix_reuse":
            assert ex.pool.hit_rate > 0 and any(r.result.num_cached_prompt_tokens > 0 for r in results)
        if setting == "preemption":
            assert ex.scheduler.num_preemptions > 0 and any(s.num_preempted for s in stats)
        assert_pool_full(ex)


# ---- the overlapped loop (and on a GPU, CUDA graphs) against the eager reference ---------------------------

def mixed_requests(seed: int, count: int) -> list[Request]:
    """Greedy requests, seeded sampled ones (temperature 0.8, top-p 0.95) and seeded pairs (n = 2), over shared
    prefixes: every token of each is fixed by its prompt and seed, whatever else runs with it."""
    kinds = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95), dict(temperature=1.0, n=2)]
    return [Request(p, sampling_params=SamplingParams(max_tokens=40, ignore_eos=True, seed=1000 + i, **kinds[i % 3]))
            for i, p in enumerate(prompts_with_shared_prefixes(seed, count))]


def assert_fast_path_gives_the_reference_tokens(engine, requests: list[Request], **crowded) -> int:
    """The reference: each step planned once the previous step's tokens are on the host, no CUDA graphs, a
    roomy pool. Against it, the fast path (overlap: inputs still pending on the device when their step is
    planned; graphs where the engine has them) under ``crowded`` limits: chunked prompts, preemption.
    Returns how many of the fast path's steps replayed a CUDA graph."""
    def count_pending_inputs(ex: Executor) -> list[int]:
        """Per launched plan, its entries whose input was still on the device when planned."""
        counts, launch = [], ex.runner.launch

        def count_and_launch(plan):
            counts.append(sum(s.is_input_pending for s in plan.scheduled))
            return launch(plan)

        ex.runner.launch = count_and_launch
        return counts

    with Executor(engine, RuntimeConfig(enable_cuda_graphs=False, enable_overlap=False)) as ex:
        reference_pending = count_pending_inputs(ex)
        expected = [r.result.output_token_ids for r in run_requests(ex, requests)]
    with make_executor(engine, "max_utilization", **crowded) as ex:
        num_pending_inputs, graph_keys = count_pending_inputs(ex), []
        pick_graph = ex.runner._graph_key
        ex.runner._graph_key = lambda *args: graph_keys.append(pick_graph(*args)) or graph_keys[-1]
        got = [r.result.output_token_ids for r in run_requests(ex, requests)]
        stats = ex.get_latest_iteration_stats()
        assert_pool_full(ex)
    assert sum(reference_pending) == 0 and sum(num_pending_inputs) > 0
    assert ex.scheduler.num_preemptions > 0 and max(s.batch_size for s in stats) > 1
    assert max(s.num_context_tokens for s in stats) < max(len(r.input_token_ids) for r in requests)  # chunked
    assert got == expected
    return sum(1 for key in graph_keys if key is not None)


def test_overlapped_crowded_runs_give_the_reference_tokens(engine):
    assert assert_fast_path_gives_the_reference_tokens(engine, mixed_requests(2, 12), kv_tokens=2 * MAX_SEQ_LEN,
                                                       max_num_tokens=16) == 0  # no graphs on the CPU


def float32_engine(model: str, tmp_path_factory):
    """float32, so that the reference and the fast path (other batch shapes: graphs pad the batch) differ by
    summation order only, far below a greedy choice's margin; blocks of 16, a batch of up to 16."""
    from kiln import BuildConfig, Builder
    from kiln.convert import AutoModelForCausalLM

    source = (AutoModelForCausalLM.from_hugging_face(STORIES_DIR) if model == "stories260K"
              else AutoModelForCausalLM.from_preset(model))
    build = BuildConfig(max_batch_size=16, max_input_len=64, max_seq_len=MAX_SEQ_LEN, max_num_tokens=128,
                        tokens_per_block=16, dtype="float32")
    path = Builder().build(source, build).save(tmp_path_factory.mktemp(f"float32_{model}"), progress=False)
    return load_engine(path, progress=False)


def test_overlapped_crowded_runs_with_n_samples_forked_from_preempted_parents(tmp_path_factory):
    # This schedule preempts parents of n = 2 requests between the step that samples their first token and
    # the one that forks it (the fork failed the request until the scheduler learned to recompute it).
    assert assert_fast_path_gives_the_reference_tokens(float32_engine("stories260K", tmp_path_factory),
                                                       mixed_requests(3, 24), kv_tokens=4 * MAX_SEQ_LEN,
                                                       max_num_tokens=32) == 0  # no graphs on the CPU


@pytest.fixture(scope="module", params=["stories260K", "llama-3.2-1b"])
def gpu_engine(request, tmp_path_factory):
    """The float32 engines of the bundled model and the 1B preset (dummy weights)."""
    return float32_engine(request.param, tmp_path_factory)


@pytest.mark.gpu
def test_cuda_graphs_and_overlap_give_the_eager_reference_tokens(gpu_engine):
    assert gpu_engine.device.type == "cuda"
    num_graph_steps = assert_fast_path_gives_the_reference_tokens(gpu_engine, mixed_requests(3, 24),
                                                                  kv_tokens=4 * MAX_SEQ_LEN, max_num_tokens=32)
    assert num_graph_steps > 0


# ---- random load ---------------------------------------------------------------------------------------

@st.composite
def loads(draw):
    policy = draw(st.sampled_from(list(CapacityPolicy)))
    chunked = draw(st.booleans())
    # Mostly the smallest pool the loader accepts (32 blocks): max_utilization has to preempt.
    options = dict(reuse=draw(st.booleans()), kv_tokens=draw(st.sampled_from([MAX_SEQ_LEN, MAX_SEQ_LEN, 256])),
                   max_batch_size=draw(st.integers(1, 8)),
                   max_num_tokens=draw(st.integers(8 if chunked else 64, 128)))
    rng = random.Random(draw(st.integers(0, 2**32)))
    shared = [rng.randrange(3, 512) for _ in range(32)]
    requests = []
    for _ in range(draw(st.integers(3, 10))):
        own = [rng.randrange(3, 512) for _ in range(draw(st.integers(0, 31)))]
        prompt = [1] + shared[:draw(st.integers(0, 32))] + own
        params = SamplingParams(max_tokens=draw(st.integers(1, 48)), n=draw(st.sampled_from([1, 1, 1, 2, 3])),
                                temperature=draw(st.sampled_from([0.0, 1.0])), ignore_eos=draw(st.booleans()),
                                seed=rng.getrandbits(32))
        # A frequent token as the end id, so that some samples stop early.
        end_id = draw(st.sampled_from([None, FREQUENT_TOKEN]))
        requests.append(Request(prompt, sampling_params=params, streaming=draw(st.booleans()), end_id=end_id))
    # Some are cancelled: at once (0), or after the first step >= N that follows their arrival: waiting,
    # mid-prompt or mid-decode.
    cancel_at = [draw(st.integers(0, 16)) if draw(st.booleans()) and draw(st.booleans()) else None
                 for _ in requests]
    return policy, chunked, options, requests, cancel_at


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(load=loads())
def test_random_load_ends_every_request_once_within_limits(engine, load):
    run_random_load(engine, load)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(load=loads())
def test_random_load_with_a_sliding_window(windowed_engine, load):
    # A decoding sample holds at most 4 of the 4-token blocks (12-token window), so the 32-block pool takes
    # requests (n samples of up to 112 tokens) that it would refuse without the window.
    run_random_load(windowed_engine, load)


def run_random_load(engine, load) -> None:
    policy, chunked, options, requests, cancel_at = load
    with make_executor(engine, policy, chunked, **options) as ex:
        got: dict[int, list[Response]] = defaultdict(list)  # appended by the loop thread (response callbacks)
        ids: list[int] = []  # appended here, read by the loop thread (a list append is atomic)
        due = {i: step for i, step in enumerate(cancel_at) if step}
        cancelled_unfinished: set[int] = set()

        def has_ended(request_id: int) -> bool:
            responses = got.get(request_id)
            return bool(responses) and (responses[-1].has_error() or responses[-1].result.is_final)

        def cancel_due(stats):  # in the loop thread, between steps: the cancel comes before any more tokens
            for i, step in list(due.items()):
                if i < len(ids) and stats.iteration >= step:
                    if not has_ended(ids[i]):
                        cancelled_unfinished.add(ids[i])
                    ex.cancel_request(ids[i])
                    del due[i]

        ex.on_step = cancel_due
        for request, step in zip(requests, cancel_at):
            ids.append(ex.enqueue_request(request, on_response=lambda r: got[r.request_id].append(r)))
            if step == 0:
                ex.cancel_request(ids[-1])
        wait_until(lambda: all(has_ended(i) for i in ids), "every request's final response", timeout=60)
        for request_id, step in zip(ids, cancel_at):
            if step is not None:
                ex.cancel_request(request_id)  # late: a no-op
        ex.shutdown()  # after the loop has handled the late cancellations: whatever they sent is in got
        for request_id, request, step in zip(ids, requests, cancel_at):
            was_cancelled = step is not None
            responses = got[request_id]
            params = request.sampling_params
            num_tokens = len(request.input_token_ids) + params.max_tokens
            if ex.scheduler.max_live_blocks(num_tokens, ex.max_num_tokens) * params.n > ex.pool.num_blocks:
                assert len(responses) == 1 and "KV blocks" in responses[0].error_msg
                continue
            assert all(not r.has_error() for r in responses)
            assert [r.result.is_final for r in responses] == [False] * (len(responses) - 1) + [True]
            assert request.streaming or len(responses) == 1
            final = responses[-1].result
            tokens, texts = joined(responses) if request.streaming else (final.output_token_ids, final.text)
            assert len(tokens) == params.n and len(final.finish_reasons) == params.n
            for sample_tokens, reason in zip(tokens, final.finish_reasons):
                assert len(sample_tokens) <= params.max_tokens
                if reason == "length":
                    assert len(sample_tokens) == params.max_tokens
                elif reason == "stop":
                    assert not params.ignore_eos and sample_tokens[-1] == (request.end_id or EOS)
                else:
                    assert was_cancelled and reason == "cancelled"
            # Cancelled from the loop before its final response: it ends cancelled; otherwise it never does
            # (a cancellation sent from this thread right after enqueueing may come before or after the end).
            if step != 0:
                assert ("cancelled" in final.finish_reasons) == (request_id in cancelled_unfinished)
        stats = ex.get_latest_iteration_stats()
        assert all(s.batch_size <= ex.max_batch_size for s in stats)
        assert all(0 < s.num_context_tokens + s.num_decode_tokens <= ex.max_num_tokens for s in stats)
        assert all(s.kv_blocks_used + s.kv_blocks_free == s.kv_blocks_total == ex.pool.num_blocks for s in stats)
        assert_pool_full(ex)


# ---- cancellation, errors, shutdown -----------------------------------------------------------------------------

def first_response(ex: Executor, request_id: int) -> Response:
    responses = ex.await_responses(request_id, timeout=30.0)
    assert responses, "no response"
    return responses[0]


def cancel_after_step(ex: Executor, step: int) -> Future:
    """Has the loop thread cancel a request when it has processed ``step`` steps (Executor.on_step); the
    caller sets the returned future to the request's id. Counted from the executor's first step."""
    request_id: Future = Future()

    def on_step(stats):
        if stats.iteration == step:
            ex.cancel_request(request_id.result(timeout=30))

    ex.on_step = on_step
    return request_id


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("step", [1, 9])
def test_a_request_cancelled_after_step_n_ends_with_its_first_n_tokens_and_frees_its_blocks(
        engine, greedy_alone, step, streaming):
    prompts, alone = greedy_alone  # each prompt runs in one step, so step n gives the n-th token
    with make_executor(engine) as ex:
        cancelled = cancel_after_step(ex, step)
        cancelled.set_result(ex.enqueue_request(Request(prompts[0], sampling_params=GREEDY, streaming=streaming)))
        responses = collect(ex, [cancelled.result()])[cancelled.result()]
        assert_pool_full(ex)  # the final response is sent after the blocks are back
        assert ex.get_latest_iteration_stats()[step - 1].kv_blocks_used > 0  # held them until cancelled
        final = responses[-1].result
        assert final.is_final and final.finish_reasons == ["cancelled"]
        # Streamed: one delta per step, then the final one with nothing new.
        assert [len(r.result.output_token_ids[0]) for r in responses] == ([1] * step + [0] if streaming else [step])
        tokens = joined(responses)[0] if streaming else final.output_token_ids
        assert tokens == [alone[0][:step]]
        ex.cancel_request(cancelled.result())  # again, and an id that never existed: no effect
        ex.cancel_request(10_000)
        later = run_requests(ex, [Request(prompts[1], sampling_params=GREEDY)])[0].result
        assert later.output_token_ids == [alone[1]] and later.finish_reasons == ["length"]


def test_an_exception_in_one_request_fails_only_that_request(engine, greedy_alone, monkeypatch):
    prompts, alone = greedy_alone
    with make_executor(engine) as ex:
        launch = ex.runner.launch
        bad_prompt = [1, 400, 401, 402, 403, 404, 405]

        def fail_for_bad_prompt(plan):
            if any(s.seq.token_ids[:7] == bad_prompt and s.seq.sample_index == 1 for s in plan.scheduled):
                raise RuntimeError("injected failure")
            return launch(plan)

        monkeypatch.setattr(ex.runner, "launch", fail_for_bad_prompt)
        # The bad request's second sample fails after the fork: its first sample, in the same plan, ends
        # with it (and fills its second block in that step, which must not be registered for reuse).
        bad = Request(bad_prompt, sampling_params=SamplingParams(temperature=0.0, max_tokens=20, n=2))
        results = run_requests(ex, [Request(p, sampling_params=GREEDY) for p in prompts[:4]] + [bad])
        assert results[-1].has_error() and "injected failure" in results[-1].error_msg
        assert [r.result.output_token_ids[0] for r in results[:4]] == alone[:4]
        assert_pool_full(ex)
        assert ex.is_alive()
        later = run_requests(ex, [Request(prompts[4], sampling_params=GREEDY)])[0]
        assert later.result.output_token_ids[0] == alone[4]


def test_shutdown_cancels_requests_in_flight(engine, greedy_alone):
    prompts, alone = greedy_alone
    ex = make_executor(engine)
    held, release = threading.Event(), threading.Event()

    def hold_after_step_3(stats):  # the requests cannot finish while the shutdown is on its way
        if stats.iteration == 3:
            held.set()
            release.wait(30)

    ex.on_step = hold_after_step_3
    ids = ex.enqueue_requests([Request(p, sampling_params=GREEDY) for p in prompts[:3]])
    assert held.wait(30), "the loop never reached step 3"
    num_waiting = ex.num_waiting
    stopper = threading.Thread(target=ex.shutdown)
    stopper.start()
    wait_until(lambda: ex.num_waiting == num_waiting + 1, "the shutdown message")  # num_waiting counts the inbox
    release.set()
    stopper.join(60)
    assert not ex.is_alive()
    finals = {r.request_id: r for r in ex.await_responses(timeout=0)}
    assert sorted(finals) == ids
    assert all(r.result.is_final and r.result.finish_reasons == ["cancelled"] for r in finals.values())
    # Each keeps the tokens of the steps before the shutdown: the first arrived before step 1, the others
    # in it or later.
    tokens = [finals[i].result.output_token_ids[0] for i in ids]
    assert [t == a[:len(t)] for t, a in zip(tokens, alone)] == [True] * 3
    lengths = [len(t) for t in tokens]
    assert lengths[0] == 3 and lengths == sorted(lengths, reverse=True)
    assert ex.await_responses(timeout=5.0) == []  # returns at once once shut down
    with pytest.raises(KilnError, match="shut down"):
        ex.enqueue_request(Request([1, 2, 3]))
    ex.shutdown()  # twice is fine


def test_the_loop_thread_makes_the_runner_and_its_errors_reach_the_caller(engine, monkeypatch):
    """The KV cache is allocated on the loop thread (so the caller's thread never forms an OpenMP team of
    its own); a failure there is raised by the constructor, and no loop is left running."""
    import kiln.runtime.executor as executor_module

    make_runner = executor_module.make_runner  # allocates the KV cache
    threads = []

    def record_thread(*args):
        threads.append(threading.current_thread())
        return make_runner(*args)

    monkeypatch.setattr(executor_module, "make_runner", record_thread)
    with make_executor(engine) as ex:
        assert threads == [ex._thread] and threads[0] is not threading.current_thread()
        assert run_requests(ex, [Request([1, 7, 8], sampling_params=GREEDY)])[0].result.is_final

    allocated = []

    def fail(*args):
        kv_cache = torch.empty(1024)  # what the runner had allocated before it failed
        allocated.append(weakref.ref(kv_cache))
        raise MemoryError("no room for the CUDA graphs")

    monkeypatch.setattr(executor_module, "make_runner", fail)
    before = threading.active_count()
    with pytest.raises(MemoryError, match="no room") as failure:
        make_executor(engine)
    assert threading.active_count() == before
    # Freed while the caller still holds the error (a retry inside its except block has the memory back),
    # the error keeping where it was raised.
    assert allocated[0]() is None and "fail" in "".join(traceback.format_tb(failure.value.__traceback__))


def test_await_responses_by_id_leaves_the_others(engine):
    with make_executor(engine) as ex:
        a, b = ex.enqueue_requests([Request([1, 20, 30], sampling_params=GREEDY),
                                    Request([1, 21, 31], sampling_params=GREEDY)])
        only_b = collect_by_id(ex, b)
        assert {r.request_id for r in only_b} == {b}
        rest = collect(ex, [a])
        assert {r.request_id for r in rest[a]} == {a} and rest[a][-1].result.is_final


def collect_by_id(ex: Executor, request_id: int) -> list[Response]:
    responses: list[Response] = []
    while not responses or not responses[-1].result.is_final:
        responses += ex.await_responses(request_id, timeout=30.0)
    return responses


# ---- streaming, stats, prefix counts, prompt logprobs under preemption ------------------------------------

def test_streaming_deltas_add_up_to_the_non_streaming_output(engine):
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=30, n=2, logprobs=2, ignore_eos=True)
    with make_executor(engine) as ex:
        whole = run_requests(ex, [Request([1, 300, 301, 302], sampling_params=params)])[0].result
        request_id = ex.enqueue_request(Request([1, 300, 301, 302], sampling_params=params, streaming=True))
        responses = collect(ex, [request_id])[request_id]
    assert len(responses) > 2 and responses[-1].result.is_final
    tokens, texts = joined(responses)
    assert tokens == whole.output_token_ids and texts == whole.text
    for i in range(2):
        assert sum((r.result.log_probs[i] for r in responses), []) == whole.log_probs[i]
        assert sum((r.result.top_logprobs[i] for r in responses), []) == whole.top_logprobs[i]
    times = responses[-1].result
    assert times.arrival_time <= times.first_token_time <= times.finish_time


def test_iteration_stats_match_each_launched_plan_and_the_run_s_own_clock(engine, monkeypatch):
    # 29 tokens: run twice, the second run finds 28 in the prefix cache and its prompt is one token, which
    # must count as context, not as a decode. The others are chunked (16 tokens per step).
    prompts = [[1] + list(range(10, 10 + length)) for length in (5, 17, 30)] + [[1] + list(range(100, 128))] * 2
    with make_executor(engine, max_num_tokens=16) as ex:
        planned: list[tuple[int, int]] = []  # per launched step: sequences, tokens
        launch = ex.runner.launch

        def record_and_launch(plan):
            planned.append((len(plan.scheduled), plan.num_tokens))
            return launch(plan)

        monkeypatch.setattr(ex.runner, "launch", record_and_launch)
        seen = []
        ex.on_step = seen.append
        wall_start, clock_start = time.time(), time.perf_counter()
        results = run_requests(ex, [Request(p, sampling_params=GREEDY) for p in prompts[:4]])
        results += run_requests(ex, [Request(prompts[4], sampling_params=GREEDY)])
        wait_until(lambda: len(seen) == len(planned), "the last launched step's stats")  # it ends no request
        wall_end, clock_end = time.time(), time.perf_counter()
        stats = ex.get_latest_iteration_stats()
        assert ex.get_latest_iteration_stats() == []  # each call returns the iterations since the last
    assert stats == seen and [s.iteration for s in stats] == list(range(1, len(planned) + 1))
    assert [(s.batch_size, s.num_context_tokens + s.num_decode_tokens) for s in stats] == planned
    assert results[4].result.num_cached_prompt_tokens == 28
    num_outputs = sum(len(r.result.output_token_ids[0]) for r in results)
    num_computed_prompt_tokens = sum(len(p) - r.result.num_cached_prompt_tokens for p, r in zip(prompts, results))
    assert sum(s.num_context_tokens for s in stats) == num_computed_prompt_tokens
    assert sum(s.num_decode_tokens for s in stats) == num_outputs - len(prompts)  # first tokens come from prompts
    timestamps = [s.timestamp for s in stats]
    assert wall_start <= timestamps[0] and timestamps == sorted(timestamps) and timestamps[-1] <= wall_end
    # Each step's time runs from the previous step's end (or its own planning): back to back, within the run.
    elapsed_ms = (clock_end - clock_start) * 1e3
    assert all(0 <= s.iteration_time_ms <= elapsed_ms for s in stats)
    assert sum(s.iteration_time_ms for s in stats) <= elapsed_ms + 1e-6
    assert [s.kv_blocks_used + s.kv_blocks_free for s in stats] == [ex.pool.num_blocks] * len(stats)
    assert max(s.kv_blocks_used for s in stats) > 0
    assert 1 <= max(s.num_running for s in stats) <= 4 and (stats[-1].num_running, stats[-1].num_waiting) == (0, 0)
    assert stats[-1].prefix_cache_hit_rate == ex.pool.hit_rate > 0


def test_cached_prompt_tokens_are_reported_once(engine):
    prompt = [1] + list(range(100, 130))  # 31 tokens: 7 full blocks can be reused (one token must run)
    with make_executor(engine) as ex:
        first, second = (run_requests(ex, [Request(prompt, sampling_params=GREEDY)])[0].result for _ in range(2))
        assert first.num_cached_prompt_tokens == 0
        assert second.num_cached_prompt_tokens == 28 and second.output_token_ids == first.output_token_ids
        assert ex.pool.hit_rate == pytest.approx(28 / (2 * 31))


def test_prompt_logprobs_survive_preemption_and_chunking(engine):
    prompts = prompts_with_shared_prefixes(1, 6)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    requests = [Request(p, sampling_params=params) for p in prompts]
    with make_executor(engine) as ex:
        reference = [r.result.prompt_logprobs for r in run_requests(ex, requests)]
    with make_executor(engine, "max_utilization", kv_tokens=MAX_SEQ_LEN, max_num_tokens=24) as ex:
        pressed = [r.result.prompt_logprobs for r in run_requests(ex, requests)]
        assert ex.scheduler.num_preemptions > 0
    for prompt, ref, got in zip(prompts, reference, pressed):
        assert len(got) == len(prompt) and got[0] is None
        for want, have in zip(ref[1:], got[1:]):
            assert want.keys() == have.keys()
            assert all(abs(want[t] - have[t]) < 1e-4 for t in want)


def test_a_malformed_request_gets_an_error_and_the_loop_goes_on(engine):
    with make_executor(engine) as ex:
        bad = ex.enqueue_request(Request([1, 2, 3], sampling_params=None))
        assert "SamplingParams" in first_response(ex, bad).error_msg
        assert ex.is_alive()
        (good,) = run_requests(ex, [Request([1, 403, 407], sampling_params=SamplingParams(max_tokens=4, temperature=0.0))])
        assert not good.has_error() and len(good.result.output_token_ids[0]) == 4


@pytest.mark.parametrize("options", [dict(max_batch_size=-2), dict(max_num_tokens=0), dict(max_num_tokens=1.5)])
def test_runtime_limits_must_be_positive_integers(options):
    with pytest.raises(KilnError, match="must be a positive integer"):
        RuntimeConfig(**options)
