"""`kiln serve` end to end: real server processes on loopback ports, driven by the official openai
client, httpx and raw HTTP, with the bundled stories260K model on the CPU."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_chat import TOOL_TEMPLATE

from conftest import ServerProcess, port_in_use
from kiln.cli import build_parser
from kiln.cli import main as kiln_main
from kiln.models.config import ModelConfig
from kiln.runtime.llm import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from kiln.engine.tokenizer import Tokenizer

PROMPT = "Once upon a time"
DEFAULT_URL = "http://127.0.0.1:8000"  # where the docs' examples send requests


def metrics(url: str) -> dict[str, float]:
    """Samples by name (labels as name{k="v"}), parsed with the Prometheus client's parser."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def next_event(lines) -> str:
    """The next ``data:`` line of an SSE stream; ``lines`` stays open (closing a response's line
    iterator closes its connection)."""
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended")


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def server():
    """`kiln serve` with no model: the bundled stories260K, as documented."""
    proc = ServerProcess()
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="module")
def guarded_server(stories_engine):
    """An engine folder, an API key from the environment, one sequence at a time and a queue of one."""
    proc = ServerProcess(str(stories_engine), "--served-model-name", "org/tiny", "--max-batch-size", "1",
                         "--max-queue-size", "1", env={"KILN_API_KEY": "sesame"})
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """stories260K with a chat template that renders tool calls and tool results."""
    template = tmp_path_factory.mktemp("tool_template") / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    proc = ServerProcess("--chat-template", str(template))
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    config = ModelConfig.from_hf_dir(DEFAULT_MODEL_DIR)
    return Tokenizer(DEFAULT_MODEL_DIR, config.eos_token_ids, config.bos_token_id)


# ---- OpenAI client: completions ---------------------------------------------------------------------


def test_completion_text_and_token_prompts_agree_with_streaming(client, tokenizer):
    full = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    choice = full.choices[0]
    assert full.object == "text_completion" and full.model == DEFAULT_MODEL_NAME
    assert choice.finish_reason == "length" and choice.text
    prompt_ids = tokenizer.encode(PROMPT)
    assert full.usage.prompt_tokens == len(prompt_ids) and full.usage.completion_tokens == 24
    assert full.usage.total_tokens == len(prompt_ids) + 24

    by_ids = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt_ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == choice.text

    chunks = list(client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_completion_n_and_several_prompts(client):
    out = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=[PROMPT, "The dog"], n=3, max_tokens=6,
                                    temperature=1.0, seed=7, logprobs=0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert all(c.finish_reason == "length" and len(c.logprobs.tokens) == 6 for c in out.choices)
    assert out.usage.completion_tokens == 36
    texts = [c.text for c in out.choices]
    assert len(set(texts[:3])) > 1, "n samples of one prompt should differ at temperature 1"

    streamed: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in client.completions.create(model=DEFAULT_MODEL_NAME, prompt=[PROMPT, "The dog"], n=3, max_tokens=6,
                                           temperature=1.0, seed=7, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            if c.finish_reason:
                assert c.index not in reasons, "a choice's finish_reason is sent once"
                reasons[c.index] = c.finish_reason
    assert streamed == dict(enumerate(texts)), "a seeded request gives the same samples streamed or not"
    assert reasons == dict.fromkeys(range(6), "length")


def test_completion_logprobs(client):
    out = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4 and top[token] == logprob
        assert logprob == max(top.values()), "greedy picks the likeliest token"


def test_completion_echo_with_prompt_logprobs(client, tokenizer):
    out = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                    logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT)
    num_prompt = len(tokenizer.encode(PROMPT))
    assert len(choice.logprobs.tokens) == num_prompt + 4
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])


