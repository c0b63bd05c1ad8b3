"""Every Triton op against its plain-PyTorch reference, at awkward sizes.

On a CPU-only machine the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
before kiln imports triton) at small shapes; the ``gpu`` cases run the same checks compiled, at Llama-3-8B sizes
(``python -m pytest tests/test_kernels.py -m gpu``). Data movement (the KV cache writes) must match
exactly; arithmetic within the per-dtype tolerances below. Buffers the kernels write into start out
poisoned (NaN), so an element left unwritten, or written where it should not be, shows.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import DEVICE, ON_GPU, gpu
from kiln.kernels import LLAMA_OPS, OPS, AttentionMetadata, KernelOps
from kiln.kernels.activation import silu_mul_ref, silu_mul_triton
from kiln.kernels.attention import paged_attention_ref, paged_attention_triton
from kiln.kernels.norm import add_rms_norm_ref, add_rms_norm_triton, rms_norm_ref, rms_norm_triton
from kiln.kernels.rotary import rope_cos_sin, rotary_kv_write_ref, rotary_kv_write_triton
from kiln.models.config import ModelConfig, RopeConfig

pytest.importorskip("triton")

INTERPRETED = not ON_GPU

# (rtol, atol) for arithmetic ops: float32 differs by summation order only; float16 / bfloat16 by a
# rounding or two of their own precision (2**-11 / 2**-8 relative), which Triton's interpreter
# widens for bfloat16: it truncates float32 -> bfloat16 casts where the GPU rounds to nearest.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# Attention rounds the softmax probabilities to the input dtype for the P @ V dot, as flash attention does.
ATTENTION_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}

# Triton 3.9's interpreter multiplies bfloat16 dot operands as raw 16-bit integers (its create_dot
# converts only 8-bit floats), so bfloat16 attention is checked on the GPU only.
ATTENTION_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_ID = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerances=TOLERANCES) -> None:
    rtol, atol = tolerances[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_cache_writes_match(actual: torch.Tensor, expected: torch.Tensor, is_exact: bool = True) -> None:
    """Equal element for element, NaN (never written) in the same places."""
    assert torch.equal(actual.isnan(), expected.isnan())
    rtol, atol = (0.0, 0.0) if is_exact else TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


# ---- RMSNorm -------------------------------------------------------------------------------------
NORM_SHAPES = [(1, 72), (7, 200), (5, 4096)] + [
    pytest.param(t, 4096, marks=gpu) for t in (1, 64, 2048)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,hidden", NORM_SHAPES)
def test_rms_norm(num_tokens, hidden, dtype):
    x, weight = randn(num_tokens, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    assert_close(rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,hidden", NORM_SHAPES)
def test_add_rms_norm_writes_the_new_residual_in_place(num_tokens, hidden, dtype):
    x, residual, weight = randn(num_tokens, hidden, dtype=dtype), randn(num_tokens, hidden, dtype=dtype), randn(
        hidden, dtype=dtype)
    expected_out, expected_residual = add_rms_norm_ref(x, residual, weight, 1e-5)
    out, new_residual = add_rms_norm_triton(x, residual, weight, 1e-5, num_warps=2)
    assert new_residual.data_ptr() == residual.data_ptr()
    assert_close(out, expected_out)
    assert_cache_writes_match(new_residual, expected_residual, is_exact=not (INTERPRETED and dtype == torch.bfloat16))


# ---- SiLU(gate) * up -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,intermediate,block", [
    (1, 72, 64), (5, 200, 64), (3, 1000, 1024),
    pytest.param(1, 14336, 1024, marks=gpu), pytest.param(2048, 14336, 2048, marks=gpu)])
def test_silu_mul(num_tokens, intermediate, block, dtype):
    gate_up = randn(num_tokens, 2 * intermediate, dtype=dtype)
    assert_close(silu_mul_triton(gate_up, BLOCK=block, num_warps=2), silu_mul_ref(gate_up))


# ---- rotary embedding + paged KV write -----------------------------------------------------------
ROPES = {
    "default": RopeConfig(theta=10000.0),
    "linear": RopeConfig(rope_type="linear", factor=2.0),
    "llama3": RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, original_max_position_embeddings=64),
}


def fused_qkv_views(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v as the model has them: strided views of one fused QKV output (row stride = QKV width)."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim,block_size", [
    (7, 8, 2, 64, 16), (5, 4, 4, 128, 32), (3, 6, 1, 64, 16), (4, 6, 2, 12, 16), (5, 8, 4, 8, 16),
    pytest.param(1, 32, 8, 128, 32, marks=gpu), pytest.param(2048, 32, 8, 128, 32, marks=gpu)])
def test_rotary_kv_write(num_tokens, num_heads, num_kv_heads, head_dim, block_size, rope, dtype):
    max_positions = 4096
    q, k, v = fused_qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    cos_sin = rope_cos_sin(ROPES[rope], head_dim, max_positions).to(DEVICE)
    positions = torch.randint(0, max_positions, (num_tokens,), device=DEVICE)
    num_blocks = -(-num_tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::3] = -1  # padding tokens: no KV write
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_q = rotary_kv_write_ref(q, k, v, positions, cos_sin, expected_k, expected_v, slots)
    q_rot = rotary_kv_write_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slots, num_warps=2)
    assert_close(q_rot, expected_q)
    # The rotated keys are bit-identical to the reference's except where the interpreter truncates.
    assert_cache_writes_match(k_cache, expected_k, is_exact=not (INTERPRETED and dtype == torch.bfloat16))
    assert_cache_writes_match(v_cache, expected_v)


# ---- paged attention -----------------------------------------------------------------------------
class AttentionCase:
    """Sequences with a query chunk each, their keys scattered over a shuffled paged cache."""

    def __init__(self, q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, sliding_window: int | None = None):
        max_blocks = max(-(-s // block_size) for s in seq_lens) + 1  # tables wider than any sequence needs
        num_blocks = len(seq_lens) * max_blocks + 3
        self.k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
        self.v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
        tables = torch.randperm(num_blocks, device=DEVICE)[:len(seq_lens) * max_blocks].view(len(seq_lens), -1)
        # q is a head-strided view, as the attention output of a fused QKV projection could be.
        self.q = randn(sum(q_lens), num_heads + 2, head_dim, dtype=dtype)[:, :num_heads]
        self.meta = AttentionMetadata(
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE),
            block_tables=tables.int(), seq_lens_host=list(seq_lens), query_lens_host=list(q_lens),
            sliding_window=sliding_window)
        self.scale = head_dim ** -0.5

    def reference(self) -> torch.Tensor:
        return paged_attention_ref(self.q, self.k_cache, self.v_cache, self.meta, self.scale)

    def triton(self, meta: AttentionMetadata | None = None, **config) -> torch.Tensor:
        return paged_attention_triton(self.q, self.k_cache, self.v_cache, meta or self.meta, self.scale, **config)


# name -> (query lengths, sequence lengths (cached prefix + queries), heads, KV heads, head_dim, block size)
CONTEXT_CASES = {
    "prompts_gqa4": ([5, 17, 1], [5, 17, 1], 8, 2, 64, 16),
    "prefix_cached_and_chunked": ([9, 20, 3], [49, 33, 3], 8, 2, 64, 16),
    "mqa": ([11, 4], [30, 4], 6, 1, 64, 32),
    "gqa8_head_dim_128": ([13], [40], 8, 1, 128, 32),
    "mha_awkward_head_dim": ([6, 10], [6, 25], 3, 3, 48, 16),
    "stories260k_head_dim_8": ([7, 12], [20, 12], 8, 4, 8, 16),
    "gpu_llama3_8b_prompts": pytest.param(([2048, 700, 1], [2048, 700, 1], 32, 8, 128, 32), marks=gpu),
    "gpu_llama3_8b_chunks": pytest.param(([512, 1000, 300], [2048, 1900, 1500], 32, 8, 128, 32), marks=gpu),
}
CONTEXT_CONFIGS = [None, {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "num_stages": 1}]


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("config", CONTEXT_CONFIGS, ids=["default", "small_tiles"])
@pytest.mark.parametrize("case", list(CONTEXT_CASES.values()), ids=list(CONTEXT_CASES))
def test_context_attention(case, config, dtype):
    attention = AttentionCase(*case, dtype=dtype)
    assert not attention.meta.is_decode_only
    assert_close(attention.triton(context=config), attention.reference(), ATTENTION_TOLERANCES)


# name -> (sequence lengths, heads, KV heads, head_dim, block size); one query per sequence, and
# seq_len 0 marks a padded row of a CUDA-graph batch.
DECODE_CASES = {
    "gqa4_padded_rows": ([33, 1, 70, 0, 0], 8, 2, 64, 16),
    "mha_head_dim_128": ([100, 3, 64], 4, 4, 128, 32),
    "mqa_group_8": ([45, 17], 8, 1, 64, 16),
    "stories260k_head_dim_8": ([30, 0, 9], 8, 4, 8, 16),
    "gpu_llama3_8b_batch_1": pytest.param(([400], 32, 8, 128, 32), marks=gpu),
    "gpu_llama3_8b_batch_64": pytest.param(
        ([1024 + (i * 977) % 3072 for i in range(60)] + [0] * 4, 32, 8, 128, 32), marks=gpu),
}
DECODE_CONFIGS = [None] + [[{"max_batch_size": 256, "num_splits": s, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}]
                           for s in (1, 3)]


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("decode", DECODE_CONFIGS, ids=["default", "one_split", "three_splits"])
@pytest.mark.parametrize("case", list(DECODE_CASES.values()), ids=list(DECODE_CASES))
def test_decode_attention(case, decode, dtype):
    seq_lens, *shape = case
    attention = AttentionCase([1] * len(seq_lens), seq_lens, *shape, dtype=dtype)
    assert attention.meta.is_decode_only
    out = attention.triton(decode=decode)
    assert_close(out, attention.reference(), ATTENTION_TOLERANCES)
    padded = torch.tensor(seq_lens, device=DEVICE) == 0
    assert torch.equal(out[padded], torch.zeros_like(out[padded]))


def test_decode_reads_only_device_tensors():
    """A CUDA graph freezes host values: decode must size everything from device tensors and shapes."""
    attention = AttentionCase([1, 0, 1, 1], [37, 5, 12, 0], 8, 2, 64, 16, torch.float32)
    stale = AttentionMetadata(attention.meta.seq_lens, attention.meta.query_start_loc, attention.meta.block_tables,
                              seq_lens_host=[1, 1, 1, 1], query_lens_host=[1, 1, 1, 1])
    decode = [{"max_batch_size": 4, "num_splits": 2, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}]
    assert_close(attention.triton(stale, decode=decode), attention.reference(), ATTENTION_TOLERANCES)


@pytest.mark.parametrize("min_split_keys,merge_pairs", [(4, 64), (4, 4), (64, 64)],
                         ids=["merged", "merged_in_chunks", "mostly_alone"])
def test_split_decode_leaves_its_split_counts_zero_for_the_next_launch(monkeypatch, min_split_keys, merge_pairs):
    """The last split of each (sequence, KV head) merges the others' results and puts its count back to zero,
    so the next launch on the same counts (the next layer, a graph replay) merges right too. The first batch
    has a row without a query and one with a query but no keys; the second outgrows the counts, which are
    reallocated (the old ones kept) and zero again. At 4 keys a split, rows of 3 to 70 keys run 1 to 4 of the
    4 splits (merged in one round of loads, or one split at a time); at 64, all but the longest rows run one
    split, which writes its output alone."""
    from kiln.kernels import attention as attention_module

    monkeypatch.setattr(attention_module, "_split_counts", {})
    monkeypatch.setattr(attention_module, "_outgrown_split_counts", [])
    monkeypatch.setattr(attention_module, "MIN_SPLIT_COUNTS", 8)
    monkeypatch.setattr(attention_module, "MIN_SPLIT_KEYS", min_split_keys)
    monkeypatch.setattr(attention_module, "MAX_MERGE_PAIRS", merge_pairs)
    decode = [{"max_batch_size": 8, "num_splits": 4, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}]
    small = AttentionCase([1, 0, 1, 1], [37, 5, 0, 64], 8, 2, 64, 16, torch.float32)
    large = AttentionCase([1] * 5, [70, 3, 20, 1, 48], 8, 2, 64, 16, torch.float32)
    for attention, num_counts in ((small, 8), (small, 8), (large, 16), (small, 16)):
        assert_close(attention.triton(decode=decode), attention.reference(), ATTENTION_TOLERANCES)
        counts = attention_module._split_counts[attention.q.device]
        assert counts.numel() == num_counts and not counts.any()
    assert [c.numel() for c in attention_module._outgrown_split_counts] == [8]


@pytest.mark.parametrize("decode", DECODE_CONFIGS[1:], ids=["one_split", "three_splits"])
def test_sliding_window_matches_reference(decode):
    context = AttentionCase([9, 20], [49, 33], 4, 2, 64, 16, torch.float32, sliding_window=24)
    assert_close(context.triton(context=CONTEXT_CONFIGS[1]), context.reference(), ATTENTION_TOLERANCES)
    decoding = AttentionCase([1, 1], [49, 7], 4, 2, 64, 16, torch.float32, sliding_window=24)
    assert_close(decoding.triton(decode=decode), decoding.reference(), ATTENTION_TOLERANCES)


@pytest.mark.parametrize("decode", DECODE_CONFIGS[1:], ids=["one_split", "three_splits"])
def test_sliding_window_never_reads_blocks_released_below_it(decode):
    """The runtime gives blocks wholly before a sequence's window back to the pool, which may reuse them: here
    their table slots point at a block of NaNs, which neither path may read (a masked NaN still poisons P @ V)."""
    window, block_size = 11, 8
    for q_lens, seq_lens, config in (([9, 20, 3], [49, 33, 60], dict(context=CONTEXT_CONFIGS[1])),
                                     ([1, 1, 1], [49, 7, 60], dict(decode=decode))):
        case = AttentionCase(q_lens, seq_lens, 4, 2, 64, block_size, torch.float32, sliding_window=window)
        expected = case.reference()
        tables = case.meta.block_tables
        poison = min(set(range(case.k_cache.shape[0])) - set(tables.flatten().tolist()))
        case.k_cache[poison] = case.v_cache[poison] = float("nan")
        released = [max(0, s - q - window + 1) // block_size for q, s in zip(q_lens, seq_lens)]
        assert sum(released) >= 8
        for row, num_released in enumerate(released):
            tables[row, :num_released] = poison
        assert torch.equal(case.reference(), expected)
        assert_close(case.triton(**config), expected, ATTENTION_TOLERANCES)


@gpu
def test_decode_attention_in_a_cuda_graph():
    """Captured once, replayed on new lengths and block tables written into the same device tensors."""
    attention = AttentionCase([1] * 8, [700] * 8, 32, 8, 128, 32, torch.bfloat16)  # tables for 700 keys
    meta = attention.meta
    meta.seq_lens.zero_()  # captured on padded rows, as the runtime does
    decode = [{"max_batch_size": 8, "num_splits": 4, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}]
    attention.triton(decode=decode)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.triton(decode=decode)
    for seq_lens in ([300, 1, 64, 0, 0, 0, 0, 0], [5, 700, 33, 12, 2, 400, 64, 0]):
        meta.seq_lens.copy_(torch.tensor(seq_lens))
        meta.block_tables.copy_(meta.block_tables[torch.randperm(8, device=DEVICE)])
        graph.replay()
        meta.seq_lens_host = seq_lens
        meta.reference_batches = None  # the reference's per-step batches were made for the lengths before
        assert_close(out, attention.reference(), ATTENTION_TOLERANCES)


# ---- the ops in a model --------------------------------------------------------------------------
def test_model_forward_with_triton_plan_matches_reference_plan():
    """Every op through KernelOps inside a Llama, over three iterations sharing a KV cache: prompt
    chunks, a mixed batch (a chunk after its cached prefix, a decode), then decode with a padded row."""
    from kiln.convert.converter import dummy_weights
    from kiln.layers import LayerContext, linear_method, load_parameters
    from kiln.models import create_model, model_skeleton

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=72, intermediate_size=100,
                         num_layers=2, num_heads=6, num_kv_heads=2, head_dim=12, max_position_embeddings=64)
    weights = dict(dummy_weights(model_skeleton(config), DEVICE))
    for name, tensor in weights.items():
        if name.endswith("norm.weight"):
            tensor.uniform_(0.5, 1.5)  # not all ones, so a norm weight applied wrongly shows
    block_size = 16
    tables = torch.tensor([[3, 5, 0], [6, 1, 2], [4, 0, 0]], dtype=torch.int32, device=DEVICE)
    # Per iteration, per sequence: (first position, number of new tokens), or None for a padded row.
    iterations = [[(0, 15), (0, 9), (0, 1)], [(15, 6), (9, 1), None], [(21, 1), (10, 1), None]]
    inputs = []
    for n, iteration in enumerate(iterations):
        spans = [span or (0, 1) for span in iteration]
        positions = torch.cat([torch.arange(start, start + count) for start, count in spans]).to(DEVICE)
        slots = torch.cat([
            tables[i, torch.arange(start, start + count) // block_size].long() * block_size
            + torch.arange(start, start + count).to(DEVICE) % block_size if span else torch.tensor([-1], device=DEVICE)
            for i, (span, (start, count)) in enumerate(zip(iteration, spans))])
        seq_lens = [start + count if span else 0 for span, (start, count) in zip(iteration, spans)]
        q_lens = [count for _, count in spans]
        meta = AttentionMetadata(
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE),
            block_tables=tables, seq_lens_host=seq_lens, query_lens_host=q_lens)
        input_ids = torch.randint(0, config.vocab_size, (sum(q_lens),), generator=torch.Generator().manual_seed(n))
        inputs.append((input_ids.to(DEVICE), positions, slots, meta, torch.arange(sum(q_lens), device=DEVICE)))

    def run(plan: dict) -> list[torch.Tensor]:
        model = create_model(config, LayerContext(KernelOps(plan), linear_method("none"), torch.float32, DEVICE),
                             max_positions=64)
        load_parameters(model, weights)
        kv_cache = torch.zeros(config.num_layers, 2, 8, block_size, config.num_kv_heads, config.head_dim,
                               device=DEVICE)
        return [model.forward(ids, positions, kv_cache, slots, meta, rows)
                for ids, positions, slots, meta, rows in inputs]

    triton_plan = {op: {"impl": "triton", "config": {}} for op in OPS}
    for triton_logits, reference_logits in zip(run(triton_plan), run({})):
        torch.testing.assert_close(triton_logits, reference_logits, rtol=1e-4, atol=1e-4)


# ---- kernel plan and tuning ----------------------------------------------------------------------
TINY_MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=96,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)


def test_an_op_the_plan_leaves_out_binds_its_reference_but_weight_only_in_a_triton_plan():
    """A plan made before an op existed: its ops bind their references, except weight_only_linear in a Triton
    plan, which binds the Triton kernels at their default tiles (what such an engine ran); planned() still
    says the plan does not name them."""
    from kiln.kernels.gemv import dense_linear_ref
    from kiln.kernels.weight_only import weight_only_linear_ref, weight_only_linear_triton

    old_triton = KernelOps({"rms_norm": {"impl": "triton", "config": {}}})
    assert old_triton.weight_only_linear is weight_only_linear_triton
    assert old_triton.dense_linear is dense_linear_ref  # F.linear: cuBLAS on a GPU, as before the op
    assert not old_triton.planned("weight_only_linear")
    old_reference = KernelOps({"rms_norm": {"impl": "reference", "config": {}}})
    assert old_reference.weight_only_linear is weight_only_linear_ref


def test_decode_batch_buckets():
    from kiln.builder.tuning import decode_batch_buckets

    assert decode_batch_buckets(1) == [1]
    assert decode_batch_buckets(8) == [1, 2, 4, 8]
    assert decode_batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_tuning_runs_every_candidate_and_keeps_the_fastest(monkeypatch):
    """Every candidate config runs on this engine's shapes; a fake clock (time = warps, then BLOCK_N,
    then splits) says which must win; the plan is JSON and binds through KernelOps."""
    from kiln.builder import tuning
    from kiln.config import BuildConfig

    runs = []

    def fake_median_ms(fn):
        fn()
        runs.append(fn.keywords)
        return fn.keywords["num_warps"] + fn.keywords.get("BLOCK_N", 0) / 1000 + fn.keywords.get("num_splits", 0) / 1e6

    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    build = BuildConfig(max_batch_size=3, max_input_len=16, max_seq_len=32, max_num_tokens=32, tokens_per_block=8,
                        dtype="float32", target="cpu")
    configs = tuning.TuningRun(TINY_MODEL, build, torch.float32, num_sms=1, device=DEVICE).tune()
    plan = json.loads(json.dumps(tuning._plan(configs)))

    assert plan["rms_norm"]["config"] == plan["add_rms_norm"]["config"] == {"num_warps": 4}
    assert plan["silu_mul"]["config"] == {"BLOCK": 1024, "num_warps": 4}
    assert plan["rotary_kv_write"]["config"] == {"num_warps": 1}
    assert plan["attention"]["config"]["context"] == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    decode = plan["attention"]["config"]["decode"]
    assert [entry["max_batch_size"] for entry in decode] == [1, 2, 3]
    assert all(entry == {"max_batch_size": entry["max_batch_size"], "BLOCK_N": 32, "num_warps": 2, "num_stages": 2,
                         "num_splits": 1} for entry in decode)
    # Three token counts (1, 3, 32) for norms, SiLU and rotary; one context batch; per decode bucket,
    # each kernel config with the splits that one SM's worth of programs allows (1 2 4, 1 2, 1).
    assert len(runs) == (3 * 2 * len(tuning.NORM_CANDIDATES) + 3 * len(tuning.SILU_MUL_CANDIDATES)
                         + 3 * len(tuning.ROTARY_CANDIDATES) + len(tuning.CONTEXT_CANDIDATES)
                         + len(tuning.DECODE_KERNEL_CANDIDATES) * (3 + 2 + 1))
    ops = KernelOps(plan)
    attention = AttentionCase([1, 1], [20, 3], 4, 2, 16, 8, torch.float32)
    assert_close(ops.attention(attention.q, attention.k_cache, attention.v_cache, attention.meta, attention.scale),
                 attention.reference(), ATTENTION_TOLERANCES)


@gpu
def test_gpu_kernel_plan_tuned_on_this_gpu():
    from kiln.engine.target import detect_target
    from kiln.builder.tuning import gpu_kernel_plan
    from kiln.config import BuildConfig

    build = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=128, tokens_per_block=16,
                        dtype="bfloat16", target=detect_target())
    for tune in (False, True):
        plan = json.loads(json.dumps(gpu_kernel_plan(TINY_MODEL, build, torch.bfloat16, tune=tune)))
        assert {entry["impl"] for entry in plan.values()} == {"triton"} and set(plan) == set(LLAMA_OPS)
        assert [entry["max_batch_size"] for entry in plan["attention"]["config"]["decode"]] == [1, 2, 4]
        ops = KernelOps(plan)
        for seq_lens in ([100, 7, 0], [60]):
            attention = AttentionCase([1] * len(seq_lens), seq_lens, 4, 2, 16, 16, torch.bfloat16)
            out = ops.attention(attention.q, attention.k_cache, attention.v_cache, attention.meta, attention.scale)
            assert_close(out, attention.reference(), ATTENTION_TOLERANCES)
