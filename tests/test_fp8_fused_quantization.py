"""The RMSNorm (+ residual add) and SiLU·up kernels that quantize their output to e4m3 per token for the
FP8 Linear after them (issue 11 part 1), and the blocks that hand such a Linear its input so.

A fused kernel must write exactly what the unfused path quantizes: the plain op's output, rounded to its
dtype, through quantize_fp8_per_token (which quantize_fp8_per_token_triton matches bit for bit,
tests/test_fp8.py), bytes and scales alike. On a CPU-only machine the kernels run in Triton's interpreter
with its float32 -> bfloat16 / e4m3 casts rounded as the GPU rounds them (conftest's rounding fixtures);
the ``gpu`` cases run them compiled at Llama-3-8B's shapes, and an FP8 model's forward on the GPU with
the fusion against the same forward without it (``python -m pytest tests/test_fp8_fused_quantization.py
-m gpu``).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import kiln.kernels.triton_jit
from conftest import DEVICE, ON_GPU, gpu
from kiln.config import BuildConfig
from kiln.convert.converter import dummy_weights
from kiln.kernels import OPS, AttentionMetadata, KernelOps, reference_plan
from kiln.kernels.activation import silu_mul_fp8_ref, silu_mul_fp8_triton, silu_mul_ref, silu_mul_triton
from kiln.kernels.fp8 import MAX_GEMV_ROWS, fp8_linear, fp8_matmul_gpu, quantize_fp8_per_token_triton
from kiln.kernels.norm import (add_rms_norm_fp8_ref, add_rms_norm_fp8_triton, add_rms_norm_ref, add_rms_norm_triton,
                               rms_norm_fp8_ref, rms_norm_fp8_triton, rms_norm_ref, rms_norm_triton)
from kiln.layers import DenseLinearMethod, LayerContext, kernel_ops_of, linear_method, load_parameters
from kiln.layers.fp8 import Fp8LinearMethod
from kiln.models import create_model, model_skeleton
from kiln.models.config import ModelConfig
from kiln.quantization.fp8 import FP8_DTYPE, Fp8Activation, quantize_fp8_per_token
from test_fp8 import compile_for, compiled_apart

pytest.importorskip("triton")

# Row-wise torch._scaled_mm, the only matmul that takes an FP8 Linear's input quantized, needs sm90.
hopper = pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() < (9, 0),
                            reason="row-wise torch._scaled_mm needs Hopper (sm90+)")
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_ID = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
EPS = 1e-5
FUSED_OPS = ("rms_norm_fp8", "add_rms_norm_fp8", "silu_mul_fp8")


@pytest.fixture
def rounding_casts(rounding_fp8_casts, rounding_bf16_casts):
    """Both of the interpreter's float32 casts kernels round (to e4m3 and to bfloat16) as the GPU's."""


def rows_of_magnitudes(num_rows: int, num_cols: int, dtype: torch.dtype, max_exponent: float = 3) -> torch.Tensor:
    """Rows of magnitudes 10^-3 .. 10^max_exponent (so their scales differ), one of them all zeros (a
    padded token)."""
    exponents = torch.empty(num_rows, 1, device=DEVICE).uniform_(-3, max_exponent)
    x = torch.randn(num_rows, num_cols, device=DEVICE) * 10.0 ** exponents
    x[num_rows // 2] = 0
    return x.to(dtype)


def assert_same_fp8(actual: Fp8Activation, expected: Fp8Activation, dtype: torch.dtype = torch.float32) -> None:
    """The same e4m3 bytes and the same float32 scales, [T, K] and [T, 1], of values of ``dtype``. On the GPU
    two kernels compiled apart (the fused one and the plain one, or torch's quantization) may contract a
    multiply-add or order a reduction otherwise, a last-bit difference in ``dtype`` before rounding to e4m3
    (seen on the H200: float32 rows, whose amax then differed by 3 float32 ulps; a float16 row of 2048
    whose amax differed by one float16 ulp; a few elements of 2048-row bfloat16 batches); there the
    scales must agree within 4 float32 ulps, or 2 of a 16-bit ``dtype``, and at most 0.1% of the values may
    land on the neighbouring e4m3 value."""
    assert actual.data.dtype == FP8_DTYPE and actual.scale.dtype == torch.float32
    assert actual.data.shape == expected.data.shape and actual.scale.shape == (*expected.data.shape[:-1], 1)
    if not actual.data.is_cuda:
        assert torch.equal(actual.data.view(torch.uint8), expected.data.view(torch.uint8))
        assert torch.equal(actual.scale, expected.scale)
        return
    ulps = 4 if dtype == torch.float32 else 2
    torch.testing.assert_close(actual.scale, expected.scale, rtol=ulps * torch.finfo(dtype).eps, atol=0)
    a, e = actual.data.float(), expected.data.float()
    differ = a != e
    assert differ.float().mean() <= 1e-3
    # Neighbours in e4m3: 3 mantissa bits, so within 2^-3 of the larger magnitude (2^-9 in the subnormals).
    assert ((a - e).abs()[differ] <= torch.maximum(a.abs(), e.abs())[differ] * 2.0 ** -3 + 2.0 ** -9).all()


def assert_same_fp8_where_plain_matches_reference(actual: Fp8Activation, plain: torch.Tensor,
                                                  reference: torch.Tensor) -> None:
    """Bit for bit quantize_fp8_per_token(reference) in every row where the plain kernel wrote what the
    reference computes. (Elsewhere the two sum squares, divide and take sigmoids in other orders and
    instructions, a last-bit difference that rounding to 16 bits usually absorbs: test_kernels.py holds
    them to a tolerance.)"""
    rows = (plain == reference).all(dim=-1)
    expected = quantize_fp8_per_token(reference)
    assert_same_fp8(Fp8Activation(actual.data[rows], actual.scale[rows]),
                    Fp8Activation(expected.data[rows], expected.scale[rows]), reference.dtype)


# ---- the kernels ---------------------------------------------------------------------------------
NORM_SHAPES = [(1, 100), (3, 100), (17, 1000), (17, 4104)] + [
    pytest.param(t, 4096, marks=gpu) for t in (17, 256, 2048)]


@pytest.mark.parametrize("has_residual", [False, True], ids=["first_layer", "residual"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,hidden", NORM_SHAPES)
def test_fused_rms_norm_quantizes_what_the_plain_norm_writes(num_tokens, hidden, dtype, has_residual, rounding_casts):
    x, weight = rows_of_magnitudes(num_tokens, hidden, dtype), (torch.rand(hidden, device=DEVICE) + 0.5).to(dtype)
    if has_residual:
        residual = rows_of_magnitudes(num_tokens, hidden, dtype)
        residual[num_tokens // 2] = 0  # the padded token stays all zeros
        reference, reference_residual = add_rms_norm_ref(x, residual, weight, EPS)
        fused_residual = residual.clone()
        fused, new_residual = add_rms_norm_fp8_triton(x, fused_residual, weight, EPS, num_warps=4)
        plain, _ = add_rms_norm_triton(x, residual.clone(), weight, EPS, num_warps=4)
        # Written in place, as the plain kernel writes it: x + residual, one rounding.
        assert new_residual.data_ptr() == fused_residual.data_ptr() and torch.equal(new_residual, reference_residual)
    else:
        fused = rms_norm_fp8_triton(x, weight, EPS, num_warps=4)
        plain = rms_norm_triton(x, weight, EPS, num_warps=4)
        reference = rms_norm_ref(x, weight, EPS)
    assert_same_fp8(fused, quantize_fp8_per_token(plain), dtype)
    assert_same_fp8_where_plain_matches_reference(fused, plain, reference)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,intermediate", [(1, 100), (3, 1000), (17, 1000), (17, 2100)] + [
    pytest.param(t, 14336, marks=gpu) for t in (17, 256, 2048)])
def test_fused_silu_mul_quantizes_what_the_plain_silu_mul_writes(num_tokens, intermediate, dtype, rounding_casts):
    gate_up = rows_of_magnitudes(num_tokens, 2 * intermediate, dtype, max_exponent=1)  # float16 products stay finite
    fused = silu_mul_fp8_triton(gate_up)  # its default warps
    plain = silu_mul_triton(gate_up, BLOCK=256, num_warps=2)  # columns in blocks: the values do not depend on it
    assert_same_fp8(fused, quantize_fp8_per_token(plain), dtype)
    assert_same_fp8_where_plain_matches_reference(fused, plain, silu_mul_ref(gate_up))
    assert (fused.data[num_tokens // 2].float() == 0).all()  # the padded token


def test_the_fused_ops_are_registered_with_references_and_kernels():
    reference_ops = KernelOps(reference_plan(OPS))
    triton_ops = KernelOps({op: {"impl": "triton", "config": {}} for op in OPS})
    for op, ref, kernel in (("rms_norm_fp8", rms_norm_fp8_ref, rms_norm_fp8_triton),
                            ("add_rms_norm_fp8", add_rms_norm_fp8_ref, add_rms_norm_fp8_triton),
                            ("silu_mul_fp8", silu_mul_fp8_ref, silu_mul_fp8_triton)):
        assert getattr(reference_ops, op) is ref and getattr(triton_ops, op) is kernel
    x, residual, weight = torch.randn(3, 40), torch.randn(3, 40), torch.rand(40) + 0.5
    normed, new_residual = add_rms_norm_ref(x, residual, weight, EPS)
    fused, fused_residual = add_rms_norm_fp8_ref(x, residual, weight, EPS)
    assert_same_fp8(fused, quantize_fp8_per_token(normed))
    assert torch.equal(fused_residual, new_residual)
    assert_same_fp8(rms_norm_fp8_ref(x, weight, EPS), quantize_fp8_per_token(rms_norm_ref(x, weight, EPS)))
    gate_up = torch.randn(3, 80)
    assert_same_fp8(silu_mul_fp8_ref(gate_up), quantize_fp8_per_token(silu_mul_ref(gate_up)))


# ---- compiled for the GPU, without one -----------------------------------------------------------
def compile_fused_kernels_for_hopper() -> dict[str, str]:
    """PTX of the fused kernels for sm90 in bfloat16 at Llama-3-8B's widths (hidden 4096 over 8 warps,
    intermediate 14336 over 16), as the defaults launch them."""
    from kiln.kernels.activation import _silu_mul_fp8_kernel
    from kiln.kernels.fp8 import FP8_CONSTEXPRS
    from kiln.kernels.norm import _rms_norm_kernel

    norm_types = {name: "i32" for name in _rms_norm_kernel.arg_names}
    norm_types.update(x_ptr="*bf16", residual_ptr="*bf16", weight_ptr="*bf16", out_ptr="*fp8e4nv",
                      scale_ptr="*fp32", eps="fp32")
    silu_types = {"gate_up_ptr": "*bf16", "gate_up_row_stride": "i32", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
                  "num_cols": "i32"}
    return {
        "add_rms_norm_fp8": compile_for(_rms_norm_kernel, 90, norm_types, {
            "HAS_RESIDUAL": True, "IS_FP8_OUT": True, **FP8_CONSTEXPRS, "BLOCK_ROWS": 1, "BLOCK": 4096}, 8, 1),
        "silu_mul_fp8": compile_for(_silu_mul_fp8_kernel, 90, silu_types, {**FP8_CONSTEXPRS, "BLOCK": 16384}, 16, 1),
    }


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the kernels themselves")
def test_fused_kernels_compile_for_hopper_with_the_conversions_they_rely_on(tmp_path):
    """What the interpreter cannot show: the fused kernels pass Triton's and ptxas's pipeline for sm90, round
    to bfloat16 to nearest even before quantizing, divide with IEEE division and cast with round-to-
    nearest-even saturation, as the plain kernels and _quantize_fp8_kernel do. Compiled in a process of
    its own, without the interpreter."""
    kernels = compiled_apart(tmp_path, "test_fp8_fused_quantization", "compile_fused_kernels_for_hopper()")
    for name, ptx in kernels.items():
        assert "cvt.rn.bf16.f32" in ptx or "cvt.rn.bf16x2.f32" in ptx, name
        assert "div.rn.f32" in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx, name


# ---- the choice ----------------------------------------------------------------------------------
def fake_linear(out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> SimpleNamespace:
    return SimpleNamespace(out_features=out_features, in_features=in_features, dtype=dtype)


@pytest.mark.parametrize("capability", [(9, 0), (8, 9)])
def test_fp8_wants_its_input_quantized_exactly_where_fp8_linear_quantizes(capability, monkeypatch):
    """On a GPU (its capability faked here), above MAX_GEMV_ROWS rows where row-wise _scaled_mm runs the
    shape: Hopper, bfloat16, in/out features multiples of 16. Nowhere else, the CPU included."""
    monkeypatch.setattr(kiln.kernels.triton_jit, "_cuda_capability", lambda index: capability)
    method, cuda = Fp8LinearMethod(), torch.device("cuda", 0)
    is_hopper = capability >= (9, 0)
    assert method.wants_fp8_input(fake_linear(6144, 4096), MAX_GEMV_ROWS + 1, cuda) == is_hopper
    assert method.wants_fp8_input(fake_linear(6144, 4096), 4096, cuda) == is_hopper
    assert not method.wants_fp8_input(fake_linear(6144, 4096), MAX_GEMV_ROWS, cuda)  # the GEMV reads bf16
    assert not method.wants_fp8_input(fake_linear(6144, 4096, torch.float16), 64, cuda)
    assert not method.wants_fp8_input(fake_linear(172, 64), 64, cuda)  # stories260K's MLP width
    assert not method.wants_fp8_input(fake_linear(6144, 4096), 64, torch.device("cpu"))
    for other in (DenseLinearMethod(), linear_method("int8_wo")):
        assert not other.takes_fp8_input and not other.wants_fp8_input(fake_linear(6144, 4096), 64, cuda)


# ---- in a model ----------------------------------------------------------------------------------
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=64)
CONFIGS = {
    "llama": ModelConfig(architecture="LlamaForCausalLM", **TINY),
    "qwen3": ModelConfig(architecture="Qwen3ForCausalLM", **TINY),
    "gptj": ModelConfig(architecture="GPTJForCausalLM", **TINY, rotary_dim=8, hidden_act="gelu_new"),
}
FP8_BUILD = BuildConfig(quantization="fp8")
BLOCK_SIZE = 16


def fp8_model(config: ModelConfig, ops: KernelOps, dtype: torch.dtype):
    """The model in FP8 with dummy weights (norm weights not all ones, so a weight applied wrongly shows)."""
    weights = dict(dummy_weights(model_skeleton(config, FP8_BUILD, dtype), DEVICE))
    for name, tensor in weights.items():
        if name.endswith("norm.weight"):
            tensor.uniform_(0.5, 1.5)
    model = create_model(config, LayerContext(ops, linear_method("fp8", FP8_BUILD), dtype, DEVICE), max_positions=64)
    load_parameters(model, weights)
    return model


def prompt_batch(config: ModelConfig, q_lens: list[int]):
    """A context batch of whole prompts, each in blocks of its own; the logits of every token."""
    tables = torch.arange(len(q_lens) * 2, dtype=torch.int32, device=DEVICE).view(len(q_lens), 2)
    positions = torch.cat([torch.arange(n) for n in q_lens]).to(DEVICE)
    slots = torch.cat([tables[i, torch.arange(n, device=DEVICE) // BLOCK_SIZE].long() * BLOCK_SIZE
                       + torch.arange(n, device=DEVICE) % BLOCK_SIZE for i, n in enumerate(q_lens)])
    meta = AttentionMetadata(
        seq_lens=torch.tensor(q_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE),
        block_tables=tables, seq_lens_host=q_lens, query_lens_host=q_lens)
    input_ids = torch.randint(0, config.vocab_size, (sum(q_lens),), generator=torch.Generator().manual_seed(0))
    return input_ids.to(DEVICE), positions, slots, meta, torch.arange(sum(q_lens), device=DEVICE)


def forward(model, config: ModelConfig, q_lens: list[int]) -> torch.Tensor:
    input_ids, positions, slots, meta, rows = prompt_batch(config, q_lens)
    kv_cache = torch.zeros(config.num_layers, 2, 2 * len(q_lens), BLOCK_SIZE, config.num_kv_heads, config.head_dim,
                           dtype=model.dtype, device=DEVICE)
    return model(input_ids, positions, kv_cache, slots, meta, rows)


def counting_calls(monkeypatch, ops: KernelOps, calls: Counter) -> None:
    """Counts each op the model calls through ``ops`` (the blocks read them from it at every call);
    fp8_linear's as "quantized by the Linear": the FP8 Linear calls it for an unquantized input (an
    Fp8Activation goes to the matmul as it is), and its reference, the CPU's W8A8, quantizes it first."""
    for op in OPS:
        fn, name = getattr(ops, op), "quantized by the Linear" if op == "fp8_linear" else op
        monkeypatch.setattr(ops, op, lambda *args, _fn=fn, _name=name, **kwargs: calls.update([_name])
                            or _fn(*args, **kwargs))


