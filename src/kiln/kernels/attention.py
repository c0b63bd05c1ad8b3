"""Causal attention over packed sequences whose keys and values live in the paged KV cache.

One op covers context chunks (many query tokens per sequence, attending to cached prefix blocks and
to themselves) and decode (one query token per sequence): the new tokens' K/V are written to the
cache first (rotary.py), then every key is read from the cache.

The Triton path runs one flash-attention kernel in two launch shapes. Its rows are (query token, query
head) pairs of one KV head's group, so each key/value tile is loaded once for the whole group (GQA/MQA).
Context batches tile the query tokens (BLOCK_M rows per program). Decode batches (one query per
sequence) split each sequence's keys into ``num_splits`` ranges, one program each (flash-decoding), and
the last of a sequence's splits to finish merges their partial results (TensorRT-LLM's multi-block mode:
no second kernel, whose launch would be one more dependent kernel boundary per layer); decode reads only
device tensors and shapes, so it can be captured in a CUDA graph.

An FP8 KV cache (float8_e4m3fn, k / k_scale and v / v_scale: rotary.py) is dequantized in registers:
keys and values are converted to the query's dtype (exact), k_scale folds into the softmax scale and
v_scale into the output's normalization. With ``fp8_context`` (FP8 context attention, TensorRT-LLM's
use_fp8_context_fmha) batches with context chunks multiply Q @ K^T and P @ V as e4m3 dots: each query
row (token, head) is quantized with its own scale (amax / 448), K and V are the cache's bytes, and the
softmax probabilities P (in [0, 1]) are rounded as P * 448; decode-only batches keep the 16-bit dots.
The reference does the same roundings in float32 (P relative to each row's final maximum; the kernel's
online softmax rounds it relative to the running one, a difference within e4m3's step).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from kiln.kernels.fp8 import FP8_CONSTEXPRS, fp8_row_scales, to_fp8
from kiln.kernels.triton_jit import count_sms, jit, next_power_of_2, pdl_launch, tl, wait_for_producer
from kiln.quantization.fp8 import FP8_DTYPE, FP8_MAX, FP8_MAX_INV, dequantize_fp8, quantize_fp8_per_token

# Triton converts float8e4nv (e4m3, what float8_e4m3fn tensors are to it) only on sm89+: on an sm80 / sm86
# GPU a kernel that loads or stores one does not compile ("type fp8e4nv not supported in this
# architecture"), so kiln keeps an FP8 KV cache to Ada and Hopper (sm89+), and FP8 dots with it.
MIN_FP8_KV_CAPABILITY = 89


def fp8_kv_cache_refusal(target: str) -> str | None:
    """Why an engine for ``target`` cannot keep its KV cache in FP8 (None: it can; the CPU reference can)."""
    if target == "cpu" or int(target.removeprefix("sm")) >= MIN_FP8_KV_CAPABILITY:
        return None
    gpu = " (the A100)" if target == "sm80" else ""
    return (f"kiln's Triton kernels read and write e4m3 only on sm{MIN_FP8_KV_CAPABILITY}+ (Ada, Hopper), not on "
            f"{target}{gpu}")


@dataclass
class AttentionMetadata:
    """Where each sequence's queries sit in the packed batch and where its keys sit in the cache: one
    step's, read alike by every layer.

    Device tensors are what kernels read; the host lists serve the reference path and launch sizing.
    """

    seq_lens: torch.Tensor          # [B] int32: keys per sequence after this step's tokens are written
    query_start_loc: torch.Tensor   # [B + 1] int32: offsets of each sequence's queries in the batch
    block_tables: torch.Tensor      # [B, max_blocks_per_seq] int32
    seq_lens_host: list[int]
    query_lens_host: list[int]
    sliding_window: int | None = None
    # The reference path's gather indices and masks, made from the above by the first layer that attends
    # and reused by the others (_reference_batches).
    reference_batches: list["_ReferenceBatch"] | None = field(default=None, repr=False, compare=False)

    @property
    def is_decode_only(self) -> bool:
        return max(self.query_lens_host, default=0) <= 1

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, kv_scale: torch.Tensor | None = None,
                        fp8_context: bool = False) -> torch.Tensor:
    """q: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; returns [T, Hq, D]. FP8 caches are
    dequantized with ``kv_scale`` [2] (k_scale, v_scale); ``fp8_context`` (FP8 caches only) rounds Q and
    P to e4m3 as the FP8 context kernel does, in batches with context chunks.

    Sequences with the same number of query tokens attend together, as one batch whose keys are padded
    to the longest of theirs (and masked): a step's decodes are one batch, equal prompt chunks another.
    Nothing is done per token, and what depends on the metadata alone is made once per step."""
    if meta.reference_batches is None:
        meta.reference_batches = _reference_batches(meta, k_cache.shape[1], q.device)
    if k_cache.dtype == FP8_DTYPE:
        k_cache, v_cache = _Fp8Cache(k_cache, kv_scale[0]), _Fp8Cache(v_cache, kv_scale[1])
    attend = functools.partial(_attend_batch, k_cache=k_cache, v_cache=v_cache, scale=scale,
                               is_fp8_dot=fp8_context and not meta.is_decode_only)
    batches = meta.reference_batches
    if len(batches) == 1 and batches[0].token_rows is None:  # every sequence alike: no gather of queries
        batch = batches[0]
        # Contiguous, as the Triton op writes it, whatever layout SDPA returned (CUDA's may leave the heads
        # strided; the CPU's does not).
        return attend(q.view(batch.num_seqs, -1, *q.shape[1:]), batch).reshape(q.shape).to(q.dtype).contiguous()
    out = torch.empty_like(q)
    for batch in batches:
        out[batch.token_rows] = attend(q[batch.token_rows], batch).to(q.dtype)
    return out


class _Fp8Cache(NamedTuple):
    """An FP8 cache and the scale its values multiply by."""
    cache: torch.Tensor
    scale: torch.Tensor


@dataclass
class _ReferenceBatch:
    """Sequences of one query length that the reference attends together, and what their layers share:
    which cache blocks to gather and which keys each query sees."""

    num_seqs: int
    token_rows: torch.Tensor | None  # [N, Q] their queries' rows in the packed batch; None: all rows, in order
    blocks: torch.Tensor             # [N * blocks] their tables' blocks (freed slots read block 0), in order
    num_keys: int                    # L: keys per sequence, padded to the longest
    mask: torch.Tensor | None = None      # [N, Q, L] float32: 0 where a query sees a key, else -inf; None: all
    is_causal: bool = False               # whole prompts: query i sees keys 0..i, no mask built
    stale: torch.Tensor | None = None     # [N, L, 1, 1] keys before the first query's window: never read
    has_keys: torch.Tensor | None = None  # [N, 1, 1, 1] where some sequence has none (a padded row): which do


def _reference_batches(meta: AttentionMetadata, block_size: int, device: torch.device) -> list[_ReferenceBatch]:
    """The step's sequences grouped by query length, with their gather indices and masks."""
    q_lens, seq_lens, window = meta.query_lens_host, meta.seq_lens_host, meta.sliding_window
    groups: dict[int, list[int]] = {}  # query length -> sequences
    for i, q_len in enumerate(q_lens):
        if q_len:
            groups.setdefault(q_len, []).append(i)
    starts = [0, *itertools.accumulate(q_lens)]
    is_whole_batch = len(groups) == 1 and starts[-1] == len(q_lens) * q_lens[0]
    batches = []
    for num_q, rows in groups.items():
        lens = [seq_lens[i] for i in rows]
        num_keys = max(lens)
        if is_whole_batch:
            token_rows, tables = None, meta.block_tables
        else:
            token_rows = (torch.tensor([starts[i] for i in rows], device=device)[:, None]
                          + torch.arange(num_q, device=device))
            tables = meta.block_tables[torch.tensor(rows, device=device)]
        blocks = tables[:, :-(-num_keys // block_size)].flatten().long().clamp(min=0)
        batch = _ReferenceBatch(len(rows), token_rows, blocks, num_keys)
        # Every sequence has all num_keys keys and the window hides none: one query each (decode) sees them
        # all; queries at every position (whole prompts) see plain causal attention. No mask to build.
        if min(lens) == num_keys > 0 and (window is None or window >= num_keys) and num_q in (1, num_keys):
            batch.is_causal = num_q > 1
            batches.append(batch)
            continue
        kv_lens = torch.tensor(lens, device=device)
        q_pos = kv_lens[:, None] - num_q + torch.arange(num_q, device=device)  # [N, Q]
        k_pos = torch.arange(num_keys, device=device)
        visible = k_pos <= q_pos[..., None]  # [N, Q, L]
        if window is not None:
            visible &= k_pos > q_pos[..., None] - window
            # Keys before the first query's window are never read (as the Triton kernel's kv_begin skips their
            # blocks): the pool may have freed and reused those blocks, and even masked, a reused block's
            # values (inf, NaN) would poison P @ V.
            batch.stale = (k_pos < (q_pos[:, :1] - window + 1))[..., None, None]
        if min(lens) == 0:
            batch.has_keys = (kv_lens > 0)[:, None, None, None]
        # Additive, as SDPA turns a boolean mask into one on every call (2 ops a layer).
        batch.mask = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
        batches.append(batch)
    return batches


def _attend_batch(q: torch.Tensor, batch: _ReferenceBatch, k_cache: torch.Tensor | _Fp8Cache,
                  v_cache: torch.Tensor | _Fp8Cache, scale: float, is_fp8_dot: bool = False) -> torch.Tensor:
    """q: [N, Q, Hq, D], the last Q tokens of the batch's N sequences; returns [N, Q, Hq, D] float32."""
    attend = _attend_fp8 if is_fp8_dot else _attend
    keys = _gather_one(k_cache, batch.blocks, batch.num_seqs, batch.num_keys)
    values = _gather_one(v_cache, batch.blocks, batch.num_seqs, batch.num_keys)
    if batch.stale is not None:
        keys, values = keys.masked_fill(batch.stale, 0.0), values.masked_fill(batch.stale, 0.0)
    out = attend(q, keys, values, batch.mask, scale, is_causal=batch.is_causal)
    # A padded row (no keys, as CUDA-graph batches have) sees nothing: zeros, not softmax's NaN.
    return out if batch.has_keys is None else torch.where(batch.has_keys, out, 0.0)


def _gather_one(cache: torch.Tensor | _Fp8Cache, blocks: torch.Tensor, num_seqs: int, num_keys: int
                ) -> torch.Tensor:
    """Keys or values [N, num_keys, Hkv, D]: the first num_keys slots of each sequence's blocks, in order
    (whole blocks gathered: contiguous reads), an FP8 cache's dequantized to float32."""
    fp8_scale = cache.scale if isinstance(cache, _Fp8Cache) else None
    if fp8_scale is not None:  # gathered as bytes: index_select has no float8 kernels
        cache = cache.cache.view(torch.uint8)
    num_kv_heads, head_dim = cache.shape[2:]
    gathered = cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim)[:, :num_keys]
    return gathered if fp8_scale is None else dequantize_fp8(gathered.view(FP8_DTYPE), fp8_scale)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            is_causal: bool = False) -> torch.Tensor:
    """Softmax attention in float32. q: [N, Q, Hq, D]; k, v: [N, L, Hkv, D]; mask: [N, Q, L], 0 where a query
    sees a key and -inf elsewhere (None: all, or with is_causal and Q == L, query i sees keys 0..i). Query head h
    reads KV head h // (Hq // Hkv) (GQA / MQA). Returns [N, Q, Hq, D] float32."""
    num_seqs, num_q, num_heads, head_dim = q.shape
    k, v = k.float().transpose(1, 2), v.float().transpose(1, 2)
    mask = None if mask is None else mask[:, None]
    if num_q == 1:
        # Decode: a KV head's query heads are its query rows, [N, Hkv, group, D], a view. SDPA's CPU kernel
        # takes that in about half the time of enable_gqa's one row per head (stories260K's decode at batch
        # 64, 200 keys: 0.20 vs 0.40 ms on 2 threads, 0.40 vs 0.68 on 1).
        out = F.scaled_dot_product_attention(q.float().reshape(num_seqs, k.shape[1], -1, head_dim), k, v,
                                             attn_mask=mask, scale=scale)
        return out.reshape(num_seqs, 1, num_heads, head_dim)  # a view on the CPU; CUDA SDPA may lay it out otherwise
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k, v, attn_mask=mask, scale=scale,
                                         is_causal=is_causal, enable_gqa=True)
    return out.transpose(1, 2)


