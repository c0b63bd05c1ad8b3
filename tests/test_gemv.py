"""The GEMV for dense (16-bit) weights and the ``dense_linear`` op: the kernel against F.linear in the
interpreter, the op's choice between it and cuBLAS by the plan's shapes, the blocks that call it, and the
build's timing that fills the plan; the same for ``rms_norm_linear``, the one-row GEMV with the RMSNorm
before it folded in (and the residual add in the GEMV before that norm). The kernel's FP8 use is
test_fp8.py's."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU, gpu
from kiln.config import BuildConfig, RopeConfig
from kiln.convert import AutoModelForCausalLM
from kiln.convert.converter import dummy_weights
from kiln.kernels import OPS, AttentionMetadata, KernelOps, reference_plan
from kiln.kernels import gemv as gemv_module
from kiln.kernels.activation import silu_mul_triton
from kiln.kernels.gemv import GEMV_CANDIDATES, dense_linear_ref, dense_linear_triton, gemv, kv_write_fits
from kiln.kernels.norm import rms_norm_linear_ref, rms_norm_linear_triton
from kiln.kernels.rotary import KvWrite, qkv_rotary_kv_write_ref, rope_cos_sin
from kiln.layers import (LayerContext, fold_norm_weights, kernel_ops_of, linear_method, load_parameters,
                         matmul_shapes)
from kiln.models import create_model, model_skeleton
from kiln.quantization.fp8 import FP8_DTYPE
from test_fp8_fused_quantization import BLOCK_SIZE, CONFIGS, counting_calls, forward, prompt_batch

pytest.importorskip("triton")

# (rtol, atol as a share of the largest output): a float32 sum in another order, rounded once to the dtype.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2.0 ** -9, 2.0 ** -10),
              torch.bfloat16: (2.0 ** -7, 2.0 ** -8)}


def assert_matmul_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol,
                               atol=atol * expected.float().abs().max().item())


def dense_case(num_rows: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(num_rows, k, device=DEVICE).to(dtype)
    weight = (torch.randn(n, k, device=DEVICE) * k ** -0.5).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    return x, weight, bias


GEMV_CASES = [(1, {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}),
              (1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 2, "num_stages": 1}),
              (3, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}),
              (16, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1})]


def gemv_params(cases) -> list:
    """(rows, config, dtype) of each case in each dtype. The interpreter's tl.dot mishandles bfloat16: the
    tensor-core cases of bfloat16 are marked gpu and run there."""
    return [pytest.param(rows, config, dtype, marks=gpu if dtype == torch.bfloat16 and config["BLOCK_M"] > 1 else ())
            for rows, config in cases for dtype in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("num_rows,config,dtype", gemv_params(GEMV_CASES))
@pytest.mark.parametrize("has_bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_of_a_dense_weight_is_f_linear(num_rows, config, dtype, has_bias):
    """Odd N (37: a partial column block) and K (300: a partial K step), no scale, bias or none."""
    x, weight, bias = dense_case(num_rows, 37, 300, dtype)
    bias = bias if has_bias else None
    assert_matmul_close(gemv(x, weight, None, bias, **config), F.linear(x.float(), weight.float(),
                                                                      None if bias is None else bias.float()).to(dtype))


def test_dense_linear_takes_the_gemv_only_for_the_shapes_and_rows_the_plan_lists(monkeypatch):
    calls = []

    def recorded_gemv(x, w, scale, bias, residual=None, silu_mul=False, kv_write=None, **config):
        calls.append((x.shape[0], config))
        return gemv(x, w, scale, bias, residual=residual, silu_mul=silu_mul, kv_write=kv_write, **config)

    monkeypatch.setattr(gemv_module, "gemv", recorded_gemv)
    one_row = {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
    shapes = {"37x300": {"1": one_row}}
    x, weight, bias = dense_case(16, 37, 300, torch.float32)
    for rows in (1, 2, 16):
        assert_matmul_close(dense_linear_triton(x[:rows], weight, bias, shapes=shapes),
                            F.linear(x[:rows], weight, bias))
    assert calls == [(1, one_row)]  # 2 and 16 rows: no "16" entry for this shape
    calls.clear()
    other = torch.randn(40, 300, device=DEVICE)
    dense_linear_triton(x[:1], other, None, shapes=shapes)  # a shape the plan does not list
    dense_linear_triton(x[:1], weight, bias)  # an untuned plan: no shapes
    shapes["37x300"]["16"] = {**one_row, "BLOCK_M": 16}
    dense_linear_triton(x, weight, bias, shapes=shapes)
    dense_linear_triton(torch.randn(17, 300, device=DEVICE), weight, bias, shapes=shapes)  # above 16 rows
    assert calls == [(16, {**one_row, "BLOCK_M": 16})]


def test_the_blocks_that_multiply_16_bit_weights_declare_dense_linear_at_their_shapes():
    """An unquantized Llama multiplies every Linear and its LM head through dense_linear; a quantized one
    only its LM head (a weight-only one its Linears through weight_only_linear, an FP8 one through
    fp8_linear); the CPU's reference plan binds F.linear."""
    config = AutoModelForCausalLM.from_preset("llama-3-8b").config
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    none = model_skeleton(config, BuildConfig(quantization="none"), torch.bfloat16)
    assert "dense_linear" in kernel_ops_of(none) and "rms_norm_linear" in kernel_ops_of(none)
    assert matmul_shapes(none) == {"dense_linear": tuple(sorted({(qkv, hidden), (hidden, hidden), (2 * inter, hidden),
                                                                 (hidden, inter), (vocab, hidden)})),
                                   "rms_norm_linear": ((qkv, hidden), (2 * inter, hidden))}
    linears = tuple(sorted({(qkv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)}))
    for quantization in ("fp8", "int8_wo", "int4_wo"):
        quantized = model_skeleton(config, BuildConfig(quantization=quantization), torch.bfloat16)
        assert "dense_linear" in kernel_ops_of(quantized)
        linears_op = "fp8_linear" if quantization == "fp8" else "weight_only_linear"
        assert matmul_shapes(quantized) == {"dense_linear": ((vocab, hidden),), linears_op: linears}
    assert KernelOps(reference_plan()).dense_linear is dense_linear_ref


