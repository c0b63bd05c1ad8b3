"""The Executor's data contract: what a client enqueues and what it gets back.

Streaming responses carry deltas (the tokens and text produced since the previous response of that
request); a non-streaming request gets one final response with everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.config import SamplingParams

@dataclass
class Request:
    input_token_ids: list[int]
    max_tokens: int | None = None  # overrides sampling_params.max_tokens when given
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    streaming: bool = False
    end_id: int | None = None      # replaces the model's EOS ids for this request
    prompt: str | None = None      # the text the ids came from, if any (kept for outputs)

    def effective_sampling(self) -> SamplingParams:
        if self.max_tokens is None or self.max_tokens == self.sampling_params.max_tokens:
            return self.sampling_params
        return self.sampling_params.replace(max_tokens=self.max_tokens,
                                            min_tokens=min(self.sampling_params.min_tokens, self.max_tokens))


@dataclass
class Result:
    """Per sample i (n of them): tokens, text, finish reason, log probabilities."""

    output_token_ids: list[list[int]]
    text: list[str]
    finish_reasons: list[str | None]
    is_final: bool
    log_probs: list[list[float]] | None = None
    top_logprobs: list[list[dict[int, float]]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    arrival_time: float = 0.0
    schedule_time: float | None = None  # when an iteration first ran the request (queue time ends)
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class Response:
    request_id: int
    result: Result | None = None
    error_msg: str | None = None

    def has_error(self) -> bool:
        return self.error_msg is not None
