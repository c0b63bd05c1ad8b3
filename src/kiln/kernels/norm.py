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
def _rms_norm_kernel(x_ptr, x_row_stride, residual_ptr, residual_row_stride, weight_ptr, out_ptr, out_row_stride,
                     num_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program. With HAS_RESIDUAL, x + residual is written back to residual and normalized."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + row * residual_row_stride + cols
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptrs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / num_cols + eps)
    # Rounded to the input dtype before the weight product, as the reference does.
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def default_norm_warps(num_cols: int) -> int:
    """Liger-Kernel's ``calculate_settings`` rule (a row of >= 2048 elements gets 8 warps, >= 8192 16):
    kiln's default before tuning, borrowed, not measured here; ``kiln build`` times the candidates."""
    return 16 if num_cols >= 8192 else 8 if num_cols >= 2048 else 4


def _rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
              num_warps: int | None) -> torch.Tensor:
    num_cols = x.shape[-1]
    rows = x.reshape(-1, num_cols)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_rows = rows if residual is None else residual.view(-1, num_cols)
    assert rows.stride(-1) == 1 and residual_rows.stride(-1) == 1 and weight.is_contiguous()
    _rms_norm_kernel[(rows.shape[0],)](
        rows, rows.stride(0), residual_rows, residual_rows.stride(0), weight, out, num_cols, num_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=next_power_of_2(num_cols),
        num_warps=num_warps or default_norm_warps(num_cols))
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, num_warps: int | None = None
                    ) -> torch.Tensor:
    return _rms_norm(x, None, weight, eps, num_warps)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As add_rms_norm_ref in one pass; the new residual is written in place of ``residual``."""
    return _rms_norm(x, residual, weight, eps, num_warps), residual
