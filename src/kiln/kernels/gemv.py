"""The GEMV: a few rows (batch-1 and small-batch decode) times a weight read once, with wide loads, its
values converted in registers, the sums in float32 by one program per column block (no split-K
reduction kernel). The FP8 linear layer runs it for its e4m3 weights up to MAX_GEMV_ROWS rows
(``kiln.kernels.fp8.fp8_gemv``). Unquantized weights (the engine dtype's: 16- or 32-bit) run it where the
build timed it faster than cuBLAS for that shape (``dense_linear_triton``, the kernel op ``dense_linear``,
whose plan config lists the shapes); elsewhere they stay in cuBLAS (``dense_linear_ref``: F.linear).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.kernels.rotary import KvWrite, cache_slot_offset, cache_value, qkv_rotary_kv_write_ref
from kiln.kernels.triton_jit import jit, pdl_launch, tl, wait_for_producer
from kiln.quantization.fp8 import FP8_DTYPE, FP8_MAX


@jit
def _gemv_step(w, x_ptrs, k_mask):
    """A [BLOCK_N, BLOCK_K] weight tile times x's BLOCK_K inputs at x_ptrs, summed along K per column, and
    the inputs' squares (their part of the row's RMS, for NORM)."""
    x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
    return tl.sum(w.to(tl.float32) * x[None, :], axis=1), x * x


@jit
def silu_mul_values(gate, up):
    """silu(gate) * up in up's dtype, rounded as F.silu(gate) * up rounds (silu rounded to up's dtype before
    the product): gate float32 (of a value in up's dtype), up in its dtype. The SiLU·up kernels' arithmetic,
    and the GEMV's with SILU_MUL."""
    silu = (gate * tl.sigmoid(gate)).to(up.dtype).to(tl.float32)
    return (silu * up.to(tl.float32)).to(up.dtype)


@jit
def _rotate_and_write(out, out_rows, cols, col_mask, num_rows, q_ptr, q_row_stride, first_col, head_offset,
                      positions_ptr, cos_sin_ptr, cos_sin_row_stride, slot_mapping_ptr, k_cache_ptr, v_cache_ptr,
                      cache_block_stride, cache_slot_stride, kv_block_size, kv_scale_ptr, Q_SIZE: tl.constexpr,
                      KV_SIZE: tl.constexpr, ROTARY_DIM: tl.constexpr, IS_FP8_CACHE: tl.constexpr,
                      FP8_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KV_WRITE's epilogue (_gemv_kernel) for one program's products ``out`` [BLOCK_M, BLOCK_N], rounded to
    the dtype, whose columns ``cols`` hold rotary pairs side by side: rotary_kv_write_ref's arithmetic on
    them (its rotation in float32 of the rounded values; a pair from ROTARY_DIM / 2 on, or in v, is not
    rotated), then q to q_ptr, k and v to their cache slot."""
    row_mask = out_rows < num_rows
    first, second = tl.split(tl.reshape(out, [BLOCK_M, BLOCK_N // 2, 2]))
    pairs = head_offset // 2 + tl.arange(0, BLOCK_N // 2)
    is_rotated = row_mask[:, None] & (pairs < tl.where(first_col < Q_SIZE + KV_SIZE, ROTARY_DIM // 2, 0))[None, :]
    positions = tl.load(positions_ptr + out_rows, mask=row_mask, other=0)
    cos_ptrs = cos_sin_ptr + positions.to(tl.int64)[:, None] * cos_sin_row_stride + pairs[None, :]
    cos = tl.load(cos_ptrs, mask=is_rotated, other=1.0)
    sin = tl.load(cos_ptrs + ROTARY_DIM // 2, mask=is_rotated, other=0.0)
    x1, x2 = first.to(tl.float32), second.to(tl.float32)
    rotated = tl.reshape(tl.join(tl.where(is_rotated, x1 * cos - x2 * sin, x1),
                                 tl.where(is_rotated, x2 * cos + x1 * sin, x2)), [BLOCK_M, BLOCK_N])
    if first_col < Q_SIZE:
        tl.store(q_ptr + out_rows.to(tl.int64)[:, None] * q_row_stride + cols[None, :], rotated.to(out.dtype),
                 mask=row_mask[:, None] & col_mask[None, :])
    else:
        slots = tl.load(slot_mapping_ptr + out_rows, mask=row_mask, other=-1).to(tl.int64)
        slot_offsets = cache_slot_offset(slots, kv_block_size, cache_block_stride, cache_slot_stride)
        is_key = first_col < Q_SIZE + KV_SIZE
        cache_ptr = k_cache_ptr
        dims = cols - Q_SIZE
        scale = 1.0
        if IS_FP8_CACHE:
            scale = tl.load(kv_scale_ptr + (1 - is_key.to(tl.int32)))
        if not is_key:
            cache_ptr = v_cache_ptr
            dims -= KV_SIZE
        tl.store(cache_ptr + slot_offsets[:, None] + dims[None, :],
                 cache_value(rotated, scale, out.dtype, IS_FP8_CACHE, FP8_MAX),
                 mask=(row_mask & (slots >= 0))[:, None] & col_mask[None, :])


@jit(do_not_specialize=["num_rows"],
     do_not_specialize_on_alignment=["positions_ptr", "slot_mapping_ptr"])  # views of the runtime's buffers
def _gemv_kernel(x_ptr, x_row_stride, w_ptr, w_row_stride, w_scale_ptr, w_scale_stride, bias_ptr, out_ptr,
                 out_row_stride, num_rows, N, K, eps, positions_ptr, cos_sin_ptr, cos_sin_row_stride, slot_mapping_ptr,
                 k_cache_ptr, v_cache_ptr, cache_block_stride, cache_slot_stride, kv_block_size, kv_scale_ptr,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                 SILU_MUL: tl.constexpr, KV_WRITE: tl.constexpr, Q_SIZE: tl.constexpr, KV_SIZE: tl.constexpr,
                 HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, IS_INTERLEAVED: tl.constexpr,
                 IS_FP8_CACHE: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (column block, row block): out[rows, cols] = x[rows] @ (w[cols] * w_scale[cols]).T + bias
    (no scale without HAS_SCALE), summed in float32 over all of K by this program alone (no split-K, no
    second kernel). Weights are read [BLOCK_N, BLOCK_K] at a time along their contiguous K, converted
    from their dtype (e4m3, or the activations' own) to the activations' dtype (exact: e4m3 fits in
    bfloat16 / float16) and scaled once per column in the epilogue.
    BLOCK_M == 1: products on the CUDA cores, summed along K every step into one float per column;
    BLOCK_M >= 16: tl.dot. With PDL (wait_for_producer) BLOCK_M == 1 reads its first weight tile before
    waiting for the kernel that writes x: those bytes stream in while that kernel ends.
    NORM (BLOCK_M == 1): x is an RMSNorm's input whose weight is folded into w already (the RMSNorm's
    consumer, prepared at load: kiln.layers.norm), so the product is (x @ w.T) * rsqrt(mean(x^2) + eps):
    the squares are summed beside the products in the one pass over x that the GEMV makes anyway, and no
    norm kernel runs. ADD_RESIDUAL: out is the residual, and the product, rounded to its dtype as a plain
    GEMV stores it, is added to it in place (rounded as add_rms_norm adds): no add kernel after it.
    SILU_MUL: w is a fused gate / up projection (gate's N / 2 rows, then up's) and out [rows, N / 2] is
    silu(gate) * up of the products, rounded as a plain GEMV stores them and as silu_mul computes (bit for
    bit the GEMV then SiLU·up's kernel): a program takes BLOCK_N / 2 columns of each, interleaved, so its
    epilogue has each pair at hand, and no SiLU·up kernel runs.
    KV_WRITE: w is a fused QKV projection (Q_SIZE columns of q, KV_SIZE of k, KV_SIZE of v; heads of
    HEAD_DIM), and the epilogue does rotary_kv_write's work: it rotates q and k by each row's position
    (cos_sin: rope_cos_sin's table, ROTARY_DIM wide) and writes k and v into the paged cache at the row's
    slot (quantized with kv_scale for an FP8 cache; a negative slot writes nothing), q into out [rows,
    Q_SIZE]. A program takes BLOCK_N columns of one head (BLOCK_N divides HEAD_DIM, and ROTARY_DIM where
    the halves are rotated): rotated pairs side by side (dims j and j + ROTARY_DIM / 2, taken as SILU_MUL
    takes gate and up; interleaved, 2j and 2j + 1 are so already), so that no rotary kernel runs."""
    if SILU_MUL:  # weight rows: pair j's gate, then its up, for the program's BLOCK_N / 2 pairs
        half = tl.arange(0, BLOCK_N) // 2
        pairs = tl.program_id(0) * (BLOCK_N // 2) + half
        cols = pairs + (tl.arange(0, BLOCK_N) % 2) * (N // 2)
        col_mask = pairs < N // 2
    elif KV_WRITE:  # the program's columns: BLOCK_N of one head, from head_dim head_offset on
        first_col = tl.program_id(0) * BLOCK_N
        head_offset = first_col % HEAD_DIM
        cols = first_col + tl.arange(0, BLOCK_N)
        if not IS_INTERLEAVED:
            if (first_col < Q_SIZE + KV_SIZE) & (head_offset < ROTARY_DIM):
                # BLOCK_N / 2 pairs from pair head_offset / 2 on, each pair's two dims side by side
                cols = (first_col - head_offset + head_offset // 2 + tl.arange(0, BLOCK_N) // 2
                        + (tl.arange(0, BLOCK_N) % 2) * (ROTARY_DIM // 2))
        col_mask = cols < N
    else:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
    row0 = tl.program_id(1) * BLOCK_M
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * w_row_stride + ks[None, :]
    if BLOCK_M == 1:
        x_ptrs = x_ptr + row0.to(tl.int64) * x_row_stride + ks
        w = tl.load(w_ptrs, mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)
        wait_for_producer(PDL)
        acc, squares = _gemv_step(w, x_ptrs, ks < K)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k_mask = ks < K - k0
            w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            step, step_squares = _gemv_step(w, x_ptrs + k0, k_mask)
            acc += step
            if NORM:
                squares += step_squares
        if NORM:
            acc = acc * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        out = acc[None, :]
    else:
        wait_for_producer(PDL)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride + ks[None, :]
        out = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = ks < K - k0
            w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            # e4m3 -> float32 -> x's dtype: Triton 3.6 converts e4m3 -> bfloat16 through a float16 ->
            # bfloat16 cvt that only sm90 has (ptxas refuses it for Ada); the detour is exact too.
            out = tl.dot(x, tl.trans(w.to(tl.float32).to(x.dtype)), out, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    if HAS_SCALE:
        out = out * tl.load(w_scale_ptr + cols * w_scale_stride, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_rows = row0 + tl.arange(0, BLOCK_M)
    out = out.to(out_ptr.dtype.element_ty)
    if SILU_MUL:
        gate, up = tl.split(tl.reshape(out, [BLOCK_M, BLOCK_N // 2, 2]))
        out = silu_mul_values(gate.to(tl.float32), up)
        cols = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        col_mask = cols < N // 2
    if KV_WRITE:
        _rotate_and_write(out, out_rows, cols, col_mask, num_rows, out_ptr, out_row_stride, first_col, head_offset,
                          positions_ptr, cos_sin_ptr, cos_sin_row_stride, slot_mapping_ptr, k_cache_ptr, v_cache_ptr,
                          cache_block_stride, cache_slot_stride, kv_block_size, kv_scale_ptr, Q_SIZE, KV_SIZE,
                          ROTARY_DIM, IS_FP8_CACHE, FP8_MAX, BLOCK_M, BLOCK_N)
        return
    out_ptrs = out_ptr + out_rows.to(tl.int64)[:, None] * out_row_stride + cols[None, :]
    out_mask = (out_rows < num_rows)[:, None] & col_mask[None, :]
    if ADD_RESIDUAL:  # out_ptr is the residual: each program reads and writes its own columns alone
        out = (out.to(tl.float32) + tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)).to(out.dtype)
    tl.store(out_ptrs, out, mask=out_mask)


# Launch configs before tuning, by BLOCK_M, measured with e4m3 weights (a dense weight takes the GEMV only
# with a config the build timed for its shape: dense_linear_triton). BLOCK_M 1: the best of
# scripts/sweep_gemv.py (H200,
# 2026-12-03, --only-options as of fa771fc; Triton 3.6, torch 2.11, bfloat16 x, each kernel replayed
# from a CUDA graph over >= 400 MB of weight copies; docs/results/h200/sweep_gemv_options.json), at the
# Llama-3-8B shapes qkv / o / gate_up / down, us: BLOCK_N 4, BLOCK_K 2048, 4 warps 9.6 / 6.8 / 30.7 /
# 17.3, 64.4 for the four (copy 4.27 TB/s; dense bf16 through cuBLAS 123.0), against 68.7 for the
# default before (BLOCK_K 1024: 10.0 / 6.9 / 34.4 / 17.3); BLOCK_K 4096 67.3, with 8 warps 71.9. Each
# step's products are summed along K into one float per column: 61 registers per thread at BLOCK_K
# 2048 (ptxas of Triton 3.9 for sm90a, bfloat16 x, 4 warps), where the [BLOCK_N, BLOCK_K] float32 tile
# the kernel kept before, summed once at the end, took 115 and 77.5 us for the four (2026-12-02). That
# tile was 1.6% faster only at BLOCK_K 1024 (68.7 against 69.8; 73 registers against 48), so it is gone.
# Loading the next step's tile by hand before this step's arithmetic was 26-80% slower per layer
# wherever tried (docs/benchmarks.md, "H200: 2026-12-03"). ncu at gate_up with the BLOCK_K 1024 tile
# (2026-12-02): DRAM 70%, issue slots 55%, half the stalls wait on loads (46% occupancy); num_stages
# changes nothing (Triton pipelines only loads that feed a tl.dot). BLOCK_M 16, a [16, 512] tile
# pipelined 3 deep through shared memory (48 KB, 80 registers), is not measured yet.
DEFAULT_GEMV_CONFIGS: dict[int, dict[str, int]] = {
    1: {"BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1},
    16: {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3},
}
GEMV_CANDIDATES: list[dict[str, int]] = (
    [{"BLOCK_M": 1, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": 1}
     for n, k, w in ((4, 1024, 4), (4, 2048, 4), (4, 4096, 4), (8, 1024, 4), (8, 2048, 8), (16, 1024, 8))]
    + [{"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": st}
       for n, k, w, st in ((16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 256, 4, 3))])


# Rows the GEMV takes in one row block (BLOCK_M 16: tl.dot's smallest tile); more rows are more blocks,
# each reading the whole weight again.
MAX_GEMV_ROWS = 16


def gemv_block_m(num_rows: int) -> int:
    """The row block the GEMV takes ``num_rows`` rows in: 1 (CUDA cores) for one row, else MAX_GEMV_ROWS."""
    return 1 if num_rows == 1 else MAX_GEMV_ROWS


def default_gemv_config(num_rows: int) -> dict[str, int]:
    block_m = gemv_block_m(num_rows)
    return {"BLOCK_M": block_m, **DEFAULT_GEMV_CONFIGS[block_m]}


def gemv(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         rms_eps: float | None = None, residual: torch.Tensor | None = None, silu_mul: bool = False,
         kv_write: KvWrite | None = None, **config: Any) -> torch.Tensor:
    """x [..., K] (16- or 32-bit) times w [N, K] (e4m3, or x's dtype), times ``w_scale`` ([N, 1] or 0-d
    float32; None: none), plus ``bias``. ``rms_eps`` (one row): x is an RMSNorm's input, whose weight w
    holds already: the product of its normalized row (see _gemv_kernel's NORM). ``residual`` [..., N]: the
    product is added to it in place and it is returned. ``silu_mul``: w is a fused gate / up projection
    and the output [..., N / 2] is silu(gate) * up (SILU_MUL). ``kv_write``: w is a fused QKV projection
    whose k and v go to the cache, rotated as rotary_kv_write does, and the output [..., q_size] is rotated
    q (KV_WRITE; where kv_write_fits). ``config``: BLOCK_M (1, or a power of two >= 16), BLOCK_N, BLOCK_K,
    num_warps, num_stages; default_gemv_config(rows) for what is not given."""
    num_cols, n = x.shape[-1], w.shape[0]
    rows = x.reshape(-1, num_cols)
    assert rows.stride(-1) == 1 and w.stride(-1) == 1 and w.shape[1] == num_cols
    config = {**default_gemv_config(rows.shape[0]), **config}
    block_m, block_n = config.pop("BLOCK_M"), config["BLOCK_N"]
    assert block_m == 1 or block_m >= 16, "tl.dot needs BLOCK_M >= 16"
    assert rms_eps is None or (rows.shape[0] == 1 and block_m == 1), "the RMSNorm folds into one-row GEMVs only"
    assert not silu_mul or (n % 2 == 0 and block_n % 2 == 0 and residual is None)
    assert kv_write is None or (kv_write_fits(block_n, kv_write) and not silu_mul and residual is None)
    num_out = n // 2 if silu_mul else n - 2 * kv_write.kv_size if kv_write is not None else n
    if residual is None:
        out = torch.empty(*x.shape[:-1], num_out, dtype=x.dtype, device=x.device)
    else:
        assert residual.shape == (*x.shape[:-1], n) and residual.dtype == x.dtype and residual.is_contiguous()
        out = residual
    if rows.shape[0] == 0:
        return out
    write = kv_write_arguments(kv_write, rows, w)
    grid = (-(-n // block_n), -(-rows.shape[0] // block_m))  # SILU_MUL: BLOCK_N / 2 pairs, so BLOCK_N columns
    _gemv_kernel[grid](
        rows, rows.stride(0), w, w.stride(0), w_scale if w_scale is not None else w,
        0 if w_scale is None or w_scale.numel() == 1 else 1, bias if bias is not None else w, out.view(-1, num_out),
        num_out, rows.shape[0], n, num_cols, rms_eps or 0.0, *write["pointers"], HAS_SCALE=w_scale is not None,
        HAS_BIAS=bias is not None, NORM=rms_eps is not None, ADD_RESIDUAL=residual is not None, SILU_MUL=silu_mul,
        **write["constants"], BLOCK_M=block_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **config, **pdl_launch(x.device))
    return out


def kv_write_fits(block_n: int, write: KvWrite) -> bool:
    """Whether the GEMV's KV_WRITE takes a fused QKV projection whose cache and table ``write`` holds with
    column blocks of ``block_n``: a block within one head, and within the rotated dims or past them where
    the halves are rotated."""
    head_dim, rotary_dim = write.k_cache.shape[3], write.cos_sin_cache.shape[1]
    return (block_n % 2 == 0 and head_dim % block_n == 0 and (write.is_interleaved or rotary_dim % block_n == 0)
            and write.k_cache.stride(3) == 1 and write.k_cache.stride(2) == head_dim
            and write.k_cache.stride() == write.v_cache.stride())


# _gemv_kernel's KV_WRITE constants where it writes no cache.
NO_KV_WRITE = {"KV_WRITE": False, "Q_SIZE": 0, "KV_SIZE": 0, "HEAD_DIM": 1, "ROTARY_DIM": 0, "IS_INTERLEAVED": False,
               "IS_FP8_CACHE": False, "FP8_MAX": FP8_MAX}


def kv_write_arguments(write: KvWrite | None, rows: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    """_gemv_kernel's KV_WRITE arguments for ``rows`` (the GEMV's input): its pointers (placeholders without
    ``write``: not read) and constants."""
    if write is None:
        return {"pointers": (w, w, 0, w, w, w, 0, 0, 1, w), "constants": NO_KV_WRITE}
    k_cache = write.k_cache
    assert write.positions.shape[0] >= rows.shape[0] and write.slot_mapping.shape[0] >= rows.shape[0]
    assert write.cos_sin_cache.stride(1) == 1 and k_cache.dtype in (rows.dtype, FP8_DTYPE)
    is_fp8 = k_cache.dtype == FP8_DTYPE
    assert not is_fp8 or (write.kv_scale is not None and write.kv_scale.dtype == torch.float32)
    return {"pointers": (write.positions, write.cos_sin_cache, write.cos_sin_cache.stride(0), write.slot_mapping,
                         k_cache, write.v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.shape[1],
                         write.kv_scale if is_fp8 else write.positions),
            "constants": {"KV_WRITE": True, "Q_SIZE": w.shape[0] - 2 * write.kv_size, "KV_SIZE": write.kv_size,
                          "HEAD_DIM": k_cache.shape[3], "ROTARY_DIM": write.cos_sin_cache.shape[1],
                          "IS_INTERLEAVED": write.is_interleaved, "IS_FP8_CACHE": is_fp8, "FP8_MAX": FP8_MAX}}


def gemv_bucket(num_rows: int) -> str:
    """The plan's key for a row count the GEMV may take (up to MAX_GEMV_ROWS): its row block, "1" or "16"."""
    return str(gemv_block_m(num_rows))


def shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def dense_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     residual: torch.Tensor | None = None, silu_mul: bool = False,
                     kv_write: KvWrite | None = None) -> torch.Tensor:
    """A dense Linear's matmul: F.linear (cuBLAS on the GPU). With ``residual``: the product added to it in
    place (rounded as add_rms_norm adds), which is returned. With ``silu_mul`` (a fused gate / up
    projection): silu_mul_ref of the product. With ``kv_write`` (a fused QKV projection): k and v written
    to the cache and rotated q returned, as qkv_rotary_kv_write_ref does."""
    y = F.linear(x, weight, bias)
    if silu_mul:
        assert residual is None, "a gate / up projection's output goes to down, not to the residual"
        from kiln.kernels.activation import silu_mul_ref  # activation -> norm -> gemv: imported when called

        return silu_mul_ref(y)
    if kv_write is not None:
        return qkv_rotary_kv_write_ref(y, kv_write)
    return y if residual is None else residual.add_(y)


def gemv_config(shapes: dict[str, dict[str, dict[str, int]]] | None, weight_shape: tuple[int, ...],
                num_rows: int) -> dict[str, int] | None:
    """The GEMV's config the plan's ``shapes`` (dense_linear's or fp8_linear's) give this weight at ``num_rows``
    rows (None: none, so cuBLAS for dense_linear, the GEMV's default for fp8_linear)."""
    if not shapes or not 0 < num_rows <= MAX_GEMV_ROWS:
        return None
    return shapes.get(shape_key(*weight_shape), {}).get(gemv_bucket(num_rows))


def dense_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor | None = None, silu_mul: bool = False,
                        kv_write: KvWrite | None = None,
                        shapes: dict[str, dict[str, dict[str, int]]] | None = None) -> torch.Tensor:
    """As dense_linear_ref; the GEMV for up to MAX_GEMV_ROWS rows where ``shapes`` (the kernel plan's,
    made by the build's timing) holds a config for this weight's shape and the rows' bucket (gemv_bucket),
    adding to ``residual``, taking SiLU·up or writing the KV cache in its epilogue; cuBLAS elsewhere. A
    function of shapes alone: a CUDA graph replays the choice it captured."""
    config = gemv_config(shapes, weight.shape, x.numel() // x.shape[-1])
    if config is not None:
        return gemv(x, weight, None, bias, residual=residual, silu_mul=silu_mul, kv_write=kv_write, **config)
    return dense_linear_ref(x, weight, bias, residual, silu_mul, kv_write)
