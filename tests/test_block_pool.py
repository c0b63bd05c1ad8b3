"""BlockPool: allocation, reference counts, prefix reuse with chained hashes, LRU eviction, hit counters.

The property test drives the pool through random allocate / share / cache / release steps and checks
after every step that each block is in exactly one state (free, cached and unreferenced, or held) and
that releasing everything returns the pool to full.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kiln.runtime.kv_cache import BlockPool, block_hashes

BLOCK = 4


def cached_prompt(pool: BlockPool, token_ids: list[int]) -> tuple[list[int], list[int]]:
    """Allocates blocks for token_ids and registers every full one, as a finished prefill would."""
    num_full = len(token_ids) // pool.block_size
    hashes = block_hashes(token_ids, pool.block_size, num_full)
    blocks = pool.allocate(-(-len(token_ids) // pool.block_size))
    for block, h in zip(blocks, hashes):
        pool.cache_block(block, h)
    return blocks, hashes


def test_allocate_and_release_return_the_pool_to_full():
    pool = BlockPool(8, BLOCK)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert pool.num_free_blocks == 0 and pool.num_used_blocks == 8
    with pytest.raises(RuntimeError, match="exhausted: asked 1, 0 free"):
        pool.allocate(1)
    pool.release(a)
    pool.release(b)
    assert pool.num_free_blocks == 8 and pool.ref_counts == [0] * 8


def test_releasing_a_block_twice_is_caught():
    pool = BlockPool(2, BLOCK)
    (block,) = pool.allocate(1)
    pool.release([block])
    with pytest.raises(AssertionError, match="released twice"):
        pool.release([block])


def test_block_hashes_chain_and_extend_incrementally():
    tokens = list(range(1, 15))  # 3 full blocks and a partial one
    full = block_hashes(tokens, BLOCK, 3)
    assert len(full) == 3
    head = block_hashes(tokens, BLOCK, 1)
    assert head + block_hashes(tokens, BLOCK, 3, parent=head[-1], start_block=1) == full
    # The same block content after a different prefix is a different block.
    other = [9, 9, 9, 9] + tokens[4:]
    assert block_hashes(other, BLOCK, 3)[1] != full[1]


def test_prefix_match_shares_full_blocks_and_leaves_a_token_to_compute():
    pool = BlockPool(16, BLOCK)
    prompt = list(range(10, 22))  # exactly 3 full blocks
    blocks, hashes = cached_prompt(pool, prompt)
    # The same prompt: all 3 blocks are cached, but the last token must be computed to get logits.
    hits = pool.match_prefix(prompt, hashes)
    assert hits == blocks[:2]
    assert [pool.ref_counts[b] for b in blocks] == [2, 2, 1]
    # A longer prompt with the same first 8 tokens then a difference: 2 blocks.
    longer = prompt[:8] + [99] * 9
    assert pool.match_prefix(longer, block_hashes(longer, BLOCK, 4)) == blocks[:2]
    # A prompt that differs in the first block: no hit, although later blocks hold equal tokens.
    other = [0] + prompt[1:] + [5]
    assert pool.match_prefix(other, block_hashes(other, BLOCK, 3)) == []


def test_released_cached_blocks_stay_matchable_until_evicted_lru_first():
    pool = BlockPool(4, BLOCK)
    old, old_hashes = cached_prompt(pool, [1] * 8 + [2])      # 3 blocks: 2 cached, 1 partial
    pool.release(old)
    assert pool.num_free_blocks == 4                          # cached blocks count as free
    new, new_hashes = cached_prompt(pool, [3] * 4 + [4])      # 2 blocks: 1 cached, 1 partial
    pool.release(new)
    # Blocks holding nothing reusable go first; then the least recently released cached block, and of
    # one sequence its tail before its head (the head is the likelier to be shared).
    never_cached, evicted = pool.allocate(2)
    assert never_cached not in old[:2] + new[:1]
    assert evicted == old[1]
    assert pool.match_prefix([1] * 8 + [2], old_hashes) == old[:1]  # the chain stops at the evicted block
    assert pool.match_prefix([3] * 4 + [4], new_hashes) == new[:1]


def test_a_hit_on_an_unreferenced_cached_block_takes_it_out_of_the_free_count():
    pool = BlockPool(4, BLOCK)
    blocks, hashes = cached_prompt(pool, [7] * 9)
    pool.release(blocks)
    hits = pool.match_prefix([7] * 9, hashes)
    assert hits == blocks[:2] and pool.num_free_blocks == 2
    # Held blocks are never evicted: only the two free ones can be allocated.
    assert set(pool.allocate(2)).isdisjoint(hits)
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_without_reuse_nothing_is_cached_or_matched():
    pool = BlockPool(4, BLOCK, enable_reuse=False)
    blocks, hashes = cached_prompt(pool, [5] * 9)
    pool.release(blocks)
    assert pool.match_prefix([5] * 9, hashes) == []
    assert pool.num_free_blocks == 4 and pool.hit_rate == 0.0


def test_hit_rate_counts_recorded_lookups_only():
    pool = BlockPool(8, BLOCK)
    blocks, hashes = cached_prompt(pool, [5] * 9)
    for _ in range(3):  # a waiting sequence is looked up each iteration until it is admitted
        pool.release(pool.match_prefix([5] * 9, hashes))
    assert pool.hit_rate == 0.0
    pool.record_lookup(9, 8)
    pool.record_lookup(9, 0)
    assert pool.hit_rate == pytest.approx(8 / 18)


class BlockPoolMachine(RuleBasedStateMachine):
    """Holders (sequences) allocate, share prefix hits, cache full blocks and release in any order."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(12, BLOCK)
        self.holders: list[list[int]] = []

    @rule(num_blocks=st.integers(1, 5), content=st.integers(0, 3))
    def allocate_and_cache(self, num_blocks, content):
        if num_blocks > self.pool.num_free_blocks:
            with pytest.raises(RuntimeError):
                self.pool.allocate(num_blocks)
            return
        tokens = [content] * (num_blocks * BLOCK - 1)  # the last block stays partial
        blocks, _ = cached_prompt(self.pool, tokens)
        assert len(set(blocks)) == num_blocks
        self.holders.append(blocks)

    @rule(content=st.integers(0, 3), num_tokens=st.integers(1, 20))
    def match(self, content, num_tokens):
        tokens = [content] * num_tokens
        hits = self.pool.match_prefix(tokens, block_hashes(tokens, BLOCK, num_tokens // BLOCK))
        assert len(hits) <= (num_tokens - 1) // BLOCK
        self.holders.append(hits)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def release(self, data):
        index = data.draw(st.integers(0, len(self.holders) - 1))
        self.pool.release(self.holders.pop(index))

    @invariant()
    def each_block_in_exactly_one_state(self):
        held = [b for blocks in self.holders for b in blocks]
        for block in range(self.pool.num_blocks):
            assert self.pool.ref_counts[block] == held.count(block)
        free = set(self.pool._free)
        evictable = set(self.pool._evictable)
        assert len(free) == len(self.pool._free) and free.isdisjoint(evictable)
        assert free | evictable == {b for b in range(self.pool.num_blocks) if self.pool.ref_counts[b] == 0}
        assert evictable <= set(self.pool._hash_of)
        assert {self.pool._by_hash[h] for h in self.pool._hash_of.values()} == set(self.pool._hash_of)

    def teardown(self):
        for blocks in self.holders:
            self.pool.release(blocks)
        assert self.pool.num_free_blocks == self.pool.num_blocks
        assert self.pool.ref_counts == [0] * self.pool.num_blocks


TestBlockPoolMachine = BlockPoolMachine.TestCase
TestBlockPoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, derandomize=True,
                                         suppress_health_check=[HealthCheck.too_slow])