def test_tuning_keeps_cublas_unless_a_gemv_candidate_is_faster_and_agrees(monkeypatch, caplog):
    """Fake times: cuBLAS 10 everywhere; a one-row GEMV candidate 20 - BLOCK_N (BLOCK_N 16 wins at 4), the
    2-16-row ones 50 (cuBLAS wins). The plan then lists the shape's one-row winner only; a weight below
    MIN_TUNED_MATMUL_BYTES is not timed; a GEMV whose product is wrong is dropped with a warning, and
    cuBLAS stays."""
    from kiln.builder import tuning

    timed = []

    def fake_median_ms(fn):
        config = fn.keywords
        timed.append((fn.args[0].shape[0], config.get("BLOCK_M")))
        if not config:
            return 10.0
        return 20.0 - config["BLOCK_N"] if config["BLOCK_M"] == 1 else 50.0

    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    monkeypatch.setattr(tuning, "MIN_TUNED_MATMUL_BYTES", 48 * 64 * 4)  # this small weight is timed
    config = AutoModelForCausalLM.from_preset("llama-3-8b").config
    build = BuildConfig(max_batch_size=16, max_input_len=16, max_seq_len=32, max_num_tokens=32)
    run = tuning.TuningRun(config, build, torch.float32, num_sms=1, device=DEVICE)
    plan = run.tune_dense_linear([(48, 64)])
    winner = next(c for c in GEMV_CANDIDATES if c["BLOCK_M"] == 1 and c["BLOCK_N"] == 16)
    assert plan == {"shapes": {"48x64": {"1": winner}}}
    one_row = [c for c in GEMV_CANDIDATES if c["BLOCK_M"] == 1]
    many_rows = [c for c in GEMV_CANDIDATES if c["BLOCK_M"] == 16]
    # cuBLAS and every candidate at 1 row; at 2 and 16 rows, cuBLAS and the BLOCK_M 16 candidates
    expected = ([(1, None)] + [(1, 1)] * len(one_row) + [(r, None) for r in (2, 16)]
                + [(r, 16) for r in (2, 16)] * len(many_rows))
    assert sorted(timed, key=str) == sorted(expected, key=str)
    assert tuning.TuningRun(config, BuildConfig(max_batch_size=1, max_input_len=16, max_seq_len=32, max_num_tokens=32),
                            torch.float32, num_sms=1, device=DEVICE).tune_dense_linear([(48, 64)]) == plan

    timed.clear()
    assert run.tune_dense_linear([(48, 32)]) == {} and not timed  # below MIN_TUNED_MATMUL_BYTES: cuBLAS, untimed

    monkeypatch.setattr(tuning, "gemv", lambda x, w, **config: F.linear(x, w) + 1.0)  # a GEMV that is wrong
    with caplog.at_level(logging.WARNING):
        assert run.tune_dense_linear([(48, 64)]) == {}
    assert "disagrees with the default's results; passed over" in caplog.text


@gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
@pytest.mark.parametrize("num_rows", [1, 2, 16])
def test_gpu_dense_gemv_at_llama3_8b_shapes(num_rows, n, k):
    """Every GEMV candidate for the row count, bfloat16, against cuBLAS."""
    x, weight, _ = dense_case(num_rows, n, k, torch.bfloat16)
    expected = F.linear(x, weight)
    for config in GEMV_CANDIDATES:
        if (config["BLOCK_M"] == 1) == (num_rows == 1):
            assert_matmul_close(gemv(x, weight, **config), expected)


def test_tuning_passes_over_configs_the_gpu_cannot_launch(monkeypatch):
    """A candidate whose launch Triton refuses for want of shared memory is timed as infinity; if none
    launches, or none of those that do passes ``accept``, the build fails saying which op; a candidate
    ``accept`` refuses gives way to the next fastest."""
    from triton.runtime.errors import OutOfResources

    from kiln.builder import tuning
    from kiln.errors import EngineError

    def fake_median_ms(fn):
        if fn.keywords.get("num_stages", 0) >= 3:
            raise OutOfResources(147456, 101376, "shared memory")
        return 10.0 - fn.keywords.get("BLOCK_N", 0) / 100

    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    candidates = [{"BLOCK_N": 64, "num_stages": 3}, {"BLOCK_N": 32, "num_stages": 2}, {"BLOCK_N": 16, "num_stages": 2}]
    run = lambda **config: None  # noqa: E731
    assert tuning._fastest(candidates, [run, run], "op") == {"BLOCK_N": 32, "num_stages": 2}
    with pytest.raises(EngineError, match="tuning op: none of its 1 candidate configs launches"):
        tuning._fastest(candidates[:1], [run], "op")
    with pytest.raises(EngineError, match="tuning op: no candidate config that launches gives the expected results"):
        tuning._fastest(candidates, [run], "op", accept=lambda config: False)
    assert tuning._fastest(candidates, [run], "op", accept=lambda config: config["BLOCK_N"] == 16)["BLOCK_N"] == 16


@gpu
def test_gpu_tuning_times_dense_linear_at_llama3_8b_shapes_and_its_choice_runs():
    """The build's timing on this GPU, for real, at two Llama-3-8B shapes (qkv, and the LM head, which
    cuBLAS reads at copy bandwidth): it returns a plan the op takes, and whatever it chose matches cuBLAS."""
    from kiln.builder import tuning

    config = AutoModelForCausalLM.from_preset("llama-3-8b").config
    build = BuildConfig(max_batch_size=64, max_input_len=128, max_seq_len=256, max_num_tokens=256)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    run = tuning.TuningRun(config, build, torch.bfloat16, num_sms=num_sms, device=DEVICE)
    shapes = [(6144, 4096), (128256, 4096)]
    plan = run.tune_dense_linear(shapes)
    for key, buckets in plan.get("shapes", {}).items():
        assert key in {"6144x4096", "128256x4096"} and set(buckets) <= {"1", "16"}
    for n, k in shapes:
        x, weight, _ = dense_case(16, n, k, torch.bfloat16)
        for rows in (1, 7, 16):
            assert_matmul_close(dense_linear_triton(x[:rows], weight, None, **plan), F.linear(x[:rows], weight))


# ---- the RMSNorm folded into the one-row GEMV ------------------------------------------------------------
ONE_ROW_CONFIGS = [c for _, c in GEMV_CASES if c["BLOCK_M"] == 1]