def test_echo_with_max_tokens_0_scores_the_prompt(client, server, tokenizer):
    """The scoring idiom of lm-evaluation-harness: the prompt back with its logprobs, nothing generated."""
    scored = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    one = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=1, echo=True, logprobs=2)
    num_prompt = len(tokenizer.encode(PROMPT))
    choice, lp = scored.choices[0], scored.choices[0].logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens, scored.usage.total_tokens) == (
        num_prompt, 0, num_prompt)
    assert len(lp.tokens) == num_prompt and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = one.choices[0].logprobs
    assert lp.tokens == expected.tokens[:num_prompt] and lp.text_offset == expected.text_offset[:num_prompt]
    assert lp.token_logprobs == expected.token_logprobs[:num_prompt]
    assert lp.top_logprobs == expected.top_logprobs[:num_prompt]

    # As lm-evaluation-harness sends it: token ids, several prompts in one request.
    ids = [tokenizer.encode(PROMPT), tokenizer.encode("The dog ran")]
    body = {"model": DEFAULT_MODEL_NAME, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1,
            "temperature": 0, "seed": 1234}
    batch = httpx.post(server.url + COMPLETIONS, json=body, timeout=60).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1] and batch["usage"]["completion_tokens"] == 0
    # Beside another prompt, the first one's matmuls run over more rows: MKL's small-row kernels (fewer than 8
    # rows) round differently from its larger ones in the last bits, so the same prompt scores alike, not
    # bit for bit, in a different batch (stories260K's MLP down projection: 5 rows vs 11, 6 float32 ulps).
    assert batch["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert batch["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], rel=1e-5)
    assert [len(c["logprobs"]["tokens"]) for c in batch["choices"]] == [len(i) for i in ids]
    assert all(c["finish_reason"] == "length" for c in batch["choices"])

    chunks = list(client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0


def test_stop_strings(client):
    text = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=32, temperature=0).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.index(stop)]
    out = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=32, temperature=0,
                                       stop=stop, stream=True)
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks]
    assert "".join(t for t, _ in pieces) == expected and pieces[-1][1] == "stop"


def test_max_tokens_defaults_to_the_rest_of_max_seq_len(client):
    model = client.models.list().data[0]
    out = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == model.max_model_len


# ---- OpenAI client: chat ------------------------------------------------------------------------------


def test_chat_completion_plain_template(client, tokenizer):
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A cat"}]
    out = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_completion_tokens=12,
                                         temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    rendered = "<s>system: Tell a story.\n\nuser: A cat\n\nassistant:"
    assert out.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))

    stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_completion_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_chat_logprobs_n_and_stop(client):
    messages = [{"role": "user", "content": "Once upon a time"}]
    out = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=6, n=2,
                                         temperature=0.8, seed=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        for t in content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 2 and bytes(t.bytes).decode() == t.token
    greedy = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=20,
                                            temperature=0).choices[0].message.content
    stop = greedy[5:8]
    stopped = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=20,
                                             temperature=0, stop=stop).choices[0]
    assert stopped.message.content == greedy[:greedy.index(stop)] and stopped.finish_reason == "stop"


def test_metadata_is_accepted_and_ignored(client):
    tags = {"run": "eval-7", "owner": "kiln"}
    plain = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    tagged = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                       extra_body={"metadata": tags})
    assert tagged.choices[0].text == plain.choices[0].text
    chat = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=4, metadata=tags)
    assert chat.choices[0].message.content is not None


TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
]


def test_chat_history_with_tool_messages_renders_through_the_template(tool_server, tokenizer):
    client = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=TOOL_HISTORY, max_completion_tokens=4)
    rendered = 'user: Weather in Oslo?\n<call weather {"city": "Oslo"}>\n<result call_1>-3 C</result>\nassistant:'
    assert out.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    missing_id = httpx.post(tool_server.url + CHAT, json={"messages": [{"role": "tool", "content": "-3 C"}]})
    assert missing_id.status_code == 400 and missing_id.json()["error"]["param"] == "messages.0.tool_call_id"


def test_tool_messages_need_a_template_that_renders_them(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[TOOL_HISTORY[0], TOOL_HISTORY[2]])
    error = refused.value.body
    assert error["param"] == "messages.1.role"
    assert error["message"].startswith("messages[1]: role 'tool' is not supported by kiln's plain chat template")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=TOOL_HISTORY[:2])
    error = refused.value.body
    assert error["param"] == "messages.1.tool_calls" and "role 'assistant' with tool_calls" in error["message"]


