"""Per-sequence state shared by the scheduler, the model runner and the executor.

One concept: a sequence has ``num_tokens`` tokens (prompt, then outputs) and ``num_computed_tokens``
(those whose K/V are in the cache). Each iteration the scheduler lets computed tokens catch up; when they
catch up with all tokens the runner samples one more. Prefill and decode are the same thing at
different sizes.

The executor plans the next step before the tokens of the step in flight reach the host, so the last
outputs may be *pending*: sampled on the device, their values not known here yet. ``token_ids`` holds
the tokens whose values are known; ``num_pending_tokens`` (at most two) follow them.
"""

from __future__ import annotations

import enum

from kiln.config import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request_id: int, token_ids: list[int], num_prompt_tokens: int,
                 params: SamplingParams, seed: int, sample_index: int = 0, arrival_index: int = 0,
                 stop_ids: tuple[int, ...] = ()):
        self.seq_id = seq_id
        self.request_id = request_id
        self.token_ids = token_ids          # prompt, then the outputs whose values reached the host
        self.num_pending_tokens = 0         # outputs after them, sampled on the device, values not here yet
        self.num_prompt_tokens = num_prompt_tokens
        self.params = params
        self.seed = seed
        self.sample_index = sample_index
        self.arrival_index = arrival_index  # FIFO order; preemption takes the newest first
        self.stop_ids = stop_ids            # EOS (unless ignore_eos) and stop_token_ids
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_released_blocks = 0       # leading table slots given back (outside the window): NO_BLOCK
        self.block_hashes: list[bytes] = []  # chained hashes of full blocks, computed as they fill
        self.num_cached_blocks = 0         # leading blocks registered in the pool's prefix cache
        self.num_prefix_hit_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.forks_pending = params.n - 1 if sample_index == 0 else 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Outputs so far, pending ones included."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The outputs whose values are known."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.sample_index == 0

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.value})")
