"""RMSNorm and LayerNorm, each optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.triton_jit import jit, next_power_of_2, tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the normalized input and the new residual."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


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
                     num_rows, num_heads, num_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """BLOCK_ROWS rows per program; row r of x is head r % num_heads of token r // num_heads (num_heads
    is 1 but for a head-strided [T, heads, D] view). With HAS_RESIDUAL, x + residual is written back to
    residual and normalized."""
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
    tl.store(out_ptr + rows * num_cols + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _layer_norm_kernel(x_ptr, x_row_stride, residual_ptr, residual_row_stride, weight_ptr, bias_ptr, out_ptr,
                       num_rows, num_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """BLOCK_ROWS rows per program, in float32 and rounded once, as layer_norm_ref. With HAS_RESIDUAL,
    x + residual is written back to residual and normalized."""
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
              num_warps: int | None) -> torch.Tensor:
    num_cols = x.shape[-1]
    if x.dim() == 3 and residual is None:  # [T, heads, D], read in place even when head-strided
        rows, (row_stride, head_stride, _), num_heads = x, x.stride(), x.shape[1]
    else:
        rows = x.reshape(-1, num_cols)
        row_stride, head_stride, num_heads = rows.stride(0), 0, 1
    num_rows = x.numel() // num_cols
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_rows = rows if residual is None else residual.view(-1, num_cols)
    assert rows.stride(-1) == 1 and residual_rows.stride(-1) == 1 and weight.is_contiguous()
    num_warps = num_warps or default_norm_warps(num_cols)
    block_rows = norm_rows_per_program(num_rows, num_cols, num_warps)
    _rms_norm_kernel[(-(-num_rows // block_rows),)](
        rows, row_stride, head_stride, residual_rows, residual_rows.stride(0), weight, out, num_rows, num_heads,
        num_cols, eps, HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK=next_power_of_2(num_cols),
        num_warps=num_warps)
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, num_warps: int | None = None
                    ) -> torch.Tensor:
    """As rms_norm_ref over [..., H]; a [T, heads, head_dim] view of the fused QKV output (Qwen3's q / k
    norm) is read in place."""
    return _rms_norm(x, None, weight, eps, num_warps)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As add_rms_norm_ref in one pass; the new residual is written in place of ``residual``."""
    return _rms_norm(x, residual, weight, eps, num_warps), residual


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
        num_warps=num_warps)
    return out


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      num_warps: int | None = None) -> torch.Tensor:
    return _layer_norm(x, None, weight, bias, eps, num_warps)


def add_layer_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As add_layer_norm_ref in one pass; the new residual is written in place of ``residual``."""
    return _layer_norm(x, residual, weight, bias, eps, num_warps), residual