@pytest.mark.parametrize("config", ONE_ROW_CONFIGS, ids=["N4K128", "N8K64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rms_norm_folded_into_the_gemv_is_the_norm_then_the_linear(config, dtype, rounding_bf16_casts):
    """Odd N (37) and K (300: a partial K step), with a bias: the product of the normalized row (the norm's
    weight held by the Linear's) within the matmul's tolerance of the norm then F.linear; the row unchanged."""
    x, weight, bias = dense_case(1, 37, 300, dtype)
    x = x * 3  # an RMS far from 1, so a missing normalization shows
    before = x.clone()
    out = rms_norm_linear_triton(x, 1e-5, weight, bias, shapes={"37x300": config})
    assert_matmul_close(out, rms_norm_linear_ref(x, 1e-5, weight, bias))
    assert torch.equal(x, before)


@pytest.mark.parametrize("num_rows,config,dtype", gemv_params(GEMV_CASES[:3]))
def test_gemv_adds_its_product_to_the_residual_in_place(num_rows, config, dtype, rounding_bf16_casts):
    """The product as the plain GEMV stores it, added to the residual as add_rms_norm adds (torch's add in
    the dtype): bit for bit, written in place of the residual, which is returned."""
    x, weight, bias = dense_case(num_rows, 37, 300, dtype)
    residual = torch.randn(num_rows, 37, device=DEVICE).to(dtype)
    expected = residual + gemv(x, weight, None, bias, **config)
    out = gemv(x, weight, None, bias, residual=residual, **config)
    assert out is residual and torch.equal(out, expected)
    reference = torch.randn(num_rows, 37, device=DEVICE).to(dtype)
    expected = reference + F.linear(x, weight, bias)
    assert dense_linear_ref(x, weight, bias, reference) is reference and torch.equal(reference, expected)


@pytest.mark.parametrize("num_rows,config,dtype", gemv_params(GEMV_CASES[:3]))
@pytest.mark.parametrize("has_bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_of_a_gate_up_projection_takes_silu_mul_in_its_epilogue(num_rows, config, dtype, has_bias,
                                                                     rounding_bf16_casts):
    """[gate | up] of 2 x 37 rows (a partial pair block), K 300: bit for bit the GEMV's product and then
    SiLU·up's kernel (the same arithmetic; torch's silu may differ from it by an ulp)."""
    x, weight, bias = dense_case(num_rows, 74, 300, dtype)
    bias = bias if has_bias else None
    out = gemv(x, weight, None, bias, silu_mul=True, **config)
    assert out.shape == (num_rows, 37)
    assert torch.equal(out, silu_mul_triton(gemv(x, weight, None, bias, **config)))
    if num_rows == 1:  # with the norm folded in too (gate_up's GEMV at batch 1)
        assert torch.equal(gemv(x, weight, None, bias, rms_eps=1e-5, silu_mul=True, **config),
                           silu_mul_triton(gemv(x, weight, None, bias, rms_eps=1e-5, **config)))


def dense_model(config, ops: KernelOps, dtype: torch.dtype = torch.float32):
    """The model unquantized with dummy weights (norm weights not all ones, so a weight applied wrongly
    shows), loaded as the loader does: the norms the plan folds give their weight to the Linear after them."""
    build = BuildConfig(quantization="none")
    weights = dict(dummy_weights(model_skeleton(config, build, dtype), DEVICE))
    generator = torch.Generator(DEVICE).manual_seed(0)  # the same weights for every plan
    for name, tensor in weights.items():
        if name.endswith("norm.weight"):
            tensor.uniform_(0.5, 1.5, generator=generator)
    model = create_model(config, LayerContext(ops, linear_method("none", build), dtype, DEVICE), max_positions=64)
    load_parameters(model, weights)
    fold_norm_weights(model)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_one_row_step_folds_every_norm_between_two_linears(family, monkeypatch):
    """A one-token forward with rms_norm_linear listing qkv's and gate_up's shapes and dense_linear's GEMV
    o's and down's: every layer's two norms fold into qkv's and gate_up's GEMVs (the first attn_norm without
    a residual), o and down adding their products to the residual in their GEMVs, gate_up's GEMV taking
    SiLU·up; only the final norm (the LM head's) runs its kernel; the logits are the reference plan's. Two
    rows fold nothing, and still give the reference's logits (the norms' weights held by the Linears); a
    plan that lists no shape, or predates the op, leaves the weights as they are."""
    config = CONFIGS[family]
    qkv = ((config.num_heads + 2 * config.num_kv_heads) * config.head_dim, config.hidden_size)
    gate_up = (2 * config.intermediate_size, config.hidden_size)
    o, down = (config.hidden_size, config.num_heads * config.head_dim), (config.hidden_size, config.intermediate_size)
    reference = dense_model(config, KernelOps(reference_plan(OPS)))
    one_row = {"shapes": {f"{n}x{k}": ONE_ROW_CONFIGS[0] for n, k in (qkv, gate_up)}}
    plan = {**reference_plan(OPS), "rms_norm_linear": {"impl": "triton", "config": one_row},
            "dense_linear": {"impl": "triton", "config": {"shapes": {f"{n}x{k}": {"1": ONE_ROW_CONFIGS[0]}
                                                                     for n, k in (o, down)}}}}
    ops = KernelOps(plan)
    model = dense_model(config, ops)
    for name, tensor in model.state_dict().items():  # the norms' weights moved into qkv's and gate_up's
        folded = name.endswith(("attn_norm.weight", "mlp_norm.weight"))
        assert torch.equal(tensor, torch.ones_like(tensor)) == folded, name
    calls = Counter()
    counting_calls(monkeypatch, ops, calls)
    torch.testing.assert_close(forward(model, config, [1]), forward(reference, config, [1]), rtol=1e-5, atol=1e-5)
    per_head_norms = 2 * config.num_layers if family == "qwen3" else 0  # q and k norms: not a Linear's input
    assert calls["rms_norm_linear"] == 2 * config.num_layers and calls["add_rms_norm"] == 1
    assert calls["rms_norm"] == per_head_norms and calls["silu_mul"] == 0
    calls.clear()
    torch.testing.assert_close(forward(model, config, [2]), forward(reference, config, [2]), rtol=1e-5, atol=1e-5)
    assert calls["rms_norm_linear"] == 0 and calls["add_rms_norm"] == 2 * config.num_layers
    assert calls["silu_mul"] == config.num_layers
    for unfolding in ({**plan, "rms_norm_linear": {"impl": "triton", "config": {}}},
                      reference_plan([op for op in OPS if op != "rms_norm_linear"])):
        weights = dense_model(config, KernelOps(unfolding)).state_dict()
        norms = [t for name, t in weights.items() if name.endswith("norm.weight")]
        assert all(not torch.equal(t, torch.ones_like(t)) for t in norms)


def decode_after_prompt(models: list, config, prompt_len: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first model reads a prompt of ``prompt_len`` tokens into a cache; each model then decodes one
    token after it from a copy of that cache: its logits and its cache."""
    input_ids, positions, slots, meta, rows = prompt_batch(config, [prompt_len])
    cache = torch.zeros(config.num_layers, 2, 2, BLOCK_SIZE, config.num_kv_heads, config.head_dim,
                        dtype=models[0].dtype, device=DEVICE)
    models[0](input_ids, positions, cache, slots, meta, rows)
    decode = AttentionMetadata(seq_lens=torch.tensor([prompt_len + 1], dtype=torch.int32, device=DEVICE),
                               query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
                               block_tables=meta.block_tables, seq_lens_host=[prompt_len + 1], query_lens_host=[1])
    token, position = input_ids[:1], torch.tensor([prompt_len], device=DEVICE)
    slot = meta.block_tables[0, prompt_len // BLOCK_SIZE].long().view(1) * BLOCK_SIZE + prompt_len % BLOCK_SIZE
    results = []
    for model in models:
        model_cache = cache.clone()
        results.append((model(token, position, model_cache, slot, decode, rows[:1]), model_cache))
    return results


@pytest.mark.parametrize("family", ["llama", "gptj", "qwen3"])
def test_a_one_row_decode_writes_the_kv_cache_in_the_qkv_gemv(family, monkeypatch):
    """A one-token decode at position 5 with qkv's one-row GEMV planned (through rms_norm_linear for Llama,
    dense_linear for GPT-J's LayerNorm): qkv's GEMV rotates q and k (rotate_half; GPT-J's interleaved partial)
    and writes the cache, so no rotary kernel runs; logits and cache are the reference plan's. Qwen3's
    per-head norms come between qkv and the rotation: it folds nothing."""
    config = CONFIGS[family]
    qkv = f"{(config.num_heads + 2 * config.num_kv_heads) * config.head_dim}x{config.hidden_size}"
    plan = {**reference_plan(OPS), "rms_norm_linear": {"impl": "triton", "config": {"shapes": {
        qkv: ONE_ROW_CONFIGS[0]}}}, "dense_linear": {"impl": "triton", "config": {"shapes": {
            qkv: {"1": ONE_ROW_CONFIGS[0]}}}}}
    ops = KernelOps(plan)
    calls = Counter()
    counting_calls(monkeypatch, ops, calls)
    (logits, cache), (expected_logits, expected_cache) = decode_after_prompt(
        [dense_model(config, ops), dense_model(config, KernelOps(reference_plan(OPS)))], config)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, expected_cache, rtol=1e-5, atol=1e-5)
    prompt_rotations = config.num_layers  # the prompt's five rows: the plan has no GEMV for them
    assert calls["rotary_kv_write"] == prompt_rotations + (config.num_layers if family == "qwen3" else 0)


def test_a_row_parallel_linear_never_folds_the_norm():
    """Its rank holds a slice of the row's columns: the RMS of the slice is not the row's."""
    from types import SimpleNamespace

    from kiln.layers import DenseLinearMethod

    ops = KernelOps({**reference_plan(OPS), "rms_norm_linear": {"impl": "triton", "config": {
        "shapes": {"48x64": ONE_ROW_CONFIGS[0]}}}})
    for is_row_parallel, folds in ((False, True), (True, False)):
        layer = SimpleNamespace(out_features=48, in_features=64, is_row_parallel=is_row_parallel, ops=ops)
        assert DenseLinearMethod().folds_norm(layer, 1) == folds
        assert not DenseLinearMethod().folds_norm(layer, 2)


def test_tuning_folds_the_norm_where_the_fold_is_faster_and_agrees(monkeypatch, caplog):
    """Fake times: the norm's kernel and dense_linear apart 10; a fold 12 - BLOCK_N / 4 (BLOCK_N 16 wins at
    8; BLOCK_N 4 loses at 11). A weight below MIN_TUNED_MATMUL_BYTES is not timed; a fold whose product is
    wrong is passed over with a warning; where apart is faster, nothing folds."""
    from kiln.builder import tuning

    timed = []

    def fake_median_ms(fn):
        timed.append(fn.keywords)
        return 12.0 - fn.keywords["BLOCK_N"] / 4 if fn.keywords else 10.0

    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    monkeypatch.setattr(tuning, "MIN_TUNED_MATMUL_BYTES", 48 * 64 * 4)
    config = AutoModelForCausalLM.from_preset("llama-3-8b").config
    build = BuildConfig(max_batch_size=16, max_input_len=16, max_seq_len=32, max_num_tokens=32)
    run = tuning.TuningRun(config, build, torch.float32, num_sms=1, device=DEVICE)
    one_row = [c for c in GEMV_CANDIDATES if c["BLOCK_M"] == 1]
    winner = next(c for c in one_row if c["BLOCK_N"] == 16)
    assert run.tune_rms_norm_linear([(48, 64), (48, 32)], {}, {}) == {"shapes": {"48x64": winner}}
    assert timed == [{}] + one_row  # 48 x 32: not timed
    monkeypatch.setattr(tuning, "gemv", lambda x, w, **config: F.linear(x, w))  # forgets the norm
    with caplog.at_level(logging.WARNING):
        assert run.tune_rms_norm_linear([(48, 64)], {}, {}) == {}
    assert "disagrees with the default's results; passed over" in caplog.text
    monkeypatch.setattr(tuning, "_median_ms", lambda fn: 20.0 if fn.keywords else 10.0)  # apart is faster
    assert run.tune_rms_norm_linear([(48, 64)], {}, {}) == {}


# (rotary dims of a 16-dim head, interleaved): rotate_half, partial rotate_half, GPT-J's interleaved partial
ROTATIONS = [(16, False), (8, False), (8, True)]


def kv_write_case(num_rows: int, rotation: tuple[int, bool], cache_dtype: torch.dtype, dtype: torch.dtype,
                  seed: int = 0) -> KvWrite:
    """A cache of 4 blocks of 16 slots for 2 KV heads of 16 dims (zeros), rows at random positions and slots,
    the second row (where there is one) padding (slot -1)."""
    generator = torch.Generator().manual_seed(seed)
    rotary_dim, is_interleaved = rotation
    cos_sin = rope_cos_sin(RopeConfig(), rotary_dim, 64).to(DEVICE)
    positions = torch.randint(0, 64, (num_rows,), generator=generator)
    slots = torch.randperm(64, generator=generator)[:num_rows]
    slots[1:2] = -1
    cache = torch.zeros(2, 4, 16, 2, 16, device=DEVICE, dtype=dtype).to(cache_dtype)
    kv_scale = torch.tensor([0.5, 2.0], device=DEVICE) if cache_dtype == FP8_DTYPE else None
    return KvWrite(positions.to(DEVICE), cos_sin, cache[0], cache[1], slots.to(DEVICE), is_interleaved, kv_scale)


def assert_rotated_as(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit in the interpreter. Compiled, the GEMV's epilogue may contract the rotation's products
    into FMAs (rotary_kv_write's kernel is built without), so there within one rounding of the dtype (of
    e4m3 for an FP8 cache) of the largest value."""
    if not ON_GPU:
        assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))
        return
    ulp = 2.0 ** -3 if expected.dtype == FP8_DTYPE else TOLERANCES[expected.dtype][1] * 2
    expected = expected.float()
    torch.testing.assert_close(actual.float(), expected, rtol=0, atol=ulp * expected.abs().max().item())


def copied(write: KvWrite) -> KvWrite:
    return write._replace(k_cache=write.k_cache.clone(), v_cache=write.v_cache.clone())


def assert_same_cache(actual: KvWrite, expected: KvWrite) -> None:
    for name in ("k_cache", "v_cache"):
        assert_rotated_as(getattr(actual, name), getattr(expected, name))


KV_WRITE_CASES = [(1, {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}),
                  (1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 2, "num_stages": 1}),
                  (3, {"BLOCK_M": 16, "BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2})]


# Each case with a cache of its dtype and, for 16-bit ones (an FP8 cache is for 16-bit engines), one of e4m3.
KV_WRITE_PARAMS = [pytest.param(*case.values, fp8_cache, marks=case.marks) for case in gemv_params(KV_WRITE_CASES)
                   for fp8_cache in (False, True) if not (fp8_cache and case.values[2] == torch.float32)]


@pytest.mark.parametrize("num_rows,config,dtype,fp8_cache", KV_WRITE_PARAMS)
@pytest.mark.parametrize("rotation", ROTATIONS, ids=["half", "half_partial", "interleaved_partial"])
def test_gemv_of_a_qkv_projection_rotates_and_writes_the_kv_cache_in_its_epilogue(
        num_rows, config, dtype, fp8_cache, rotation, rounding_bf16_casts, rounding_fp8_casts):
    """4 query heads and 2 KV heads of 16 dims, K 72 (a partial K step), a bias: rotated q, and the cache's
    bytes (e4m3 with a scale for k and one for v, or the dtype), bit for bit the plain GEMV's product then
    rotary_kv_write's reference (assert_rotated_as); a padding row (slot -1) writes nothing."""
    write = kv_write_case(num_rows, rotation, FP8_DTYPE if fp8_cache else dtype, dtype)
    x, weight, bias = dense_case(num_rows, 8 * 16, 72, dtype)
    assert kv_write_fits(config["BLOCK_N"], write)
    expected_write = copied(write)
    q = gemv(x, weight, None, bias, kv_write=write, **config)
    assert_rotated_as(q, qkv_rotary_kv_write_ref(gemv(x, weight, None, bias, **config), expected_write))
    assert_same_cache(write, expected_write)
    written = [cache.float().view(-1, 32).ne(0).any(dim=-1).sum().item() for cache in (write.k_cache, write.v_cache)]
    assert written == [num_rows - (num_rows > 1)] * 2  # one slot per row but the padding row


def test_the_kv_write_takes_only_column_blocks_within_a_head_and_its_rotated_halves():
    write = kv_write_case(1, (8, False), torch.float32, torch.float32)
    assert [kv_write_fits(n, write) for n in (2, 4, 8, 16, 3)] == [True, True, True, False, False]
    assert kv_write_fits(16, write._replace(is_interleaved=True))  # pairs side by side: a head's 16 columns
    assert not kv_write_fits(32, write._replace(is_interleaved=True))  # two heads


@gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096)])
def test_gpu_rms_norm_folded_into_the_gemv_at_llama3_8b_shapes(n, k):
    """Compiled, bfloat16, every one-row GEMV candidate, qkv's and gate_up's shapes: the product against the
    norm's kernel (weight ones: the Linear holds it) then cuBLAS."""
    from kiln.kernels.norm import rms_norm_triton

    x, weight, _ = dense_case(1, n, k, torch.bfloat16)
    expected = F.linear(rms_norm_triton(x * 3, torch.ones(k, device=DEVICE, dtype=torch.bfloat16), 1e-5), weight)
    for config in ONE_ROW_CONFIGS_8B:
        assert_matmul_close(rms_norm_linear_triton(x * 3, 1e-5, weight, None, shapes={f"{n}x{k}": config}), expected)


