"""Weight-only quantized matmuls, y = x @ dequant(W).T: W8A16 and W4A16 over kiln's layouts
(``kiln.quantization.weight_only`` describes them), the weights dequantized in registers.

Three Triton kernels, chosen by the launch config's BLOCK_M and the bits:

* GEMVs (BLOCK_M = 1: batch-1 decode): a program per (tile of BLOCK_N output channels, row of x) loops
  over all of K (no split-K, so no reduction kernel and no partial buffers), reading its channels'
  weights contiguously along K in 16-byte vector loads, and accumulates products on CUDA cores; one
  for INT8 (``_int8_gemv_kernel``), one for INT4 (``_int4_gemv_kernel``).
* Tensor cores (BLOCK_M >= 16): out.T = dequant(W) @ x.T in BLOCK_N x BLOCK_M tiles, the weights as
  tl.dot's left operand (which may come from registers; BLOCK_N >= 64 fills the instruction's 64 rows
  when a batch has few). With one row tile (BLOCK_M >= rows: 2-16 rows at BLOCK_M = 16) this is the
  GEMV shape on tensor cores, each program owning output channels over all of K; larger batches get
  GROUP_M-grouped tiles, so row tiles share each weight tile while it is in L2.

A run of inputs that shares one group (16 for INT4: one nibble of a block's 16 words; GROUP_K for
INT8) is the unit: its scale and zero point are loaded once per tile, not per weight. Integers become
floats without a conversion instruction (quarter rate): OR-ing q into the mantissa of 2**23 gives the
float 2**23 + q, and subtracting 2**23 + z gives q - z exactly (INT8 the same way, from 2**23 + 128 +
q). The INT4 GEMV, bound by integer instructions, goes further: q shifted into the top of 1.0's
mantissa is the float 1 + q / 16 (a shift and one mask-and-OR per weight), multiplied into the sum
as it is, and the group's scale, zero point and the sum of its inputs correct the sum once per group.

Above a row count (the launch config's ``dequantize`` bucket: DEQUANT_MIN_ROWS rows by default) a
batch is compute-bound and the tensor-core kernel, which dequantizes every weight tile once per row
tile, falls far behind cuBLAS: on the H200 at 256 rows, gate_up (28672 x 4096) took 315 us (INT4) and
168 us (INT8) against dense bf16's 101 us. There the weight is dequantized once, whole, into a scratch
[N, K] in x's dtype (``dequantize_weight_triton``: reading the packed bytes and writing 2 bytes per
weight, ~75 us for INT4 gate_up at 4 TB/s) and multiplied by cuBLAS at the dense rate (``F.linear``).

``*_ref``: dequantize in float32, matmul in float32, round to x's dtype: the CPU path and the oracle.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from kiln.kernels.gemv import shape_key
from kiln.kernels.triton_jit import jit, pdl_launch, tl, wait_for_producer
from kiln.quantization.weight_only import dequantize_int4, dequantize_int8, padded_in_features


def w8a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None = None, group_size: int | None = None,
                     input_order: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(qweight int8 [N, K]).T -> [..., N] in x's dtype."""
    weight = dequantize_int8(qweight, scales, zeros, group_size, input_order)
    return (x.float() @ weight.T).to(x.dtype)


def w4a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, input_order: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(qweight int32 [N, Kp / 8]).T -> [..., N] in x's dtype."""
    weight = dequantize_int4(qweight, scales, zeros, group_size, x.shape[-1], input_order)
    return (x.float() @ weight.T).to(x.dtype)


# Float bit patterns of 2**23 and of 2**23 + 128: a small integer added to them lands in the mantissa,
# so a bitcast and one subtraction turn it into a float without a conversion instruction.
MAGIC_2_POW_23 = tl.constexpr(0x4B000000) if tl is not None else 0x4B000000
MAGIC_2_POW_23_PLUS_128 = tl.constexpr(0x4B000080) if tl is not None else 0x4B000080
INT4_BLOCK = tl.constexpr(128) if tl is not None else 128  # inputs per block of 16 words
INT4_RUN = tl.constexpr(16) if tl is not None else 16  # inputs per nibble run, one group's