def always_fp8_input(monkeypatch) -> None:
    """The fused path on the CPU: the fp8 method asks for its input quantized at any size and device."""
    monkeypatch.setattr(Fp8LinearMethod, "wants_fp8_input", lambda self, layer, num_rows, device: True)


# Where the forward quantizes with the fusion (2 layers): the first attn_norm without a residual, the other
# three norms feeding qkv / gate_up with it, both SiLU·ups; only o still quantizes its own input.
EXPECTED_FUSED_CALLS = {"llama": {"rms_norm_fp8": 1, "add_rms_norm_fp8": 3, "silu_mul_fp8": 2,
                                  "quantized by the Linear": 2},
                        "qwen3": {"rms_norm_fp8": 1, "add_rms_norm_fp8": 3, "silu_mul_fp8": 2,
                                  "quantized by the Linear": 2},
                        "gptj": {"quantized by the Linear": 8}}  # its LayerNorm feeds attention and the MLP


@pytest.mark.skipif(ON_GPU, reason="the CPU's path (the fused path forced); the gpu test below runs the GPU's")
@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
def test_fp8_model_forward_with_the_fusion_equals_the_forward_without(family, dtype, monkeypatch):
    """The reference plan, as CPU engines run: the fused ops' references quantize what fp8_linear_ref
    would, so the logits are bit-identical. Only norms that feed one FP8 Linear alone quantize: not the
    final norm (the LM head), not Qwen3's per-head q / k norms (attention), not GPT-J's LayerNorm."""
    config = CONFIGS[family]
    ops = KernelOps(reference_plan(OPS))
    model = fp8_model(config, ops, dtype)
    plain_calls, fused_calls = Counter(), Counter()
    with monkeypatch.context() as patch:
        counting_calls(patch, ops, plain_calls)
        plain = forward(model, config, [20, 13])
    always_fp8_input(monkeypatch)
    counting_calls(monkeypatch, ops, fused_calls)
    fused = forward(model, config, [20, 13])
    assert torch.equal(fused, plain)
    assert not any(plain_calls[op] for op in FUSED_OPS)
    assert plain_calls["quantized by the Linear"] == 4 * config.num_layers
    assert {op: fused_calls[op] for op in [*FUSED_OPS, "quantized by the Linear"] if fused_calls[op]} == \
        EXPECTED_FUSED_CALLS[family]
    # The final norm stays plain (and so do both of GPT-J's others).
    assert {op: fused_calls[op] for op in ("add_rms_norm", "layer_norm", "add_layer_norm") if fused_calls[op]} == \
        ({"layer_norm": 1, "add_layer_norm": 2} if family == "gptj" else {"add_rms_norm": 1})


