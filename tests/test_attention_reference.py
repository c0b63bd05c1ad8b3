"""The reference paged attention (the CPU path and the Triton kernels' oracle) against the plainest
possible version of itself: a loop over sequences, each attending with einsum over its own keys.

The reference batches decode rows and masks padded keys for speed; this file keeps the loop that it
replaced, as the oracle for those semantics (causal masking, sliding window, GQA / MQA, padded rows,
sequences without queries), on random inputs of awkward sizes.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kiln.kernels import AttentionMetadata
from kiln.kernels.attention import paged_attention_ref


def loop_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float) -> torch.Tensor:
    """One sequence at a time: its keys gathered from its blocks, repeated for each query head of the
    group, causal (and sliding-window) masked scores, softmax, weighted values."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        if q_len == 0:
            continue
        blocks = meta.block_tables[i, :-(-kv_len // block_size)].long()
        k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:kv_len].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:kv_len].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:start + q_len].float(), k) * scale
        q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
        k_pos = torch.arange(kv_len)[None, :]
        masked = k_pos > q_pos
        if meta.sliding_window is not None:
            masked |= k_pos <= q_pos - meta.sliding_window
        probs = scores.masked_fill(masked, float("-inf")).softmax(dim=-1)
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
        start += q_len
    return out


def random_case(q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype, sliding_window: int | None, seed: int):
    generator = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 2  # tables wider than any sequence needs
    num_blocks = len(seq_lens) * max_blocks + 5
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    tables = torch.randperm(num_blocks, generator=generator)[:len(seq_lens) * max_blocks].view(len(seq_lens), -1)
    q = torch.randn(sum(q_lens), num_heads + 3, head_dim, generator=generator).to(dtype)[:, :num_heads]  # strided
    meta = AttentionMetadata(
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
        block_tables=tables.int(), seq_lens_host=list(seq_lens), query_lens_host=list(q_lens),
        sliding_window=sliding_window)
    return q, k_cache, v_cache, meta, head_dim ** -0.5


