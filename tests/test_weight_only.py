"""Weight-only INT8 / INT4: the quantizers' rounding, kiln's packed layouts, AWQ's scale search, and the
W8A16 / W4A16 Triton matmuls against their plain-PyTorch references.

On a CPU-only machine the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1) at
small, awkward shapes: K = 172 (stories260K's down projection, padded to whole groups), odd N, every
launch path (1 row, a few rows on CUDA cores, 16 rows through tl.dot, a tiled GEMM, and from
DEQUANT_MIN_ROWS rows the weight dequantized whole, then multiplied by torch). The ``gpu`` cases
run the same checks compiled at Llama-3-8B sizes (``python -m pytest tests/test_weight_only.py -m gpu``);
``kiln.kernels.weight_only.measure_weight_bandwidth`` times them.
"""

from __future__ import annotations

import pytest
import torch

import kiln.kernels.weight_only as weight_only
from conftest import DEVICE, ON_GPU, gpu
from kiln.kernels.weight_only import (DEFAULT_CONFIGS, DEQUANT_MIN_ROWS, DEQUANTIZE_CONFIG, TENSOR_CORE_CONFIGS,
                                      dequantize_from, dequantize_min_rows, dequantize_weight_triton,
                                      dequantize_workspace_bytes, launch_config, w4a16_matmul_ref,
                                      w4a16_matmul_triton, w8a16_matmul_ref, w8a16_matmul_triton)
from kiln.quantization.weight_only import (QuantizedWeight, awq_clip, awq_scales, clip_groups, dequantize_int4,
                                           dequantize_int8, pack_int4, padded_in_features, quantize_int4,
                                           quantize_int8, unpack_int4)

pytest.importorskip("triton")


# (rtol, atol) on outputs of order 1 (weights ~ N(0, 1/K), x ~ N(0, 1)). The references multiply the
# float32 dequantized weight in float32; the CUDA-core path sums float32 products too, so it differs by
# summation order and the final rounding; the tl.dot path rounds each dequantized weight to x's dtype
# first (2**-11 / 2**-8 relative), which adds ~2**-11 / 2**-8 / sqrt(3) relative noise per output.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
DTYPE_ID = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5).to(DEVICE)


# ---- quantization: rounding and layouts -----------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_ID)
def test_int8_round_to_nearest_is_within_half_a_step(scale_dtype):
    w = random_weight(70, 172)
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 40.0  # an outlier sets its row's step
    qweight, scales = quantize_int8(w, scale_dtype)
    assert qweight.dtype == torch.int8 and qweight.shape == w.shape
    assert scales.dtype == scale_dtype and scales.shape == (70,)
    assert qweight.abs().max() <= 127
    error = (dequantize_int8(qweight, scales) - w).abs()
    # Half a step, plus the float32 rounding of w / s (a relative 2**-24 of w).
    assert (error <= scales.float()[:, None] / 2 * (1 + 1e-6) + w.abs() * 2 ** -23).all()
    assert torch.equal(dequantize_int8(qweight, scales)[3], torch.zeros(172, device=DEVICE))


def test_int8_values_on_the_grid_round_trip_exactly():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (40, 96), generator=gen, dtype=torch.int8)
    q[:, 0] = 127  # each row reaches the end of its grid, so the step is recovered
    scales = (torch.rand(40, generator=gen) + 0.01).to(torch.float16).float()
    w = q.float() * scales[:, None]
    qweight, found_scales = quantize_int8(w.to(DEVICE))
    assert torch.equal(found_scales.cpu(), scales) and torch.equal(qweight.cpu(), q)
    assert torch.equal(dequantize_int8(qweight, found_scales).cpu(), w)