@pytest.mark.skipif(ON_GPU, reason="the CPU's path (the fused path forced)")
def test_an_engine_whose_plan_predates_the_fused_ops_keeps_the_unfused_path(monkeypatch):
    """An fp8 engine built before the *_fp8 ops existed has no plan entry for them: its blocks take the plain
    ops (whose plan entries were tuned) and the Linear quantizes, rather than the fused ops' references."""
    config = CONFIGS["llama"]
    ops = KernelOps({op: entry for op, entry in reference_plan(OPS).items() if op not in FUSED_OPS})
    model = fp8_model(config, ops, torch.float32)
    always_fp8_input(monkeypatch)
    calls = Counter()
    counting_calls(monkeypatch, ops, calls)
    forward(model, config, [20, 13])
    assert not any(calls[op] for op in FUSED_OPS)
    assert calls["quantized by the Linear"] == 4 * config.num_layers


@pytest.mark.skipif(ON_GPU, reason="the interpreter's; the gpu test below runs the kernels compiled")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fp8_model_forward_with_the_fused_kernels_equals_the_forward_without(family, monkeypatch, rounding_casts):
    """Triton's kernels in the interpreter (float16: its tl.dot mishandles bfloat16): the fused norm and
    SiLU·up kernels against the plain kernels followed by fp8_linear_ref's quantization (the FP8 Linear's
    own op the reference: the Triton one, in the interpreter, is the W8A16 GEMV at any row count)."""
    config = CONFIGS[family]
    ops = KernelOps({op: {"impl": "reference" if op == "fp8_linear" else "triton", "config": {}} for op in OPS})
    model = fp8_model(config, ops, torch.float16)
    plain = forward(model, config, [20, 13])
    always_fp8_input(monkeypatch)
    calls = Counter()
    counting_calls(monkeypatch, ops, calls)
    assert torch.equal(forward(model, config, [20, 13]), plain)
    assert calls["add_rms_norm_fp8"] == 3 and calls["silu_mul_fp8"] == 2


