"""FP8 (e4m3): the quantization references against float, and the kernels against the references.

On a CPU-only machine the Triton kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1)
at small awkward shapes, and ``fp8_linear_gpu`` through the CPU's ``torch._scaled_mm``; the ``gpu``
cases run them compiled at Llama-3-8B's shapes (``python -m pytest tests/test_fp8.py -m gpu``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import DEVICE, ON_GPU, gpu
from kiln.errors import ConfigError
from kiln.kernels.fp8 import (fp8_gemv, fp8_linear, fp8_linear_gpu, fp8_linear_op_ref, fp8_linear_triton,
                              quantize_fp8_per_token_triton, quantize_fp8_static_triton, scaled_mm_refusal)
from kiln.quantization.fp8 import (FP8_DTYPE, FP8_MAX, Fp8Linear, dequantize_fp8, fp8_linear_ref,
                                   fp8_w8a16_linear_ref, fuse_fp8_linears, quantize_fp8_per_token,
                                   quantize_fp8_static, quantize_fp8_weight, requantize_fp8_per_tensor)

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_ID = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
# (rtol, atol) of a kernel against its reference, as in test_kernels.py: float32 differs by summation
# order; 16-bit outputs by a rounding or two, which the interpreter widens for bfloat16 (it truncates).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def e4m3_half_step(y: torch.Tensor) -> torch.Tensor:
    """Half the spacing of e4m3 values around |y| (y in units of the scale): 2^(e - 3) / 2 in the binade
    [2^e, 2^(e + 1)) of normal numbers (e >= -6), 2^-9 / 2 among the subnormals."""
    exponent = torch.floor(torch.log2(y.abs().clamp(min=2.0 ** -6)))
    return 2.0 ** (exponent - 3) / 2


def bytes_of(x_fp8: torch.Tensor) -> torch.Tensor:
    return x_fp8.view(torch.uint8)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ---- quantization references ---------------------------------------------------------------------
@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_weight_round_trip_is_within_half_an_e4m3_step(scaling):
    # Magnitudes over six decades, so that per-tensor scaling reaches e4m3's subnormals.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=gen) * 10.0 ** (torch.rand(64, 300, generator=gen) * 6 - 4)
    w_fp8, scale = quantize_fp8_weight(w, scaling)
    assert w_fp8.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == ((64, 1) if scaling == "channel" else ())
    error = (dequantize_fp8(w_fp8, scale) - w).abs()
    # Half a step of w / scale, plus the rounding of that division (half an ulp of float32): a w whose
    # quotient rounds onto a midpoint between two e4m3 values (seed 378: -50.0) is off by both.
    bound = e4m3_half_step(w / scale) * scale + w.abs() * 2.0 ** -24
    assert (error <= bound * (1 + 1e-6)).all()
    normal = (w / scale).abs() >= 2.0 ** -6
    assert (error[normal] <= 2.0 ** -4 * w.abs()[normal] * (1 + 1e-6)).all()  # e4m3: 3 mantissa bits
    if scaling == "channel":  # each row's largest magnitude lands exactly on ±448
        assert (w_fp8.float().gather(1, w.abs().argmax(dim=1, keepdim=True)).abs() == FP8_MAX).all()
    else:
        assert w_fp8.float().abs().max() == FP8_MAX


def test_static_quantization_saturates_at_448():
    x = torch.tensor([[-1e6, -500.0, -448.0, -1.0, 0.0, 1.0, 447.0, 449.0, 1e30, float("inf")]])
    q = quantize_fp8_static(x, torch.tensor(1.0))
    assert q.float().tolist() == [[-448.0, -448.0, -448.0, -1.0, 0.0, 1.0, 448.0, 448.0, 448.0, 448.0]]
    y = fp8_linear_ref(x, *quantize_fp8_weight(torch.randn(3, 10)), x_scale=torch.tensor(2.0))
    assert torch.isfinite(y).all()


def test_zero_rows_quantize_to_zero_with_a_finite_scale():
    w = torch.randn(5, 32)
    w[2] = 0
    w_fp8, scale = quantize_fp8_weight(w, "channel")
    assert torch.isfinite(scale).all() and (scale > 0).all() and (w_fp8[2].float() == 0).all()
    zero_fp8, zero_scale = quantize_fp8_weight(torch.zeros(4, 8), "tensor")
    assert zero_scale > 0 and (zero_fp8.float() == 0).all()
    x = torch.randn(3, 32)
    x[1] = 0  # a padded token
    x_fp8, x_scale = quantize_fp8_per_token(x)
    assert x_scale.shape == (3, 1) and (x_scale > 0).all() and (x_fp8[1].float() == 0).all()
    y = fp8_linear_ref(x, w_fp8, scale)
    assert torch.isfinite(y).all() and (y[1] == 0).all() and (y[:, 2] == 0).all()


@pytest.mark.parametrize("outlier_factor", [100.0, 1e4])
def test_per_channel_scaling_beats_per_tensor_with_outlier_channels(outlier_factor):
    """e4m3 is floating point: a per-tensor scale costs the ordinary channels little (the same 3 mantissa
    bits at a lower exponent) until the outliers push them down into e4m3's subnormals, below 2^-6 in
    units of the scale; per-channel scales keep every channel's full precision. Outliers 100x larger
    (N(0, 1/512) weights) leave the ordinary channels normal; 10^4x sink half their values."""
    torch.manual_seed(0)
    w = torch.randn(256, 512) / 512 ** 0.5
    outliers = torch.randperm(256)[:4]
    w[outliers] *= outlier_factor
    ordinary = torch.ones(256, dtype=torch.bool)
    ordinary[outliers] = False
    x = torch.randn(16, 512)
    expected = x @ w.t()
    errors = {}
    for scaling in ("channel", "tensor"):
        y = fp8_w8a16_linear_ref(x, *quantize_fp8_weight(w, scaling))
        errors[scaling] = relative_error(y[:, ordinary], expected[:, ordinary])
        assert relative_error(y[:, ~ordinary], expected[:, ~ordinary]) < 0.05
    assert errors["channel"] < 0.05
    if outlier_factor < 1000:
        assert errors["channel"] < errors["tensor"] < 1.2 * errors["channel"]
    else:
        assert errors["tensor"] > 1.5 * errors["channel"]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp8_linear_ref_approximates_the_float_linear(static):
    torch.manual_seed(1)
    w, bias = torch.randn(96, 200) / 200 ** 0.5, torch.randn(96)
    x = torch.randn(2, 7, 200)  # leading dims are kept
    x_scale = x.abs().amax() / FP8_MAX if static else None
    y = fp8_linear_ref(x, *quantize_fp8_weight(w), x_scale=x_scale, bias=bias)
    assert y.shape == (2, 7, 96) and y.dtype == x.dtype
    assert relative_error(y, x @ w.t() + bias) < 0.05
    # The dequantize-then-matmul form of the same arithmetic.
    w_fp8, w_scale = quantize_fp8_weight(w)
    x_fp8, x_s = (quantize_fp8_static(x, x_scale), x_scale) if static else quantize_fp8_per_token(x)
    torch.testing.assert_close(fp8_linear_ref(x, w_fp8, w_scale, x_scale, bias),
                               dequantize_fp8(x_fp8, x_s) @ dequantize_fp8(w_fp8, w_scale).t() + bias)


def test_fp8_linear_ref_is_fast_enough_for_the_bundled_model():
    """stories260K's largest linear (512 x 64, the LM head) over a 512-token context batch: the CPU path of
    every FP8 engine in CI must stay a small part of a forward."""
    import time

    w_fp8, w_scale = quantize_fp8_weight(torch.randn(512, 64))
    x = torch.randn(512, 64)
    fp8_linear_ref(x, w_fp8, w_scale)
    t0 = time.perf_counter()
    for _ in range(10):
        fp8_linear_ref(x, w_fp8, w_scale)
    assert (time.perf_counter() - t0) / 10 < 0.02


# ---- fusing parts with different scales ----------------------------------------------------------
def modelopt_like_parts(sizes=(48, 16, 16), k=64, seed=0) -> list[Fp8Linear]:
    """q, k, v as ModelOpt stores them: each a per-tensor weight scale and a static input scale of its own."""
    torch.manual_seed(seed)
    parts = []
    for i, n in enumerate(sizes):
        w_fp8, w_scale = quantize_fp8_weight(torch.randn(n, k) * (i + 1) ** 2, "tensor")
        parts.append(Fp8Linear(w_fp8, w_scale, torch.tensor(0.01 * (i + 1))))
    return parts


def test_fused_parts_keep_their_bytes_and_scales_per_row():
    parts = modelopt_like_parts()
    fused = fuse_fp8_linears(parts)
    assert torch.equal(bytes_of(fused.weight), torch.cat([bytes_of(p.weight) for p in parts]))
    assert fused.weight_scale.shape == (80, 1) and fused.weight_scale.dtype == torch.float32
    # Exact: the fused weight dequantizes to the parts' dequantized weights, element for element.
    assert torch.equal(dequantize_fp8(fused.weight, fused.weight_scale),
                       torch.cat([dequantize_fp8(p.weight, p.weight_scale) for p in parts]))
    assert fused.input_scale == 0.03  # the largest: no part's calibrated range is clipped
    x = torch.randn(5, 64)
    torch.testing.assert_close(fp8_w8a16_linear_ref(x, fused.weight, fused.weight_scale),
                               torch.cat([fp8_w8a16_linear_ref(x, p.weight, p.weight_scale) for p in parts], dim=1),
                               rtol=1e-6, atol=1e-6)


def test_fusing_parts_of_one_scale_keeps_it_per_tensor_and_channel_scales_concatenate():
    w_fp8, scale = quantize_fp8_weight(torch.randn(32, 16), "tensor")
    same = fuse_fp8_linears([Fp8Linear(w_fp8[:8], scale, None), Fp8Linear(w_fp8[8:], scale, None)])
    assert same.weight_scale.dim() == 0 and same.input_scale is None and torch.equal(bytes_of(same.weight),
                                                                                     bytes_of(w_fp8))
    gate, up = quantize_fp8_weight(torch.randn(24, 16)), quantize_fp8_weight(torch.randn(24, 16))
    fused = fuse_fp8_linears([Fp8Linear(*gate, None), Fp8Linear(*up, None)])
    assert torch.equal(fused.weight_scale, torch.cat([gate[1], up[1]]))
    with pytest.raises(ValueError, match="mix static and dynamic"):
        fuse_fp8_linears([Fp8Linear(*gate, torch.tensor(1.0)), Fp8Linear(*up, None)])


def test_requantizing_to_one_scale_costs_at_most_half_a_step():
    parts = modelopt_like_parts()
    fused = fuse_fp8_linears(parts)
    w_fp8, scale = requantize_fp8_per_tensor(fused.weight, fused.weight_scale)
    assert scale.dim() == 0 and scale == fused.weight_scale.max()
    assert torch.equal(bytes_of(w_fp8[-16:]), bytes_of(parts[-1].weight))  # the part that had the largest scale
    exact = dequantize_fp8(fused.weight, fused.weight_scale)
    error = (dequantize_fp8(w_fp8, scale) - exact).abs()
    assert (error <= e4m3_half_step(exact / scale) * scale * (1 + 1e-6)).all()
    assert error[:48].max() > 0  # the parts with smaller scales did lose precision


# ---- Triton kernels (interpreted on the CPU) -----------------------------------------------------
QUANT_SHAPES = [(1, 72), (7, 200), (5, 1000)] + [
    pytest.param(t, k, marks=gpu) for t, k in ((1, 4096), (256, 14336), (4096, 4096))]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,hidden", QUANT_SHAPES)
def test_quantize_per_token_kernel_matches_reference_bit_for_bit(num_tokens, hidden, dtype, rounding_fp8_casts):
    x = (randn(num_tokens, hidden) * 10.0 ** torch.empty(num_tokens, 1, device=DEVICE).uniform_(-3, 3)).to(dtype)
    x[num_tokens // 2] = 0  # a padded token
    x_fp8, scale = quantize_fp8_per_token_triton(x)
    expected_fp8, expected_scale = quantize_fp8_per_token(x)
    assert x.dtype == dtype and scale.shape == (num_tokens, 1) and torch.equal(scale, expected_scale)
    assert torch.equal(bytes_of(x_fp8), bytes_of(expected_fp8))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,hidden", QUANT_SHAPES)
def test_quantize_static_kernel_matches_reference_and_saturates(num_tokens, hidden, dtype, rounding_fp8_casts):
    x = randn(num_tokens, hidden, dtype=dtype)
    scale = (x.float().abs().amax() / FP8_MAX / 2).reshape(())  # half the range: the largest values saturate
    x_fp8 = quantize_fp8_static_triton(x, scale)
    assert torch.equal(bytes_of(x_fp8), bytes_of(quantize_fp8_static(x, scale)))
    assert x_fp8.float().abs().max() == FP8_MAX


def gemv_case(num_rows: int, n: int, k: int, dtype: torch.dtype, scaling: str, has_bias: bool):
    w_fp8, w_scale = quantize_fp8_weight(randn(n, k) / k ** 0.5, scaling)
    x = randn(num_rows, k, dtype=dtype)
    bias = randn(n, dtype=dtype) if has_bias else None
    return x, w_fp8, w_scale, bias


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# (rows, N, K, config): BLOCK_M 1 is the CUDA-core path, 16 tl.dot (the interpreter multiplies bfloat16 dot
# operands as raw integers, see test_kernels.py, so tl.dot runs float32 / float16 there).
GEMV_CASES = [
    (1, 72, 100, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}),
    (1, 200, 1000, {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2}),
    (1, 40, 100, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}),  # K < a step
    (1, 24, 256, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1}),  # one whole step
    (3, 72, 100, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}),
    (21, 200, 1000, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("scaling,has_bias", [("channel", True), ("tensor", False)])
@pytest.mark.parametrize("num_rows,n,k,config", GEMV_CASES)
def test_gemv_matches_w8a16_reference(num_rows, n, k, config, scaling, has_bias, dtype):
    if dtype == torch.bfloat16 and config["BLOCK_M"] > 1 and not ON_GPU:
        pytest.skip("the interpreter's tl.dot mishandles bfloat16")
    x, w_fp8, w_scale, bias = gemv_case(num_rows, n, k, dtype, scaling, has_bias)
    out = fp8_gemv(x, w_fp8, w_scale, bias, **config)
    assert_close(out, fp8_w8a16_linear_ref(x, w_fp8, w_scale, bias))


@pytest.mark.parametrize("scaling,has_bias", [("channel", True), ("tensor", False)])
@pytest.mark.parametrize("num_rows", [1, 5])
def test_fp8_gemv_of_a_gate_up_projection_takes_silu_mul_in_its_epilogue(num_rows, scaling, has_bias,
                                                                         rounding_bf16_casts):
    """What the FP8 method's apply_silu_mul runs (its default GEMV, the weight's scales, a bias or none):
    bit for bit the GEMV's product, then SiLU·up's kernel. bfloat16 on the GPU, float16 in the interpreter
    (its tl.dot, at 5 rows, mishandles bfloat16)."""
    from kiln.kernels.activation import silu_mul_triton

    dtype = torch.bfloat16 if ON_GPU else torch.float16
    x, w_fp8, w_scale, bias = gemv_case(num_rows, 2 * 37, 300, dtype, scaling, has_bias)
    out = fp8_gemv(x, w_fp8, w_scale, bias, silu_mul=True)
    assert out.shape == (num_rows, 37) and torch.equal(out, silu_mul_triton(fp8_gemv(x, w_fp8, w_scale, bias)))


def recording_gemv_configs(monkeypatch) -> list[dict]:
    """The launch options each fp8_gemv call gets from now on (fp8_linear's GEMV included), in order."""
    import kiln.kernels.fp8

    configs, gemv = [], kiln.kernels.fp8.fp8_gemv

    def recording(*args, **config):
        configs.append(config)
        return gemv(*args, **config)

    monkeypatch.setattr(kiln.kernels.fp8, "fp8_gemv", recording)
    return configs


def test_fp8_linear_op_takes_the_plans_config_for_the_weights_shape_and_row_bucket(monkeypatch):
    """The op as a GPU engine binds it: the GEMV with the config the plan's shapes give this [N, K] at this
    row count's bucket, its default where the plan has none (another bucket, another shape, no plan); with
    silu_mul, SiLU·up in the same GEMV's epilogue, with the same config. The CPU's reference: the W8A8
    product, then silu_mul_ref."""
    from kiln.kernels.activation import silu_mul_ref

    tuned = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1}
    shapes = {"74x300": {"16": tuned}}
    five, w_fp8, w_scale, bias = gemv_case(5, 74, 300, torch.float16, "channel", True)
    one = randn(1, 300, dtype=torch.float16)
    configs = recording_gemv_configs(monkeypatch)
    out = fp8_linear_triton(five, w_fp8, w_scale, bias, shapes=shapes)
    assert configs == [tuned] and torch.equal(out, fp8_gemv(five, w_fp8, w_scale, bias, **tuned))
    configs.clear()
    out = fp8_linear_triton(five, w_fp8, w_scale, bias, silu_mul=True, shapes=shapes)
    assert configs == [{"silu_mul": True, **tuned}]
    assert torch.equal(out, fp8_gemv(five, w_fp8, w_scale, bias, silu_mul=True, **tuned))
    for x, plan in [(one, shapes), (five, {"40x300": {"16": tuned}}), (five, None)]:
        configs.clear()
        out = fp8_linear_triton(x, w_fp8, w_scale, bias, shapes=plan)
        assert configs == [{}] and torch.equal(out, fp8_gemv(x, w_fp8, w_scale, bias))
    assert torch.equal(fp8_linear_op_ref(five, w_fp8, w_scale, bias), fp8_linear_ref(five, w_fp8, w_scale, bias=bias))
    assert torch.equal(fp8_linear_op_ref(five, w_fp8, w_scale, bias, silu_mul=True),
                       silu_mul_ref(fp8_linear_ref(five, w_fp8, w_scale, bias=bias)))