def _attend_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                is_causal: bool = False) -> torch.Tensor:
    """As _attend, with FP8 context attention's roundings: each query row (token, head) to e4m3 with its
    own scale, the softmax probabilities to e4m3 as P * 448 (K and V come dequantized from the FP8 cache);
    the products and the softmax's sum in float32."""
    q_fp8, q_scale = quantize_fp8_per_token(q)
    q = dequantize_fp8(q_fp8, q_scale)
    group = q.shape[2] // k.shape[2]
    k, v = k.float().repeat_interleave(group, dim=2), v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("nqhd,nkhd->nhqk", q, k) * scale
    if is_causal:
        mask = torch.full(scores.shape[-2:], float("-inf"), device=q.device).triu(1)[None]
    if mask is not None:
        scores = scores + mask[:, None]
    row_max = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(row_max == float("-inf"), 0.0, row_max))  # rows that see no key: zeros
    p_rounded = (p * FP8_MAX).to(FP8_DTYPE).float() * FP8_MAX_INV
    out = torch.einsum("nhqk,nkhd->nqhd", p_rounded, v) / p.sum(-1).clamp(min=torch.finfo(torch.float32).tiny
                                                                          ).transpose(1, 2)[..., None]
    return out


# Metadata pointers and sizes that the runtime's own buffers make vary (in alignment, or by step) are
# not specialized on: each variant would be another compile, at load or on the first request.
@jit(do_not_specialize=["block_table_stride", "sliding_window", "num_splits"],
     do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr",
                                     "block_table_stride", "sliding_window", "num_splits"])
