"""RMSNorm and LayerNorm, each optionally fused with the residual add that precedes it.

RMSNorm (with the add or not) also comes quantized to e4m3 per token (``rms_norm_fp8``,
``add_rms_norm_fp8``) for an FP8 Linear that would quantize the norm's output itself: the kernel rounds
the normalized row to the input dtype as the plain norm writes it, then quantizes it in its epilogue
(kiln.kernels.fp8's ``fp8_row_scales`` / ``to_fp8``), so the bytes and scales are those of the plain
norm followed by quantize_fp8_per_token, and no quantization kernel runs after it.

RMSNorm also folds into the one-row GEMV of the unquantized Linear it feeds (``rms_norm_linear``), whose
weight holds the norm's weight already (kiln.layers.norm, at load): the GEMV sums the row's squares beside
its products and scales them by the row's 1 / RMS, so batch-1 decode runs no norm kernel there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.fp8 import FP8_CONSTEXPRS, fp8_row_scales, to_fp8
from kiln.kernels.gemv import dense_linear_ref, gemv, shape_key
from kiln.kernels.rotary import KvWrite
from kiln.kernels.triton_jit import jit, next_power_of_2, pdl_launch, tl, wait_for_producer
from kiln.quantization.fp8 import FP8_DTYPE, Fp8Activation, quantize_fp8_per_token


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * _normalized(x, eps)


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / RMS(x) in float32, rounded to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_linear_ref(x: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                        silu_mul: bool = False, kv_write: KvWrite | None = None) -> torch.Tensor:
    """dense_linear_ref of x's RMSNorm, the norm's weight held by ``weight`` already (so applied as ones)."""
    return dense_linear_ref(_normalized(x, eps), weight, bias, silu_mul=silu_mul, kv_write=kv_write)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the normalized input and the new residual."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def rms_norm_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Fp8Activation:
    """rms_norm_ref's output quantized per token: what an FP8 Linear after the norm would quantize."""
    return quantize_fp8_per_token(rms_norm_ref(x, weight, eps))


def add_rms_norm_fp8_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                         ) -> tuple[Fp8Activation, torch.Tensor]:
    """add_rms_norm_ref with the normalized output quantized per token."""
    normed, new_residual = add_rms_norm_ref(x, residual, weight, eps)
    return quantize_fp8_per_token(normed), new_residual


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in float32, weight and bias applied before the one rounding to x's
    dtype, as torch's own layer_norm kernels do for 16-bit inputs."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (layer_norm(x + residual), x + residual): the normalized input and the new residual."""
    new_residual = x + residual
    return layer_norm_ref(new_residual, weight, bias, eps), new_residual


