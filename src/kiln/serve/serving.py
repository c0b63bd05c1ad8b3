"""The OpenAI endpoints' logic: request bodies -> executor Requests -> OpenAI responses or SSE chunks.

Both endpoints share one path (``OpenAIServing.generate``); what differs is the shape of a choice,
which a view (``CompletionView`` or ``ChatView``) writes. A request whose prompts the executor
refuses (limits, parameters) gets a 400 with the executor's message: a stream sends its headers only
after every prompt was accepted, so no refusal ever arrives inside a 200.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse
from starlette.responses import Response as HTTPResponse
from starlette.types import Receive

from kiln.config import SamplingParams
from kiln.errors import KilnError, RequestError
from kiln.runtime.executor import Executor
from kiln.runtime.request import Request, Result
from kiln.engine.tokenizer import Tokenizer
from kiln.serve import protocol as p
from kiln.serve.chat import ChatTemplate
from kiln.serve.generation import EngineStopped, EventStream, Generation, unless_disconnected
from kiln.serve.metrics import ServerMetrics

SSE_DONE = "data: [DONE]\n\n"
# Tokens of context decoded before a token to get its text with the right leading space.
TOKEN_TEXT_CONTEXT = 4
# The sampling fields copied to SamplingParams as they are, when given.
PASSTHROUGH_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                        "repetition_penalty", "ignore_eos", "min_tokens")


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.body = p.ErrorResponse(error=p.ErrorDetail(message=message, type=type, param=param, code=code))
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=self.headers)


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _json_object_or_text(text: str) -> dict[str, Any] | str:
    """A tool call's arguments as templates expect them (``arguments | tojson``), if they are a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # None when the client sent token ids


@dataclass
class TokenLogprob:
    """One token with its log probability and the top-k tokens at its position (likeliest first; the
    token itself among them when it is one of the k)."""

    token: str
    logprob: float | None
    alternatives: list[tuple[str, float]]


@dataclass
class Fragment:
    """What one response adds to one choice."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


class TokenTexts:
    """The text of a token where it stands: ' the', not '▁the' or 'the'; a choice's token texts add up
    to its text."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer

    def __call__(self, context: list[int], candidates: list[int]) -> list[str]:
        if self.tokenizer is None:
            return [f"token_id:{t}" for t in candidates]
        decode = self.tokenizer.decode  # special tokens come out empty, as they are in the text
        window = context[-TOKEN_TEXT_CONTEXT:]
        prefix = decode(window)
        texts = []
        for token in candidates:
            full = decode(window + [token])
            texts.append(full[len(prefix):] if full.startswith(prefix) else decode([token]))
        return texts

    def logprobs(self, context: list[int], token: int, logprob: float | None,
                 alternatives: dict[int, float]) -> TokenLogprob:
        ranked = sorted(alternatives.items(), key=lambda item: -item[1])
        texts = self(context, [token] + [t for t, _ in ranked])
        return TokenLogprob(texts[0], logprob, list(zip(texts[1:], (lp for _, lp in ranked))))


class ChoiceTracker:
    """Per choice across a request's responses: the tokens so far (context for token texts) and
    whether its end was reported."""

    def __init__(self, prompts: list[Prompt], n: int, token_texts: TokenTexts):
        self.n = n
        self.token_texts = token_texts
        self.contexts = {k * n + i: list(prompt.token_ids) for k, prompt in enumerate(prompts) for i in range(n)}
        self.finished: set[int] = set()

    def fragments(self, prompt_index: int, result: Result) -> list[Fragment]:
        out = []
        for i, tokens in enumerate(result.output_token_ids):
            index = prompt_index * self.n + i
            if index in self.finished:
                continue
            context = self.contexts[index]
            logprobs = None
            if result.log_probs is not None:
                logprobs = []
                for token, chosen, top in zip(tokens, result.log_probs[i], result.top_logprobs[i]):
                    logprobs.append(self.token_texts.logprobs(context, token, chosen, top))
                    context.append(token)
            else:
                context.extend(tokens)
            reason = result.finish_reasons[i]
            if reason:
                self.finished.add(index)
            if tokens or result.text[i] or reason:
                out.append(Fragment(index, result.text[i], logprobs, reason))
        return out

    def prompt_logprobs(self, prompt: Prompt, entries: list[dict[int, float] | None]) -> list[TokenLogprob]:
        ids = prompt.token_ids
        return [self.token_texts.logprobs(ids[:j], token, entry[token] if entry else None, entry or {})
                for j, (token, entry) in enumerate(zip(ids, entries))]


# ---- views: the shape of choices, per endpoint ----------------------------------------------------


