"""Scheduler + BlockPool under random load, without a model.

A fake runner stands in for the model: its "KV cache" stores token ids, every step writes the
scheduled tokens through the block tables and reads back every position each sequence attends to, so
any paging mistake (a wrong slot, a block shared while written, a missed copy of a forked block, a
block given back below a sliding window while still in it) shows up as a wrong token. Its next token is
a function of the last tokens it read and the position, so each sample's output must equal what the same
request gives when run alone, whatever the arrivals, chunking, prefix reuse, preemption, cancellations
and window were. Scheduling is driven as the Executor drives it (fork n > 1 samples, then stop / length
checks), and every iteration is checked against the batch and token limits and the blocks a sequence
may hold. Like the Executor, a simulation may plan each step before the previous step's tokens are known
(overlap): those tokens are pending when planned, the fake runner feeds them in from its previous step's
samples, and they are resolved after the next step is launched.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.config import CapacityPolicy, SamplingParams
from kiln.runtime.kv_cache import NO_BLOCK, BlockPool, max_live_blocks
from kiln.runtime.model_runner import RunnerOutput
from kiln.runtime.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from kiln.runtime.sequence import Sequence, SequenceStatus


def update(scheduler: Scheduler, plan: SchedulerOutput, sampled: dict[int, int]) -> None:
    """A step whose tokens are known at once: the executor's advance, then resolve."""
    scheduler.advance(plan)
    for s in plan.scheduled:
        if s.samples:
            scheduler.resolve(s.seq, sampled[s.seq.seq_id])


VOCAB = 31
STOP = 0
MAX_SEQ_LEN = 48
MAX_INPUT_LEN = 24


def next_token(history: list[int], length: int, sample_index: int) -> int:
    """The fake model: a deterministic function of the last 3 tokens read from the cache (any sliding
    window of 3 or more sees them) and of the sequence's length."""
    return (7 * sum(history[-3:]) + length + 5 * sample_index) % VOCAB


def reference_output(prompt: list[int], max_tokens: int, sample_index: int) -> list[int]:
    """What sample ``sample_index`` of a request produces when it runs alone."""
    history, out = list(prompt), []
    while True:
        token = next_token(history, len(history), sample_index)
        history.append(token)
        out.append(token)
        if token == STOP or len(out) == max_tokens:
            return out


def unstopped(length: int, max_tokens: int, arrival_step: int = 0, first_token: int = 1, n: int = 1,
              prefix: tuple[int, ...] = ()) -> FakeRequest:
    """A request (its prompt starting with ``prefix``) whose n outputs run to max_tokens without the stop token."""
    prompts = (list(prefix) + [t] * (length - len(prefix) - 1) + [u]
               for t in range(first_token, VOCAB) for u in range(1, VOCAB))
    prompt = next(p for p in prompts if all(STOP not in reference_output(p, max_tokens, i) for i in range(n)))
    return FakeRequest(prompt, max_tokens, n, arrival_step=arrival_step)