# name -> (query lengths, sequence lengths, heads, KV heads, head_dim, block size, sliding window)
CASES = {
    "decode_stories260k": ([1] * 5, [1, 33, 32, 70, 9], 8, 4, 8, 32, None),
    "decode_padded_rows": ([1] * 6, [0, 17, 0, 5, 64, 0], 6, 2, 12, 16, None),
    "decode_mqa_window": ([1] * 4, [49, 7, 24, 25], 6, 1, 16, 16, 24),
    "decode_with_idle_sequences": ([1, 0, 1, 1], [37, 5, 12, 0], 8, 2, 64, 16, None),
    "prompts_gqa": ([5, 17, 1, 3], [5, 17, 1, 3], 8, 2, 24, 16, None),
    "chunks_after_prefix": ([9, 20, 3, 1], [49, 33, 3, 40], 3, 3, 48, 16, None),
    "mixed_window_mqa": ([1, 13, 1, 0, 2], [50, 61, 1, 9, 30], 4, 1, 8, 8, 11),
    "window_wider_than_sequences": ([7, 1], [7, 19], 4, 2, 8, 16, 4096),
    "window_of_one": ([6, 1, 1], [20, 3, 9], 2, 2, 8, 4, 1),
    "decode_equal_lengths": ([1] * 3, [20] * 3, 8, 4, 8, 16, None),  # every key visible: no mask
    "decode_equal_lengths_window_wide": ([1] * 3, [20] * 3, 6, 3, 8, 16, 20),
    "decode_equal_lengths_window_narrow": ([1] * 3, [20] * 3, 6, 3, 8, 16, 19),
    "decode_all_padded": ([1, 1], [0, 0], 4, 2, 8, 16, None),
    "equal_whole_prompts": ([7, 7, 7], [7, 7, 7], 6, 2, 8, 4, None),  # plain causal: no mask
    "equal_whole_prompts_window": ([9, 9], [9, 9], 4, 2, 8, 4, 5),
    "equal_chunks_after_prefixes": ([6, 6, 1, 6], [6, 20, 30, 13], 4, 2, 8, 8, None),
    "two_chunk_lengths_and_decodes": ([3, 1, 5, 3, 1, 5], [3, 9, 40, 12, 1, 5], 4, 4, 16, 16, 7),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_reference_matches_the_loop_over_sequences(case, dtype):
    *shape, window = case
    inputs = random_case(*shape, dtype=dtype, sliding_window=window, seed=len(shape[0]))
    expected = loop_attention(*inputs)
    actual = paged_attention_ref(*inputs)
    assert actual.dtype == dtype and actual.shape == expected.shape
    # float32 arithmetic in both: only the summation order differs (then one rounding to dtype).
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("layout", ["heads_outer", "queries_outer"])
@pytest.mark.parametrize("case", ["decode_equal_lengths", "equal_whole_prompts", "prompts_gqa"])
def test_reference_output_is_contiguous_whatever_layout_sdpa_returns(case, layout, monkeypatch):
    """SDPA's [N, H, Q, D] output comes laid out as [N, Q, H, D] from the CPU's kernels and as [N, H, Q, D]
    from some of CUDA's (on the H200 the reference failed there, in its view of the output and in
    Attention's view into the o projection): either way the reference returns [T, H, D] contiguous, as the
    Triton op does."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out.contiguous() if layout == "heads_outer" else out.transpose(1, 2).contiguous().transpose(1, 2)

    *shape, window = CASES[case]
    inputs = random_case(*shape, dtype=torch.float32, sliding_window=window, seed=1)
    expected = paged_attention_ref(*inputs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", strided_sdpa)
    inputs[3].reference_batches = None
    actual = paged_attention_ref(*inputs)
    assert actual.is_contiguous() and torch.equal(actual, expected)
    actual.view(actual.shape[0], -1)


@pytest.mark.parametrize("seed", range(20))
def test_reference_matches_the_loop_on_random_batches(seed):
    """Random mixes of padded rows, decodes, prompts and chunks after a cached prefix."""
    rng = random.Random(seed)
    num_kv_heads = rng.choice([1, 2, 3])
    num_heads = num_kv_heads * rng.choice([1, 2, 4])
    q_lens, seq_lens = [], []
    for _ in range(rng.randint(1, 9)):
        kind = rng.choice(["padded", "idle", "decode", "decode", "prompt", "chunk"])
        q_len = {"padded": 1, "idle": 0, "decode": 1}.get(kind, rng.randint(2, 40))
        prefix = 0 if kind in ("padded", "prompt") else rng.randint(0 if kind == "idle" else 1, 90)
        q_lens.append(q_len)
        seq_lens.append(0 if kind == "padded" else prefix + q_len)
    window = rng.choice([None, None, rng.randint(1, 50)])
    inputs = random_case(q_lens, seq_lens, num_heads, num_kv_heads, rng.choice([8, 12, 32]), rng.choice([4, 16, 32]),
                         torch.float32, window, seed)
    torch.testing.assert_close(paged_attention_ref(*inputs), loop_attention(*inputs), rtol=1e-5, atol=1e-5)


def test_rows_without_keys_are_zeros():
    """A padded decode row (seq_len 0, as CUDA-graph batches have) attends to nothing."""
    q, k_cache, v_cache, meta, scale = random_case([1, 1, 1], [0, 9, 0], 4, 2, 8, 16, torch.float32, None, 0)
    out = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    assert out[1].abs().sum() > 0


def test_layers_of_one_step_share_the_gathers_and_masks():
    """Every layer of a step reads the same metadata: the batches (gather indices, masks) are made by the
    first and reused by the others, each still attending over its own cache."""
    q, k_cache, v_cache, meta, scale = random_case([1, 1, 4, 1], [30, 7, 12, 1], 8, 2, 8, 4, torch.float32, 9, 3)
    paged_attention_ref(q, k_cache, v_cache, meta, scale)
    batches = meta.reference_batches
    assert batches is not None
    other_q, other_k, other_v = torch.randn_like(q), torch.randn_like(k_cache), torch.randn_like(v_cache)
    out = paged_attention_ref(other_q, other_k, other_v, meta, scale)
    assert meta.reference_batches is batches
    torch.testing.assert_close(out, loop_attention(other_q, other_k, other_v, meta, scale), rtol=1e-5, atol=1e-5)
