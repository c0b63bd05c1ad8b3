"""OpenAI's request and response bodies for the endpoints kiln serves, as pydantic models.

Requests are strict (no silent type coercion, no NaN or infinity) and reject unknown fields, as
OpenAI's API does; fields kiln accepts but cannot honour yet are listed by ``unsupported_fields``.
Beyond OpenAI's fields, both endpoints take kiln's sampling extras: ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos`` and ``min_tokens``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer
from pydantic_core import PydanticCustomError

INT64 = 2**63


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _one_of(message: str):
    """A wrap validator that replaces a union's per-member errors with one readable message."""

    def check(value, handler):
        try:
            return handler(value)
        except ValueError:
            raise PydanticCustomError("invalid_type", message) from None

    return check


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Fields both endpoints share."""

    model: str | None = Field(None, description="the served model name; may be omitted")
    n: int | None = Field(None, description="choices to generate per prompt")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to any number of stop strings (not included in the "
                                                            "output)")
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, description="an end-user identifier; accepted and not used")
    metadata: dict[str, str] | None = Field(None, description="key-value tags for the caller; accepted and not used")
    top_k: int | None = Field(None, description="kiln extra: keep the k likeliest tokens (0: off)")
    min_p: float | None = Field(None, description="kiln extra: drop tokens below min_p x the top probability")
    repetition_penalty: float | None = Field(None, description="kiln extra: > 1 discourages repeated tokens")
    ignore_eos: bool | None = Field(None, description="kiln extra: generate past the end-of-sequence token")
    min_tokens: int | None = Field(None, description="kiln extra: no stop before this many tokens")

    _check_stop = field_validator("stop", mode="wrap")(_one_of("stop must be a string or a list of strings"))

    def unsupported_fields(self) -> list[str]:
        """Names of the fields set to a value kiln cannot honour yet."""
        return [name for name, value in self._unsupported().items() if value]

    def _unsupported(self) -> dict[str, Any]:
        return {"logit_bias": self.logit_bias}


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a list of texts, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(None, description="default: the rest of the engine's max_seq_len")
    echo: bool | None = False
    logprobs: int | None = Field(None, description="return the log probabilities of this many likeliest tokens too")
    best_of: int | None = None
    suffix: str | None = None

    _check_prompt = field_validator("prompt", mode="wrap")(_one_of(
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"))

    def _unsupported(self) -> dict[str, Any]:
        return {**super()._unsupported(), "suffix": self.suffix,
                "best_of": self.best_of if self.best_of not in (None, self.n or 1) else None}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: str = Field(description="the call's arguments as JSON text, as the model wrote them")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # Fields of assistant messages echoed back from a previous response (refusal, audio, ...) are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant message's calls of tools")
    tool_call_id: str | None = Field(None, description="a tool message: the id of the call it answers")

    _check_content = field_validator("content", mode="wrap")(_one_of(
        "content must be a string or a list of content parts"))


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, description="deprecated by OpenAI; max_completion_tokens wins when both "
                                                     "are given")
    max_completion_tokens: int | None = Field(None, description="default: the rest of the engine's max_seq_len")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, description="with logprobs: this many likeliest tokens per position")
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    def _unsupported(self) -> dict[str, Any]:
        plain_text = self.response_format is None or self.response_format == {"type": "text"}
        return {**super()._unsupported(), "tools": self.tools, "functions": self.functions,
                "function_call": self.function_call, "parallel_tool_calls": self.parallel_tool_calls is not None,
                "tool_choice": self.tool_choice not in (None, "none"),
                "response_format": None if plain_text else self.response_format}


# ---- responses --------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Envelope(BaseModel):
    """What every completion response and chunk carries around its choices."""

    id: str
    created: int
    model: str


class CompletionResponse(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = []


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _without_unset(self) -> dict[str, str]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
