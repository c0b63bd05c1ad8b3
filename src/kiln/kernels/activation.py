"""Activations of the MLP: SiLU(gate) * up over the fused gate/up projection output [T, 2 * I] (gate
first, then up), and GELU (exact or tanh-approximated) over an ungated projection output [T, N].

SiLU·up also comes quantized to e4m3 per token (``silu_mul_fp8``) for an FP8 down projection that would
quantize its input itself: the product, rounded to the input dtype as ``silu_mul`` writes it, is
quantized in the kernel's epilogue (kiln.kernels.fp8's ``fp8_row_scales`` / ``to_fp8``), bit for bit
``silu_mul`` followed by quantize_fp8_per_token, with no quantization kernel after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.fp8 import FP8_CONSTEXPRS, fp8_row_scales, to_fp8
from kiln.kernels.gemv import silu_mul_values
from kiln.kernels.norm import default_norm_warps
from kiln.kernels.triton_jit import jit, next_power_of_2, pdl_launch, tl, wait_for_producer
from kiln.quantization.fp8 import FP8_DTYPE, Fp8Activation, quantize_fp8_per_token


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_fp8_ref(gate_up: torch.Tensor) -> Fp8Activation:
    """silu_mul_ref's output quantized per token: what an FP8 down projection would quantize."""
    return quantize_fp8_per_token(silu_mul_ref(gate_up))


# HF's "gelu_new" / "gelu_pytorch_tanh" are the tanh approximation; its "gelu" is the exact erf form.
GELU_APPROXIMATIONS = ("tanh", "none")


def check_gelu_approximation(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"unknown GELU approximation {approximate!r}; supported: {', '.join(GELU_APPROXIMATIONS)}")


def gelu_ref(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU in float32, rounded once to x's dtype (torch's GPU kernels compute 16-bit inputs so)."""
    check_gelu_approximation(approximate)
    return F.gelu(x.float(), approximate=approximate).to(x.dtype)


@jit
def _silu_mul(gate_ptrs, mask, num_cols):
    """silu(gate) * up of the gate columns at gate_ptrs (up num_cols further), in the input dtype."""
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + num_cols, mask=mask, other=0.0)
    return silu_mul_values(gate, up)


@jit
def _silu_mul_kernel(gate_up_ptr, gate_up_row_stride, out_ptr, num_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row, column block): out[row, cols] = silu(gate[row, cols]) * up[row, cols]."""
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    out = _silu_mul(gate_up_ptr + row * gate_up_row_stride + cols, mask, num_cols)
    tl.store(out_ptr + row * num_cols + cols, out, mask=mask)


@jit
def _silu_mul_fp8_kernel(gate_up_ptr, gate_up_row_stride, out_ptr, scale_ptr, num_cols, FP8_MAX: tl.constexpr,
                         FP8_MAX_INV: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    """One whole row per program, a [1, BLOCK] tile (BLOCK >= num_cols): out[row] = e4m3 of silu(gate) *
    up with the row's scale (fp8_row_scales) in scale_ptr[row].

    A per-token scale needs the amax of the whole row before any element is quantized. The row is held
    in registers, as _quantize_fp8_kernel (which this replaces in front of the down projection) holds
    it: gate_up is read once, 4 bytes per column (bf16), and 1 byte written. Two passes over column
    blocks (amax, then quantize) would hold less but read the 4 bytes twice, the second time from L2 at
    best. Holding it costs no spills at Llama-3-8B's I = 14336 (BLOCK 16384): compiled for sm90 (Triton
    3.9, ptxas -v) a thread takes 54 registers at 16 warps (the default), 99 at 8, 174 at 4. Not timed
    yet; the build's tuning picks the warps."""
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = cols < num_cols
    out = _silu_mul(gate_up_ptr + row * gate_up_row_stride + cols, mask, num_cols).to(tl.float32)
    scale = fp8_row_scales(out, FP8_MAX_INV, MIN_AMAX)[:, None]
    tl.store(scale_ptr + row, scale)
    tl.store(out_ptr + row * num_cols + cols, to_fp8(out, scale, FP8_MAX), mask=mask)


# Columns per program and warps before tuning: 1024 columns over 4 warps is 8 elements (16 bytes of
# bf16) per thread per load, the widest vector load; chosen by that arithmetic, not measured here.
DEFAULT_SILU_MUL_CONFIG = {"BLOCK": 1024, "num_warps": 4}


def silu_mul_triton(gate_up: torch.Tensor, BLOCK: int = DEFAULT_SILU_MUL_CONFIG["BLOCK"],
                    num_warps: int = DEFAULT_SILU_MUL_CONFIG["num_warps"]) -> torch.Tensor:
    num_cols = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * num_cols)
    assert rows.stride(-1) == 1
    out = torch.empty(*gate_up.shape[:-1], num_cols, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows.shape[0], -(-num_cols // BLOCK))](rows, rows.stride(0), out, num_cols, BLOCK=BLOCK,
                                                            num_warps=num_warps, **pdl_launch(gate_up.device))
    return out


def silu_mul_fp8_triton(gate_up: torch.Tensor, num_warps: int | None = None) -> Fp8Activation:
    """As silu_mul_fp8_ref: silu_mul_triton and quantize_fp8_per_token in one pass, a row per program.
    Warps before tuning: the norms' rule for a row per program (default_norm_warps), by its width."""
    num_cols = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * num_cols)
    assert rows.stride(-1) == 1
    out = torch.empty(*gate_up.shape[:-1], num_cols, dtype=FP8_DTYPE, device=gate_up.device)
    scale = torch.empty(*gate_up.shape[:-1], 1, dtype=torch.float32, device=gate_up.device)
    _silu_mul_fp8_kernel[(rows.shape[0],)](rows, rows.stride(0), out, scale, num_cols, **FP8_CONSTEXPRS,
                                           BLOCK=next_power_of_2(num_cols),
                                           num_warps=num_warps or default_norm_warps(num_cols),
                                           **pdl_launch(gate_up.device))
    return Fp8Activation(out, scale)


@jit
def _gelu_kernel(x_ptr, x_row_stride, out_ptr, num_cols, IS_TANH: tl.constexpr, BLOCK: tl.constexpr,
                 PDL: tl.constexpr):
    """Program (row, column block): out[row, cols] = gelu(x[row, cols]) in float32, rounded once."""
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_TANH:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh needed, and no cancellation where tanh(u) nears -1.
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (x + 0.044715 x^3)
        out = x * tl.sigmoid(2.0 * inner)
    else:
        out = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))  # x / sqrt(2)
    tl.store(out_ptr + row * num_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


# As silu_mul's: 1024 columns over 4 warps is 8 elements (16 bytes of bf16) per thread per load.
DEFAULT_GELU_CONFIG = {"BLOCK": 1024, "num_warps": 4}


def gelu_triton(x: torch.Tensor, approximate: str, BLOCK: int = DEFAULT_GELU_CONFIG["BLOCK"],
                num_warps: int = DEFAULT_GELU_CONFIG["num_warps"]) -> torch.Tensor:
    check_gelu_approximation(approximate)
    num_cols = x.shape[-1]
    rows = x.reshape(-1, num_cols)
    assert rows.stride(-1) == 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _gelu_kernel[(rows.shape[0], -(-num_cols // BLOCK))](rows, rows.stride(0), out, num_cols,
                                                        IS_TANH=approximate == "tanh", BLOCK=BLOCK,
                                                        num_warps=num_warps, **pdl_launch(x.device))
    return out