class FakeRunner:
    """The model runner's contract (plan in, RunnerOutput out) over a cache of token ids. An input the plan
    marks pending is the token this runner sampled for that sequence in its previous step."""

    def __init__(self, pool: BlockPool, sliding_window: int | None = None):
        self.pool = pool
        self.block_size = pool.block_size
        self.sliding_window = sliding_window
        self.cache = [[None] * pool.block_size for _ in range(pool.num_blocks)]
        self.last_sampled: dict[int, int] = {}  # the previous sampling step's tokens, by sequence

    def tokens(self, s: ScheduledSequence) -> list[int]:
        """The sequence's tokens up to the step's end, as the device has them (a pending input from the
        previous step's samples, whether or not the host has its value by now)."""
        end = s.start + s.num_new_tokens
        if not s.is_input_pending:
            return s.seq.token_ids[:end]
        assert s.seq.seq_id in self.last_sampled, f"{s.seq}: its pending input was not sampled by the last step"
        return s.seq.token_ids[:end - 1] + [self.last_sampled[s.seq.seq_id]]

    def read(self, seq: Sequence, position: int) -> int:
        block = seq.block_table[position // self.block_size]
        assert block != NO_BLOCK and self.pool.ref_counts[block] > 0, f"{seq} reads a block it gave back"
        return self.cache[block][position % self.block_size]

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        bs = self.block_size
        for src, dst in plan.block_copies:
            self.cache[dst] = list(self.cache[src])
        for s in plan.scheduled:
            seq, tokens = s.seq, self.tokens(s)
            for p in range(s.start, s.start + s.num_new_tokens):
                block = seq.block_table[p // bs]
                assert self.pool.ref_counts[block] == 1, f"{seq} writes into shared block {block}"
                self.cache[block][p % bs] = tokens[p]
        out = RunnerOutput()
        for s in plan.scheduled:  # attention reads after every write of the step
            seq = s.seq
            end = s.start + s.num_new_tokens
            # The keys the step's queries see: from the first one's window on.
            first = 0 if self.sliding_window is None else max(0, s.start - self.sliding_window + 1)
            seen = [self.read(seq, p) for p in range(first, end)]
            assert seen == self.tokens(s)[first:end], f"{seq} reads a corrupted cache"
            if s.samples:
                out.sampled[seq.seq_id] = next_token(seen, end, seq.sample_index)
                if seq.forks_pending and seq.num_output_tokens == 0:
                    out.forked[seq.seq_id] = [(next_token(seen, end, i), i, None)
                                              for i in range(1, seq.forks_pending + 1)]
        if out.sampled:
            self.last_sampled = dict(out.sampled)
        return out


@dataclass
class FakeRequest:
    prompt: list[int]
    max_tokens: int
    n: int = 1
    arrival_step: int = 0
    cancel_step: int | None = None


@dataclass
class Run:
    scheduler: Scheduler
    samples: dict[int, dict[int, Sequence]]  # request index -> sample index -> sequence
    num_finishes: dict[int, int]             # seq_id -> times it was finished
    num_steps: int
    num_preemptions: int
    max_used_blocks: int                     # the most blocks held at once
    num_pending_plans: int                   # plans with an input still pending (overlap)




def blocks_needed(request: FakeRequest, block_size: int, max_num_tokens: int,
                  sliding_window: int | None = None) -> int:
    """The Executor's admission check: the request (prompt + max_tokens, n samples) must fit, each sample
    at the most blocks it holds at once."""
    num_tokens = len(request.prompt) + request.max_tokens
    return max_live_blocks(num_tokens, block_size, sliding_window, max_num_tokens) * request.n


def simulate(requests: list[FakeRequest], num_blocks: int, block_size: int, max_batch_size: int,
             max_num_tokens: int, policy: str, chunked: bool, reuse: bool, sliding_window: int | None = None,
             max_seq_len: int = MAX_SEQ_LEN, overlap: bool = False) -> Run:
    """Runs the requests as the Executor does; with ``overlap``, each step is planned and launched before the
    previous step's tokens are processed (the Executor's loop), else after."""
    pool = BlockPool(num_blocks, block_size, reuse)
    scheduler = Scheduler(pool, max_batch_size, max_num_tokens, max_seq_len, policy, chunked, sliding_window)
    runner = FakeRunner(pool, sliding_window)
    samples: dict[int, dict[int, Sequence]] = {}
    num_finishes: dict[int, int] = {}
    request_of: dict[int, int] = {}

    def finish(seq: Sequence, reason: str) -> None:
        num_finishes[seq.seq_id] = num_finishes.get(seq.seq_id, 0) + 1
        scheduler.finish(seq, reason)

    def check_end(seq: Sequence) -> None:
        """After a token reached the host (the sequence may hold a pending one after it)."""
        if seq.token_ids[-1] == STOP:
            finish(seq, "stop")
        elif len(seq.output_token_ids) >= seq.params.max_tokens:
            finish(seq, "length")

    def complete(plan: SchedulerOutput, out: RunnerOutput) -> None:
        """A launched step's tokens reach the host: resolved, then forks and stop checks as the Executor does."""
        for s in plan.scheduled:
            if s.samples:
                scheduler.resolve(s.seq, out.sampled[s.seq.seq_id])
        for s in plan.scheduled:
            seq = s.seq
            if seq.seq_id not in out.sampled or seq.is_finished:
                continue
            index = request_of[seq.seq_id]
            for token, sample_index, _ in out.forked.get(seq.seq_id, ()):
                child = scheduler.fork(seq, token, sample_index, seed=sample_index)
                samples[index][sample_index] = child
                request_of[child.seq_id] = index
                check_end(child)
            if seq.seq_id in out.forked:
                seq.forks_pending = 0
            check_end(seq)

    total_work = sum((len(r.prompt) + r.max_tokens) * r.n for r in requests)
    step, num_preemptions, max_used_blocks = 0, 0, 0
    in_flight: tuple[SchedulerOutput, RunnerOutput] | None = None  # launched, its tokens not processed yet
    num_pending_plans = 0  # plans with an input still pending (overlap only)
    while step <= max(r.arrival_step for r in requests) or scheduler.has_work() or in_flight:
        assert step < 100 + 10 * total_work, "requests starved: no progress"
        for index, r in enumerate(requests):
            if r.arrival_step == step:
                params = SamplingParams(max_tokens=r.max_tokens, n=r.n)
                seq = Sequence(scheduler.new_seq_id(), index, list(r.prompt), len(r.prompt), params, seed=0)
                samples[index] = {0: seq}
                request_of[seq.seq_id] = index
                scheduler.add(seq)
            if r.cancel_step == step and index in samples:
                for seq in samples[index].values():
                    if not seq.is_finished:
                        finish(seq, "cancelled")
        # A sequence whose pending token is its last (overlap) is not planned again: it ends when that token arrives.
        plannable = [s for s in scheduler.running
                     if s.num_output_tokens < s.params.max_tokens and s.num_tokens < scheduler.max_seq_len]
        running = {s.seq_id for s in plannable}
        decodes = {s.seq_id for s in plannable if s.num_tokens - s.num_computed_tokens == 1}
        waiting = {s.seq_id for s in scheduler.waiting}
        plan = scheduler.schedule()
        check_plan(scheduler, plan, running, decodes, waiting)
        check_block_tables(scheduler)
        num_preemptions += len(plan.preempted)
        max_used_blocks = max(max_used_blocks, pool.num_used_blocks)
        num_pending_plans += any(s.is_input_pending for s in plan.scheduled)
        previous, in_flight = in_flight, None
        if not plan.is_empty:
            in_flight = (plan, runner.execute(plan))
            scheduler.advance(plan)
        if previous:
            complete(*previous)
        if in_flight and not overlap:
            complete(*in_flight)
            in_flight = None
        step += 1
    assert overlap or num_pending_plans == 0
    return Run(scheduler, samples, num_finishes, step, num_preemptions, max_used_blocks, num_pending_plans)


def check_block_tables(scheduler: Scheduler) -> None:
    """Each running sequence's table: given-back slots first, then held blocks, no more of them at once than
    the Executor's admission check and (guaranteed_no_evict) its reservation allow."""
    for seq in scheduler.running:
        released, table = seq.num_released_blocks, seq.block_table
        assert table[:released] == [NO_BLOCK] * released and NO_BLOCK not in table[released:]
        assert all(scheduler.pool.ref_counts[b] > 0 for b in table[released:])
        live = len(table) - released
        assert live <= scheduler.max_live_blocks(seq.max_total_tokens, scheduler.max_num_tokens)
        if scheduler.guaranteed and scheduler.sliding_window is not None:
            assert live * (1 + seq.forks_pending) <= scheduler.worst_case_blocks(seq)


def check_plan(scheduler: Scheduler, plan: SchedulerOutput, running: set[int], decodes: set[int],
               waiting: set[int]) -> None:
    """One iteration's plan against the limits, the capacity policy and first-come-first-served order;
    ``running``, ``decodes``, ``waiting``: ids of the sequences running, running one token behind, and
    waiting, before it was made."""
    assert len(plan.scheduled) <= scheduler.max_batch_size
    assert plan.num_tokens <= scheduler.max_num_tokens
    assert len({s.seq.seq_id for s in plan.scheduled}) == len(plan.scheduled)
    assert all(s.num_new_tokens >= 1 for s in plan.scheduled)
    if scheduler.guaranteed:
        # Reservations hold: nothing is paused and every running decode gets its block.
        assert not plan.preempted
        num_decodes = sum(1 for s in plan.scheduled if s.seq.seq_id in decodes)
        assert num_decodes == min(len(decodes), scheduler.max_batch_size, scheduler.max_num_tokens)
        if len(plan.scheduled) < scheduler.max_batch_size and plan.num_tokens < scheduler.max_num_tokens:
            assert running <= {s.seq.seq_id for s in plan.scheduled}  # context chunks get their blocks too
    admitted = [s.seq for s in plan.scheduled if s.seq.seq_id in waiting]
    if admitted:  # nothing older is left waiting, or running with a context chunk skipped
        newest = max(seq.arrival_index for seq in admitted)
        scheduled = {s.seq.seq_id for s in plan.scheduled}
        assert all(seq.arrival_index >= newest for seq in scheduler.waiting)
        assert all(seq.seq_id in scheduled for seq in scheduler.running
                   if seq.arrival_index < newest and seq.num_tokens - seq.num_computed_tokens > 1)
    if not scheduler.enable_chunked_context:
        for s in plan.scheduled:  # what fits one iteration is admitted whole
            remaining = s.seq.num_tokens - s.start
            if s.seq.seq_id in waiting and remaining <= scheduler.max_num_tokens:
                assert s.num_new_tokens == remaining


def check_run(run: Run, requests: list[FakeRequest]) -> None:
    for index, r in enumerate(requests):
        samples = run.samples[index]
        if r.cancel_step is None:
            assert sorted(samples) == list(range(r.n)), f"request {index} lost or duplicated samples"
        for sample_index, seq in samples.items():
            assert run.num_finishes[seq.seq_id] == 1, f"{seq} ended {run.num_finishes[seq.seq_id]} times"
            expected = reference_output(r.prompt, r.max_tokens, sample_index)
            if seq.finish_reason == "cancelled":
                assert seq.output_token_ids == expected[:seq.num_output_tokens]
            else:
                assert seq.output_token_ids == expected, f"request {index} sample {sample_index}"
                assert seq.finish_reason == ("stop" if expected[-1] == STOP else "length")
    scheduler = run.scheduler
    assert not scheduler.running and not scheduler.waiting
    pool = scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert pool.ref_counts == [0] * pool.num_blocks


# ---- property-based runs ---------------------------------------------------------------------------

@st.composite
def workloads(draw, crowded: bool):
    """Random requests and limits. ``crowded``: single samples arriving together with long outputs into
    a pool that fits only the largest one, so that max_utilization must preempt. A third of the workloads
    run a sliding window (at least the fake model's 3 tokens)."""
    block_size = draw(st.sampled_from([2, 4, 8]))
    sliding_window = draw(st.sampled_from([None, None, None, None, 3, 5, 8, 13]))
    chunked = draw(st.booleans())
    max_batch_size = draw(st.integers(3 if crowded else 1, 8))
    # Without chunked context the runtime requires room for a whole prompt in one iteration.
    max_num_tokens = draw(st.integers(1 if chunked else MAX_INPUT_LEN, 40))
    tokens = st.integers(1, VOCAB - 1)
    prefixes = draw(st.lists(st.lists(tokens, min_size=2, max_size=16), min_size=1, max_size=2))
    last_arrival = draw(st.sampled_from([1] if crowded else [0, 2, 8]))
    requests = []
    for _ in range(draw(st.integers(3 if crowded else 1, 10))):
        prefix = draw(st.sampled_from(prefixes))
        prompt = prefix + draw(st.lists(tokens, max_size=MAX_INPUT_LEN - len(prefix)))
        room = MAX_SEQ_LEN - len(prompt)
        max_tokens = draw(st.integers(room // 2 if crowded else 1, room))
        arrival = draw(st.integers(0, last_arrival))
        cancel = draw(st.one_of(st.none(), st.none(), st.integers(arrival, arrival + 30)))
        n = 1 if crowded else draw(st.sampled_from([1, 1, 2, 3]))
        requests.append(FakeRequest(prompt, max_tokens, n, arrival, cancel))
    # Pools from the smallest the Executor accepts (one request at its worst case) up.
    min_blocks = max(blocks_needed(r, block_size, max_num_tokens, sliding_window) for r in requests)
    num_blocks = min_blocks + draw(st.integers(0, 2) if crowded else st.one_of(st.integers(0, 4), st.integers(0, 40)))
    return dict(requests=requests, num_blocks=num_blocks, block_size=block_size, max_batch_size=max_batch_size,
                max_num_tokens=max_num_tokens, chunked=chunked, reuse=draw(st.booleans()),
                sliding_window=sliding_window, overlap=draw(st.sampled_from([True, True, False])))


@pytest.mark.parametrize("crowded", [False, True], ids=["mixed", "crowded"])
@pytest.mark.parametrize("policy", list(CapacityPolicy))
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_workloads_end_right_and_return_the_pool(policy, crowded, data):
    workload = data.draw(workloads(crowded))
    run = simulate(policy=policy, **workload)
    check_run(run, workload["requests"])
    # Overlapped runs plan decodes whose input is still pending (every run that decodes twice in a row).
    if workload["overlap"] and any(len(seq.output_token_ids) > 2 for samples in run.samples.values()
                                   for seq in samples.values()):
        assert run.num_pending_plans > 0


# ---- specific cases --------------------------------------------------------------------------------

def test_max_utilization_preempts_the_newest_and_recomputes_it_exactly():
    # Two requests that together outgrow a 6-block pool: the newer one is paused and resumed.
    requests = [unstopped(5, 11), unstopped(3, 13, arrival_step=1)]
    run = simulate(requests, num_blocks=6, block_size=4, max_batch_size=4, max_num_tokens=16,
                   policy="max_utilization", chunked=True, reuse=False)
    assert run.num_preemptions > 0
    assert run.samples[0][0].num_preemptions == 0 and run.samples[1][0].num_preemptions > 0
    check_run(run, requests)


def test_guaranteed_no_evict_admits_only_what_can_finish():
    pool = BlockPool(6, 4, enable_reuse=False)
    scheduler = Scheduler(pool, max_batch_size=4, max_num_tokens=16, max_seq_len=MAX_SEQ_LEN)
    first = Sequence(0, 0, [1] * 5, 5, SamplingParams(max_tokens=11), seed=0)   # worst case 4 blocks
    second = Sequence(1, 1, [2] * 3, 3, SamplingParams(max_tokens=13), seed=0)  # worst case 4 blocks
    scheduler.add(first)
    scheduler.add(second)
    plan = scheduler.schedule()
    assert [s.seq for s in plan.scheduled] == [first]
    assert pool.num_used_blocks == 2 and list(scheduler.waiting) == [second]


def test_n_samples_share_the_prompt_blocks_and_copy_the_partial_one():
    pool = BlockPool(16, 4)
    scheduler = Scheduler(pool, max_batch_size=4, max_num_tokens=32, max_seq_len=MAX_SEQ_LEN)
    parent = Sequence(0, 0, list(range(1, 11)), 10, SamplingParams(max_tokens=4, n=3), seed=0)
    scheduler.add(parent)
    plan = scheduler.schedule()
    update(scheduler, plan, {parent.seq_id: 5})
    children = [scheduler.fork(parent, token, i, seed=i) for i, token in ((1, 6), (2, 7))]
    full, partial = parent.block_table[:2], parent.block_table[2]
    assert [pool.ref_counts[b] for b in full] == [3, 3] and pool.ref_counts[partial] == 1
    for child in children:
        assert child.block_table[:2] == full and child.block_table[2] != partial
        assert child.num_computed_tokens == 10 and child.token_ids[-1] != 5
    copies = scheduler.schedule().block_copies
    assert copies == [(partial, c.block_table[2]) for c in children]
    for seq in [parent, *children]:
        scheduler.finish(seq, "cancelled")
    assert pool.num_free_blocks == 16 and pool.ref_counts == [0] * 16


def test_a_fork_without_a_free_block_waits_and_recomputes_from_the_cache():
    pool = BlockPool(4, 4)
    scheduler = Scheduler(pool, max_batch_size=4, max_num_tokens=32, max_seq_len=MAX_SEQ_LEN,
                          policy="max_utilization")
    parent = Sequence(0, 0, list(range(1, 11)), 10, SamplingParams(max_tokens=2, n=2), seed=0)
    other = Sequence(1, 1, [7], 1, SamplingParams(max_tokens=2), seed=0)
    scheduler.add(parent)
    scheduler.add(other)
    update(scheduler, scheduler.schedule(), {0: 5, 1: 6})
    assert pool.num_free_blocks == 0  # no block to copy the parent's partial block into
    child = scheduler.fork(parent, 9, 1, seed=1)
    assert child.status is SequenceStatus.WAITING and child.block_table == []
    scheduler.finish(other, "length")
    plan = scheduler.schedule()
    (entry,) = [s for s in plan.scheduled if s.seq is child]
    assert (entry.start, entry.num_new_tokens) == (8, 3)  # the 2 full prompt blocks came from the cache
    assert child.block_table[:2] == parent.block_table[:2] and not plan.block_copies


def test_a_fork_of_a_parent_preempted_since_its_first_token_recomputes():
    # With the overlap, a parent's first token reaches the host after the next step was planned, and that
    # plan may have preempted the parent (its blocks freed): the child must not take blocks the parent no
    # longer holds (it indexed past the parent's empty block table, failing the request, on the H200).
    pool = BlockPool(8, 4)
    scheduler = Scheduler(pool, max_batch_size=4, max_num_tokens=32, max_seq_len=MAX_SEQ_LEN,
                          policy="max_utilization")
    for prompt_len in (10, 8):  # a partial last block to copy, and whole blocks only
        parent = Sequence(scheduler.new_seq_id(), prompt_len, list(range(1, prompt_len + 1)), prompt_len,
                          SamplingParams(max_tokens=2, n=2), seed=0)
        scheduler.add(parent)
        update(scheduler, scheduler.schedule(), {parent.seq_id: 5})
        scheduler._preempt(parent, SchedulerOutput())
        assert parent.block_table == [] and parent.status is SequenceStatus.WAITING
        child = scheduler.fork(parent, 9, 1, seed=1)
        assert child.status is SequenceStatus.WAITING and child.block_table == [] and child.num_computed_tokens == 0
        assert child.token_ids == list(range(1, prompt_len + 1)) + [9]
        plan = scheduler.schedule()
        assert {s.seq for s in plan.scheduled} == {parent, child} and not plan.block_copies
        for seq in (parent, child):
            scheduler.finish(seq, "cancelled")
    assert pool.num_free_blocks == 8


def test_a_sequence_finished_during_its_step_is_not_updated():
    # The Executor fails a request whose forward raised after the plan was made; update must skip it
    # (it used to index the freed block table).
    pool = BlockPool(8, 4)
    scheduler = Scheduler(pool, max_batch_size=4, max_num_tokens=16, max_seq_len=MAX_SEQ_LEN)
    seq = Sequence(0, 0, [1] * 9, 9, SamplingParams(max_tokens=4), seed=0)
    scheduler.add(seq)
    plan = scheduler.schedule()
    scheduler.finish(seq, "error")
    update(scheduler, plan, {seq.seq_id: 3})
    assert seq.num_tokens == 9 and pool.num_free_blocks == 8


def test_prefix_lookups_are_counted_once_per_admission():
    pool = BlockPool(6, 4)
    scheduler = Scheduler(pool, max_batch_size=4, max_num_tokens=32, max_seq_len=MAX_SEQ_LEN)
    prompt = list(range(1, 10))
    first = Sequence(0, 0, list(prompt), 9, SamplingParams(max_tokens=8), seed=0)  # 5 blocks worst case
    scheduler.add(first)
    update(scheduler, scheduler.schedule(), {0: 1})
    second = Sequence(1, 1, list(prompt), 9, SamplingParams(max_tokens=8), seed=0)
    scheduler.add(second)
    for _ in range(3):  # the second waits (guaranteed_no_evict: no room for its worst case)
        update(scheduler, scheduler.schedule(), {0: 1})
        assert second.status is SequenceStatus.WAITING
    assert (pool.prefix_queries, pool.prefix_hits) == (9, 0)
    scheduler.finish(first, "stop")
    scheduler.schedule()
    assert second.status is SequenceStatus.RUNNING
    assert (pool.prefix_queries, pool.prefix_hits) == (18, 8)
    assert second.num_prefix_hit_tokens == 8


def test_a_resumed_sequence_reports_only_its_first_prompt_hits():
    # The newer request is paused after caching blocks of its own; resumed, it finds them again,
    # which the pool counts, but the request had no prompt tokens in the cache when it arrived.
    requests = [unstopped(5, 15), unstopped(6, 12, arrival_step=1, first_token=9)]
    run = simulate(requests, num_blocks=6, block_size=4, max_batch_size=4, max_num_tokens=16,
                   policy="max_utilization", chunked=True, reuse=True)
    resumed = run.samples[1][0]
    assert resumed.num_preemptions > 0 and run.scheduler.pool.prefix_hits > 0
    assert resumed.num_prefix_hit_tokens == 0
    check_run(run, requests)


def test_without_chunked_context_a_resumed_sequence_longer_than_an_iteration_still_runs():
    # 12 prompt tokens fit max_num_tokens=20 whole, but the newer request is preempted with more than
    # 20 tokens to recompute: it is chunked rather than blocking the queue forever.
    requests = [unstopped(8, 16), unstopped(12, 16, arrival_step=1)]
    run = simulate(requests, num_blocks=10, block_size=4, max_batch_size=2, max_num_tokens=20,
                   policy="max_utilization", chunked=False, reuse=False)
    assert run.samples[1][0].num_preemptions > 0
    check_run(run, requests)


def test_a_resumed_sequence_short_of_blocks_is_not_overtaken():
    # Found by the property test: a paused sequence recomputing in chunks was skipped while short of
    # blocks, and newer requests were admitted into the blocks that came free (simulate checks FIFO).
    requests = [FakeRequest([1, 1], 27)] + [FakeRequest([1, 1], 23) for _ in range(3)]
    run = simulate(requests, num_blocks=15, block_size=2, max_batch_size=3, max_num_tokens=4,
                   policy="max_utilization", chunked=True, reuse=False)
    assert run.num_preemptions > 0
    check_run(run, requests)


# ---- sliding window --------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, num_blocks", [("guaranteed_no_evict", 15), ("max_utilization", 10)])
def test_blocks_below_the_window_go_back_to_the_pool_during_long_generations(policy, num_blocks):
    # Two samples of 100 tokens after a 10-token prompt, and a request reusing its first 8 tokens' blocks:
    # without the window each sample holds up to 28 blocks. With an 8-token window a sample holds at most 5
    # (the window and an 8-token chunk across block boundaries): guaranteed_no_evict reserves that for each
    # of the three, max_utilization needs only the 10 the Executor's check asks of the forked request alone.
    # Decoding, each holds 3 (9 keys), so the three run together in 9 blocks.
    forked = unstopped(10, 100, n=2)
    sharing = unstopped(10, 80, arrival_step=3, prefix=tuple(forked.prompt[:8]))
    requests = [forked, sharing]
    assert max_live_blocks(110, 4, 8, 8) == 5 and blocks_needed(forked, 4, 8, 8) == 10
    run = simulate(requests, num_blocks, block_size=4, max_batch_size=4, max_num_tokens=8, policy=policy,
                   chunked=True, reuse=True, sliding_window=8, max_seq_len=110)
    check_run(run, requests)
    assert run.max_used_blocks == 9 and run.num_preemptions == 0 and run.num_steps == 101
    assert run.scheduler.pool.prefix_hits == 8


def test_a_parent_a_step_ahead_keeps_its_prompt_window_for_the_samples_it_forks():
    # The Executor plans (and advances) the parent's next step before it forks the samples of its first
    # token, so the parent is one token ahead: it must not give back the block holding the first key the
    # samples' window needs (key 7 of a 10-token prompt with a 4-token window: 11 - 4 + 1 = 8 would drop it).
    pool = BlockPool(16, 4)
    scheduler = Scheduler(pool, max_batch_size=4, max_num_tokens=32, max_seq_len=MAX_SEQ_LEN, sliding_window=4)
    runner = FakeRunner(pool, sliding_window=4)
    prompt = list(range(1, 11))
    parent = Sequence(0, 0, list(prompt), 10, SamplingParams(max_tokens=4, n=2), seed=0)
    scheduler.add(parent)
    first_plan = scheduler.schedule()
    first = runner.execute(first_plan)
    scheduler.advance(first_plan)
    ahead_plan = scheduler.schedule()  # the parent's pending token, planned before the first step is done
    scheduler.resolve(parent, first.sampled[parent.seq_id])
    ahead = runner.execute(ahead_plan)
    update(scheduler, ahead_plan, ahead.sampled)
    assert parent.num_computed_tokens == 11 and parent.num_released_blocks == 1  # keys 0-3, not 4-7
    (token, sample_index, _), = first.forked[parent.seq_id]
    child = scheduler.fork(parent, token, sample_index, seed=sample_index)
    parent.forks_pending = 0
    assert child.block_table[:2] == [NO_BLOCK, parent.block_table[1]] and child.num_released_blocks == 1
    plan = scheduler.schedule()
    out = runner.execute(plan)  # reads keys 7.. of the child's prompt
    update(scheduler, plan, out.sampled)
    assert child.token_ids[10:] == reference_output(prompt, 2, sample_index)
    assert parent.num_released_blocks == child.num_released_blocks == 2
    for seq in (parent, child):
        scheduler.finish(seq, "cancelled")
    assert pool.num_free_blocks == 16 and pool.ref_counts == [0] * 16
