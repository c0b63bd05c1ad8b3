"""The scheduler: each iteration, one batch plan within the request and token limits.

One pass over the running sequences, those one token behind first (decodes), then those with a context
chunk to compute, each group oldest first; then waiting sequences are admitted in arrival order, a long
prompt taking as many tokens as the budget leaves (chunked context). Capacity policies decide admission:

- ``guaranteed_no_evict``: admit only if the free blocks cover every running sequence's remaining
  worst case plus the newcomer's, so no sequence ever runs out of blocks. With a sliding window a
  sequence holds at most its window's blocks at once (it gives back the blocks below), and the pool
  must hold every running sequence's window at once.
- ``max_utilization``: admit when the blocks for this step exist; when a running sequence needs a block
  and none is free, the newest sequence is preempted (blocks freed, recomputed later).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from kiln.config import CapacityPolicy
from kiln.runtime.kv_cache import NO_BLOCK, BlockPool, block_hashes, max_live_blocks
from kiln.runtime.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's part of a step, fixed when planned (the sequence moves on once the step is launched)."""

    seq: Sequence
    start: int                 # its computed tokens when planned: the first position this step computes
    num_new_tokens: int
    is_decode: bool            # one token after outputs exist (a prompt's last chunk of one token is context)
    samples: bool              # after this step every token is computed, so the runner samples the next one
    is_input_pending: bool     # its last input token is the previous step's sample, not on the host yet

    @classmethod
    def plan(cls, seq: Sequence, num_new_tokens: int) -> "ScheduledSequence":
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        return cls(seq, start, num_new_tokens, is_decode=num_new_tokens == 1 and seq.num_output_tokens > 0,
                   samples=end == seq.num_tokens, is_input_pending=end > len(seq.token_ids))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), done before the forward

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.scheduled if s.is_decode)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_size: int, max_num_tokens: int, max_seq_len: int,
                 policy: CapacityPolicy | str = CapacityPolicy.GUARANTEED_NO_EVICT,
                 enable_chunked_context: bool = True, sliding_window: int | None = None):
        self.pool = pool
        self.block_size = pool.block_size
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self.policy = CapacityPolicy.parse(policy)
        self.guaranteed = self.policy is CapacityPolicy.GUARANTEED_NO_EVICT
        self.enable_chunked_context = enable_chunked_context
        self.sliding_window = sliding_window
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._pending_copies: list[tuple[int, int]] = []
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # ---- bookkeeping -------------------------------------------------------------------------
    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def add(self, seq: Sequence) -> None:
        seq.arrival_index = next(self._arrivals)
        self.waiting.append(seq)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_live_blocks(self, num_tokens: int, max_chunk: int) -> int:
        """Most blocks a sequence of up to num_tokens tokens holds at once (kv_cache.max_live_blocks)."""
        return max_live_blocks(min(num_tokens, self.max_seq_len), self.block_size, self.sliding_window, max_chunk)

    def worst_case_blocks(self, seq: Sequence) -> int:
        """guaranteed_no_evict's reservation for a sequence and the samples it will fork. Without a window:
        the blocks it may still allocate, to be covered by the free blocks. With one: the most it holds at
        once, to be covered by the whole pool (a block it gives back while another sequence shares it does
        not come free, so its own blocks cannot pay for its next ones). Its chunks are its prompt's: this
        policy never preempts, so nothing is recomputed."""
        if self.sliding_window is None:
            own = self.blocks_for(min(seq.max_total_tokens, self.max_seq_len))
            return max(0, own - len(seq.block_table)) + seq.forks_pending * own
        own = self.max_live_blocks(seq.max_total_tokens, min(seq.num_prompt_tokens, self.max_num_tokens))
        return own * (1 + seq.forks_pending)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence wherever it is, frees its blocks at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release_all(seq)
        seq.num_pending_tokens = 0  # sampled after its end: never happened
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- one iteration -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(block_copies=self._pending_copies)
        self._pending_copies = []
        budget = self.max_num_tokens
        scheduled_ids: set[int] = set()

        # 1. running sequences: decodes, then context chunks (long prompts spanning iterations), each oldest
        #    first; under max_utilization a sequence short of blocks preempts the newest sequence, so newer
        #    arrivals cannot starve an old prompt.
        for seq in sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.arrival_index)):
            if len(out.scheduled) >= self.max_batch_size or budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this pass
            if seq.num_tokens >= self.max_seq_len or seq.num_output_tokens >= seq.params.max_tokens:
                continue  # its last token is pending: it ends when that token arrives
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, num_new, out, scheduled_ids):
                continue
            out.scheduled.append(ScheduledSequence.plan(seq, num_new))
            scheduled_ids.add(seq.seq_id)
            budget -= num_new

        # 2. admit waiting sequences in arrival order; none in an iteration that ran out of blocks (what was
        #    just paused would be readmitted only to be paused again).
        # (Blocks the running sequences may still take: summed only when something waits, since a full
        # decode batch would otherwise pay for it every iteration.)
        outstanding = (sum(self.worst_case_blocks(s) for s in self.running)
                       if self.guaranteed and self.waiting and not out.preempted else 0)
        windowed = self.sliding_window is not None
        while self.waiting and not out.preempted and len(out.scheduled) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            if not seq.block_table:
                self._match_prefix(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            # Without chunked context a prompt waits for an iteration with room for all of it; a preempted
            # sequence longer than any iteration (prompt + outputs > max_num_tokens) is chunked regardless.
            if not self.enable_chunked_context and budget < remaining <= self.max_num_tokens:
                self._unmatch(seq)
                break
            num_new = min(remaining, budget)
            if self.guaranteed:
                need = self.worst_case_blocks(seq)
                if (self.pool.num_blocks if windowed else self.pool.num_free_blocks) - outstanding < need:
                    self._unmatch(seq)
                    break
                # Without a window, what it allocates now comes off the free blocks and its reservation alike.
                outstanding += need - (0 if windowed else
                                       self.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table))
            if not self._try_allocate(seq, num_new):
                self._unmatch(seq)
                break
            self.waiting.popleft()
            self._record_prefix_hits(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence.plan(seq, num_new))
            budget -= num_new
        return out

    def advance(self, out: SchedulerOutput) -> None:
        """After a step is launched: computed tokens advance, full blocks are registered for reuse, and each
        sequence that samples gets a pending token (its value still on the device), so the next step can be
        planned before this one's tokens reach the host."""
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished:
                continue  # ended while its step ran (its request failed); its blocks are gone
            seq.num_computed_tokens += s.num_new_tokens
            self._cache_full_blocks(seq)
            self._release_out_of_window(seq)
            if s.samples:
                seq.num_pending_tokens += 1

    @staticmethod
    def resolve(seq: Sequence, token: int) -> None:
        """The value of the sequence's first pending token, once it reached the host (steps complete in the
        order they were launched)."""
        if seq.num_pending_tokens:  # a finished sequence dropped its pending tokens
            seq.token_ids.append(token)
            seq.num_pending_tokens -= 1

    def fork(self, parent: Sequence, token: int, sample_index: int, seed: int) -> Sequence:
        """A new sample of parent's request sharing its computed prompt blocks (the partial last block
        is copied, since both will write into it)."""
        # The parent may be a step ahead already (its first token computed, a pending one after it): the
        # child takes the prompt's KV only and computes its own first token.
        num_prompt = parent.num_prompt_tokens
        child = Sequence(self.new_seq_id(), parent.request_id, parent.token_ids[:num_prompt] + [token],
                         num_prompt, parent.params, seed, sample_index, parent.arrival_index, parent.stop_ids)
        full = num_prompt // self.block_size
        child.block_hashes = parent.block_hashes[:full]
        # The parent kept what its prompt's last query sees (_release_out_of_window): the child's next query
        # sees no further back.
        released = parent.num_released_blocks
        needs_copy = num_prompt % self.block_size != 0
        # No block to copy into, or a parent preempted since its first token was sampled (with the overlap,
        # the step that sampled it may have been planned before the preemption): the child recomputes,
        # reusing cached blocks. Both happen under max_utilization only.
        if (needs_copy and self.pool.num_free_blocks == 0) or len(parent.block_table) < full + needs_copy:
            self._enqueue_waiting(child)
            return child
        shared = parent.block_table[:full]
        self.pool.acquire(shared[released:])
        child.block_table = list(shared)
        child.num_released_blocks = released
        if needs_copy:
            (dst,) = self.pool.allocate(1)
            self._pending_copies.append((parent.block_table[full], dst))
            child.block_table.append(dst)
        child.num_computed_tokens = num_prompt
        child.num_cached_blocks = min(parent.num_cached_blocks, full)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)
        return child

    # ---- helpers -----------------------------------------------------------------------------
    def _try_allocate(self, seq: Sequence, num_new: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free_blocks:
            return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def _grow(self, seq: Sequence, num_new: int, out: SchedulerOutput, scheduled_ids: set[int]) -> bool:
        while not self._try_allocate(seq, num_new):
            if self.guaranteed:
                return False  # cannot happen with correct reservations; wait rather than corrupt
            victims = [s for s in self.running if s.seq_id not in scheduled_ids]
            victim = max(victims, key=lambda s: s.arrival_index)
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release_all(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue_waiting(seq)
        out.preempted.append(seq)

    def _enqueue_waiting(self, seq: Sequence) -> None:
        """Back to the queue in arrival order, so the oldest paused sequence resumes first."""
        index = next((i for i, w in enumerate(self.waiting) if w.arrival_index > seq.arrival_index),
                     len(self.waiting))
        self.waiting.insert(index, seq)

    def _ensure_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        have = len(seq.block_hashes)
        if num_full_blocks > have:
            parent = seq.block_hashes[-1] if have else None
            seq.block_hashes.extend(block_hashes(seq.token_ids, self.block_size, num_full_blocks, parent, have))

    def _uses_prefix_cache(self, seq: Sequence) -> bool:
        # Prompt logprobs need every prompt position's logits, so those prompts are computed in full.
        return self.pool.enable_reuse and not seq.wants_prompt_logprobs

    def _match_prefix(self, seq: Sequence) -> None:
        if not self._uses_prefix_cache(seq):
            return
        self._ensure_hashes(seq, len(seq.token_ids) // self.block_size)
        hits = self.pool.match_prefix(seq.token_ids, seq.block_hashes)
        seq.block_table = hits
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_blocks = len(hits)
        self._release_out_of_window(seq)  # hits below the window of its first query stay cached, unheld

    def _record_prefix_hits(self, seq: Sequence) -> None:
        """Counts an admitted sequence's cache lookup once (not each iteration it waited); the request
        reports the prompt tokens found at its first admission, not what a resumed sequence re-found."""
        if self._uses_prefix_cache(seq):
            self.pool.record_lookup(seq.num_tokens, seq.num_computed_tokens)
        if seq.num_preemptions == 0:
            seq.num_prefix_hit_tokens = seq.num_computed_tokens

    def _unmatch(self, seq: Sequence) -> None:
        """Gives back blocks taken for a sequence that could not be admitted this iteration."""
        self._release_all(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    def _cache_full_blocks(self, seq: Sequence) -> None:
        # Only blocks whose tokens are all known (a pending token cannot be hashed yet).
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if full <= seq.num_cached_blocks or not self.pool.enable_reuse:
            return
        self._ensure_hashes(seq, full)
        # A block given back before its last token was known (a window of one token) is not cached.
        for b in range(max(seq.num_cached_blocks, seq.num_released_blocks), full):
            self.pool.cache_block(seq.block_table[b], seq.block_hashes[b])
        seq.num_cached_blocks = full

    def _release_out_of_window(self, seq: Sequence) -> None:
        """Gives back the blocks wholly before the window of the sequence's next query (per block boundary,
        not per token). A parent whose n > 1 samples are not forked yet keeps its prompt's window for them.
        Attention never reads the slots left behind (its keys start at the first query's window)."""
        if self.sliding_window is None:
            return
        next_query = (min(seq.num_computed_tokens, seq.num_prompt_tokens) if seq.forks_pending
                      else seq.num_computed_tokens)
        num_below = (next_query - self.sliding_window + 1) // self.block_size
        start = seq.num_released_blocks
        if num_below <= start:
            return
        self.pool.release(seq.block_table[start:num_below])
        seq.block_table[start:num_below] = [NO_BLOCK] * (num_below - start)
        seq.num_released_blocks = num_below

    def _release_all(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table[seq.num_released_blocks:])
        seq.block_table = []
        seq.num_released_blocks = 0