def _paged_attention_kernel(
        q_ptr, q_row_stride, q_head_stride, k_cache_ptr, v_cache_ptr, cache_block_stride, cache_slot_stride,
        cache_head_stride, block_tables_ptr, block_table_stride, seq_lens_ptr, query_start_loc_ptr,
        out_ptr, out_row_stride, out_head_stride, partial_out_ptr, partial_lse_ptr, split_counts_ptr, kv_scale_ptr,
        scale_log2, sliding_window, num_splits, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        KV_BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, MERGE_CHUNK: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr,
        IS_SPLIT: tl.constexpr, IS_FP8_KV: tl.constexpr, IS_FP8_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        FP8_MAX: tl.constexpr, FP8_MAX_INV: tl.constexpr, MIN_AMAX: tl.constexpr, PDL: tl.constexpr):
    """Program (query tile, KV head, sequence * num_splits + split): BLOCK_Q query tokens x BLOCK_G heads
    of the group against the split's share of the keys the tile can see. Without IS_SPLIT the result is
    written to out; with it (decode: one query tile), normalized partial outputs and their log2-sum-exp go
    to the partial buffers, and the last split of the (sequence, KV head) to finish, counted in
    split_counts_ptr (zero before and after every launch), merges them into out. A split takes at least
    MIN_SPLIT_KEYS keys: the splits beyond those a short sequence needs return at once, and one that is
    alone writes out as an unsplit program does (no count, no merge). IS_FP8_KV: the caches are
    e4m3, scaled by kv_scale_ptr's (k_scale, v_scale); IS_FP8_DOT: the two products are e4m3 dots (query
    rows quantized here, P as P * FP8_MAX)."""
    wait_for_producer(PDL)
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal ranges start first
    kv_head = tl.program_id(1)
    seq = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)  # loaded with q_len, not after the test: one memory latency less
    if q_tile * BLOCK_Q >= q_len:
        return
    context_len = seq_len - q_len  # keys before this step's queries (cached prefix, earlier chunks)
    # Keys the tile can see: from the window start of its first query to its last query, shared
    # evenly (in whole BLOCK_N tiles) among the splits that have MIN_SPLIT_KEYS of them at least.
    kv_begin = tl.maximum(context_len + q_tile * BLOCK_Q - sliding_window + 1, 0)
    kv_end = tl.minimum(seq_len, context_len + (q_tile + 1) * BLOCK_Q)
    num_keys = tl.maximum(kv_end - kv_begin, 0)
    active_splits = tl.minimum(tl.maximum(tl.cdiv(num_keys, MIN_SPLIT_KEYS), 1), num_splits)
    if split >= active_splits:
        return
    split_len = tl.cdiv(tl.cdiv(num_keys, active_splits), BLOCK_N) * BLOCK_N
    lo = kv_begin + split * split_len
    hi = tl.minimum(lo + split_len, kv_end)

    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    token = q_tile * BLOCK_Q + rows // BLOCK_G
    head = kv_head * GROUP + rows % BLOCK_G
    row_mask = (token < q_len) & (rows % BLOCK_G < GROUP)
    q_pos = context_len + token
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + (q_start + token).to(tl.int64)[:, None] * q_row_stride + head[:, None] * q_head_stride
                + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    io_dtype = q.dtype
    # k_scale multiplies every score and v_scale the output: folded into the softmax scale and the final
    # normalization, so the cache's values enter the dots unscaled (e4m3 -> 16 bits is exact).
    qk_scale = scale_log2
    out_scale = 1.0
    if IS_FP8_KV:
        qk_scale = scale_log2 * tl.load(kv_scale_ptr)
        out_scale = tl.load(kv_scale_ptr + 1)
    row_scale = tl.full([BLOCK_Q * BLOCK_G], 1.0, tl.float32)
    if IS_FP8_DOT:  # each query row to e4m3 with its own scale, as quantize_fp8_per_token
        q_f32 = q.to(tl.float32)
        q_scale = fp8_row_scales(q_f32, FP8_MAX_INV, MIN_AMAX)
        q = to_fp8(q_f32, q_scale[:, None], FP8_MAX)
        row_scale = q_scale
        out_scale = out_scale * FP8_MAX_INV  # P entered the dot as P * FP8_MAX
    row_scale = row_scale * qk_scale


    m = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < hi
        block = tl.load(block_table + keys // KV_BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
        kv_offsets = (block * cache_block_stride + (keys % KV_BLOCK_SIZE) * cache_slot_stride
                      + kv_head * cache_head_stride)
        kv_mask = key_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if IS_FP8_DOT:
            scores = tl.dot(q, tl.trans(k))
        else:
            if IS_FP8_KV:  # through float32: Triton's e4m3 -> bfloat16 cvt is sm90-only
                k = k.to(tl.float32).to(io_dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        scores = scores * row_scale[:, None]
        visible = (key_mask[None, :] & (keys[None, :] <= q_pos[:, None])
                   & (keys[None, :] > q_pos[:, None] - sliding_window))
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet stay at zero
        p = tl.exp2(scores - m_shift[:, None])
        alpha = tl.exp2(m - m_shift)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if IS_FP8_DOT:
            acc = acc * alpha[:, None] + tl.dot((p * FP8_MAX).to(tl.float8e4nv, fp_downcast_rounding="rtne"), v)
        else:
            if IS_FP8_KV:
                v = v.to(tl.float32).to(io_dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(io_dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    l_safe = tl.where(l > 0, l, 1.0)  # a row that saw no key (a padded decode row, an empty split): zeros
    out = acc * (out_scale / l_safe)[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if IS_SPLIT:
        if active_splits > 1:  # a split alone writes out below, as an unsplit program does
            partials = (seq * tl.num_programs(1) * GROUP + head) * num_splits  # the row's first split
            tl.store(partial_out_ptr + (partials + split).to(tl.int64)[:, None] * HEAD_DIM + dims[None, :], out,
                     mask=out_mask)
            tl.store(partial_lse_ptr + partials + split, tl.where(l > 0, m + tl.log2(l_safe), float("-inf")),
                     mask=row_mask)
            # One thread takes the count: the barrier puts every thread's stores before its release (cumulative
            # at GPU scope), and the program that acquires the last count (Triton hands it to all its threads
            # through shared memory, behind a barrier) reads after them. Rows without a query returned above in
            # every split (and the runtime's padded rows, with no keys, run one split), and so did the splits
            # beyond active_splits: the active ones all count.
            tl.debug_barrier()
            split_count = split_counts_ptr + seq * tl.num_programs(1) + kv_head
            if tl.atomic_add(split_count, 1, sem="acq_rel", scope="gpu") < active_splits - 1:
                return
            _merge_splits(partial_out_ptr, partial_lse_ptr, (seq * tl.num_programs(1) + kv_head) * GROUP, num_splits,
                          active_splits, out_ptr + q_start.to(tl.int64) * out_row_stride, out_head_stride,
                          kv_head * GROUP, GROUP, HEAD_DIM, BLOCK_H, MERGE_CHUNK, BLOCK_D)
            # Zero again for the next launch (the next layer's, a graph replay's), with no memset kernel: every
            # active split of the row has counted, and the next launch touches it only after wait_for_producer.
            tl.atomic_xchg(split_count, 0, sem="relaxed", scope="gpu")
            return
    tl.store(out_ptr + (q_start + token).to(tl.int64)[:, None] * out_row_stride
             + head[:, None] * out_head_stride + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)


@jit
def _merge_splits(partial_out_ptr, partial_lse_ptr, first_head, num_splits, active_splits, out_row_ptr,
                  out_head_stride, out_head, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Writes the GROUP heads' merged outputs (from out_head on, in the output row at out_row_ptr): their
    first active_splits split results, weighted by their sum-exp, CHUNK splits of every head at a time
    with a running maximum, so that one round of loads covers CHUNK splits (a split with no key, lse
    -inf, weighs nothing; a head whose splits saw none is zeros). Read at L2 (.cg): other SMs wrote them,
    and this one's L1 may hold stale lines of the buffers' memory."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s0 in range(0, active_splits, CHUNK):
        splits = s0 + tl.arange(0, CHUNK)
        mask = (heads < GROUP)[:, None] & (splits < active_splits)[None, :]
        partial = (first_head + heads)[:, None] * num_splits + splits[None, :]  # [BLOCK_H, CHUNK]
        lse = tl.load(partial_lse_ptr + partial, mask=mask, other=float("-inf"), cache_modifier=".cg")
        parts = tl.load(partial_out_ptr + partial.to(tl.int64)[:, :, None] * HEAD_DIM + dims[None, None, :],
                        mask=mask[:, :, None] & (dims < HEAD_DIM)[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        weight = tl.exp2(lse - m_shift[:, None])
        alpha = tl.exp2(m - m_shift)
        total = total * alpha + tl.sum(weight, 1)
        acc = acc * alpha[:, None] + tl.sum(weight[:, :, None] * parts, 1)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_row_ptr + (out_head + heads)[:, None] * out_head_stride + dims[None, :],
             out.to(out_row_ptr.dtype.element_ty), mask=(heads < GROUP)[:, None] & (dims < HEAD_DIM)[None, :])


# The reduction dim of an e4m3 tl.dot (mma k32 on Ada and Hopper) must be at least this.
MIN_FP8_DOT_K = 32

# Context launch parameters before tuning (``kiln build`` times candidates on the target GPU and stores
# the winners in the kernel plan): 64 query rows x 64 keys per tile over 4 warps and 2 pipeline stages,
# the flash-attention tutorial's smallest config for head_dim 128; it compiles for sm90 with head_dim 128
# in 220 registers per thread without spills (ptxas -v, Triton 3.9). Chosen by that, not by a timing.
DEFAULT_CONTEXT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
# Decode before tuning: at most 16 splits of tiles of 32 keys (8 KB of bf16 K per tile at head_dim 128)
# over 4 warps; see default_decode_config. Chosen by arithmetic, not by a timing.
MAX_DEFAULT_SPLITS = 16
DEFAULT_DECODE_KERNEL = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
# Keys a decode split takes at least: a sequence shorter than num_splits * MIN_SPLIT_KEYS runs fewer splits
# (the others return at once), and one of fewer keys runs one, which writes its output with no count and no
# merge. Two tiles of the default 32 keys: chosen by arithmetic, not by a timing.
MIN_SPLIT_KEYS = 64
# Split results the merge reads in one round of loads, for all of a KV head's query heads together: at
# most this many (head, split) pairs of head_dim floats (64 registers per thread at head_dim 128, 4 warps).
MAX_MERGE_PAIRS = 64


def default_decode_config(batch_size: int, num_kv_heads: int, num_sms: int) -> dict[str, Any]:
    """Splits (a power of two, at most MAX_DEFAULT_SPLITS) until the batch's programs fill two waves of
    the GPU's SMs: a batch of one sequence has only num_kv_heads programs without splitting."""
    num_splits = 1
    while num_splits < MAX_DEFAULT_SPLITS and batch_size * num_kv_heads * num_splits < 2 * num_sms:
        num_splits *= 2
    return {"num_splits": num_splits, **DEFAULT_DECODE_KERNEL}


def decode_config(decode: list[dict[str, Any]] | None, batch_size: int, num_kv_heads: int,
                  device: torch.device) -> dict[str, Any]:
    """The decode entry tuned for the smallest batch bucket that holds ``batch_size`` (else the largest)."""
    if not decode:
        return default_decode_config(batch_size, num_kv_heads, count_sms(device))
    return next((c for c in decode if c["max_batch_size"] >= batch_size), decode[-1])


# Decode's split counts: one int32 per (sequence, KV head) of a batch, zero between launches (each launch's
# last splits put them back), kept per device so that no launch memsets them. Launches on one device must
# not overlap (the runtime's run on one stream at a time). Batches beyond MIN_SPLIT_COUNTS rows x KV heads
# reallocate, outside a CUDA graph capture only: the runtime runs each graph's batch eagerly before
# capturing it.
MIN_SPLIT_COUNTS = 4096
_split_counts: dict[torch.device, torch.Tensor] = {}
# Outgrown buffers stay allocated: a CUDA graph captured with one still counts in it.
_outgrown_split_counts: list[torch.Tensor] = []


def split_counts(device: torch.device, size: int) -> torch.Tensor:
    """The device's zeroed split counts, at least ``size`` of them."""
    counts = _split_counts.get(device)
    if counts is None or counts.numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"decode attention needs {size} split counts on {device} inside a CUDA graph "
                               "capture: run the batch eagerly before capturing it")
        if counts is not None:
            _outgrown_split_counts.append(counts)
        counts = _split_counts[device] = torch.zeros(max(MIN_SPLIT_COUNTS, next_power_of_2(size)),
                                                     dtype=torch.int32, device=device)
    return counts


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                           scale: float, kv_scale: torch.Tensor | None = None, fp8_context: bool = False,
                           context: dict[str, Any] | None = None,
                           decode: list[dict[str, Any]] | None = None) -> torch.Tensor:
    """As paged_attention_ref. ``context``: BLOCK_M / BLOCK_N / num_warps / num_stages for batches with
    context chunks; ``decode``: per batch bucket (ascending ``max_batch_size``) num_splits / BLOCK_N /
    num_warps / num_stages for decode-only batches."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = meta.seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert q.stride(2) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    is_fp8_kv = k_cache.dtype == FP8_DTYPE
    assert k_cache.dtype == v_cache.dtype in (q.dtype, FP8_DTYPE)
    assert not is_fp8_kv or (kv_scale is not None and kv_scale.dtype == torch.float32 and kv_scale.numel() == 2)
    assert is_fp8_kv or not fp8_context, "FP8 context attention reads an FP8 KV cache"
    is_fp8_dot = fp8_context and not meta.is_decode_only
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.is_decode_only:
        config = decode_config(decode, num_seqs, num_kv_heads, q.device)
        num_splits, block_q, block_g = config["num_splits"], 1, max(16, next_power_of_2(group))
        num_q_tiles = 1
    else:
        config = context or DEFAULT_CONTEXT_CONFIG
        block_g = next_power_of_2(group)
        num_splits, block_q = 1, max(1, config["BLOCK_M"] // block_g)
        num_q_tiles = -(-max(meta.query_lens_host) // block_q)
    is_split = num_splits > 1
    if is_split:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        counts = split_counts(q.device, num_seqs * num_kv_heads)
    else:
        partial_out = partial_lse = counts = out  # not read without IS_SPLIT
    _paged_attention_kernel[(num_q_tiles, num_kv_heads, num_seqs * num_splits)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables, meta.block_tables.stride(0), meta.seq_lens, meta.query_start_loc,
        out, out.stride(0), out.stride(1), partial_out, partial_lse, counts, kv_scale if is_fp8_kv else out,
        scale * math.log2(math.e), meta.sliding_window or (1 << 30), num_splits,
        GROUP=group, HEAD_DIM=head_dim, KV_BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q, BLOCK_G=block_g,
        # tl.dot needs K >= 16 (32 for e4m3 operands): small heads (stories260K's 8) are padded, masked by
        # HEAD_DIM, and so are FP8 dots' key tiles.
        BLOCK_N=max(MIN_FP8_DOT_K, config["BLOCK_N"]) if is_fp8_dot else config["BLOCK_N"],
        BLOCK_D=max(MIN_FP8_DOT_K if is_fp8_dot else 16, next_power_of_2(head_dim)),
        BLOCK_H=next_power_of_2(group), MERGE_CHUNK=min(next_power_of_2(num_splits),
                                                        max(1, MAX_MERGE_PAIRS // next_power_of_2(group))),
        MIN_SPLIT_KEYS=MIN_SPLIT_KEYS, IS_SPLIT=is_split, IS_FP8_KV=is_fp8_kv, IS_FP8_DOT=is_fp8_dot,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **FP8_CONSTEXPRS,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **pdl_launch(q.device))
    return out