@jit
def _dequantize(w_bits, offset, run_starts, meta_offsets, col_mask, num_inputs, scales_ptr, zeros_ptr,
                GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Runs of weights -> (q - z) * s in float32. ``w_bits`` [BLOCK_N, R, L] are q as 2**23 + ``offset``
    + q float bit patterns; run r starts at input ``run_starts`` [R] and lies in one group, whose scale
    and zero point sit at ``meta_offsets`` + group ([BLOCK_N, 1] + [R]). Without groups, q alone (the
    per-channel scale is applied to the accumulator)."""
    if GROUP_SIZE > 0:
        meta = meta_offsets + (run_starts // GROUP_SIZE)[None, :]
        meta_mask = col_mask[:, None] & (run_starts < num_inputs)[None, :]
        scale = tl.load(scales_ptr + meta, mask=meta_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            offset = offset + tl.load(zeros_ptr + meta, mask=meta_mask, other=0).to(tl.float32)[:, :, None]
        return (w_bits.to(tl.float32, bitcast=True) - offset) * scale[:, :, None]
    return w_bits.to(tl.float32, bitcast=True) - offset


@jit
def _int8_step(q, x_row, input_order_ptr, k_start, runs, lanes, meta_offsets, col_mask, num_inputs, scales_ptr,
               zeros_ptr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_INPUT_ORDER: tl.constexpr,
               RUN_K: tl.constexpr):
    """One step of _int8_gemv_kernel: the int8 tile q [BLOCK_N, TILE_RUNS, RUN_K] from input k_start on,
    dequantized, times x, summed per channel."""
    run_starts = k_start + runs * RUN_K
    ks = run_starts[:, None] + lanes[None, :]
    w = _dequantize(q.to(tl.int32) + MAGIC_2_POW_23_PLUS_128, 8388736.0, run_starts, meta_offsets, col_mask,
                    num_inputs, scales_ptr, zeros_ptr, GROUP_SIZE, HAS_ZEROS)
    x = _load_inputs(x_row, True, input_order_ptr, ks, num_inputs, HAS_INPUT_ORDER)
    return tl.sum(tl.sum(x.to(tl.float32)[None, :, :] * w, axis=2), axis=1)


@jit(do_not_specialize=["num_rows"])
def _int8_gemv_kernel(
        x_ptr, x_row_stride, input_order_ptr, w_ptr, w_row_stride, scales_ptr, scales_row_stride, zeros_ptr,
        out_ptr, out_row_stride, num_rows, num_cols, num_inputs,
        GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_INPUT_ORDER: tl.constexpr,
        BLOCK_N: tl.constexpr, TILE_RUNS: tl.constexpr, RUN_K: tl.constexpr, PDL: tl.constexpr):
    """Program (output channel tile, row of x): one row against BLOCK_N channels over all of K, in steps
    of TILE_RUNS runs of RUN_K inputs; products on CUDA cores, summed along K every step into one float
    per channel. With PDL (wait_for_producer) the first step's weights are read before waiting for the
    kernel that writes x."""
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < num_cols
    cols_64 = cols.to(tl.int64)
    w_rows = w_ptr + cols_64[:, None, None] * w_row_stride
    meta_offsets = cols_64[:, None] * scales_row_stride
    runs = tl.arange(0, TILE_RUNS)
    lanes = tl.arange(0, RUN_K)
    x_row = x_ptr + row * x_row_stride
    ks = runs[:, None] * RUN_K + lanes[None, :]
    q = tl.load(w_rows + ks[None, :, :], mask=col_mask[:, None, None] & (ks < num_inputs)[None, :, :], other=0)
    wait_for_producer(PDL)
    out = _int8_step(q, x_row, input_order_ptr, 0, runs, lanes, meta_offsets, col_mask, num_inputs, scales_ptr,
                     zeros_ptr, GROUP_SIZE, HAS_ZEROS, HAS_INPUT_ORDER, RUN_K)
    for k_start in range(TILE_RUNS * RUN_K, num_inputs, TILE_RUNS * RUN_K):
        ks = k_start + runs[:, None] * RUN_K + lanes[None, :]
        q = tl.load(w_rows + ks[None, :, :], mask=col_mask[:, None, None] & (ks < num_inputs)[None, :, :], other=0)
        out += _int8_step(q, x_row, input_order_ptr, k_start, runs, lanes, meta_offsets, col_mask, num_inputs,
                          scales_ptr, zeros_ptr, GROUP_SIZE, HAS_ZEROS, HAS_INPUT_ORDER, RUN_K)
    if GROUP_SIZE == 0:
        out *= tl.load(scales_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


# 1.0's bits, passed to the INT4 kernels as a run-time argument (``one_bits``) rather than written in them:
# ptxas then reads it from the constant bank and keeps the mask as the mask-and-OR's immediate. With both
# constants in the code it kept 1.0 as the immediate and rebuilt the mask in a register before nearly every
# nibble (a MOV each, ~10% of the GEMV's instructions in ptxas's SASS for sm90). The tensor-core kernel
# keeps the constant (ONE_BITS_CONSTANT): with the argument, int4_wo decode at batch 16 went from 1,607 to
# 1,289 tok/s on the H200 (docs/benchmarks.md, "H200: 2026-12-03, sixth session").
ONE_BITS = 0x3F800000
ONE_BITS_CONSTANT = tl.constexpr(ONE_BITS) if tl is not None else ONE_BITS


@jit
def _nibble_as_float(words, one_bits, NIBBLE: tl.constexpr):
    """Nibble NIBBLE of each word as the float 1 + q / 16, exactly: q shifted into bits 19-22 (the top of
    1.0's mantissa) by one shift and one mask-and-OR with ``one_bits`` (ONE_BITS)."""
    if NIBBLE < 5:
        bits = words << (19 - 4 * NIBBLE)
    else:
        bits = words >> (4 * NIBBLE - 19)
    return ((bits & 0x780000) | one_bits).to(tl.float32, bitcast=True)


@jit(do_not_specialize=["num_rows"])
def _int4_gemv_kernel(
        x_ptr, x_row_stride, input_order_ptr, w_ptr, w_row_stride, scales_ptr, scales_row_stride, zeros_ptr,
        out_ptr, out_row_stride, num_rows, num_cols, num_inputs, num_blocks, one_bits,
        GROUP_SIZE: tl.constexpr, HAS_INPUT_ORDER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
        EVEN: tl.constexpr, PDL: tl.constexpr):
    """Program (output channel tile, row of x): one row against BLOCK_N channels over all of K, BLOCKS
    blocks of 128 inputs per step. Each nibble becomes the float 1 + q / 16 with a shift and one mask-and-
    OR (q into bits 19-22 of 1.0's mantissa), so a weight costs two integer operations and one FMA:
    sum x (q - z) s = s (16 sum x (1 + q / 16) - (16 + z) sum x), the sums per group, corrected once
    per group and channel. EVEN: whole tiles of channels and blocks, no masks. With PDL
    (wait_for_producer) the first step's words are read before waiting for the kernel that writes x."""
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < num_cols
    cols_64 = cols.to(tl.int64)
    blocks = tl.arange(0, BLOCKS)
    lanes = tl.arange(0, INT4_RUN)
    GROUPS_PER_BLOCK: tl.constexpr = INT4_BLOCK // GROUP_SIZE
    w_ptrs = w_ptr + cols_64[:, None, None] * w_row_stride + (blocks[:, None] * INT4_RUN + lanes[None, :])[None, :, :]
    meta_offsets = cols_64[:, None] * scales_row_stride + blocks[None, :] * GROUPS_PER_BLOCK
    x_row = x_ptr + row * x_row_stride
    words = _int4_words(w_ptrs, col_mask, blocks < num_blocks, EVEN)
    wait_for_producer(PDL)
    out = _int4_step(words, one_bits, x_row, input_order_ptr, 0, blocks, lanes, meta_offsets, col_mask, num_blocks,
                     num_inputs, scales_ptr, zeros_ptr, GROUP_SIZE, HAS_INPUT_ORDER, BLOCKS, EVEN)
    for block0 in range(BLOCKS, num_blocks, BLOCKS):
        words = _int4_words(w_ptrs + block0 * INT4_RUN, col_mask, block0 + blocks < num_blocks, EVEN)
        out += _int4_step(words, one_bits, x_row, input_order_ptr, block0, blocks, lanes, meta_offsets, col_mask,
                          num_blocks, num_inputs, scales_ptr, zeros_ptr, GROUP_SIZE, HAS_INPUT_ORDER, BLOCKS, EVEN)
    tl.store(out_ptr + row * out_row_stride + cols, tl.sum(out, axis=1).to(out_ptr.dtype.element_ty), mask=col_mask)


@jit
def _int4_words(w_ptrs, col_mask, block_mask, EVEN: tl.constexpr):
    """A step's packed words [BLOCK_N, BLOCKS, INT4_RUN] at w_ptrs (masked unless EVEN)."""
    if EVEN:
        words = tl.load(w_ptrs)
    else:
        words = tl.load(w_ptrs, mask=col_mask[:, None, None] & block_mask[None, :, None], other=0)
    return words


@jit
def _int4_step(words, one_bits, x_row, input_order_ptr, block0, blocks, lanes, meta_offsets, col_mask, num_blocks,
               num_inputs, scales_ptr, zeros_ptr, GROUP_SIZE: tl.constexpr, HAS_INPUT_ORDER: tl.constexpr,
               BLOCKS: tl.constexpr, EVEN: tl.constexpr):
    """One step of _int4_gemv_kernel: BLOCKS blocks of packed words from block block0 on, times x,
    corrected per group: [BLOCK_N, BLOCKS] sums."""
    GROUPS_PER_BLOCK: tl.constexpr = INT4_BLOCK // GROUP_SIZE
    RUNS_PER_GROUP: tl.constexpr = GROUP_SIZE // INT4_RUN
    block_mask = block0 + blocks < num_blocks
    out = tl.zeros([words.shape[0], BLOCKS], dtype=tl.float32)
    for g in tl.static_range(GROUPS_PER_BLOCK):
        acc = tl.zeros([words.shape[0], BLOCKS, INT4_RUN], dtype=tl.float32)
        x_sum = tl.zeros([BLOCKS, INT4_RUN], dtype=tl.float32)
        for r in tl.static_range(RUNS_PER_GROUP):
            j = g * RUNS_PER_GROUP + r
            ks = (block0 + blocks)[:, None] * INT4_BLOCK + j * INT4_RUN + lanes[None, :]
            if EVEN and not HAS_INPUT_ORDER:
                x = tl.load(x_row + ks).to(tl.float32)
            else:
                x = _load_inputs(x_row, True, input_order_ptr, ks, num_inputs, HAS_INPUT_ORDER).to(tl.float32)
            acc += x[None, :, :] * _nibble_as_float(words, one_bits, j)
            x_sum += x
        meta = meta_offsets + block0 * GROUPS_PER_BLOCK + g
        if EVEN:
            scale = tl.load(scales_ptr + meta).to(tl.float32)
            zero = tl.load(zeros_ptr + meta).to(tl.float32)
        else:
            meta_mask = col_mask[:, None] & block_mask[None, :]
            scale = tl.load(scales_ptr + meta, mask=meta_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + meta, mask=meta_mask, other=0).to(tl.float32)
        out += scale * (16.0 * tl.sum(acc, axis=2) - (16.0 + zero) * tl.sum(x_sum, axis=1)[None, :])
    return out


@jit
def _load_inputs(x_rows, row_mask, input_order_ptr, ks, num_inputs, HAS_INPUT_ORDER: tl.constexpr):
    """x at rows ``x_rows`` and inputs ``ks`` (broadcast together), through the act-order permutation
    where there is one; 0 past K and in masked rows."""
    k_mask = ks < num_inputs
    if HAS_INPUT_ORDER:
        ks = tl.load(input_order_ptr + ks, mask=k_mask, other=0)
    return tl.load(x_rows + ks, mask=row_mask & k_mask, other=0.0)


@jit(do_not_specialize=["num_rows"])
def _weight_only_gemm_kernel(
        x_ptr, x_row_stride, input_order_ptr, w_ptr, w_row_stride, scales_ptr, scales_row_stride, zeros_ptr,
        out_ptr, out_row_stride, num_rows, num_cols, num_inputs,
        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_INPUT_ORDER: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program: a BLOCK_N x BLOCK_M tile of out.T = dequant(W) @ x.T, in GROUP_M-grouped order. INT8: each
    run of RUN_K inputs is dequantized to x's dtype and multiplied into the float32 accumulator by
    tl.dot. INT4: each run (16 inputs, one nibble of a block's 16 words) enters tl.dot as 1 + q / 16
    (exact in any float dtype), and each group's product is corrected once, as in the INT4 GEMV:
    s (16 W'x - (16 + z) sum x)."""
    wait_for_producer(PDL)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    pids_per_group = GROUP_M * tl.cdiv(num_cols, BLOCK_N)
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    rows = (first_pid_m + (pid % pids_per_group) % group_rows) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = ((pid % pids_per_group) // group_rows) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    col_mask = cols < num_cols
    cols_64 = cols.to(tl.int64)
    w_rows = w_ptr + cols_64[:, None, None] * w_row_stride
    meta_offsets = cols_64[:, None] * scales_row_stride
    x_rows = x_ptr + rows.to(tl.int64)[None, :] * x_row_stride
    lanes = tl.arange(0, RUN_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if BITS == 4:
        step = INT4_BLOCK
    else:
        step = RUN_K
    for k_start in range(0, num_inputs, step):
        if BITS == 4:
            packed = tl.load(w_rows + (k_start // 8 + lanes)[None, None, :], mask=col_mask[:, None, None], other=0)
            packed = tl.reshape(packed, [BLOCK_N, INT4_RUN])
            for g in tl.static_range(INT4_BLOCK // GROUP_SIZE):
                group_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                x_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
                for r in tl.static_range(GROUP_SIZE // INT4_RUN):
                    run_start = k_start + (g * (GROUP_SIZE // INT4_RUN) + r) * INT4_RUN
                    x_t = _load_inputs(x_rows, row_mask[None, :], input_order_ptr, (run_start + lanes)[:, None],
                                       num_inputs, HAS_INPUT_ORDER)
                    w = _nibble_as_float(packed, ONE_BITS_CONSTANT, g * (GROUP_SIZE // INT4_RUN) + r).to(x_t.dtype)
                    group_acc = tl.dot(w, x_t, group_acc, input_precision=DOT_PRECISION)
                    x_sum += tl.sum(x_t.to(tl.float32), axis=0)
                meta = cols_64 * scales_row_stride + (k_start // GROUP_SIZE + g)
                scale = tl.load(scales_ptr + meta, mask=col_mask, other=0.0).to(tl.float32)
                zero = tl.load(zeros_ptr + meta, mask=col_mask, other=0).to(tl.float32)
                acc += scale[:, None] * (16.0 * group_acc - (16.0 + zero)[:, None] * x_sum[None, :])
        else:
            ks = k_start + lanes
            q = tl.load(w_rows + ks[None, None, :], mask=col_mask[:, None, None] & (ks < num_inputs)[None, None, :],
                        other=0)
            w = _dequantize(q.to(tl.int32) + MAGIC_2_POW_23_PLUS_128, 8388736.0, tl.full([1], k_start, tl.int32),
                            meta_offsets, col_mask, num_inputs, scales_ptr, zeros_ptr, GROUP_SIZE, HAS_ZEROS)
            x_t = _load_inputs(x_rows, row_mask[None, :], input_order_ptr, ks[:, None], num_inputs, HAS_INPUT_ORDER)
            acc = tl.dot(tl.reshape(w, [BLOCK_N, RUN_K]).to(x_t.dtype), x_t, acc, input_precision=DOT_PRECISION)
    if GROUP_SIZE == 0:
        acc *= tl.load(scales_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[None, :] * out_row_stride + cols[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=col_mask[:, None] & row_mask[None, :])


@jit
def _dequantize_weight_kernel(
        w_ptr, w_row_stride, scales_ptr, scales_row_stride, zeros_ptr, out_ptr, out_row_stride, num_cols, num_inputs,
        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
        BLOCK_N: tl.constexpr, TILE_RUNS: tl.constexpr, RUN_K: tl.constexpr):
    """Program (tile of BLOCK_N output channels, tile of inputs): dequant(W) into out [N, K] in out's
    dtype, input rows in their stored order. INT4: TILE_RUNS blocks of 128 inputs, written one nibble
    at a time (each block's 16-input run, 32 contiguous bytes of a 16-bit out row); INT8: TILE_RUNS
    runs of RUN_K inputs. The same float32 arithmetic as the matmuls and the references, rounded once."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < num_cols
    cols_64 = cols.to(tl.int64)
    w_rows = w_ptr + cols_64[:, None, None] * w_row_stride
    out_rows = out_ptr + cols_64[:, None, None] * out_row_stride
    meta_offsets = cols_64[:, None] * scales_row_stride
    runs = tl.arange(0, TILE_RUNS)
    lanes = tl.arange(0, RUN_K)
    if BITS == 4:
        k_start = tl.program_id(1) * (TILE_RUNS * INT4_BLOCK)
        words = k_start // 8 + runs[:, None] * INT4_RUN + lanes[None, :]  # [blocks, 16]
        block_mask = (k_start + runs * INT4_BLOCK < num_inputs)[None, :, None]
        packed = tl.load(w_rows + words[None, :, :], mask=col_mask[:, None, None] & block_mask, other=0)
        for nibble in tl.static_range(8):
            run_starts = k_start + runs * INT4_BLOCK + nibble * INT4_RUN
            ks = run_starts[:, None] + lanes[None, :]
            w_bits = ((packed >> (4 * nibble)) & 0xF) | MAGIC_2_POW_23
            w = _dequantize(w_bits, 8388608.0, run_starts, meta_offsets, col_mask, num_inputs, scales_ptr, zeros_ptr,
                            GROUP_SIZE, HAS_ZEROS)
            tl.store(out_rows + ks[None, :, :], w.to(out_ptr.dtype.element_ty),
                     mask=col_mask[:, None, None] & (ks < num_inputs)[None, :, :])
    else:
        run_starts = tl.program_id(1) * (TILE_RUNS * RUN_K) + runs * RUN_K
        ks = run_starts[:, None] + lanes[None, :]
        mask = col_mask[:, None, None] & (ks < num_inputs)[None, :, :]
        q = tl.load(w_rows + ks[None, :, :], mask=mask, other=0)
        w = _dequantize(q.to(tl.int32) + MAGIC_2_POW_23_PLUS_128, 8388736.0, run_starts, meta_offsets, col_mask,
                        num_inputs, scales_ptr, zeros_ptr, GROUP_SIZE, HAS_ZEROS)
        if GROUP_SIZE == 0:
            w *= tl.load(scales_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None, None]
        tl.store(out_rows + ks[None, :, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# Launch configs before tuning, per bucket of rows: the first entry whose max_rows holds the batch is
# used (else the last). BLOCK_M 1 runs the CUDA-core GEMVs, BLOCK_M >= 16 the tensor-core kernel, and
# a bucket with "dequantize" dequantize-then-cuBLAS (its BLOCK_N / BLOCK_K / num_warps tile the
# dequantization kernel). BLOCK_K: inputs per loop step (INT4: whole blocks of 128 in the GEMV, one
# block per step on tensor cores; INT8: runs of at most the group size).
# 1 row: the best uniform config of scripts/sweep_gemv.py on an H200 (Triton 3.6, bf16 x, INT4 group
# 128, each kernel replayed from a CUDA graph over >= 400 MB of weight copies), at the Llama-3-8B shapes
# qkv / o / gate_up / down (N x K = 6144 x 4096, 4096 x 4096, 28672 x 4096, 4096 x 14336), in
# microseconds, against the copy bandwidth:
#   INT4 (2026-12-02, copy 4.25 TB/s): 10.3 / 8.1 / 34.6 / 21.5 (1.28 / 1.08 / 1.80 / 1.43 TB/s); the GEMV
#     before: 15.2 / 13.0 / 55.0 / 41.9. Timed again 2026-12-03: 11.2 / 8.4 / 36.6 / 20.9. With 1.0's bits
#     as an argument (ONE_BITS; 2026-12-03, sixth session, docs/results/h200/
#     probe_int4_one_bits_2026-12-03f.json), BLOCK_N 16, BLOCK_K 2048, 4 warps: 8.8 / 7.3 / 30.1 / 22.2,
#     68.4 in all, against 72.1 for the kernel before at its default (BLOCK_N 8: 8.7 / 8.3 / 34.2 / 20.9);
#     each shape's best of nine tiles 8.8 / 5.8 / 30.1 / 19.9 (64.6) against 8.7 / 6.1 / 33.5 / 20.9 (69.3)
#     before. The build's tuning picks per shape.
#   INT8 (H200, 2026-12-03, sweep_gemv.py --only-options as of fa771fc, torch 2.11, copy 4.27 TB/s,
#     docs/results/h200/sweep_gemv_options.json): BLOCK_N 4, BLOCK_K 2048, 4 warps 10.2 / 7.6 / 33.7 /
#     19.5, 71.0 in all; BLOCK_K 1024 (the default before) 10.8 / 7.4 / 37.3 / 18.8, 74.3; BLOCK_K 4096
#     74.5, with 8 warps 82.9
#   dense bf16 (cuBLAS, 2026-12-03): 16.1 / 12.6 / 62.9 / 31.4
# The INT8 GEMV sums each step's products along K into one float per channel: 48 registers per thread
# at BLOCK_K 2048 (ptxas of Triton 3.9 for sm90a, 4 warps), where the [BLOCK_N, BLOCK_K] float32 tile it
# kept before, summed once at the end, took 118 and 84.5 us in all (2026-12-02). That tile was 3% faster
# only at BLOCK_K 1024 (74.3 against 76.6; 71 registers against 47), so it is gone. Loading the next
# step's weights by hand before this step's arithmetic cost INT8 18-67% and INT4 9% per layer where
# tried (docs/benchmarks.md, "H200: 2026-12-03").
# The INT4 GEMV is bound by integer instructions (ncu: ALU pipe 59%, issue slots 67%, DRAM 35%), not
# by memory; INT8's, with the BLOCK_K 1024 tile, by latency (ncu: half the stalls wait on loads at 44%
# occupancy). num_stages changes nothing for either (the loads feed no tl.dot, so Triton does not
# pipeline them).
# More rows (measured 2026-12-02 with L2 flushed by the older timing, in microseconds, o / down / gate_up):
#   INT4  4 rows: 39.1 / - / 92.9;  INT8 4 rows: 26.7 / - / 67.8  (dense ~19 / - / 70)
#   INT4 256 rows: 61.2 / - / 315;  INT8 256 rows: 44.5 / - / 168  (dense 24 / - / 101)
# The 64-row bucket was not swept (its configs follow the 256-row ones).
#
# DEQUANT_MIN_ROWS: from this many rows, dequantize-then-cuBLAS. scripts/sweep_weight_only_prefill.py on
# an H200 (2026-12-02), the four Llama-3-8B shapes of one layer summed, Triton kernel vs dequantize +
# cuBLAS (dense bf16), in microseconds:
#   INT4: 32 rows 387 vs 401 (155); 64 rows 419 vs 355 (157); 128 rows 504 vs 366; 2048 rows 4371 vs 1413 (1287)
#   INT8: 64 rows 281 vs 327 (157); 128 rows 349 vs 340 (161); 256 rows 410 vs 374; 2048 rows 2452 vs 1431
# The dequantization tile: BLOCK_N 8, BLOCK_K 1024 was the fastest of four at every shape within a few
# percent (gate_up: INT4 105 us, 2.8 TB/s of packed reads and bf16 writes; INT8 96 us, 3.7 TB/s).
DEQUANT_MIN_ROWS = {4: 64, 8: 128}
DEQUANTIZE_CONFIG: dict[str, Any] = {"dequantize": True, "BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4}
TENSOR_CORE_CONFIGS: dict[int, list[dict[str, Any]]] = {  # the Triton kernels alone, at every batch size
    4: [{"max_rows": 1, "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1},
        {"max_rows": 16, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
        {"max_rows": 64, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
        {"max_rows": 1 << 30, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4,
         "num_stages": 3}],
    8: [{"max_rows": 1, "BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1},
        {"max_rows": 16, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
        {"max_rows": 64, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
        {"max_rows": 1 << 30, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
         "num_stages": 3}],
}


def dequantize_from(configs: list[dict[str, Any]], min_rows: int) -> list[dict[str, Any]]:
    """``configs`` (the Triton kernels' buckets) up to ``min_rows`` - 1 rows, dequantize-then-cuBLAS from
    ``min_rows`` rows on."""
    below = [c for c in configs if c["max_rows"] < min_rows - 1]
    last = next((c for c in configs if c["max_rows"] >= min_rows - 1), configs[-1])
    return below + [{**last, "max_rows": min_rows - 1}, {"max_rows": 1 << 30, **DEQUANTIZE_CONFIG}]


DEFAULT_CONFIGS = {bits: dequantize_from(TENSOR_CORE_CONFIGS[bits], DEQUANT_MIN_ROWS[bits]) for bits in (4, 8)}


def launch_config(configs: list[dict[str, Any]] | None, num_rows: int, bits: int) -> dict[str, Any]:
    """The config for a batch of ``num_rows``: the smallest bucket that holds it, else the largest."""
    configs = configs or DEFAULT_CONFIGS[bits]
    return next((c for c in configs if c["max_rows"] >= num_rows), configs[-1])


def dequantize_min_rows(configs: list[dict[str, Any]] | None, bits: int) -> int | None:
    """The fewest rows for which ``configs`` dequantize-then-cuBLAS, or None if no batch does."""
    first_row = 1
    for config in configs or DEFAULT_CONFIGS[bits]:
        if config.get("dequantize"):
            return first_row
        first_row = config["max_rows"] + 1
    return None


def dequantize_workspace_bytes(bits: int, out_features: int, in_features: int, dtype: torch.dtype, max_rows: int,
                               has_input_order: bool = False, configs: list[dict[str, Any]] | None = None) -> int:
    """Bytes the matmul allocates besides its output for batches of up to ``max_rows`` rows: where one of
    them takes dequantize-then-cuBLAS, the dequantized weight and (act order) x gathered; else 0."""
    min_rows = dequantize_min_rows(configs, bits)
    if min_rows is None or max_rows < min_rows:
        return 0
    return (out_features + (max_rows if has_input_order else 0)) * in_features * dtype.itemsize


def _run_tiling(bits: int, block_k: int, group_size: int | None, uses_dot: bool) -> tuple[int, int]:
    """(TILE_RUNS, RUN_K) for a K step of BLOCK_K inputs. INT4: blocks of 128 per step (one on tensor
    cores), runs of 16. INT8: runs of RUN_K inputs inside one group (the largest power of two dividing
    the group size, at most BLOCK_K); tensor cores take one run per step."""
    if bits == 4:
        if 128 % group_size:  # the INT4 GEMV corrects whole groups inside a block
            raise ValueError(f"INT4 group size must divide 128 (16, 32, 64 or 128), got {group_size}")
        return (1 if uses_dot else max(1, block_k // 128)), 16
    if group_size is None:
        return 1, block_k
    run_k = min(block_k, group_size & -group_size)  # largest power of two dividing the group size
    if run_k < 16:
        raise ValueError(f"INT8 group size {group_size} cannot be tiled: its power-of-two part must be >= 16")
    return (1 if uses_dot else max(1, block_k // run_k)), run_k


def _check_layout(bits: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  group_size: int | None, num_inputs: int) -> None:
    """Refuses tensors that are not kiln's INT4 / INT8 layout for ``num_inputs`` inputs."""
    num_cols = qweight.shape[0]
    if bits == 4:
        words = padded_in_features(num_inputs, group_size) // 8
        if qweight.dtype != torch.int32 or qweight.shape[1] != words:
            raise ValueError(f"INT4 qweight must be int32 [N, {words}] for K = {num_inputs} and group size "
                             f"{group_size}, got {qweight.dtype} {list(qweight.shape)}")
    elif qweight.dtype != torch.int8 or qweight.shape[1] != num_inputs:
        raise ValueError(f"INT8 qweight must be int8 [N, {num_inputs}], got {qweight.dtype} {list(qweight.shape)}")
    is_grouped = group_size is not None
    num_groups = None
    if is_grouped:
        padded = padded_in_features(num_inputs, group_size) if bits == 4 else num_inputs
        num_groups = -(-padded // group_size)
    if scales.shape != ((num_cols, num_groups) if is_grouped else (num_cols,)):
        raise ValueError(f"scales {list(scales.shape)} do not fit a {'grouped' if is_grouped else 'per-channel'} "
                         f"weight of {num_cols} output channels and {num_inputs} inputs")
    if zeros is not None and (zeros.shape != scales.shape or not is_grouped):
        raise ValueError(f"zero points {list(zeros.shape)} need a group size and the scales' shape")
    assert qweight.is_contiguous() and scales.is_contiguous()
    assert zeros is None or zeros.is_contiguous()


def _dequantize_weight(bits: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       group_size: int | None, num_inputs: int, dtype: torch.dtype,
                       config: dict[str, Any]) -> torch.Tensor:
    num_cols = qweight.shape[0]
    tile_runs, run_k = _run_tiling(bits, config["BLOCK_K"], group_size, uses_dot=False)
    tile_inputs = tile_runs * (INT4_BLOCK if bits == 4 else run_k)
    out = torch.empty(num_cols, num_inputs, dtype=dtype, device=qweight.device)
    if out.numel():
        grid = (-(-num_cols // config["BLOCK_N"]), -(-num_inputs // tile_inputs))
        _dequantize_weight_kernel[grid](
            qweight, qweight.stride(0), scales, scales.stride(0) if group_size is not None else 0,
            zeros if zeros is not None else scales, out, out.stride(0), num_cols, num_inputs,
            BITS=bits, GROUP_SIZE=group_size or 0, HAS_ZEROS=zeros is not None, BLOCK_N=config["BLOCK_N"],
            TILE_RUNS=tile_runs, RUN_K=run_k, num_warps=config["num_warps"])
    return out


def dequantize_weight_triton(bits: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                             group_size: int | None, in_features: int, dtype: torch.dtype,
                             config: dict[str, Any] | None = None) -> torch.Tensor:
    """dequant(W) [N, in_features] in ``dtype`` from kiln's INT4 (``bits`` 4) or INT8 layout, input rows
    in their stored order: equal to ``dequantize_int4`` / ``dequantize_int8`` without ``input_order``,
    cast to ``dtype``. ``config``: the tile (DEQUANTIZE_CONFIG's fields)."""
    _check_layout(bits, qweight, scales, zeros, group_size, in_features)
    return _dequantize_weight(bits, qweight, scales, zeros, group_size, in_features, dtype,
                              config or DEQUANTIZE_CONFIG)


def _weight_only_matmul(x: torch.Tensor, bits: int, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None, group_size: int | None, input_order: torch.Tensor | None,
                        configs: list[dict[str, Any]] | None) -> torch.Tensor:
    num_inputs = x.shape[-1]
    rows = x.reshape(-1, num_inputs)
    num_rows, num_cols = rows.shape[0], qweight.shape[0]
    _check_layout(bits, qweight, scales, zeros, group_size, num_inputs)
    assert rows.stride(-1) == 1
    config = launch_config(configs, num_rows, bits)
    if config.get("dequantize"):
        weight = _dequantize_weight(bits, qweight, scales, zeros, group_size, num_inputs, x.dtype, config)
        if input_order is not None:
            # The weight stays in its stored input order and x's columns are gathered to match, once: rows x K
            # elements, at most the weight's N x K while rows <= N, all read and written coalesced. Writing the
            # weight in the original order instead would scatter each of its N x K 2-byte stores.
            rows = rows.index_select(1, input_order)
        return F.linear(rows, weight).view(*x.shape[:-1], num_cols)
    uses_dot = config["BLOCK_M"] >= 16
    if not uses_dot and config["BLOCK_M"] != 1:
        raise ValueError(f"BLOCK_M must be 1 (GEMV) or at least 16 (tensor cores), got {config['BLOCK_M']}")
    tile_runs, run_k = _run_tiling(bits, config["BLOCK_K"], group_size, uses_dot)
    is_grouped = group_size is not None
    out = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    args = (rows, rows.stride(0), input_order if input_order is not None else rows, qweight, qweight.stride(0),
            scales, scales.stride(0) if is_grouped else 0, zeros if zeros is not None else scales,
            out, out.stride(0), num_rows, num_cols, num_inputs)
    meta = dict(GROUP_SIZE=group_size or 0, HAS_ZEROS=zeros is not None,
                HAS_INPUT_ORDER=input_order is not None, BLOCK_N=config["BLOCK_N"], RUN_K=run_k,
                num_warps=config["num_warps"], num_stages=config["num_stages"])
    num_tiles_n = -(-num_cols // config["BLOCK_N"])
    if uses_dot and num_rows:
        _weight_only_gemm_kernel[(-(-num_rows // config["BLOCK_M"]) * num_tiles_n,)](
            *args, **meta, BITS=bits, BLOCK_M=config["BLOCK_M"], GROUP_M=config["GROUP_M"],
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **pdl_launch(x.device))
    elif num_rows and bits == 4:
        num_blocks = qweight.shape[1] // INT4_RUN
        even = num_cols % config["BLOCK_N"] == 0 and num_blocks % tile_runs == 0 and num_inputs == 128 * num_blocks
        _int4_gemv_kernel[(num_tiles_n, num_rows)](
            *args, num_blocks, ONE_BITS, GROUP_SIZE=group_size, HAS_INPUT_ORDER=input_order is not None,
            BLOCK_N=config["BLOCK_N"], BLOCKS=tile_runs, EVEN=even, num_warps=config["num_warps"],
            num_stages=config["num_stages"], **pdl_launch(x.device))
    elif num_rows:
        _int8_gemv_kernel[(num_tiles_n, num_rows)](*args, **meta, TILE_RUNS=tile_runs, **pdl_launch(x.device))
    return out.view(*x.shape[:-1], num_cols)


def w8a16_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None = None, group_size: int | None = None,
                        input_order: torch.Tensor | None = None,
                        configs: list[dict[str, Any]] | None = None) -> torch.Tensor:
    """As w8a16_matmul_ref. ``configs``: launch configs per bucket of rows (see DEFAULT_CONFIGS)."""
    return _weight_only_matmul(x, 8, qweight, scales, zeros, group_size, input_order, configs)


def w4a16_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, input_order: torch.Tensor | None = None,
                        configs: list[dict[str, Any]] | None = None) -> torch.Tensor:
    """As w4a16_matmul_ref. ``configs``: launch configs per bucket of rows (see DEFAULT_CONFIGS)."""
    return _weight_only_matmul(x, 4, qweight, scales, zeros, group_size, input_order, configs)


def weight_only_linear_ref(x: torch.Tensor, bits: int, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None, group_size: int | None,
                           input_order: torch.Tensor | None) -> torch.Tensor:
    """A weight-only Linear's matmul (the kernel op ``weight_only_linear``): w8a16_matmul_ref or
    w4a16_matmul_ref by ``bits``, the CPU's path."""
    if bits == 8:
        return w8a16_matmul_ref(x, qweight, scales, zeros, group_size, input_order)
    return w4a16_matmul_ref(x, qweight, scales, zeros, group_size, input_order)


def weight_only_linear_triton(x: torch.Tensor, bits: int, qweight: torch.Tensor, scales: torch.Tensor,
                              zeros: torch.Tensor | None, group_size: int | None, input_order: torch.Tensor | None,
                              shapes: dict[str, list[dict[str, Any]]] | None = None) -> torch.Tensor:
    """As weight_only_linear_ref on the Triton kernels, with the launch configs per bucket of rows that the
    build timed for this weight's [out, in] (``shapes``, the plan's, keyed by kiln.kernels.gemv.shape_key),
    DEFAULT_CONFIGS for a shape it does not list."""
    configs = shapes.get(shape_key(qweight.shape[0], x.shape[-1])) if shapes else None
    return _weight_only_matmul(x, bits, qweight, scales, zeros, group_size, input_order, configs)


def _random_weight_only(out_features: int, in_features: int, bits: int, group_size: int, device: str
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], int | None]:
    """(a random float weight of that shape, its kiln layout: qweight, scales, zeros, its group size)."""
    from kiln.quantization.weight_only import quantize_int4, quantize_int8

    weight = torch.randn(out_features, in_features, device=device) / in_features ** 0.5
    if bits == 4:
        return weight, quantize_int4(weight, group_size), group_size
    return weight, (*quantize_int8(weight), None), None


def _layout_bytes(tensors: tuple[torch.Tensor | None, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_weight_bandwidth(num_rows: int, out_features: int, in_features: int, bits: int, group_size: int = 128,
                             dtype: torch.dtype = torch.bfloat16, configs: list[dict[str, Any]] | None = None,
                             device: str = "cuda", compare_dense: bool = True,
                             dequantize_config: dict[str, Any] | None = None) -> dict[str, float]:
    """Times the matmul on a random weight of that shape (median of triton.testing.do_bench, which
    flushes L2 before each run, so the weights come from HBM) and reports the weight bandwidth it
    achieved: bytes of packed weights, scales and zeros over time. ``configs`` picks the path as in the
    runtime (DEFAULT_CONFIGS: dequantize-then-cuBLAS from DEQUANT_MIN_ROWS rows; TENSOR_CORE_CONFIGS: the
    Triton kernels at every size). With ``compare_dense``, also the dense matmul of the same shape in
    ``dtype``; with ``dequantize_config`` (DEQUANTIZE_CONFIG, or another tile), also dequantize-then-cuBLAS
    at this row count whatever ``configs`` choose (``dequantize_seconds``). Not a test: GPU scripts and
    the build's tuner call it."""
    import triton.testing

    weight, tensors, group = _random_weight_only(out_features, in_features, bits, group_size, device)
    x = torch.randn(num_rows, in_features, device=device, dtype=dtype)

    def seconds(configs: list[dict[str, Any]] | None) -> float:
        run = functools.partial(_weight_only_matmul, x, bits, *tensors, group, None, configs)
        return triton.testing.do_bench(run, return_mode="median") / 1e3

    weight_bytes = _layout_bytes(tensors)
    matmul_seconds = seconds(configs)
    report = {"seconds": matmul_seconds, "weight_bytes": weight_bytes,
              "weight_bandwidth_GBps": weight_bytes / matmul_seconds / 1e9,
              "tflops": 2 * num_rows * out_features * in_features / matmul_seconds / 1e12}
    if dequantize_config is not None:
        report["dequantize_seconds"] = seconds([{**dequantize_config, "max_rows": 1 << 30, "dequantize": True}])
    if compare_dense:
        dense = weight.to(dtype)
        dense_seconds = triton.testing.do_bench(lambda: x @ dense.T, return_mode="median") / 1e3
        report.update(dense_seconds=dense_seconds, speedup_vs_dense=dense_seconds / matmul_seconds)
    return report


def measure_dequantize(out_features: int, in_features: int, bits: int, group_size: int = 128,
                       dtype: torch.dtype = torch.bfloat16, config: dict[str, Any] | None = None,
                       device: str = "cuda") -> dict[str, float]:
    """Times ``dequantize_weight_triton`` alone on a random weight of that shape (median, L2 flushed) with
    the tile ``config`` (DEQUANTIZE_CONFIG's fields), and the bandwidth it achieved: the packed weight,
    scales and zeros read plus the [N, K] weight written in ``dtype``, over time."""
    import triton.testing

    _, tensors, group = _random_weight_only(out_features, in_features, bits, group_size, device)
    run = functools.partial(dequantize_weight_triton, bits, *tensors, group, in_features, dtype, config)
    seconds = triton.testing.do_bench(run, return_mode="median") / 1e3
    moved = _layout_bytes(tensors) + out_features * in_features * dtype.itemsize
    return {"seconds": seconds, "bytes_moved": moved, "bandwidth_GBps": moved / seconds / 1e9}