def test_int4_layout_is_blocks_of_16_words_one_16_input_run_per_nibble():
    """Input k = 128 * b + 16 * j + i is nibble j (bits 4j..4j+3) of word 16 * b + i."""
    k = torch.arange(256)
    values = ((k // 16) % 8 + 8 * (k // 128)).to(torch.uint8).repeat(2, 1)  # nibble j of block b holds j + 8b
    values[1, 130] = 15  # block 1, run 0, word 2
    packed = pack_int4(values)
    assert packed.dtype == torch.int32 and packed.shape == (2, 32)
    assert set(packed[0, :16].tolist()) == {0x76543210}
    assert set(packed[0, 16:].tolist()) == {0xFEDCBA98 - 2 ** 32}  # the same 32 bits as int32
    assert packed[1, 18].item() == 0xFEDCBA9F - 2 ** 32
    assert torch.equal(unpack_int4(packed), values)
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_int4(values[:, :64])


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("in_features", [172, 256])
def test_int4_round_to_nearest_is_within_half_a_step(group_size, in_features):
    w = random_weight(50, in_features, seed=group_size)
    w[0, :group_size] = 0.0  # an all-zero group
    w[1, :group_size] = torch.linspace(0.1, 0.9, group_size)  # all positive: 0 joins the range
    qweight, scales, zeros = quantize_int4(w, group_size)
    padded = padded_in_features(in_features, group_size)
    num_groups = padded // group_size
    assert qweight.dtype == torch.int32 and qweight.shape == (50, padded // 8)
    assert scales.dtype == torch.float16 and scales.shape == zeros.shape == (50, num_groups)
    assert zeros.dtype == torch.uint8 and zeros.max() <= 15
    dequantized = dequantize_int4(qweight, scales, zeros, group_size)
    assert dequantized.shape == (50, padded)
    step = scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    error = (dequantized[:, :in_features] - w).abs()
    assert (error <= step / 2 * (1 + 1e-6) + w.abs() * 2 ** -23).all()
    # The padded columns dequantize to exactly zero, and dequantize_int4 cuts them off when told K.
    assert torch.equal(dequantized[:, in_features:], torch.zeros(50, padded - in_features, device=DEVICE))
    assert torch.equal(dequantize_int4(qweight, scales, zeros, group_size, in_features), dequantized[:, :in_features])
    assert torch.equal(dequantized[0, :group_size], torch.zeros(group_size, device=DEVICE))


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_values_on_the_grid_round_trip_exactly(group_size):
    gen = torch.Generator().manual_seed(2)
    num_rows, num_groups = 24, 384 // group_size
    q = torch.randint(0, 16, (num_rows, num_groups, group_size), generator=gen)
    q[..., 0], q[..., 1] = 0, 15  # each group spans its whole grid, so its step is recovered
    zeros = torch.randint(0, 16, (num_rows, num_groups), generator=gen)
    scales = (torch.rand(num_rows, num_groups, generator=gen) + 0.01).to(torch.float16)
    w = ((q - zeros[..., None]).float() * scales.float()[..., None]).view(num_rows, -1)
    qweight, found_scales, found_zeros = quantize_int4(w.to(DEVICE), group_size)
    assert torch.equal(found_scales.cpu(), scales) and torch.equal(found_zeros.cpu(), zeros.to(torch.uint8))
    assert torch.equal(unpack_int4(qweight).cpu(), q.view(num_rows, -1).to(torch.uint8))
    assert torch.equal(dequantize_int4(qweight, found_scales, found_zeros, group_size).cpu(), w)


def test_quantizers_refuse_what_they_cannot_represent():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_int4(torch.randn(4, 64), group_size=40)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(4))
    with pytest.raises(ValueError, match="too large"):
        quantize_int4(torch.full((2, 32), 1e6), group_size=32)  # steps beyond float16


def test_quantized_weight_dequantizes_either_layout():
    w = random_weight(72, 172)
    int4 = QuantizedWeight(4, *quantize_int4(w, 64), group_size=64, in_features=172)
    assert torch.equal(int4.dequantize(), dequantize_int4(*quantize_int4(w, 64), 64, 172))
    assert set(int4.tensors()) == {"qweight", "scales", "zeros"} and int4.out_features == 72
    int8 = QuantizedWeight(8, *quantize_int8(w), zeros=None, group_size=None, in_features=172)
    assert torch.equal(int8.dequantize(), dequantize_int8(*quantize_int8(w)))
    with pytest.raises(ValueError, match="zero points"):
        QuantizedWeight(4, int4.qweight, int4.scales, None, 64, 172)


# ---- AWQ ------------------------------------------------------------------------------------------
def test_awq_scales_beat_round_to_nearest_on_salient_channels():
    """A layer whose inputs have a few channels 20x larger than the rest (the activation outliers AWQ
    was made for): scaling those input channels up before quantizing protects the weights they meet."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, in_features, out_features, group_size = 256, 256, 96, 64
    x = torch.randn(num_tokens, in_features, generator=gen)
    salient = torch.randperm(in_features, generator=gen)[:4]
    x[:, salient] *= 20.0
    w = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    reference = x @ w.T

    def output_error(scales: torch.Tensor) -> float:
        quantized = quantize_int4(w * scales, group_size)
        return (x @ (dequantize_int4(*quantized, group_size, in_features) / scales).T - reference).pow(2).mean().item()

    scales = awq_scales(w, x, group_size)
    assert scales.shape == (in_features,) and (scales > 0).all()
    assert scales[salient].min() > scales.median()  # the salient channels are the ones scaled up
    rtn_error = output_error(torch.ones(in_features))
    assert output_error(scales) < 0.8 * rtn_error


def test_awq_clip_never_raises_a_groups_output_error_on_the_calibration_inputs():
    gen = torch.Generator().manual_seed(4)
    num_tokens, in_features, out_features, group_size = 128, 172, 40, 32
    x = torch.randn(num_tokens, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    w[:, 3] *= 8.0  # an outlier in every row's first group: clipping it helps the group's other weights
    clip = awq_clip(w, x, group_size)
    assert clip.shape == (out_features, 6)
    max_abs = torch.nn.functional.pad(w.abs(), (0, 192 - in_features)).view(out_features, 6, group_size).amax(-1)
    assert (clip <= max_abs).all() and (clip >= 0.5 * max_abs - 1e-6).all() and (clip < max_abs).any()

    def group_errors(weight: torch.Tensor) -> torch.Tensor:
        diff = dequantize_int4(*quantize_int4(weight, group_size), group_size, in_features) - w
        diff = torch.nn.functional.pad(diff, (0, 192 - in_features)).view(out_features, 6, group_size)
        xg = torch.nn.functional.pad(x, (0, 192 - in_features)).view(num_tokens, 6, group_size)
        return torch.einsum("tgk,ngk->tng", xg, diff).pow(2).mean(0)

    assert (group_errors(clip_groups(w, clip, group_size)) <= group_errors(w) + 1e-7).all()


# ---- the matmuls ----------------------------------------------------------------------------------
def config(block_m: int, block_n: int, block_k: int, group_m: int = 1) -> list[dict]:
    """One launch config for every batch size."""
    return [{"max_rows": 1 << 30, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
             "num_warps": 4, "num_stages": 2}]


def dequantize_config(block_n: int = 16, block_k: int = 512) -> list[dict]:
    """Dequantize-then-matmul for every batch size, the dequantization in BLOCK_N x BLOCK_K tiles."""
    return [{"max_rows": 1 << 30, **DEQUANTIZE_CONFIG, "BLOCK_N": block_n, "BLOCK_K": block_k}]


# name -> (rows M, out features N, in features K, group size, launch config: None for the defaults).
# The interpreter's tl.dot multiplies bfloat16 as raw integers (see test_kernels.py), so bfloat16 runs
# the tl.dot paths (BLOCK_M >= 16) on the GPU only.
MATMUL_CASES = {
    "gemv_1_row_k172_g64": (1, 72, 172, 64, config(1, 16, 64)),
    "gemv_3_rows_k172_g128_n250": (3, 250, 172, 128, config(1, 32, 256)),
    "gemv_16_rows_dot_g32": (16, 72, 256, 32, config(16, 32, 64)),
    "gemm_33_rows_k172_g64": (33, 250, 172, 64, config(16, 32, 32, group_m=2)),
    "defaults_1_row": (1, 72, 172, 128, None),
    "gemv_2_rows_k300_g32_n33": (2, 33, 300, 32, config(1, 16, 128)),
    "defaults_5_rows_k300_g32": (5, 47, 300, 32, None),
    "gemm_20_rows_k300_g64_n47": (20, 47, 300, 64, config(16, 16, 32)),
    "gemv_1_row_whole_tiles_g128": (1, 64, 512, 128, config(1, 16, 256)),  # the INT4 GEMV without masks
    "gemv_2_rows_whole_tiles_g32": (2, 48, 256, 32, config(1, 16, 256)),
    "dequantize_3_rows_k172_g64_n97": (3, 97, 172, 64, dequantize_config()),
    "dequantize_9_rows_k300_g32_n47": (9, 47, 300, 32, dequantize_config(8, 128)),
    "defaults_at_dequant_min_rows_k172_g128_n97": (max(DEQUANT_MIN_ROWS.values()), 97, 172, 128, None),
}
MATMUL_DTYPES = [torch.float16, torch.bfloat16]


def uses_dot(rows: int, configs: list[dict] | None, bits: int) -> bool:
    return launch_config(configs, rows, bits).get("BLOCK_M", 0) >= 16


def matmul_input(rows: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """x as a strided view (row stride K + 5), as a slice of a fused projection's output would be."""
    gen = torch.Generator().manual_seed(4)
    return torch.randn(rows, in_features + 5, generator=gen).to(DEVICE, dtype)[:, :in_features]


@pytest.mark.parametrize("dtype", MATMUL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("case", list(MATMUL_CASES.values()), ids=list(MATMUL_CASES))
def test_w4a16_matmul(case, dtype):
    rows, out_features, in_features, group_size, configs = case
    if dtype == torch.bfloat16 and not ON_GPU and uses_dot(rows, configs, 4):
        pytest.skip("the interpreter's tl.dot mishandles bfloat16")
    qweight, scales, zeros = quantize_int4(random_weight(out_features, in_features), group_size)
    x = matmul_input(rows, in_features, dtype)
    expected = w4a16_matmul_ref(x, qweight, scales, zeros, group_size)
    assert_close(w4a16_matmul_triton(x, qweight, scales, zeros, group_size, configs=configs), expected)


@pytest.mark.parametrize("dtype", MATMUL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("case", list(MATMUL_CASES.values()), ids=list(MATMUL_CASES))
def test_w8a16_matmul(case, dtype):
    rows, out_features, in_features, _, configs = case
    if dtype == torch.bfloat16 and not ON_GPU and uses_dot(rows, configs, 8):
        pytest.skip("the interpreter's tl.dot mishandles bfloat16")
    qweight, scales = quantize_int8(random_weight(out_features, in_features))
    x = matmul_input(rows, in_features, dtype)
    assert_close(w8a16_matmul_triton(x, qweight, scales, configs=configs), w8a16_matmul_ref(x, qweight, scales))


# One launch config of each path, for every batch size.
PATHS = {"gemv": config(1, 16, 128), "dot": config(16, 16, 128), "dequantize": dequantize_config(16, 128)}


@pytest.mark.parametrize("configs", list(PATHS.values()), ids=list(PATHS))
def test_w4a16_matmul_reads_inputs_through_the_act_order_permutation(configs):
    """GPTQ desc_act: stored input row k is original row input_order[k]; the kernels gather x to match
    (dequantize-then-matmul gathers x's columns once)."""
    rows, out_features, in_features, group_size = 5, 40, 172, 32
    qweight, scales, zeros = quantize_int4(random_weight(out_features, in_features), group_size)
    input_order = torch.randperm(in_features, generator=torch.Generator().manual_seed(5)).to(torch.int32).to(DEVICE)
    x = matmul_input(rows, in_features, torch.float16)
    expected = w4a16_matmul_ref(x, qweight, scales, zeros, group_size, input_order)
    assert_close(expected, w4a16_matmul_ref(x[:, input_order.long()], qweight, scales, zeros, group_size))
    actual = w4a16_matmul_triton(x, qweight, scales, zeros, group_size, input_order, configs=configs)
    assert_close(actual, expected)


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("configs", list(PATHS.values()), ids=list(PATHS))
def test_w8a16_matmul_grouped_with_zero_points(configs, group_size):
    """INT8 with a scale and a zero point per group of input rows, as GPTQ 8-bit checkpoints have them."""
    gen = torch.Generator().manual_seed(6)
    rows, out_features, in_features = 3, 24, 172
    num_groups = -(-in_features // group_size)
    qweight = torch.randint(-128, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    zeros = torch.randint(-20, 20, (out_features, num_groups), generator=gen, dtype=torch.int8)
    scales = (torch.rand(out_features, num_groups, generator=gen) / 400).to(torch.float16)
    qweight, zeros, scales = qweight.to(DEVICE), zeros.to(DEVICE), scales.to(DEVICE)
    x = matmul_input(rows, in_features, torch.float16)
    expected = w8a16_matmul_ref(x, qweight, scales, zeros, group_size)
    actual = w8a16_matmul_triton(x, qweight, scales, zeros, group_size, configs=configs)
    assert_close(actual, expected)


def test_default_configs_cover_every_batch_size():
    for bits, configs in DEFAULT_CONFIGS.items():
        buckets = [c["max_rows"] for c in configs]
        assert buckets == sorted(buckets) and configs[0]["max_rows"] == 1
        assert launch_config(None, 1, bits)["BLOCK_M"] == 1  # batch-1 decode: the CUDA-core GEMV
        assert launch_config(None, 10 ** 6, bits) is configs[-1]
        tiles = [c for c in configs if not c.get("dequantize")]
        assert all(c["BLOCK_M"] == 1 or c["BLOCK_M"] >= 16 for c in tiles)
        assert all(c["BLOCK_K"] % (128 if bits == 4 else 16) == 0 for c in configs)
        # The Triton kernels below DEQUANT_MIN_ROWS rows, as TENSOR_CORE_CONFIGS has them; dequantize from there.
        min_rows = DEQUANT_MIN_ROWS[bits]
        assert dequantize_min_rows(None, bits) == min_rows
        assert dequantize_min_rows(TENSOR_CORE_CONFIGS[bits], bits) is None
        for rows in [r for r in (1, 2, 16, 17, 64, 65) if r < min_rows] + [min_rows - 1]:
            assert launch_config(None, rows, bits) == {**launch_config(TENSOR_CORE_CONFIGS[bits], rows, bits),
                                                      "max_rows": launch_config(None, rows, bits)["max_rows"]}
        assert launch_config(None, min_rows - 1, bits)["BLOCK_M"] >= 16
        assert all(launch_config(None, rows, bits).get("dequantize") for rows in (min_rows, 2048, 10 ** 6))


def test_dequantize_from_moves_the_threshold():
    for min_rows, buckets in [(17, [1, 16, 1 << 30]), (64, [1, 16, 63, 1 << 30]), (300, [1, 16, 64, 299, 1 << 30])]:
        configs = dequantize_from(TENSOR_CORE_CONFIGS[4], min_rows)
        assert [c["max_rows"] for c in configs] == buckets and dequantize_min_rows(configs, 4) == min_rows
        assert launch_config(configs, min_rows - 1, 4)["BLOCK_M"] >= 16


def test_matmuls_refuse_mismatched_tensors():
    qweight, scales, zeros = quantize_int4(random_weight(16, 64), 32)
    x = torch.randn(2, 256, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="INT4 qweight"):
        w4a16_matmul_triton(x, qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="INT8 qweight"):
        w8a16_matmul_triton(x, qweight, scales)


# ---- dequantize-then-matmul ------------------------------------------------------------------------
# name -> (bits, out features N, in features K, group size, zero points, act order). Odd N, K padded
# (172 -> 256 for INT4), every group size; INT8 per channel or grouped with zero points (GPTQ 8-bit).
DEQUANTIZE_CASES = {
    "int4_n97_k172_g32": (4, 97, 172, 32, True, False),
    "int4_n97_k172_g64_act_order": (4, 97, 172, 64, True, True),
    "int4_n33_k300_g128": (4, 33, 300, 128, True, False),
    "int8_n97_k172_per_channel": (8, 97, 172, None, False, False),
    "int8_n97_k172_g32_zeros": (8, 97, 172, 32, True, False),
    "int8_n33_k300_g64_zeros_act_order": (8, 33, 300, 64, True, True),
}
DEQUANTIZE_TILES = {"default": None, "tile_8x128": {"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 2}}


def quantized_case(bits: int, out_features: int, in_features: int, group_size: int | None, has_zeros: bool,
                   is_act_order: bool) -> QuantizedWeight:
    """A weight in kiln's layout; INT8 with groups gets random zero points and float16 scales (GPTQ's)."""
    gen = torch.Generator().manual_seed(out_features + in_features)
    if bits == 4:
        tensors = quantize_int4(random_weight(out_features, in_features), group_size)
    elif group_size is None:
        tensors = (*quantize_int8(random_weight(out_features, in_features)), None)
    else:
        num_groups = -(-in_features // group_size)
        tensors = (torch.randint(-128, 128, (out_features, in_features), generator=gen, dtype=torch.int8),
                   (torch.rand(out_features, num_groups, generator=gen) / 400).to(torch.float16),
                   torch.randint(-20, 20, (out_features, num_groups), generator=gen, dtype=torch.int8))
    input_order = torch.randperm(in_features, generator=gen).to(torch.int32) if is_act_order else None
    return QuantizedWeight(bits, *(t if t is None else t.to(DEVICE) for t in tensors), group_size, in_features,
                           None if input_order is None else input_order.to(DEVICE))


@pytest.mark.parametrize("tile", list(DEQUANTIZE_TILES.values()), ids=list(DEQUANTIZE_TILES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_ID)
@pytest.mark.parametrize("case", list(DEQUANTIZE_CASES.values()), ids=list(DEQUANTIZE_CASES))
def test_dequantize_weight_is_the_reference_rounded_once(case, dtype, tile, rounding_bf16_casts):
    """Exactly dequantize_int4 / dequantize_int8 cast to the dtype: (q - z) * s is exact in float32 and
    rounded once. The weight stays in its stored input order; scattering its columns through
    input_order gives the reference's original order."""
    weight = quantized_case(*case)
    config = None if tile is None else {**DEQUANTIZE_CONFIG, **tile}
    actual = dequantize_weight_triton(weight.bits, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                      weight.in_features, dtype, config)
    stored_order = QuantizedWeight(weight.bits, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                   weight.in_features)
    assert actual.shape == (weight.out_features, weight.in_features) and actual.dtype == dtype
    assert torch.equal(actual, stored_order.dequantize().to(dtype))
    if weight.input_order is not None:
        original_order = torch.empty_like(actual)
        original_order[:, weight.input_order.long()] = actual
        assert torch.equal(original_order, weight.dequantize().to(dtype))


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_dequantizes_from_dequant_min_rows(bits, monkeypatch):
    """With the default configs, one row below DEQUANT_MIN_ROWS runs the tensor-core kernel and
    DEQUANT_MIN_ROWS rows the dequantization kernel and a torch matmul; both match the reference."""
    launched = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(self.kernel.fn.__name__)
            return self.kernel[grid]

    for name in ("_int4_gemv_kernel", "_int8_gemv_kernel", "_weight_only_gemm_kernel", "_dequantize_weight_kernel"):
        monkeypatch.setattr(weight_only, name, Recorded(getattr(weight_only, name)))
    min_rows = DEQUANT_MIN_ROWS[bits]
    w = random_weight(33, 172)
    for rows, kernel in [(min_rows - 1, "_weight_only_gemm_kernel"), (min_rows, "_dequantize_weight_kernel")]:
        launched.clear()
        x = matmul_input(rows, 172, torch.float16)
        if bits == 4:
            tensors = quantize_int4(w, 64)
            actual, expected = w4a16_matmul_triton(x, *tensors, 64), w4a16_matmul_ref(x, *tensors, 64)
        else:
            tensors = quantize_int8(w)
            actual, expected = w8a16_matmul_triton(x, *tensors), w8a16_matmul_ref(x, *tensors)
        assert launched == [kernel]
        assert_close(actual, expected)


def test_dequantize_workspace_is_the_weight_where_a_batch_dequantizes():
    min_rows = DEQUANT_MIN_ROWS[4]
    assert dequantize_workspace_bytes(4, 97, 172, torch.bfloat16, min_rows - 1) == 0
    assert dequantize_workspace_bytes(4, 97, 172, torch.bfloat16, min_rows) == 97 * 172 * 2
    assert dequantize_workspace_bytes(8, 97, 172, torch.float32, 4096) == 97 * 172 * 4
    assert dequantize_workspace_bytes(4, 97, 172, torch.float16, 4096, has_input_order=True) == (97 + 4096) * 172 * 2
    assert dequantize_workspace_bytes(4, 97, 172, torch.float16, 4096, configs=TENSOR_CORE_CONFIGS[4]) == 0


# ---- the matmuls at Llama-3-8B sizes, compiled ---------------------------------------------------
LLAMA_SHAPES = [(4096, 4096), (14336, 4096), (28672, 4096), (4096, 14336)]  # (N, K): o, (gate|up), gate_up, down


def _gpu_matmul_and_reference(bits, out_features, in_features, rows, dtype, configs=None):
    """(the Triton matmul, its float32 reference) of a random weight quantized to ``bits`` and ``rows`` random
    rows on the GPU; ``configs`` as the matmuls take them (None: the defaults)."""
    w = random_weight(out_features, in_features)
    x = torch.randn(rows, in_features, device=DEVICE, dtype=dtype)
    if bits == 4:
        tensors = quantize_int4(w, 128)
        return w4a16_matmul_triton(x, *tensors, 128, configs=configs), w4a16_matmul_ref(x, *tensors, 128)
    tensors = quantize_int8(w)
    return w8a16_matmul_triton(x, *tensors, configs=configs), w8a16_matmul_ref(x, *tensors)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID)
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 64, 256])
@pytest.mark.parametrize("out_features,in_features", LLAMA_SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_weight_only_matmul_at_llama_sizes(bits, out_features, in_features, rows, dtype):
    assert_close(*_gpu_matmul_and_reference(bits, out_features, in_features, rows, dtype))


@gpu
def test_gpu_weight_only_matmul_in_a_cuda_graph():
    """Captured once, replayed on new inputs written into the same buffer, as decode runs it."""
    qweight, scales, zeros = quantize_int4(random_weight(4096, 4096), 128)
    x = torch.randn(4, 4096, device=DEVICE, dtype=torch.bfloat16)
    w4a16_matmul_triton(x, qweight, scales, zeros, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_matmul_triton(x, qweight, scales, zeros, 128)
    for seed in range(2):
        x.copy_(torch.randn(4, 4096, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        assert_close(out, w4a16_matmul_ref(x, qweight, scales, zeros, 128))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID)
@pytest.mark.parametrize("rows", [16, 128, 2048])
@pytest.mark.parametrize("out_features,in_features", LLAMA_SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_dequantize_then_cublas_at_llama_sizes(bits, out_features, in_features, rows, dtype):
    """The dequantize-then-cuBLAS path at any row count (forced), against the float32 reference."""
    assert_close(*_gpu_matmul_and_reference(bits, out_features, in_features, rows, dtype, dequantize_config()))


@gpu
@pytest.mark.parametrize("case", [(4, 28672, 4096, 128, True, False), (4, 4096, 14336, 64, True, True),
                                  (8, 28672, 4096, None, False, False), (8, 4096, 14336, 128, True, True)],
                         ids=["int4_gate_up_g128", "int4_down_g64_act_order", "int8_gate_up", "int8_down_g128_zeros"])
def test_gpu_dequantize_weight_is_exact_at_llama_sizes(case):
    weight = quantized_case(*case)
    actual = dequantize_weight_triton(weight.bits, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                      weight.in_features, torch.bfloat16)
    stored_order = QuantizedWeight(weight.bits, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                   weight.in_features)
    assert torch.equal(actual, stored_order.dequantize().to(torch.bfloat16))


@gpu
def test_gpu_dequantize_then_cublas_in_a_cuda_graph():
    """DEQUANT_MIN_ROWS rows and more take the dequantization path by default; its scratch weight comes from
    the graph's pool at capture, and replays reuse it."""
    rows = max(DEQUANT_MIN_ROWS.values())
    qweight, scales, zeros = quantize_int4(random_weight(4096, 4096), 128)
    input_order = torch.randperm(4096, generator=torch.Generator().manual_seed(9)).to(DEVICE, torch.int32)
    x = torch.randn(rows, 4096, device=DEVICE, dtype=torch.bfloat16)
    w4a16_matmul_triton(x, qweight, scales, zeros, 128, input_order)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_matmul_triton(x, qweight, scales, zeros, 128, input_order)
    for seed in range(2):
        x.copy_(torch.randn(rows, 4096, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        assert_close(out, w4a16_matmul_ref(x, qweight, scales, zeros, 128, input_order))


# ---- the kernel op and the build's timing of it ----------------------------------------------------------

@pytest.mark.parametrize("quantization,bits", [("int4_wo", 4), ("int8_wo", 8)])
def test_tuning_picks_weight_only_configs_per_shape_and_keeps_the_defaults_elsewhere(quantization, bits,
                                                                                       monkeypatch):
    """Fake times: each bucket's default 10; the GEMV variant with 8 warps and the tensor-core variant
    with BLOCK_N 32 5, the rest 20. The winners replace their buckets for the timed shape, each run on
    the kernels (interpreter) and matching the default's product; the dequantize bucket is kept; a shape
    below MIN_TUNED_MATMUL_BYTES is not timed; buckets the engine never runs keep their defaults."""
    from kiln.builder import tuning
    from kiln.config import BuildConfig
    from kiln.convert import AutoModelForCausalLM

    timed = []

    def fake_median_ms(fn):
        config = fn.keywords
        timed.append((fn.args[0].shape[0], config["BLOCK_M"], config["BLOCK_N"]))
        if config in (default for default in DEFAULT_CONFIGS[bits]):
            return 10.0
        is_winner = config["num_warps"] == 8 if config["BLOCK_M"] == 1 else config["BLOCK_N"] == 32
        return 5.0 if is_winner else 20.0

    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    monkeypatch.setattr(tuning, "MIN_TUNED_MATMUL_BYTES", 48 * 256 * 4)
    config = AutoModelForCausalLM.from_preset("llama-3-8b").config
    build = BuildConfig(max_batch_size=16, max_input_len=16, max_seq_len=32, max_num_tokens=16,
                        quantization=quantization)
    plan = tuning.TuningRun(config, build, torch.float32, num_sms=1, device=DEVICE).tune_weight_only_linear(
        [(48, 256), (48, 128)])
    defaults = DEFAULT_CONFIGS[bits]
    expected = [{**defaults[0], "num_warps": 8}, {**defaults[1], "BLOCK_N": 32}, *defaults[2:]]
    assert plan == {"shapes": {"48x256": expected}}
    assert {rows for rows, _, _ in timed} == {1, 2, 16}  # no step has more than max_num_tokens = 16 rows
    x = torch.randn(5, 256, device=DEVICE)  # 5 rows: the tuned tensor-core bucket
    shapes = plan["shapes"]
    operands = ((4, *quantize_int4(random_weight(48, 256).to(DEVICE), 128), 128, None) if bits == 4
                else (8, *quantize_int8(random_weight(48, 256).to(DEVICE)), None, None, None))
    assert_close(weight_only.weight_only_linear_triton(x, *operands, shapes=shapes),
                 weight_only.weight_only_linear_ref(x, *operands))


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["int4_wo", "int8_wo"])
def test_gpu_tuning_times_weight_only_linear_at_a_llama3_8b_shape_and_its_choice_runs(quantization):
    """The build's timing on this GPU, for real, at Llama-3-8B's o projection (N = 4096, the shape whose
    16-row tiles starve): a plan the op takes, whose configs match the reference at every bucket."""
    from types import SimpleNamespace

    from kiln.builder import tuning
    from kiln.config import BuildConfig
    from kiln.convert import AutoModelForCausalLM
    from kiln.layers import linear_method

    config = AutoModelForCausalLM.from_preset("llama-3-8b").config
    build = BuildConfig(max_batch_size=64, max_input_len=128, max_seq_len=256, max_num_tokens=256,
                        quantization=quantization)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    run = tuning.TuningRun(config, build, torch.bfloat16, num_sms=num_sms, device=DEVICE)
    plan = run.tune_weight_only_linear([(4096, 4096)])
    method = linear_method(quantization, build)
    stored = method.convert(random_weight(4096, 4096).to(DEVICE), torch.bfloat16)
    operands = method.operands(SimpleNamespace(**stored))
    for rows in (1, 16, 40, 200):
        x = torch.randn(rows, 4096, device=DEVICE, dtype=torch.bfloat16)
        assert_close(weight_only.weight_only_linear_triton(x, *operands, **plan),
                     weight_only.weight_only_linear_ref(x, *operands))