def test_tuning_picks_fp8_gemv_configs_per_shape_at_2_to_16_rows(monkeypatch):
    """Fake times: the GEMV's default 10, the 16-row candidate with BLOCK_N 32 5, the rest 20. The winner
    goes into the plan for the timed shape, checked on the kernel (interpreter) against the default's
    product, and the op then runs the GEMV with it; one row is not timed (its default stays); a shape below
    MIN_TUNED_MATMUL_BYTES (a byte a weight) is not timed; the rows timed are a step's, up to max_num_tokens."""
    from kiln.builder import tuning
    from kiln.config import BuildConfig
    from kiln.convert import AutoModelForCausalLM
    from kiln.kernels import KernelOps

    timed = []

    def fake_median_ms(fn):
        config, rows = fn.keywords, fn.args[0].shape[0]
        timed.append((rows, config.get("BLOCK_M"), config.get("BLOCK_N")))
        if not config:
            return 10.0
        return 5.0 if config["BLOCK_N"] == 32 else 20.0

    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    monkeypatch.setattr(tuning, "MIN_TUNED_MATMUL_BYTES", 48 * 256)
    config = AutoModelForCausalLM.from_preset("llama-3-8b").config
    build = BuildConfig(max_batch_size=16, max_input_len=16, max_seq_len=32, max_num_tokens=16, quantization="fp8")
    plan = tuning.TuningRun(config, build, torch.float16, num_sms=1, device=DEVICE).tune_fp8_linear(
        [(48, 256), (48, 128)])
    candidates = tuning.GEMV_CANDIDATES
    winner = next(c for c in candidates if c["BLOCK_M"] == 16 and c["BLOCK_N"] == 32)
    assert plan == {"shapes": {"48x256": {"16": winner}}}
    assert {rows for rows, _, _ in timed} == {2, 16}  # each candidate and the default at 2 and 16 rows
    assert len(timed) == 2 * (1 + sum(c["BLOCK_M"] == 16 for c in candidates))
    ops = KernelOps({"fp8_linear": {"impl": "triton", "config": plan}})
    x, w_fp8, w_scale, _ = gemv_case(5, 48, 256, torch.float16, "channel", False)
    configs = recording_gemv_configs(monkeypatch)
    ops.fp8_linear(x, w_fp8, w_scale)
    assert configs == [winner]


