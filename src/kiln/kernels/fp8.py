"""FP8 (e4m3) linear layers on the GPU, beside their references in kiln.quantization.fp8.

- ``fp8_row_scales`` / ``to_fp8``: the per-token scale and the e4m3 conversion as ``@jit`` helpers, the
  one copy of that arithmetic every kernel that quantizes uses (this file's, the ``*_fp8`` RMSNorm and
  SiLU·up of norm.py / activation.py that quantize in their epilogue, FP8 context attention's queries).
- ``quantize_fp8_per_token_triton`` / ``quantize_fp8_static_triton``: activations to e4m3, one row per
  program (reference: quantize_fp8_per_token / quantize_fp8_static).
- ``fp8_linear_gpu``: W8A8, the activations quantized per token (or with the checkpoint's static scale),
  then ``fp8_matmul_gpu``: activations quantized already (an Fp8Activation, from fp8_linear_gpu or a
  ``*_fp8`` kernel) times the weight in ``torch._scaled_mm`` on the tensor cores (references:
  fp8_linear_ref / fp8_matmul_ref).
- ``fp8_gemv``: W8A16 for a few rows (batch-1 decode): the fp8 weights are read once with wide loads and
  converted in registers, the activations stay in their 16-bit dtype (reference: fp8_w8a16_linear_ref).
  At M = 1 ``_scaled_mm`` streams the weights at half the copy bandwidth (TARGETS.md); the GEMV also
  skips the activation-quantization launch and its rounding, so it is both faster and more accurate
  there. Its grid also covers more rows, one BLOCK_M slice per program, for the shapes ``_scaled_mm``
  refuses.
- ``fp8_linear``: the choice between the two by row count and shape (``uses_scaled_mm``, which the fp8
  linear method also asks to know when its input should come quantized).

Weight scales are [N, 1] (per output channel, or per row of a fused weight) or 0-d (per tensor);
activation scales [M, 1] (per token) or 0-d (static): see kiln.quantization.fp8.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.errors import ConfigError
from kiln.kernels.gemv import MAX_GEMV_ROWS, default_gemv_config, gemv, gemv_config
from kiln.kernels.triton_jit import device_capability, jit, next_power_of_2, pdl_launch, tl, wait_for_producer
from kiln.quantization.fp8 import FP8_DTYPE, FP8_MAX, FP8_MAX_INV, MIN_AMAX, Fp8Activation, fp8_linear_ref

# ---- activation quantization ---------------------------------------------------------------------

# The constants every kernel that quantizes to e4m3 takes (constexpr arguments: a kernel may read only
# tl.constexpr globals, which this module cannot make without Triton installed).
FP8_CONSTEXPRS = {"FP8_MAX": FP8_MAX, "FP8_MAX_INV": FP8_MAX_INV, "MIN_AMAX": MIN_AMAX}


@jit
def fp8_row_scales(x, FP8_MAX_INV: tl.constexpr, MIN_AMAX: tl.constexpr):
    """Per-token scales of a float32 tile x [ROWS, COLS] whose padding is 0: max(amax, MIN_AMAX) *
    fl(1 / 448) per row, [ROWS] float32, as quantize_fp8_per_token computes them."""
    return tl.maximum(tl.max(tl.abs(x), axis=1), MIN_AMAX) * FP8_MAX_INV


@jit
def to_fp8(x, scale, FP8_MAX: tl.constexpr):
    """x / scale in IEEE division (as torch divides by a tensor; Triton's ``/`` is approximate), clamped to
    ±448 and rounded to nearest-even e4m3: bit for bit quantize_fp8_static's arithmetic. The one home
    of e4m3 quantization in kiln's kernels: the quantization kernel below, the norm and SiLU·up kernels
    that quantize in their epilogue, FP8 context attention's query rows."""
    return tl.minimum(tl.maximum(tl.div_rn(x, scale), -FP8_MAX), FP8_MAX).to(tl.float8e4nv,
                                                                             fp_downcast_rounding="rtne")


@jit
def _quantize_fp8_kernel(x_ptr, x_row_stride, scale_ptr, out_ptr, out_row_stride, num_cols,
                         IS_DYNAMIC: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAX_INV: tl.constexpr,
                         MIN_AMAX: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row per program, a [1, BLOCK] tile. IS_DYNAMIC: the row's scale (fp8_row_scales) is written to
    scale_ptr[row]; otherwise the one static scale is read from scale_ptr."""
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = cols < num_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_DYNAMIC:
        scale = fp8_row_scales(x, FP8_MAX_INV, MIN_AMAX)[:, None]
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr)
    tl.store(out_ptr + row * out_row_stride + cols, to_fp8(x, scale, FP8_MAX), mask=mask)


def _quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None, num_warps: int | None) -> Fp8Activation:
    num_cols = x.shape[-1]
    rows = x.reshape(-1, num_cols)
    assert rows.stride(-1) == 1
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    if scale is None:
        scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
        is_dynamic = True
    else:
        assert scale.numel() == 1 and scale.dtype == torch.float32, "a static activation scale is one float32"
        is_dynamic = False
    if rows.shape[0]:
        # 16 bytes of the input per thread and load where the row allows it, at least 1 warp, at most 16.
        num_warps = num_warps or min(max(num_cols * x.element_size() // (16 * 32), 1), 16)
        _quantize_fp8_kernel[(rows.shape[0],)](
            rows, rows.stride(0), scale, out, num_cols, num_cols, IS_DYNAMIC=is_dynamic, **FP8_CONSTEXPRS,
            BLOCK=next_power_of_2(num_cols), num_warps=next_power_of_2(num_warps), **pdl_launch(x.device))
    return Fp8Activation(out, scale)


def quantize_fp8_per_token_triton(x: torch.Tensor, num_warps: int | None = None) -> Fp8Activation:
    """As quantize_fp8_per_token: x [..., K] -> (x_fp8 [..., K], scale [..., 1] float32)."""
    return _quantize_fp8(x, None, num_warps)


def quantize_fp8_static_triton(x: torch.Tensor, scale: torch.Tensor, num_warps: int | None = None) -> torch.Tensor:
    """As quantize_fp8_static with a 0-d (per-tensor) scale."""
    return _quantize_fp8(x, scale, num_warps)[0]


# ---- W8A8 through torch._scaled_mm ---------------------------------------------------------------

def scaled_mm_refusal(n: int, k: int, x_dtype: torch.dtype, is_rowwise: bool,
                      capability: tuple[int, int] | None) -> str | None:
    """Why ``torch._scaled_mm`` cannot run this linear layer (None: it can). ``capability``: the CUDA
    device's (major, minor); None skips the GPU checks (``_scaled_mm`` on the CPU has no such limits).

    torch 2.4 - 2.11 on CUDA: fp8 needs sm89+; both dims of the weight ([K, N] column-major) multiples
    of 16; row-wise scales (per token x per channel) need sm90 and a bfloat16 output, per-tensor
    scales take any 16-bit output."""
    if k % 16 or n % 16:
        return f"torch._scaled_mm needs in/out features that are multiples of 16, not {k} -> {n}"
    if x_dtype not in (torch.bfloat16, torch.float16):
        return f"torch._scaled_mm writes bfloat16 or float16, not {str(x_dtype).removeprefix('torch.')}"
    if capability is None:
        return None
    if capability < (8, 9):
        return f"FP8 matmuls need an sm89+ GPU (Ada, Hopper), not sm{capability[0]}{capability[1]}"
    if is_rowwise and capability < (9, 0):
        return ("per-token / per-channel FP8 scales need Hopper (sm90+); on Ada use per-tensor weight "
                "and static activation scales")
    if is_rowwise and x_dtype != torch.bfloat16:
        return "torch._scaled_mm with per-token / per-channel scales writes bfloat16 only"
    return None


def fp8_linear_gpu(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, use_fast_accum: bool = False) -> torch.Tensor:
    """As fp8_linear_ref: x [..., K] quantized per token (``x_scale`` None) or with the static 0-d
    ``x_scale``, then fp8_matmul_gpu, which raises ConfigError where ``_scaled_mm`` cannot run the shape
    (see scaled_mm_refusal: fp8_linear then takes the GEMV)."""
    rows = x.reshape(-1, x.shape[-1])
    x_fp8 = (quantize_fp8_per_token_triton(rows) if x_scale is None
             else Fp8Activation(quantize_fp8_static_triton(rows, x_scale), x_scale))
    return fp8_matmul_gpu(x_fp8, w_fp8, w_scale, bias, x.dtype, use_fast_accum).view(*x.shape[:-1], -1)


def fp8_matmul_gpu(x: Fp8Activation, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype, use_fast_accum: bool = False) -> torch.Tensor:
    """As fp8_matmul_ref, in ``torch._scaled_mm``: activations quantized already ([..., K] e4m3, scales [..., 1]
    per token or 0-d static; from fp8_linear_gpu, or from the epilogue of the kernel before the Linear: see
    kiln.kernels.norm / activation) times w_fp8 [N, K] with ``w_scale`` [N, 1] or 0-d -> [..., N] in
    ``out_dtype``.

    Per-tensor weight and static activation scales take the tensor-wise kernel (Ada and Hopper); any
    other combination the row-wise one (Hopper), each scale broadcast to its [M, 1] / [1, N] vector.
    ``use_fast_accum`` sums in the tensor cores' reduced precision: faster at large M, less accurate."""
    num_cols, n = x.data.shape[-1], w_fp8.shape[0]
    is_rowwise = x.scale.dim() > 0 or w_scale.dim() > 0
    refusal = scaled_mm_refusal(n, num_cols, out_dtype, is_rowwise, device_capability(x.data.device))
    if refusal:
        raise ConfigError(f"FP8 linear {num_cols} -> {n}: {refusal}")
    x_fp8 = x.data.reshape(-1, num_cols)
    if x.scale.dim():
        scale_a = x.scale.reshape(-1, 1)
    else:
        scale_a = x.scale.expand(x_fp8.shape[0], 1).contiguous() if is_rowwise else x.scale
    scale_b = w_scale.reshape(1, -1).expand(1, n).contiguous() if is_rowwise else w_scale
    # Row-wise kernels want a bias in the output dtype; added here after the product otherwise.
    fused_bias = bias if bias is not None and bias.dtype == out_dtype else None
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=scale_a, scale_b=scale_b, bias=fused_bias, out_dtype=out_dtype,
                           use_fast_accum=use_fast_accum)
    if bias is not None and fused_bias is None:
        out = (out.float() + bias.float()).to(out_dtype)
    return out.view(*x.data.shape[:-1], n)


# ---- W8A16 GEMV ----------------------------------------------------------------------------------

def fp8_gemv(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
             **config: Any) -> torch.Tensor:
    """As fp8_w8a16_linear_ref: x [..., K] (16- or 32-bit) times w_fp8 [N, K] with ``w_scale`` [N, 1] or
    0-d, through kiln.kernels.gemv (``config``: its launch options, default_gemv_config(rows) for what is
    not given, and ``silu_mul`` for a fused gate / up projection whose epilogue takes SiLU·up)."""
    assert w_scale.dtype == torch.float32 and w_scale.is_contiguous() and w_scale.numel() in (1, w_fp8.shape[0])
    return gemv(x, w_fp8, w_scale, bias, **config)


# ---- the choice ----------------------------------------------------------------------------------

# The GEMV runs instead of _scaled_mm up to MAX_GEMV_ROWS rows (kiln.kernels.gemv: one row block).
# TARGETS.md: _scaled_mm at N = 28672, K = 4096 on the H200 takes 53 us at M = 1 and 60 us at M = 256,
# weight-bound throughout at ~2.2 TB/s; the GEMV's tl.dot path reads the weights once for up to 16 rows,
# so it wins there if it streams them faster (benchmarks.md "H200: 2026-12-03": at 16 rows the engine's
# tile takes 134 us per layer against 128 for quantize + _scaled_mm, so the bound stays).


def uses_scaled_mm(num_rows: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
                   is_rowwise: bool = True, max_gemv_rows: int = MAX_GEMV_ROWS) -> bool:
    """Whether fp8_linear multiplies ``num_rows`` rows of ``dtype`` on ``device`` by an [n, k] weight with
    ``_scaled_mm`` (quantizing them first) rather than the GEMV. A function of shapes alone, so a CUDA
    graph replays the choice it captured."""
    return num_rows > max_gemv_rows and scaled_mm_refusal(n, k, dtype, is_rowwise, device_capability(device)) is None


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, max_gemv_rows: int = MAX_GEMV_ROWS,
               gemv: dict[str, Any] | None = None) -> torch.Tensor:
    """The FP8 linear layer on the GPU: the W8A16 GEMV up to ``max_gemv_rows`` rows, W8A8 ``_scaled_mm``
    beyond (uses_scaled_mm); the GEMV at any row count where ``_scaled_mm`` refuses the shape (a builder
    should say so: check scaled_mm_refusal up front). ``x_scale`` (static) is used by _scaled_mm only:
    the GEMV does not quantize activations."""
    is_rowwise = x_scale is None or w_scale.dim() > 0
    if uses_scaled_mm(x.numel() // x.shape[-1], w_fp8.shape[0], x.shape[-1], x.dtype, x.device, is_rowwise,
                      max_gemv_rows):
        return fp8_linear_gpu(x, w_fp8, w_scale, x_scale, bias)
    return fp8_gemv(x, w_fp8, w_scale, bias, **(gemv or {}))