def test_models_health_version(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == DEFAULT_MODEL_NAME
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_models_retrieve(client, server):
    listed = client.models.list().data[0]
    card = client.models.retrieve(DEFAULT_MODEL_NAME)
    assert (card.id, card.object, card.owned_by) == (DEFAULT_MODEL_NAME, "model", "kiln")
    assert card.max_model_len == listed.max_model_len
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    response = httpx.get(f"{server.url}/v1/models/gpt-4")
    assert response.status_code == 404
    assert response.json()["error"] == {"message": f"the model 'gpt-4' does not exist; this server serves "
                                                   f"'{DEFAULT_MODEL_NAME}'", "type": "invalid_request_error",
                                        "param": "model", "code": "model_not_found"}


# ---- bad input: 4xx in OpenAI's error shape, never a 500 ----------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (route, json body or raw bytes, status, words in the message, param)
    (COMPLETIONS, b"{not json", 400, "not valid JSON", None),
    (COMPLETIONS, [1, 2], 400, "request body", None),
    (COMPLETIONS, {}, 400, "prompt is required", "prompt"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
    (COMPLETIONS, {"prompt": {"text": "hi"}}, 400, "prompt must be a string", "prompt"),
    (COMPLETIONS, {"prompt": "hi", "max_token": 5}, 400, "unrecognized request argument: max_token", "max_token"),
    (COMPLETIONS, {"prompt": "hi", "metadata": {"run": 7}}, 400, "metadata.run", "metadata.run"),
    (CHAT, {"messages": USER, "metadata": "run-7"}, 400, "metadata", "metadata"),
    (CHAT, {"messages": USER, "temprature": 0}, 400, "unrecognized request argument: temprature", "temprature"),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-4"}, 404, "does not exist", "model"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt must not be empty", "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt must not be empty", "prompt"),
    (COMPLETIONS, {"prompt": ["hi", ""]}, 400, "prompt must not be empty", "prompt"),
    (COMPLETIONS, {"prompt": [5] * 300}, 400, "max_input_len", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 100000}, 400, "max_seq_len", None),
    (COMPLETIONS, {"prompt": [1, 99999]}, 400, "[0, 512)", None),
    (COMPLETIONS, {"prompt": [1, -3]}, 400, "[0, 512)", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens=0 needs echo=true", "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens must be", None),
    (COMPLETIONS, {"prompt": "hi", "top_p": 3}, 400, "top_p", None),
    (COMPLETIONS, {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n must be", None),
    (COMPLETIONS, {"prompt": "hi", "n": 100000, "max_tokens": 8}, 400, "KV blocks", None),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    (COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, "stop", None),
    (COMPLETIONS, {"prompt": "hi", "stop": [1]}, 400, "stop must be a string", "stop"),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, 400, "seed", "seed"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "end"}, 400, "suffix is not supported", "suffix"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of is not supported", "best_of"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias is not supported", "logit_bias"),
    (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "only allowed when stream",
     "stream_options"),
    (COMPLETIONS, {"prompt": "hi", "stream": True, "echo": True, "logprobs": 1}, 400, "echo with logprobs", "echo"),
    (COMPLETIONS, {"prompt": "hi", "stream": True, "max_tokens": 100000}, 400, "max_seq_len", None),
    (COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", "temperature"),
    (CHAT, {"messages": []}, 400, "messages", "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "content part type 'image_url' is not supported", "messages.0.content"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format is not supported",
     "response_format"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools is not supported", "tools"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs needs logprobs", "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50}, 400, "logprobs", None),
    (CHAT, {"messages": USER, "max_completion_tokens": 100000}, 400, "max_seq_len", None),
    (CHAT, {"messages": USER, "stream": True, "max_completion_tokens": 100000}, 400, "max_seq_len", None),
]


@pytest.mark.parametrize("route,body,status,words,param", BAD_REQUESTS,
                         ids=[f"{r.rsplit('/', 1)[-1]}-{i}" for i, (r, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_4xx_in_openai_shape(server, route, body, status, words, param):
    if isinstance(body, bytes):
        response = httpx.post(server.url + route, content=body, headers={"Content-Type": "application/json"})
    else:
        response = httpx.post(server.url + route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_body_that_is_not_json_names_the_header(server):
    response = httpx.post(server.url + COMPLETIONS, content=b"prompt=hi")
    assert response.status_code == 400 and "Content-Type: application/json" in response.json()["error"]["message"]


def test_unknown_route_and_method_keep_the_error_shape(server):
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["message"] == "Not Found"
    response = httpx.get(server.url + COMPLETIONS)
    assert response.status_code == 405 and "error" in response.json()


# ---- disconnects, load, metrics ------------------------------------------------------------------------


def test_client_disconnect_mid_stream_cancels_and_frees_blocks(server):
    before = metrics(server.url)
    cancelled = 'kiln_request_finished_total{finish_reason="cancelled"}'
    body = {"prompt": "A long story", "max_tokens": 480, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(base_url=server.url) as http:
        with http.stream("POST", COMPLETIONS, json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next_event(lines)
            during = metrics(server.url)
            assert during["kiln_num_requests_running"] == 1 and during["kiln_kv_cache_used_blocks"] > 0
    after = wait_for(lambda: (m := metrics(server.url))["kiln_kv_cache_used_blocks"] == 0 and m, what="blocks freed")
    assert after["kiln_num_requests_running"] == 0 and after["kiln_num_requests_waiting"] == 0
    assert after[cancelled] == before.get(cancelled, 0) + 1
    assert after["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] < 480


def test_200_concurrent_streams_complete_with_exact_token_counts(server):
    num_streams, max_tokens = 200, 12

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str]:
        stream = await client.completions.create(
            model=DEFAULT_MODEL_NAME, prompt=f"{PROMPT} {i}", max_tokens=max_tokens, logprobs=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        num_tokens, usage, reason = 0, None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                num_tokens += len(choice.logprobs.tokens)
                reason = choice.finish_reason or reason
        return num_tokens, usage, reason

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(num_streams)))

    results = asyncio.run(run_all())
    assert results == [(max_tokens, max_tokens, "length")] * num_streams
    assert httpx.get(f"{server.url}/health").status_code == 200
    final = wait_for(lambda: (m := metrics(server.url))["kiln_num_requests_running"] == 0 and m, what="idle")
    assert final["kiln_kv_cache_used_blocks"] == 0


def test_metrics_parse_and_count(server):
    before = metrics(server.url)
    out = httpx.post(server.url + COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True}).json()
    after = metrics(server.url)
    assert after["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] == 5
    assert after["kiln_prompt_tokens_total"] - before["kiln_prompt_tokens_total"] == out["usage"]["prompt_tokens"]
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time"):
        assert after[f"kiln_{name}_seconds_count"] == before[f"kiln_{name}_seconds_count"] + 1
    length = 'kiln_request_finished_total{finish_reason="length"}'
    assert after[length] - before.get(length, 0) == 1
    assert after["kiln_kv_cache_total_blocks"] > 0 and 0 <= after["kiln_prefix_cache_hit_rate"] <= 1
    assert 0 <= after["kiln_kv_cache_usage_ratio"] <= 1


# ---- auth and overload ------------------------------------------------------------------------------------


def test_api_key_guards_v1_routes_only(guarded_server):
    url = guarded_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sesame"}):
        response = httpx.get(f"{url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(url + COMPLETIONS, json={"prompt": "hi"})
    assert response.status_code == 401
    assert httpx.get(f"{url}/v1/models/org/tiny").status_code == 401
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
    assert client.models.list().data[0].id == "org/tiny"
    assert client.models.retrieve("org/tiny").id == "org/tiny", "the openai client sends the slash as %2F"
    assert httpx.get(f"{url}/v1/models/org/tiny", headers={"Authorization": "Bearer sesame"}).json()["id"] == "org/tiny"
    assert client.completions.create(model="org/tiny", prompt=PROMPT, max_tokens=3).usage.completion_tokens <= 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_answers_429(guarded_server):
    url, auth = guarded_server.url, {"Authorization": "Bearer sesame"}
    long_body = {"prompt": "A long story", "max_tokens": 480, "ignore_eos": True, "stream": True}
    waiting_result: list[httpx.Response] = []
    with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
        with http.stream("POST", COMPLETIONS, json=long_body) as running:
            lines = running.iter_lines()
            next_event(lines)
            waiter = threading.Thread(target=lambda: waiting_result.append(
                httpx.post(url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}, headers=auth, timeout=60)))
            waiter.start()
            wait_for(lambda: metrics(url)["kiln_num_requests_waiting"] == 1, what="a waiting request")
            refused = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
        waiter.join(60)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert "--max-queue-size" in error["message"] and error["code"] == "rate_limit_exceeded"
    assert waiting_result[0].status_code == 200, "the queued request runs once the stream is gone"
    assert metrics(url)["kiln_request_overloaded_total"] >= 1


# ---- the command line and shutdown ---------------------------------------------------------------------


def test_sigterm_finishes_streams_in_flight_then_exits_cleanly():
    proc = ServerProcess("--shutdown-timeout", "60")
    body = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True, "logprobs": 0}
    num_tokens, reasons, done = 0, [], False
    with httpx.Client(base_url=proc.url, timeout=60) as http:
        with http.stream("POST", COMPLETIONS, json=body) as response:
            lines = response.iter_lines()
            proc.proc.send_signal(signal.SIGTERM)
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    num_tokens += len(choice["logprobs"]["tokens"])
                    reasons.append(choice["finish_reason"])
    assert done and num_tokens == 300 and reasons[-1] == "length"
    assert proc.stop() == 0, proc.logs()


@pytest.mark.parametrize("args,words", [
    (["--port", "70000"], "--port 70000"),
    (["--max-queue-size", "0"], "--max-queue-size"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--chat-template", "/nonexistent/template.jinja"], "--chat-template"),
    (["/nonexistent/model"], "neither an engine folder"),
])
def test_cli_errors_are_one_line(capsys, args, words):
    # Whatever holds the default port, users' 8000, these errors are the same: the tests never rely on it.
    with port_in_use(8000):
        assert kiln_main(["serve", "--port", "0", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln serve: error:") and words in err and "\n" not in err


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as exit_:
        kiln_main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    # One entry per argument: a line indented by two spaces, then its wrapped continuation lines.
    entries = {" ".join(entry.split()) for entry in re.split(r"\n  (?! )", out.split("positional arguments:")[1])}
    for entry in entries:
        assert entry.count("default") <= 1, entry
    for default in ("127.0.0.1", "8000", "guaranteed_no_evict", "30.0", "info", "0.9"):
        assert sum(f"default: {default})" in entry for entry in entries) == 1, default


def test_cli_port_in_use(capsys):
    with port_in_use() as port:
        assert kiln_main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "another --port" in err


def test_serve_listens_on_127_0_0_1_8000_by_default():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)  # as docs/serving.md and the README tell users


def _doc_blocks(language: str) -> list[str]:
    """Code blocks of docs/serving.md, with the documented address."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", doc, re.S)


def _at(server: ServerProcess, example: str) -> str:
    """A documented example pointed at the test's server instead of the default address."""
    assert DEFAULT_URL in example, f"the example does not use {DEFAULT_URL}; it would not reach the test server"
    return example.replace(DEFAULT_URL, server.url)


def test_docs_openai_example_runs_as_written(server, capsys):
    code = _at(server, _doc_blocks("python")[0])
    exec(compile(code, "docs/serving.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(lines)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_docs_curl_example_runs_as_written(server):
    curl = next(block for block in _doc_blocks("bash") if block.startswith("curl"))
    result = subprocess.run(["bash", "-c", _at(server, curl)], capture_output=True,
                            text=True, timeout=60, check=True)
    body = json.loads(result.stdout)
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] <= 32