def test_the_fused_ops_are_declared_only_where_a_block_feeds_an_fp8_linear():
    """So that the build tunes them for FP8 engines of the Llama family only."""
    llama, qwen3, gptj = (CONFIGS[name] for name in ("llama", "qwen3", "gptj"))
    for config in (llama, qwen3):
        assert set(FUSED_OPS) <= set(kernel_ops_of(model_skeleton(config, FP8_BUILD)))
        assert not set(FUSED_OPS) & set(kernel_ops_of(model_skeleton(config)))  # unquantized
    assert not set(FUSED_OPS) & set(kernel_ops_of(model_skeleton(gptj, FP8_BUILD)))
    for quantization in ("int8_wo", "int4_wo"):
        assert not set(FUSED_OPS) & set(kernel_ops_of(model_skeleton(llama, BuildConfig(quantization=quantization))))


def test_tuning_times_the_fused_ops_where_they_run(monkeypatch):
    """Above MAX_GEMV_ROWS rows only (of the token counts 1, 3 and 32: 32), every candidate, the winner
    bound through KernelOps; without tuning, the defaults of a row per program."""
    from kiln.builder import tuning

    timed = Counter()

    def fake_median_ms(fn):  # time = warps: the fewest win
        fn()
        timed.update([(fn.func, fn.args[0].shape[0])])
        return fn.keywords["num_warps"]

    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    config = CONFIGS["llama"]
    build = BuildConfig(max_batch_size=3, max_input_len=16, max_seq_len=32, max_num_tokens=32, tokens_per_block=8,
                        dtype="float32", target="cpu")
    plan = json.loads(json.dumps(tuning._plan(
        tuning.TuningRun(config, build, torch.float32, num_sms=1, device=DEVICE).tune(FUSED_OPS))))
    assert plan == {op: {"impl": "triton", "config": {"num_warps": 4}} for op in FUSED_OPS}
    candidates = len(tuning.NORM_CANDIDATES)
    assert timed == {(rms_norm_fp8_triton, 32): candidates, (add_rms_norm_fp8_triton, 32): candidates,
                     (silu_mul_fp8_triton, 32): len(tuning.SILU_MUL_FP8_CANDIDATES)}
    assert tuning._default_configs(config, build, num_sms=1, ops=FUSED_OPS) == {op: {"num_warps": 4} for op in FUSED_OPS}
    x, weight = torch.randn(20, 64, device=DEVICE), torch.rand(64, device=DEVICE) + 0.5
    assert_same_fp8(KernelOps(plan).rms_norm_fp8(x, weight, EPS), rms_norm_fp8_triton(x, weight, EPS, num_warps=4))