@jit
def _rms_norm_kernel(x_ptr, x_row_stride, x_head_stride, residual_ptr, residual_row_stride, weight_ptr, out_ptr,
                     scale_ptr, num_rows, num_heads, num_cols, eps, HAS_RESIDUAL: tl.constexpr,
                     IS_FP8_OUT: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAX_INV: tl.constexpr,
                     MIN_AMAX: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """BLOCK_ROWS rows per program; row r of x is head r % num_heads of token r // num_heads (num_heads
    is 1 but for a head-strided [T, heads, D] view). With HAS_RESIDUAL, x + residual is written back to
    residual and normalized. IS_FP8_OUT: the output, rounded to x's dtype as it would be stored, is
    quantized per row to e4m3 in out_ptr, its scales in scale_ptr."""
    wait_for_producer(PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < num_rows) & (cols < num_cols)
    x = tl.load(x_ptr + (rows // num_heads) * x_row_stride + (rows % num_heads) * x_head_stride + cols, mask=mask,
                other=0.0)
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + rows * residual_row_stride + cols
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptrs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / num_cols + eps)[:, None]
    # Rounded to the input dtype before the weight product, as the reference does.
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows * num_cols + cols
    if IS_FP8_OUT:
        out = (normed * weight).to(x.dtype).to(tl.float32)  # the plain norm's stored value (its padding 0)
        scale = fp8_row_scales(out, FP8_MAX_INV, MIN_AMAX)[:, None]
        tl.store(scale_ptr + rows, scale, mask=rows < num_rows)
        tl.store(out_ptrs, to_fp8(out, scale, FP8_MAX), mask=mask)
    else:
        tl.store(out_ptrs, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _layer_norm_kernel(x_ptr, x_row_stride, residual_ptr, residual_row_stride, weight_ptr, bias_ptr, out_ptr,
                       num_rows, num_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    """BLOCK_ROWS rows per program, in float32 and rounded once, as layer_norm_ref. With HAS_RESIDUAL,
    x + residual is written back to residual and normalized."""
    wait_for_producer(PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < num_rows) & (cols < num_cols)
    x = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + rows * residual_row_stride + cols
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptrs, x, mask=mask)
    xf = x.to(tl.float32)
    mean = (tl.sum(xf, axis=1) / num_cols)[:, None]
    centered = tl.where(mask, xf - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / num_cols + eps)[:, None]
    weight = tl.load(weight_ptr + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * num_cols + cols, (centered * rstd * weight + bias).to(out_ptr.dtype.element_ty),
             mask=mask)


def default_norm_warps(num_cols: int) -> int:
    """Liger-Kernel's ``calculate_settings`` rule (a row of >= 2048 elements gets 8 warps, >= 8192 16):
    kiln's default before tuning, borrowed, not measured here; ``kiln build`` times the candidates."""
    return 16 if num_cols >= 8192 else 8 if num_cols >= 2048 else 4


# Elements per thread a program's rows fill: 8 is one 16-byte load of bf16 per thread. Rows shorter than
# that (Qwen3's per-head q / k norm: head_dim 128 over 8 warps) share a program, so that a launch over
# T * heads rows is not T * heads programs of a few busy threads each. Chosen by that arithmetic, not timed.
NORM_ELEMENTS_PER_THREAD = 8


def norm_rows_per_program(num_rows: int, num_cols: int, num_warps: int) -> int:
    """Rows per program: as many as num_warps' threads fill at NORM_ELEMENTS_PER_THREAD, and one for rows
    that alone fill them (a power of two, for tl.arange)."""
    rows = max(1, num_warps * 32 * NORM_ELEMENTS_PER_THREAD // next_power_of_2(num_cols))
    return min(rows, next_power_of_2(num_rows))


def _rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
              num_warps: int | None, is_fp8_out: bool = False) -> torch.Tensor | Fp8Activation:
    num_cols = x.shape[-1]
    if x.dim() == 3 and residual is None:  # [T, heads, D], read in place even when head-strided
        rows, (row_stride, head_stride, _), num_heads = x, x.stride(), x.shape[1]
    else:
        rows = x.reshape(-1, num_cols)
        row_stride, head_stride, num_heads = rows.stride(0), 0, 1
    num_rows = x.numel() // num_cols
    if is_fp8_out:
        # The value quantized is the plain norm's output, of x's dtype (rounded to it in the kernel).
        assert weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
        out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        scale = out  # not read
    residual_rows = rows if residual is None else residual.view(-1, num_cols)
    assert rows.stride(-1) == 1 and residual_rows.stride(-1) == 1 and weight.is_contiguous()
    num_warps = num_warps or default_norm_warps(num_cols)
    block_rows = norm_rows_per_program(num_rows, num_cols, num_warps)
    _rms_norm_kernel[(-(-num_rows // block_rows),)](
        rows, row_stride, head_stride, residual_rows, residual_rows.stride(0), weight, out, scale, num_rows,
        num_heads, num_cols, eps, HAS_RESIDUAL=residual is not None, IS_FP8_OUT=is_fp8_out, **FP8_CONSTEXPRS,
        BLOCK_ROWS=block_rows, BLOCK=next_power_of_2(num_cols), num_warps=num_warps, **pdl_launch(x.device))
    return Fp8Activation(out, scale) if is_fp8_out else out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, num_warps: int | None = None
                    ) -> torch.Tensor:
    """As rms_norm_ref over [..., H]; a [T, heads, head_dim] view of the fused QKV output (Qwen3's q / k
    norm) is read in place."""
    return _rms_norm(x, None, weight, eps, num_warps)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As add_rms_norm_ref in one pass; the new residual is written in place of ``residual``."""
    return _rms_norm(x, residual, weight, eps, num_warps), residual


def rms_norm_fp8_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, num_warps: int | None = None
                        ) -> Fp8Activation:
    """As rms_norm_fp8_ref over [T, H] (x, weight of one dtype): rms_norm_triton and quantize_fp8_per_token
    in one pass."""
    return _rms_norm(x, None, weight, eps, num_warps, is_fp8_out=True)


def add_rms_norm_fp8_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            num_warps: int | None = None) -> tuple[Fp8Activation, torch.Tensor]:
    """As add_rms_norm_fp8_ref in one pass; the new residual is written in place of ``residual``."""
    return _rms_norm(x, residual, weight, eps, num_warps, is_fp8_out=True), residual


def _layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                eps: float, num_warps: int | None) -> torch.Tensor:
    num_cols = x.shape[-1]
    rows = x.reshape(-1, num_cols)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_rows = rows if residual is None else residual.view(-1, num_cols)
    assert rows.stride(-1) == 1 and residual_rows.stride(-1) == 1 and weight.is_contiguous() and bias.is_contiguous()
    num_warps = num_warps or default_norm_warps(num_cols)
    block_rows = norm_rows_per_program(rows.shape[0], num_cols, num_warps)
    _layer_norm_kernel[(-(-rows.shape[0] // block_rows),)](
        rows, rows.stride(0), residual_rows, residual_rows.stride(0), weight, bias, out, rows.shape[0], num_cols,
        eps, HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK=next_power_of_2(num_cols),
        num_warps=num_warps, **pdl_launch(x.device))
    return out


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      num_warps: int | None = None) -> torch.Tensor:
    return _layer_norm(x, None, weight, bias, eps, num_warps)


def add_layer_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As add_layer_norm_ref in one pass; the new residual is written in place of ``residual``."""
    return _layer_norm(x, residual, weight, bias, eps, num_warps), residual


def rms_norm_linear_triton(x: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                           silu_mul: bool = False, kv_write: KvWrite | None = None,
                           shapes: dict[str, dict[str, int]] | None = None) -> torch.Tensor:
    """As rms_norm_linear_ref for one row, in one kernel: the GEMV with the norm folded in, at the launch
    config the plan lists for this weight's shape (``shapes``, made by the build's timing; a Linear folds
    its norm only where it lists one: DenseLinearMethod.folds_norm)."""
    return gemv(x, weight, None, bias, rms_eps=eps, silu_mul=silu_mul, kv_write=kv_write,
                **shapes[shape_key(*weight.shape)])