@gpu
@pytest.mark.parametrize("num_rows", [1, 2, 16])
def test_gpu_gemv_takes_silu_mul_at_llama3_8b_gate_up(num_rows):
    """Compiled, bfloat16, every GEMV candidate of the row count, gate_up's shape: bit for bit the GEMV
    then SiLU·up's kernel."""
    x, weight, _ = dense_case(num_rows, 28672, 4096, torch.bfloat16)
    for config in GEMV_CANDIDATES:
        if (config["BLOCK_M"] == 1) == (num_rows == 1):
            assert torch.equal(gemv(x, weight, silu_mul=True, **config), silu_mul_triton(gemv(x, weight, **config)))


@gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336)])
def test_gpu_gemv_adds_to_the_residual_at_llama3_8b_shapes(n, k):
    """Compiled, bfloat16, every one-row GEMV candidate, o's and down's shapes: bit for bit the GEMV's
    product added to the residual by torch."""
    x, weight, _ = dense_case(1, n, k, torch.bfloat16)
    for config in ONE_ROW_CONFIGS_8B:
        residual = torch.randn(1, n, device=DEVICE, dtype=torch.bfloat16)
        expected = residual + gemv(x, weight, **config)
        assert torch.equal(gemv(x, weight, residual=residual, **config), expected)