@pytest.mark.parametrize("num_rows", [1, 5])
def test_gemv_default_configs(num_rows):
    x, w_fp8, w_scale, bias = gemv_case(num_rows, 40, 1100, torch.float16, "channel", True)
    assert_close(fp8_gemv(x, w_fp8, w_scale, bias), fp8_w8a16_linear_ref(x, w_fp8, w_scale, bias))


@pytest.mark.parametrize("scaling,static,has_bias", [("channel", False, True), ("tensor", True, False),
                                                     ("tensor", False, False), ("channel", True, True)])
def test_fp8_linear_gpu_matches_reference(scaling, static, has_bias, rounding_fp8_casts):
    """On the CPU, through the CPU's torch._scaled_mm: the scales' shapes and the weight's layout."""
    x, w_fp8, w_scale, bias = gemv_case(6, 48, 64, torch.bfloat16, scaling, has_bias)
    x_scale = (x.float().abs().amax() / FP8_MAX).reshape(()) if static else None
    out = fp8_linear_gpu(x.view(2, 3, 64), w_fp8, w_scale, x_scale, bias)
    assert_close(out, fp8_linear_ref(x.view(2, 3, 64), w_fp8, w_scale, x_scale, bias))


def test_scaled_mm_refusals_name_the_constraint():
    assert scaled_mm_refusal(4096, 4096, torch.bfloat16, True, (9, 0)) is None
    assert scaled_mm_refusal(4096, 4096, torch.float16, False, (8, 9)) is None
    assert "multiples of 16" in scaled_mm_refusal(172, 64, torch.bfloat16, True, None)
    assert "Hopper" in scaled_mm_refusal(4096, 4096, torch.bfloat16, True, (8, 9))
    assert "sm89" in scaled_mm_refusal(4096, 4096, torch.bfloat16, False, (8, 0))
    assert "bfloat16 only" in scaled_mm_refusal(4096, 4096, torch.float16, True, (9, 0))
    x, w_fp8, w_scale, _ = gemv_case(20, 172, 64, torch.bfloat16, "channel", False)  # stories260K's MLP width
    with pytest.raises(ConfigError, match="64 -> 172: .*multiples of 16"):
        fp8_linear_gpu(x, w_fp8, w_scale)