def assert_same_product(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit where the inputs were (the usual case); within bfloat16's rounding of a sum over K where
    assert_same_fp8 let a few e4m3 values land on their neighbours."""
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1.6e-2, atol=1e-2)


# ---- GPU -----------------------------------------------------------------------------------------
@gpu
@hopper
@pytest.mark.parametrize("num_rows", [MAX_GEMV_ROWS + 1, 256, 2048])
def test_gpu_fused_kernels_feed_scaled_mm_what_the_unfused_linear_quantizes_at_llama3_8b_shapes(num_rows):
    """attn_norm -> qkv and SiLU·up -> down of Llama-3-8B in bfloat16, the kernels at their default
    configs: the fused path's product equals fp8_linear's on the plain output (the same e4m3 bytes and
    scales into the same _scaled_mm, but for assert_same_fp8's last-bit neighbours)."""
    from kiln.quantization.fp8 import quantize_fp8_weight

    hidden, intermediate = 4096, 14336
    x, residual = (torch.randn(num_rows, hidden, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    weight = (torch.rand(hidden, device=DEVICE) + 0.5).to(torch.bfloat16)
    qkv = quantize_fp8_weight(torch.randn(6144, hidden, device=DEVICE) / hidden ** 0.5)
    fused, fused_residual = add_rms_norm_fp8_triton(x, residual.clone(), weight, EPS)
    plain, plain_residual = add_rms_norm_triton(x, residual.clone(), weight, EPS)
    assert torch.equal(fused_residual, plain_residual)
    assert_same_fp8(fused, quantize_fp8_per_token_triton(plain), torch.bfloat16)
    assert_same_product(fp8_matmul_gpu(fused, *qkv, None, torch.bfloat16), fp8_linear(plain, *qkv))
    first = rms_norm_fp8_triton(x, weight, EPS)  # the first layer's: no residual yet
    assert_same_fp8(first, quantize_fp8_per_token_triton(rms_norm_triton(x, weight, EPS)), torch.bfloat16)

    gate_up = torch.randn(num_rows, 2 * intermediate, device=DEVICE, dtype=torch.bfloat16)
    down = quantize_fp8_weight(torch.randn(hidden, intermediate, device=DEVICE) / intermediate ** 0.5)
    fused, plain = silu_mul_fp8_triton(gate_up), silu_mul_triton(gate_up)
    assert_same_fp8(fused, quantize_fp8_per_token_triton(plain), torch.bfloat16)
    assert_same_product(fp8_matmul_gpu(fused, *down, None, torch.bfloat16), fp8_linear(plain, *down))


@gpu
@hopper
def test_gpu_fp8_model_forward_fuses_above_16_rows_and_equals_the_forward_without(monkeypatch):
    """A bfloat16 FP8 Llama with the default Triton plan (the fused and plain norms at the same warps):
    a 33-token context batch takes the fused ops of itself, and its logits equal those of the same
    forward with the fusion turned off, bit for bit, eagerly and replayed from a CUDA graph."""
    from kiln.builder.tuning import gpu_kernel_plan
    from kiln.engine.target import detect_target

    config = CONFIGS["llama"]
    build = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=64, tokens_per_block=16,
                        dtype="bfloat16", target=detect_target(), quantization="fp8")
    ops = KernelOps(gpu_kernel_plan(config, build, torch.bfloat16, tune=False,
                                    ops=kernel_ops_of(model_skeleton(config, FP8_BUILD))))
    model = fp8_model(config, ops, torch.bfloat16)
    input_ids, positions, slots, meta, rows = prompt_batch(config, [20, 13])
    kv_cache = torch.zeros(config.num_layers, 2, 4, BLOCK_SIZE, config.num_kv_heads, config.head_dim,
                           dtype=torch.bfloat16, device=DEVICE)
    calls = Counter()
    with monkeypatch.context() as patch:
        counting_calls(patch, ops, calls)
        fused = model(input_ids, positions, kv_cache, slots, meta, rows)
    assert {op: calls[op] for op in FUSED_OPS} == {"rms_norm_fp8": 1, "add_rms_norm_fp8": 3, "silu_mul_fp8": 2}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = model(input_ids, positions, kv_cache, slots, meta, rows)
    graph.replay()
    assert torch.equal(captured, fused)
    monkeypatch.setattr(Fp8LinearMethod, "wants_fp8_input", lambda self, layer, num_rows, device: False)
    assert torch.equal(model(input_ids, positions, kv_cache, slots, meta, rows), fused)