# ---- the kernel op ``fp8_linear`` -----------------------------------------------------------------

def fp8_linear_op_ref(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                      silu_mul: bool = False) -> torch.Tensor:
    """The ``fp8_linear`` op's reference, a CPU engine's path (on any device it is given: float32
    arithmetic): fp8_linear_ref (W8A8, activations per token), with ``silu_mul`` (a fused gate / up
    projection) silu_mul_ref of the product."""
    y = fp8_linear_ref(x, w_fp8, w_scale, bias=bias)
    if silu_mul:
        from kiln.kernels.activation import silu_mul_ref  # activation -> fp8: imported when called

        return silu_mul_ref(y)
    return y


def fp8_linear_triton(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                      silu_mul: bool = False, shapes: dict[str, dict[str, dict[str, int]]] | None = None
                      ) -> torch.Tensor:
    """The ``fp8_linear`` op on the GPU: fp8_linear, whose GEMV (up to MAX_GEMV_ROWS rows) takes the launch
    config the build timed for this weight's shape and the rows' bucket (``shapes``, the plan's, keyed as
    dense_linear's; default_gemv_config where it has none). With ``silu_mul`` the GEMV takes SiLU·up in its
    epilogue (the Linear asks so only where fp8_linear takes the GEMV). A function of shapes alone."""
    config = gemv_config(shapes, w_fp8.shape, x.numel() // x.shape[-1])
    if silu_mul:
        return fp8_gemv(x, w_fp8, w_scale, bias, silu_mul=True, **(config or {}))
    return fp8_linear(x, w_fp8, w_scale, bias=bias, gemv=config)


# ---- timing (called from a GPU script, not a test) -----------------------------------------------

def measure_fp8_weight_bandwidth(n: int = 28672, k: int = 4096, row_counts: tuple[int, ...] = (1, 8, 64, 256),
                                 gemv_configs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Median time of one [M, k] x [k, n] FP8 product per kernel and row count, on this GPU, and the
    weight bandwidth it achieves (n * k bytes of fp8 weights / time; TARGETS.md: 4.25 TB/s copy on the
    H200). Kernels: ``gemv`` (fp8_gemv, default or each of ``gemv_configs``, e.g. GEMV_CANDIDATES; beyond
    BLOCK_M rows it reads the weights once per row block), ``scaled_mm`` (the
    product alone, activations already quantized), ``fp8_linear_gpu`` (quantization + product) and
    ``bf16_matmul`` (its bandwidth in bf16 weight bytes). Each replayed from a CUDA graph, L2 flushed
    by do_bench before each run. Returns one dict per measurement: kernel, config, M, us, weight_TB_s."""
    import triton.testing

    device = torch.device("cuda")
    w = torch.randn(n, k, device=device) / k ** 0.5
    w_scale = w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX
    w_fp8 = (w / w_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w_bf16 = w.to(torch.bfloat16)
    del w
    results = []

    def timed(kernel: str, config: Any, m: int, fn, weight_bytes: int) -> None:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median")
        results.append({"kernel": kernel, "config": config, "M": m, "us": round(ms * 1e3, 2),
                        "weight_TB_s": round(weight_bytes / (ms * 1e-3) / 1e12, 3)})

    for m in row_counts:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        x_fp8, x_scale = quantize_fp8_per_token_triton(x)
        scale_b = w_scale.reshape(1, n)
        for config in gemv_configs or [default_gemv_config(m)]:
            timed("gemv", config, m, lambda config=config: fp8_gemv(x, w_fp8, w_scale, **config), n * k)
        timed("scaled_mm", None, m, lambda: torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=scale_b,
                                                             out_dtype=torch.bfloat16), n * k)
        timed("fp8_linear_gpu", None, m, lambda: fp8_linear_gpu(x, w_fp8, w_scale), n * k)
        timed("bf16_matmul", None, m, lambda: x @ w_bf16.t(), 2 * n * k)
    return results