@pytest.mark.parametrize("num_rows,n", [(1, 48), (17, 48), (20, 172)])
def test_fp8_linear_takes_the_gemv_for_few_rows_and_unsupported_shapes(num_rows, n, rounding_fp8_casts):
    x, w_fp8, w_scale, bias = gemv_case(num_rows, n, 64, torch.float16 if n % 16 else torch.bfloat16,
                                        "channel", True)
    gemv = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}
    out = fp8_linear(x, w_fp8, w_scale, bias=bias, gemv=gemv)
    uses_scaled_mm = num_rows > 16 and n % 16 == 0
    expected = (fp8_linear_ref if uses_scaled_mm else fp8_w8a16_linear_ref)(x, w_fp8, w_scale, bias=bias)
    assert_close(out, expected)


# ---- compiled for the GPU, without one -----------------------------------------------------------
def compile_for(kernel, capability: int, signature: dict[str, str], constexprs: dict, num_warps: int,
                num_stages: int) -> str:
    """PTX of a kernel compiled ahead of time for an NVIDIA GPU of this compute capability (ptxas runs too,
    so code it rejects fails here), with every pointer and integer argument but ``num_rows`` marked
    16-divisible, as Triton's launcher marks such values at run time (then loads widen to 16 bytes). A
    kernel's ``PDL`` is what kiln launches it with on that GPU (programmatic dependent launch from sm90)
    unless given."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "PDL" in kernel.arg_names:
        constexprs = {"PDL": capability >= 90, **constexprs}
    types, constants, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            types[name], constants[(i,)] = "constexpr", constexprs[name]
        else:
            types[name] = signature[name]
            if name != "num_rows":
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, types, constants, attrs), target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ptx"]


def compile_kernels_for_ada_and_hopper() -> dict[str, str]:
    """PTX of the quantization kernel (sm90) and of the GEMV's default configs (sm89, sm90), bfloat16."""
    from kiln.kernels.fp8 import FP8_MAX_INV, MIN_AMAX, _quantize_fp8_kernel
    from kiln.kernels.gemv import DEFAULT_GEMV_CONFIGS, NO_KV_WRITE, _gemv_kernel

    ptx = {"quantize": compile_for(
        _quantize_fp8_kernel, 90, {"x_ptr": "*bf16", "x_row_stride": "i32", "scale_ptr": "*fp32",
                                   "out_ptr": "*fp8e4nv", "out_row_stride": "i32", "num_cols": "i32"},
        {"IS_DYNAMIC": True, "FP8_MAX": FP8_MAX, "FP8_MAX_INV": FP8_MAX_INV, "MIN_AMAX": MIN_AMAX, "BLOCK": 4096},
        num_warps=16, num_stages=1)}
    gemv_signature = {"x_ptr": "*bf16", "x_row_stride": "i32", "w_ptr": "*fp8e4nv", "w_row_stride": "i32",
                      "w_scale_ptr": "*fp32", "w_scale_stride": "i32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                      "out_row_stride": "i32", "num_rows": "i32", "N": "i32", "K": "i32", "eps": "fp32",
                      "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "cos_sin_row_stride": "i32",
                      "slot_mapping_ptr": "*i64", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
                      "cache_block_stride": "i32", "cache_slot_stride": "i32", "kv_block_size": "i32",
                      "kv_scale_ptr": "*fp32"}
    for capability in (89, 90):
        for (block_m, config), silu_mul in itertools.product(DEFAULT_GEMV_CONFIGS.items(), (False, True)):
            # silu_mul: a gate / up projection's GEMV taking SiLU·up in its epilogue (the FP8 method's fold)
            ptx[f"gemv_block_m{block_m}_{'silu_mul_' if silu_mul else ''}sm{capability}"] = compile_for(
                _gemv_kernel, capability, gemv_signature,
                {"HAS_SCALE": True, "HAS_BIAS": True, "NORM": False, "ADD_RESIDUAL": False, **NO_KV_WRITE,
                 "SILU_MUL": silu_mul, "BLOCK_M": block_m, "DOT_PRECISION": "tf32", "BLOCK_N": config["BLOCK_N"],
                 "BLOCK_K": config["BLOCK_K"]}, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return ptx


def compiled_apart(tmp_path, module: str, call: str):
    """What ``module.call`` returns (JSON: the PTX of kernels it compiles), run in a Python process of its own
    with TRITON_INTERPRET=0 (conftest, which test modules import, sets it to 1 only where it is unset), so
    that Triton compiles rather than interprets; its cache in tmp_path."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    result = subprocess.run([sys.executable, "-c", f"import json, {module}; print(json.dumps({module}.{call}))"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the kernels themselves")
def test_kernels_compile_for_ada_and_hopper_with_the_instructions_they_rely_on(tmp_path):
    """What the interpreter cannot show: the kernels pass Triton's and ptxas's pipeline for sm89 and sm90
    with the default configs; the quantization divides with IEEE division and casts with round-to-nearest-
    even saturation (what makes it bit-identical to torch); the weights are read 16 bytes per load; the
    multi-row GEMV runs on tensor cores fed by cp.async. Compiled in a process of its own: with
    TRITON_INTERPRET=1 (set for this one) tl.max and friends are interpreter functions."""
    ptx = compiled_apart(tmp_path, "test_fp8", "compile_kernels_for_ada_and_hopper()")
    quantize = ptx.pop("quantize")
    assert "div.rn.f32" in quantize and "cvt.rn.satfinite.e4m3x2.f32" in quantize and "ld.global.v4.b32" in quantize
    for name, code in ptx.items():
        if "block_m1_" in name:
            assert "ld.global.v4.b32" in code, name
        else:
            assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in code and "cp.async" in code, name


# ---- GPU, at Llama-3-8B's shapes -----------------------------------------------------------------
# (N, K): fused QKV, fused gate/up, down.
LLAMA3_8B_LINEARS = [(6144, 4096), (28672, 4096), (4096, 14336)]


def assert_matmul_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Both sum exact products (fp8 x fp8, or fp8 x bf16, fit float32) in float32 in different orders,
    then round to bfloat16: a bfloat16 rounding apart (2^-8), plus summation noise near zero."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2.0 ** -7,
                               atol=1e-3 * expected.float().abs().max().item())


@gpu
@pytest.mark.parametrize("n,k", LLAMA3_8B_LINEARS)
@pytest.mark.parametrize("num_rows", [1, 2, 16, 17, 64, 256])
def test_gpu_fp8_linear_at_llama3_8b_shapes(num_rows, n, k):
    x, w_fp8, w_scale, _ = gemv_case(num_rows, n, k, torch.bfloat16, "channel", False)
    assert_matmul_close(fp8_gemv(x, w_fp8, w_scale), fp8_w8a16_linear_ref(x, w_fp8, w_scale))
    assert_matmul_close(fp8_linear_gpu(x, w_fp8, w_scale), fp8_linear_ref(x, w_fp8, w_scale))
    expected = (fp8_w8a16_linear_ref if num_rows <= 16 else fp8_linear_ref)(x, w_fp8, w_scale)
    assert_matmul_close(fp8_linear(x, w_fp8, w_scale), expected)


@gpu
@pytest.mark.parametrize("num_rows", [1, 8, 256])
def test_gpu_fp8_linear_per_tensor_static_with_bias(num_rows):
    n, k = 6144, 4096
    x, w_fp8, w_scale, bias = gemv_case(num_rows, n, k, torch.bfloat16, "tensor", True)
    x_scale = (x.float().abs().amax() / FP8_MAX).reshape(())
    assert_matmul_close(fp8_linear_gpu(x, w_fp8, w_scale, x_scale, bias), fp8_linear_ref(x, w_fp8, w_scale, x_scale,
                                                                                       bias))
    assert_matmul_close(fp8_gemv(x, w_fp8, w_scale, bias), fp8_w8a16_linear_ref(x, w_fp8, w_scale, bias))


@gpu
def test_gpu_gemv_in_a_cuda_graph():
    x, w_fp8, w_scale, bias = gemv_case(1, 6144, 4096, torch.bfloat16, "channel", True)
    fp8_linear(x, w_fp8, w_scale, bias=bias)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x, w_fp8, w_scale, bias=bias)
    for _ in range(2):
        x.copy_(randn(1, 4096, dtype=torch.bfloat16))
        graph.replay()
        assert_matmul_close(out, fp8_w8a16_linear_ref(x, w_fp8, w_scale, bias))
