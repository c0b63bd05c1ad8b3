"""The LLM API over the Executor: generate with per-prompt SamplingParams, generate_async streaming,
request metrics, errors per prompt, and several clients on one engine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kiln import LLM, SamplingParams
from kiln.errors import ConfigError, RequestError

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(stories_engine):
    with LLM(stories_engine, progress=False) as llm:
        yield llm


def test_generate_takes_one_sampling_params_per_prompt(llm):
    token_prompt = llm.tokenizer.encode("The dog ran")
    params = [GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=9, n=2, ignore_eos=True, logprobs=1)]
    text_out, ids_out = llm.generate(["Once upon a time", token_prompt], params, use_tqdm=False)
    assert text_out.prompt == "Once upon a time"
    assert text_out.prompt_token_ids == llm.tokenizer.encode("Once upon a time")
    assert ids_out.prompt is None and ids_out.prompt_token_ids == token_prompt
    assert [len(o.token_ids) for o in text_out.outputs] == [24]
    assert [len(o.token_ids) for o in ids_out.outputs] == [9, 9] and [o.index for o in ids_out.outputs] == [0, 1]
    for out in (text_out, ids_out):
        assert out.finished and out.error is None
        for o in out.outputs:  # the text continues the prompt's
            assert o.finish_reason == "length"
            decode = llm.tokenizer.decode
            assert decode(out.prompt_token_ids + o.token_ids) == decode(out.prompt_token_ids) + o.text
        m = out.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
    for o in ids_out.outputs:  # logprobs: the sampled token's entry per position, summed
        assert len(o.logprobs) == 9 and all(token in entry for token, entry in zip(o.token_ids, o.logprobs))
        assert o.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(o.logprobs, o.token_ids)))
    with pytest.raises(ConfigError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


@pytest.mark.parametrize("prompts, params, message", [
    (["Hi"], SamplingParams(max_tokens=10_000), "prompt (3 tokens) + max_tokens (10000) exceeds the engine's "
                                               "max_seq_len 512; lower max_tokens to 509"),
    (["Once upon a time", [1] * 200], GREEDY, "prompts[1]: prompt has 200 tokens but the engine's max_input_len is "
                                               "128"),
    ([[1, 403], [1, 512]], GREEDY, "prompts[1]: input_token_ids must be integers in [0, 512)"),
])
def test_generate_refuses_a_prompt_beyond_the_limits_before_any_runs(llm, prompts, params, message):
    # These used to give an empty output with finish_reason "error", which printed nothing.
    counters = dict(llm.executor.counters)
    with pytest.raises(RequestError) as error:
        llm.generate(prompts, params, use_tqdm=False)
    assert str(error.value).startswith(message)
    assert dict(llm.executor.counters) == counters  # nothing was enqueued, not even the good prompt
    with pytest.raises(RequestError, match="lower max_tokens to 509"):
        stream(llm, "Hi", SamplingParams(max_tokens=10_000))


def test_an_error_while_running_is_logged_and_kept_on_its_output(llm, monkeypatch, caplog):
    launch = llm.executor.runner.launch
    bad_prompt = [1, 400, 401, 402, 403]

    def fail_for_bad_prompt(plan):
        if any(s.seq.token_ids[:5] == bad_prompt for s in plan.scheduled):
            raise RuntimeError("injected failure")
        return launch(plan)

    monkeypatch.setattr(llm.executor.runner, "launch", fail_for_bad_prompt)
    (expected,) = llm.generate(["Once upon a time"], GREEDY, use_tqdm=False)
    with caplog.at_level("WARNING", logger="kiln.runtime.llm"):
        good, bad = llm.generate(["Once upon a time", bad_prompt], GREEDY.replace(n=2), use_tqdm=False)
    assert good.error is None and [o.token_ids for o in good.outputs] == [expected.outputs[0].token_ids] * 2
    assert "injected failure" in bad.error and bad.finished
    assert [(o.index, o.finish_reason) for o in bad.outputs] == [(0, "error"), (1, "error")]  # one per sample
    (warning,) = [r for r in caplog.records if r.name == "kiln.runtime.llm"]
    assert warning.levelname == "WARNING" and warning.getMessage().startswith("prompts[1] failed while running: ")
    assert "injected failure" in warning.getMessage()


def stream(llm: LLM, prompt, params: SamplingParams, stop_after: int | None = None) -> list:
    async def consume():
        outputs = []
        async for out in llm.generate_async(prompt, params, streaming=True):
            outputs.append(out)
            if len(outputs) == stop_after:
                break
        return outputs

    return asyncio.run(consume())


def test_generate_async_streams_cumulative_outputs(llm):
    params = GREEDY.replace(logprobs=2)
    outputs = stream(llm, "Once upon a time", params)
    (whole,) = llm.generate(["Once upon a time"], params, use_tqdm=False)
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert len(outputs) > 2
    text, tokens = "", []
    for out in outputs:
        step = out.outputs[0]
        text += step.text_diff
        tokens += step.token_ids_diff
        assert step.text == text and step.token_ids == tokens and len(step.logprobs) == len(tokens)
    final = outputs[-1].outputs[0]
    assert final.token_ids == whole.outputs[0].token_ids and final.text == whole.outputs[0].text
    assert final.logprobs == whole.outputs[0].logprobs
    assert final.cumulative_logprob == pytest.approx(whole.outputs[0].cumulative_logprob)
    m = outputs[-1].metrics
    assert m.arrival_time <= m.first_token_time <= m.finish_time


def test_leaving_generate_async_early_cancels_the_request(llm):
    ex = llm.executor
    num_before = ex.counters["generation_tokens"]
    left = threading.Event()

    def hold_after_two_tokens(stats):  # the loop takes no step past the client's second token until it left
        if ex.counters["generation_tokens"] - num_before >= 2:
            left.wait(30)

    ex.on_step = hold_after_two_tokens
    try:
        outputs = stream(llm, "Once upon a time", SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True),
                         stop_after=2)
        left.set()
        assert len(outputs) == 2 and not outputs[-1].finished
        deadline = time.monotonic() + 30
        while ex.num_running or ex.num_waiting:  # the cancellation is handled by the loop thread
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.01)
    finally:
        ex.on_step = None
        left.set()
    assert ex.counters["generation_tokens"] - num_before == 2, "tokens generated after the client left"
    assert ex.pool.num_free_blocks == ex.pool.num_blocks


def test_concurrent_generate_calls_each_get_their_own_outputs(llm):
    # generate used to drain every response of the executor, so a concurrent call lost its own.
    batches = [["Once upon a time", "The cat"], ["Lily and Ben", "One day", "The sun"]]
    expected = [[o.outputs[0].token_ids for o in llm.generate(b, GREEDY, use_tqdm=False)] for b in batches]
    got: dict[int, list] = {}

    def run(i):
        got[i] = [o.outputs[0].token_ids for o in llm.generate(batches[i], GREEDY, use_tqdm=False)]

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a generate call never got its responses"
    assert [got[0], got[1]] == expected