@gpu
@pytest.mark.parametrize("num_rows", [1, 2, 16])
@pytest.mark.parametrize("fp8_cache", [False, True], ids=["bf16_cache", "fp8_cache"])
def test_gpu_gemv_writes_the_kv_cache_at_llama3_8b_qkv(num_rows, fp8_cache):
    """Compiled, bfloat16, every GEMV candidate of the row count, qkv's shape (32 query heads, 8 KV heads of
    128 dims, rotate_half): q and the cache as the plain GEMV then rotary_kv_write's kernel write them
    (assert_rotated_as)."""
    from kiln.kernels.rotary import rotary_kv_write_triton

    x, weight, bias = dense_case(num_rows, 6144, 4096, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, 8, 16, 8, 128, device=DEVICE, dtype=torch.bfloat16).to(
        FP8_DTYPE if fp8_cache else torch.bfloat16)
    write = KvWrite(torch.randint(0, 8192, (num_rows,), generator=generator).to(DEVICE),
                    rope_cos_sin(RopeConfig(theta=500000.0), 128, 8192).to(DEVICE), cache[0], cache[1],
                    torch.randperm(128, generator=generator)[:num_rows].to(DEVICE), False,
                    torch.tensor([0.5, 2.0], device=DEVICE) if fp8_cache else None)
    for config in GEMV_CANDIDATES:
        if (config["BLOCK_M"] == 1) == (num_rows == 1):
            expected_write = copied(write)
            q, k, v = gemv(x, weight, None, bias, **config).split([4096, 1024, 1024], dim=-1)
            expected = rotary_kv_write_triton(q.view(-1, 32, 128), k.view(-1, 8, 128), v.view(-1, 8, 128),
                                              *expected_write)
            assert_rotated_as(gemv(x, weight, None, bias, kv_write=write, **config), expected.view(-1, 4096))
            assert_same_cache(write, expected_write)


ONE_ROW_CONFIGS_8B = [c for c in GEMV_CANDIDATES if c["BLOCK_M"] == 1]