class CompletionView:
    """``is_scoring`` (echo with max_tokens=0): the engine ran each prompt with one new token, which the
    choices drop; they end at "length" and the usage counts no completion tokens."""

    def __init__(self, model: str, prompts: list[Prompt], n: int, echo: bool, tokenizer: Tokenizer | None,
                 is_scoring: bool = False):
        self.id, self.created, self.model = p.new_id("cmpl"), p.now(), model
        self.prompts, self.n, self.echo, self.tokenizer = prompts, n, echo, tokenizer
        self.is_scoring = is_scoring
        self.offsets = dict.fromkeys(range(len(prompts) * n), 0)  # text offset of each choice's next logprob token

    def _echo_text(self, index: int) -> str:
        """The prompt of choice ``index`` as text (token-id prompts are decoded once the engine accepted
        them, so their ids are known to be valid)."""
        prompt = self.prompts[index // self.n]
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids) if self.tokenizer is not None else ""

    def _wrap(self, choices: list[p.CompletionChoice], usage: p.Usage | None = None) -> p.CompletionResponse:
        if usage is not None and self.is_scoring:
            usage = usage.model_copy(update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens})
        return p.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _output(self, f: Fragment) -> Fragment:
        if not self.is_scoring:
            return f
        return Fragment(f.index, "", None if f.logprobs is None else [], f.finish_reason and "length")

    def _logprobs(self, index: int, tokens: list[TokenLogprob] | None) -> p.CompletionLogprobs | None:
        if tokens is None:
            return None
        out = p.CompletionLogprobs()
        for t in tokens:
            out.tokens.append(t.token)
            out.token_logprobs.append(t.logprob)
            top = None if t.logprob is None else dict(sorted([(t.token, t.logprob), *t.alternatives],
                                                             key=lambda item: -item[1]))
            out.top_logprobs.append(top)
            out.text_offset.append(self.offsets[index])
            self.offsets[index] += len(t.token)
        return out

    def start_chunks(self) -> list[BaseModel]:
        if not self.echo:
            return []
        return [self._wrap([p.CompletionChoice(index=i, text=self._echo_text(i))]) for i in self.offsets]

    def chunk(self, f: Fragment) -> BaseModel:
        f = self._output(f)
        return self._wrap([p.CompletionChoice(index=f.index, text=f.text, logprobs=self._logprobs(f.index, f.logprobs),
                                              finish_reason=f.finish_reason)])

    def usage_chunk(self, usage: p.Usage) -> BaseModel:
        return self._wrap([], usage)

    def response(self, fragments: list[Fragment], echoed: dict[int, list[TokenLogprob]], usage: p.Usage) -> BaseModel:
        choices = []
        for f in map(self._output, fragments):
            text, tokens = f.text, f.logprobs
            if self.echo:
                text = self._echo_text(f.index) + text
                if tokens is not None:
                    tokens = echoed[f.index // self.n] + tokens
            choices.append(p.CompletionChoice(index=f.index, text=text, logprobs=self._logprobs(f.index, tokens),
                                              finish_reason=f.finish_reason))
        return self._wrap(choices, usage)


class ChatView:
    def __init__(self, model: str, n: int):
        self.id, self.created, self.model = p.new_id("chatcmpl"), p.now(), model
        self.n = n

    @staticmethod
    def _logprobs(tokens: list[TokenLogprob] | None) -> p.ChatLogprobs | None:
        if tokens is None:
            return None
        return p.ChatLogprobs(content=[
            p.ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                               top_logprobs=[p.TokenLogprob(token=s, logprob=lp, bytes=list(s.encode()))
                                             for s, lp in t.alternatives])
            for t in tokens])

    def _wrap(self, choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def start_chunks(self) -> list[BaseModel]:
        return [self._wrap([p.ChatChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
                for i in range(self.n)]

    def chunk(self, f: Fragment) -> BaseModel:
        return self._wrap([p.ChatChunkChoice(index=f.index, delta=p.Delta(content=f.text or None),
                                             logprobs=self._logprobs(f.logprobs), finish_reason=f.finish_reason)])

    def usage_chunk(self, usage: p.Usage) -> BaseModel:
        return self._wrap([], usage)

    def response(self, fragments: list[Fragment], echoed: dict[int, list[TokenLogprob]], usage: p.Usage) -> BaseModel:
        choices = [p.ChatChoice(index=f.index, message=p.AssistantMessage(content=f.text),
                                logprobs=self._logprobs(f.logprobs), finish_reason=f.finish_reason)
                   for f in fragments]
        return p.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                        usage=usage)


# ---- the endpoints ----------------------------------------------------------------------------------


class OpenAIServing:
    def __init__(self, executor: Executor, model_name: str, max_queue_size: int | None = None,
                 chat_template: str | None = None):
        self.executor = executor
        self.model_name = model_name
        self.max_queue_size = max_queue_size
        self.tokenizer = executor.tokenizer
        self.chat_template = ChatTemplate(self.tokenizer, chat_template) if self.tokenizer is not None else None
        self.token_texts = TokenTexts(self.tokenizer)
        self.metrics = ServerMetrics(executor)
        self.build_config = executor.engine.build_config

    # ---- checks shared by both endpoints ------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        """A 404 unless ``model`` is the served name (or left out)."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _check_common(self, body: p.SamplingFields) -> None:
        self.check_model(body.model)
        unsupported = body.unsupported_fields()
        if unsupported:
            raise APIError(400, f"{unsupported[0]} is not supported by kiln yet; leave it out of the request",
                           param=unsupported[0])
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def _check_queue(self, num_requests: int) -> None:
        if self.max_queue_size is None:
            return
        waiting = self.executor.num_waiting
        if waiting + num_requests > self.max_queue_size:
            self.metrics.overloaded.inc()
            raise APIError(429, f"the server is overloaded: {waiting} requests wait for the engine and the queue "
                                f"holds {self.max_queue_size} (--max-queue-size); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})

    def default_max_tokens(self, num_prompt_tokens: int, n: int) -> int:
        """The rest of max_seq_len, capped so that n samples of this length fit the KV cache."""
        pool = self.executor.pool
        per_sample_tokens = (pool.num_blocks // max(n, 1)) * pool.block_size
        return max(1, min(self.build_config.max_seq_len, per_sample_tokens) - num_prompt_tokens)

    def _request(self, body: p.SamplingFields, prompt: Prompt, max_tokens: int | None, logprobs: int | None,
                 prompt_logprobs: int | None = None) -> Request:
        n = 1 if body.n is None else body.n
        given = {name: getattr(body, name) for name in PASSTHROUGH_SAMPLING if getattr(body, name) is not None}
        try:
            params = SamplingParams(
                max_tokens=self.default_max_tokens(len(prompt.token_ids), n) if max_tokens is None else max_tokens,
                n=n, stop=body.stop or (), logprobs=logprobs, prompt_logprobs=prompt_logprobs, **given)
        except RequestError as e:
            raise APIError(400, str(e)) from None
        return Request(prompt.token_ids, sampling_params=params, streaming=bool(body.stream), prompt=prompt.text)

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, f"this engine has no tokenizer, so {what} cannot be used; send the prompt as token "
                                "ids to /v1/completions", param="prompt")
        return self.tokenizer

    # ---- /v1/completions ----------------------------------------------------------------------
    def _completion_prompts(self, prompt: str | list) -> list[Prompt]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        prompts = []
        for item in prompt:
            if not item:
                raise APIError(400, "prompt must not be empty: every prompt needs some text or token ids",
                               param="prompt")
            if isinstance(item, str):
                prompts.append(Prompt(self._need_tokenizer("text prompts").encode(item), item))
            else:
                prompts.append(Prompt(list(item), None))
        return prompts

    async def completions(self, body: p.CompletionRequest, receive: Receive) -> HTTPResponse:
        self._check_common(body)
        if body.echo and body.logprobs is not None and body.stream:
            raise APIError(400, "echo with logprobs needs stream=false (prompt logprobs come with the last token)",
                           param="echo")
        is_scoring = body.max_tokens == 0
        if is_scoring and not body.echo:
            raise APIError(400, "max_tokens must be at least 1; max_tokens=0 needs echo=true (it returns the prompt "
                                "with its logprobs and generates nothing)", param="max_tokens")
        prompts = self._completion_prompts(body.prompt)
        # Scoring runs each prompt with one new token, which the view drops (the prompt's logprobs come
        # from the same forward pass): the engine needs no max_tokens=0 case.
        max_tokens = 1 if is_scoring else body.max_tokens
        requests = [self._request(body, prompt, max_tokens, body.logprobs,
                                  prompt_logprobs=body.logprobs if body.echo else None) for prompt in prompts]
        n = requests[0].sampling_params.n
        view = CompletionView(self.model_name, prompts, n, bool(body.echo), self.tokenizer, is_scoring)
        return await self.generate(view, requests, prompts, body, receive)

    # ---- /v1/chat/completions -----------------------------------------------------------------
    def _chat_message(self, i: int, message: p.ChatMessage) -> dict[str, Any]:
        """Message ``i`` as the chat template sees it, as in Hugging Face transformers: tool calls with
        their arguments parsed from JSON (text that is not a JSON object stays text)."""
        content = message.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}]: content part type '{part.type}' is not supported; "
                                        "kiln takes text parts only", param=f"messages.{i}.content")
            content = "\n".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        template = self.chat_template
        if role == "tool":
            if message.tool_call_id is None:
                raise APIError(400, f"messages[{i}]: a tool message needs tool_call_id, the id of the call it "
                                    "answers", param=f"messages.{i}.tool_call_id")
            if not template.supports_tool_role:
                raise APIError(400, f"messages[{i}]: role 'tool' is not supported by {template.name}, which "
                                    "never mentions it; give one that renders tool messages with --chat-template",
                               param=f"messages.{i}.role")
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            if role != "assistant":
                raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls, not role '{role}'",
                               param=f"messages.{i}.tool_calls")
            if not template.supports_tool_calls:
                raise APIError(400, f"messages[{i}]: role 'assistant' with tool_calls is not supported by "
                                    f"{template.name}, which never reads tool_calls; give one that renders them "
                                    "with --chat-template", param=f"messages.{i}.tool_calls")
            entry["tool_calls"] = [{"id": call.id, "type": call.type,
                                    "function": {"name": call.function.name,
                                                 "arguments": _json_object_or_text(call.function.arguments)}}
                                   for call in message.tool_calls]
        return entry

    def _chat_prompt(self, body: p.ChatCompletionRequest) -> Prompt:
        self._need_tokenizer("chat messages")
        messages = [self._chat_message(i, message) for i, message in enumerate(body.messages)]
        try:
            ids = self.chat_template.encode(messages)
        except RequestError as e:
            raise APIError(400, str(e), param="messages") from None
        if not ids:
            raise APIError(400, "the chat template rendered these messages as an empty prompt", param="messages")
        return Prompt(ids, None)

    async def chat(self, body: p.ChatCompletionRequest, receive: Receive) -> HTTPResponse:
        self._check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        prompt = self._chat_prompt(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request = self._request(body, prompt, max_tokens, logprobs)
        view = ChatView(self.model_name, request.sampling_params.n)
        return await self.generate(view, [request], [prompt], body, receive)

    # ---- one path for both -----------------------------------------------------------------------
    async def generate(self, view: CompletionView | ChatView, requests: list[Request], prompts: list[Prompt],
                       body: p.SamplingFields, receive: Receive) -> HTTPResponse:
        self._check_queue(len(requests))
        try:
            generation = Generation(self.executor, requests, self.metrics)
        except KilnError as e:
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        tracker = ChoiceTracker(prompts, requests[0].sampling_params.n, self.token_texts)
        if not body.stream:
            try:
                finals = await unless_disconnected(receive, self._collect(generation))
            finally:
                generation.cancel()
            if finals is None:
                return HTTPResponse(status_code=499)  # the client is gone; nobody reads this
            fragments = [f for k in sorted(finals) for f in tracker.fragments(k, finals[k])]
            echoed = {k: tracker.prompt_logprobs(prompts[k], r.prompt_logprobs)
                      for k, r in finals.items() if r.prompt_logprobs is not None}
            return JSONResponse(view.response(fragments, echoed, generation.usage()).model_dump())
        try:
            first = await unless_disconnected(receive, self._first_responses(generation, len(requests)))
        except BaseException:
            generation.cancel()
            raise
        if first is None:
            generation.cancel()
            return HTTPResponse(status_code=499)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = self._events(view, tracker, generation, first, include_usage)
        return EventStream(events, generation.cancel)

    @staticmethod
    async def _collect(generation: Generation) -> dict[int, Result]:
        finals = {}
        try:
            async for index, response in generation.responses():
                if response.has_error():
                    raise APIError(400, response.error_msg)
                finals[index] = response.result
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        return finals

    @staticmethod
    async def _first_responses(generation: Generation, num_prompts: int) -> list[tuple[int, Result]]:
        """Each prompt's first response: all accepted, or the first refusal as a 400."""
        first, seen = [], set()
        try:
            while len(seen) < num_prompts:
                index, response = await generation.next_response()
                if response.has_error():
                    raise APIError(400, response.error_msg)
                first.append((index, response.result))
                seen.add(index)
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        return first

    async def _events(self, view: CompletionView | ChatView, tracker: ChoiceTracker, generation: Generation,
                      first: list[tuple[int, Result]], include_usage: bool):
        for chunk in view.start_chunks():
            yield sse(chunk)
        for index, result in first:
            for fragment in tracker.fragments(index, result):
                yield sse(view.chunk(fragment))
        try:
            async for index, response in generation.responses():
                if response.has_error():
                    yield sse(p.ErrorResponse(error=p.ErrorDetail(message=response.error_msg, type="server_error")))
                    break
                for fragment in tracker.fragments(index, response.result):
                    yield sse(view.chunk(fragment))
            else:
                if include_usage:
                    yield sse(view.usage_chunk(generation.usage()))
        except EngineStopped as e:
            yield sse(p.ErrorResponse(error=p.ErrorDetail(message=str(e), type="server_error")))
        yield SSE_DONE
