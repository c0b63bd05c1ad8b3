"""The ops GPT-J and Qwen3 add: LayerNorm (+ residual add), GELU, partial and interleaved rotary, and
RMSNorm over many short rows (Qwen3's per-head q/k norm).

The references are checked against torch's and transformers' own functions; the Triton kernels against
the references, as in test_kernels.py (whose helpers and tolerance tables this file shares).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DEVICE, gpu
from kiln.config import BuildConfig
from kiln.errors import EngineError
from kiln.kernels import LLAMA_OPS, OPS, KernelOps, reference_plan, triton_ops
from kiln.kernels.activation import gelu_ref, gelu_triton
from kiln.kernels.norm import (add_layer_norm_ref, add_layer_norm_triton, layer_norm_ref, layer_norm_triton,
                               norm_rows_per_program, rms_norm_ref, rms_norm_triton)
from kiln.kernels.rotary import rope_cos_sin, rotary_kv_write_ref, rotary_kv_write_triton
from kiln.models.config import RopeConfig
from test_kernels import (ALL_DTYPES, DTYPE_ID, INTERPRETED, ROPES, TINY_MODEL, assert_cache_writes_match,
                          assert_close, fused_qkv_views, randn)


# ---- references against torch and transformers ---------------------------------------------------
def test_new_ops_are_registered_with_references_and_triton_kernels():
    reference_ops = KernelOps(reference_plan())
    triton_ops_bound = KernelOps({op: {"impl": "triton", "config": {}} for op in OPS})
    for op, ref, kernel in (("layer_norm", layer_norm_ref, layer_norm_triton),
                            ("add_layer_norm", add_layer_norm_ref, add_layer_norm_triton),
                            ("gelu", gelu_ref, gelu_triton)):
        assert op in OPS and getattr(reference_ops, op) is ref and getattr(triton_ops_bound, op) is kernel
    assert set(triton_ops.IMPLS) == set(OPS)


@pytest.mark.parametrize("hidden", [8, 40, 72])
def test_layer_norm_ref_matches_torch_layer_norm(hidden):
    x, weight, bias = randn(5, hidden), randn(hidden), randn(hidden)
    layer = torch.nn.LayerNorm(hidden, eps=1e-5)
    with torch.no_grad():
        layer.weight.copy_(weight), layer.bias.copy_(bias)
        torch.testing.assert_close(layer_norm_ref(x, weight, bias, 1e-5), layer(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_ID)
def test_layer_norm_ref_rounds_once_to_the_input_dtype(dtype):
    x, weight, bias = randn(3, 40, dtype=dtype), randn(40, dtype=dtype), randn(40, dtype=dtype)
    out = layer_norm_ref(x, weight, bias, 1e-5)
    expected = torch.nn.functional.layer_norm(x.float(), (40,), weight.float(), bias.float(), 1e-5)
    assert out.dtype == dtype and torch.equal(out, expected.to(dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
def test_add_layer_norm_ref_returns_the_new_residual_in_the_input_dtype(dtype):
    x, residual, weight, bias = randn(3, 40, dtype=dtype), randn(3, 40, dtype=dtype), randn(40), randn(40)
    normed, new_residual = add_layer_norm_ref(x, residual, weight, bias, 1e-5)
    assert new_residual.dtype == normed.dtype == dtype
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(normed, layer_norm_ref(x + residual, weight, bias, 1e-5))


@pytest.mark.parametrize("approximate,hf_name", [("tanh", "gelu_new"), ("tanh", "gelu_pytorch_tanh"),
                                                 ("none", "gelu")])
def test_gelu_ref_matches_transformers_activations(approximate, hf_name):
    from transformers.activations import ACT2FN

    x = randn(7, 33) * 4
    torch.testing.assert_close(gelu_ref(x, approximate), ACT2FN[hf_name](x), rtol=1e-6, atol=1e-6)


def test_gelu_ref_refuses_an_unknown_approximation_naming_the_known_ones():
    with pytest.raises(ValueError, match="supported: tanh, none"):
        gelu_ref(randn(2, 4), "erf")


ROPE = RopeConfig(theta=10000.0)


def rotary_case(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype = torch.float32, max_positions: int = 256):
    """Fused-QKV views, positions, and a NaN-poisoned paged cache with a padding slot every third token."""
    q, k, v = fused_qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    positions = torch.randint(0, max_positions, (num_tokens,), device=DEVICE)
    num_blocks = -(-num_tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::3] = -1
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    return q, k, v, positions, slots, k_cache, k_cache.clone()


@pytest.mark.parametrize("rotary_dim,head_dim", [(8, 16), (16, 16), (64, 256)])
def test_interleaved_rotary_ref_matches_transformers_gptj(rotary_dim, head_dim):
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    q, k, v, positions, slots, k_cache, v_cache = rotary_case(7, 4, 2, head_dim, 8)
    q_rot = rotary_kv_write_ref(q, k, v, positions, rope_cos_sin(ROPE, rotary_dim, 256), k_cache, v_cache, slots,
                                is_interleaved=True)

    sin, cos = create_sinusoidal_positions(256, rotary_dim)[positions][None].chunk(2, dim=-1)

    def gptj(x):  # GPTJAttention.forward on [batch 1, T, heads, head_dim]
        x = x[None]
        return torch.cat([apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos), x[..., rotary_dim:]], dim=-1)[0]

    torch.testing.assert_close(q_rot, gptj(q), rtol=1e-5, atol=1e-5)
    assert torch.equal(q_rot[..., rotary_dim:], q[..., rotary_dim:])
    valid = slots >= 0
    k_written = k_cache.view(-1, *k_cache.shape[2:])[slots[valid]]
    torch.testing.assert_close(k_written, gptj(k)[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache.view(-1, *v_cache.shape[2:])[slots[valid]], v[valid])
    assert int(k_cache.isnan().all(-1).all(-1).sum()) == k_cache.shape[0] * k_cache.shape[1] - int(valid.sum())


@pytest.mark.parametrize("rotary_dim,head_dim", [(8, 16), (16, 16), (32, 128)])
def test_partial_half_split_rotary_ref_matches_transformers_gpt_neox(rotary_dim, head_dim):
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    q, k, v, positions, slots, k_cache, v_cache = rotary_case(5, 4, 2, head_dim, 8)
    cos_sin = rope_cos_sin(ROPE, rotary_dim, 256)
    q_rot = rotary_kv_write_ref(q, k, v, positions, cos_sin, k_cache, v_cache, slots)

    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], dim=-1)[None], torch.cat([sin, sin], dim=-1)[None]  # HF's duplicated halves
    expected_q, expected_k = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(q_rot, expected_q[0], rtol=1e-5, atol=1e-5)
    valid = slots >= 0
    torch.testing.assert_close(k_cache.view(-1, *k_cache.shape[2:])[slots[valid]], expected_k[0][valid],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_interleaved", [False, True])
def test_rotary_ref_keeps_16_bit_pass_through_dims_exact(is_interleaved):
    q, k, v, positions, slots, k_cache, v_cache = rotary_case(4, 2, 1, 16, 8, dtype=torch.bfloat16)
    q_rot = rotary_kv_write_ref(q, k, v, positions, rope_cos_sin(ROPE, 8, 256), k_cache, v_cache, slots,
                                is_interleaved=is_interleaved)
    assert q_rot.dtype == torch.bfloat16 and torch.equal(q_rot[..., 8:], q[..., 8:])


@pytest.mark.parametrize("head_dim", [8, 16, 64, 128])
def test_rms_norm_ref_per_head_view_matches_transformers_qwen3(head_dim):
    """Qwen3 normalizes each head of q and k: rms_norm on the [T * heads, head_dim] view."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    q, weight = randn(3, 5 * head_dim, dtype=torch.bfloat16), randn(head_dim, dtype=torch.bfloat16)
    norm = Qwen3RMSNorm(head_dim, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(weight)
        expected = norm(q.view(3, 5, head_dim))
    torch.testing.assert_close(rms_norm_ref(q.view(-1, head_dim), weight, 1e-6).view(3, 5, head_dim), expected,
                               rtol=0, atol=0)


# ---- Triton kernels against the references -------------------------------------------------------
# Tolerances: test_kernels.TOLERANCES (float32 1e-5, float16 2e-3, bfloat16 2e-2, rtol = atol), for
# every arithmetic op here; KV cache writes exact (bfloat16 in the interpreter excepted, which truncates).
LAYER_NORM_SHAPES = [(1, 40), (3, 72), (17, 8), (4, 200)] + [
    pytest.param(t, 4096, marks=gpu) for t in (1, 8, 512, 8192)]


def layer_norm_inputs(num_tokens: int, hidden: int, dtype: torch.dtype):
    """Off-centre rows (mean 3), so a kernel that skips the centering, or centres the padding, shows."""
    return randn(num_tokens, hidden, dtype=dtype) * 2 + 3, randn(hidden, dtype=dtype), randn(hidden, dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,hidden", LAYER_NORM_SHAPES)
def test_layer_norm(num_tokens, hidden, dtype):
    x, weight, bias = layer_norm_inputs(num_tokens, hidden, dtype)
    assert_close(layer_norm_triton(x, weight, bias, 1e-5), layer_norm_ref(x, weight, bias, 1e-5))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_tokens,hidden", LAYER_NORM_SHAPES)
def test_add_layer_norm_writes_the_new_residual_in_place(num_tokens, hidden, dtype):
    x, weight, bias = layer_norm_inputs(num_tokens, hidden, dtype)
    residual = randn(num_tokens, hidden, dtype=dtype)
    expected_out, expected_residual = add_layer_norm_ref(x, residual, weight, bias, 1e-5)
    out, new_residual = add_layer_norm_triton(x, residual, weight, bias, 1e-5, num_warps=2)
    assert new_residual.data_ptr() == residual.data_ptr()
    assert_cache_writes_match(new_residual, expected_residual, is_exact=not (INTERPRETED and dtype == torch.bfloat16))
    # Normalized from the residual it wrote: where the interpreter truncates that residual's bfloat16 sum,
    # a 1-ulp change of an input of mean 3 moves the output by up to ~0.03, beyond the tolerance.
    assert_close(out, layer_norm_ref(new_residual, weight, bias, 1e-5))
    if not INTERPRETED:
        assert_close(out, expected_out)


# The interpreter's float32 exp overflows to inf in sigmoid's tail (gelu -> -0 there), as the GPU's does.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("num_tokens,num_cols,block", [
    (1, 40, 64), (3, 1001, 256), (17, 9, 16),
    pytest.param(1, 16384, 1024, marks=gpu), pytest.param(8192, 16384, 1024, marks=gpu)])
def test_gelu(num_tokens, num_cols, block, approximate, dtype):
    x = randn(num_tokens, num_cols, dtype=dtype) * 3  # tails too: gelu ~ x above ~4, ~ 0 below ~-4
    assert_close(gelu_triton(x, approximate, BLOCK=block, num_warps=2), gelu_ref(x, approximate))


def test_gelu_triton_refuses_an_unknown_approximation():
    with pytest.raises(ValueError, match="supported: tanh, none"):
        gelu_triton(randn(2, 4), "sigmoid")


# (tokens, heads, KV heads, head_dim, rotary_dim, block size)
ROTARY_SHAPES = [(3, 4, 2, 16, 8, 16), (17, 4, 2, 16, 16, 16), (1, 3, 1, 16, 8, 8), (5, 2, 2, 72, 24, 16),
                 pytest.param(1, 16, 16, 256, 64, 32, marks=gpu),  # GPT-J 6B
                 pytest.param(8192, 16, 16, 256, 64, 32, marks=gpu),
                 pytest.param(2048, 32, 8, 128, 128, 32, marks=gpu)]  # Qwen3-8B, full width


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("is_interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim,rotary_dim,block_size", ROTARY_SHAPES)
def test_partial_and_interleaved_rotary_kv_write(num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim,
                                                 block_size, is_interleaved, dtype):
    q, k, v, positions, slots, k_cache, v_cache = rotary_case(num_tokens, num_heads, num_kv_heads, head_dim,
                                                              block_size, dtype, max_positions=4096)
    cos_sin = rope_cos_sin(ROPES["default"], rotary_dim, 4096).to(DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_q = rotary_kv_write_ref(q, k, v, positions, cos_sin, expected_k, expected_v, slots, is_interleaved)
    q_rot = rotary_kv_write_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slots, is_interleaved,
                                   num_warps=2)
    assert_close(q_rot, expected_q)
    assert torch.equal(q_rot[..., rotary_dim:], q[..., rotary_dim:])  # passed through, not recomputed
    assert_cache_writes_match(k_cache, expected_k, is_exact=not (INTERPRETED and dtype == torch.bfloat16))
    assert_cache_writes_match(v_cache, expected_v)


# ---- RMSNorm over many short rows (Qwen3's per-head q / k norm) ----------------------------------
def test_norm_rows_per_program():
    assert norm_rows_per_program(num_rows=10**6, num_cols=4096, num_warps=8) == 1
    assert norm_rows_per_program(num_rows=10**6, num_cols=128, num_warps=8) == 16
    assert norm_rows_per_program(num_rows=10**6, num_cols=8, num_warps=4) == 128
    assert norm_rows_per_program(num_rows=3, num_cols=8, num_warps=4) == 4  # no wider than the rows


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("is_head_view", [True, False], ids=["qkv_head_view", "rows"])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim", [
    (1, 4, 2, 8), (3, 4, 2, 16), (17, 6, 2, 64), (5, 2, 1, 128),
    pytest.param(1, 32, 8, 128, marks=gpu), pytest.param(8192, 32, 8, 128, marks=gpu),
    pytest.param(8192, 64, 8, 128, marks=gpu)])
def test_per_head_rms_norm(num_tokens, num_heads, num_kv_heads, head_dim, is_head_view, dtype):
    """q and k of the fused QKV output normalized per head: read in place as [T, heads, head_dim] views, or
    as contiguous [T * heads, head_dim] rows."""
    q, k, _ = fused_qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    weight = randn(head_dim, dtype=dtype)
    for x in (q, k):
        x = x if is_head_view else x.reshape(-1, head_dim)
        out = rms_norm_triton(x, weight, 1e-6, num_warps=4)
        assert out.shape == x.shape
        assert_close(out, rms_norm_ref(x, weight, 1e-6))


# ---- kernel plan and tuning ----------------------------------------------------------------------
GPTJ_OPS = ("layer_norm", "add_layer_norm", "gelu", "rotary_kv_write", "attention")
TINY_BUILD = BuildConfig(max_batch_size=3, max_input_len=16, max_seq_len=32, max_num_tokens=32, tokens_per_block=8,
                         dtype="float32", target="cpu")


def test_default_plan_covers_the_ops_the_model_uses():
    from kiln.builder.tuning import _default_configs, _plan

    llama = _plan(_default_configs(TINY_MODEL, TINY_BUILD, num_sms=1))
    assert set(llama) == set(LLAMA_OPS)
    gptj = json.loads(json.dumps(_plan(_default_configs(TINY_MODEL, TINY_BUILD, num_sms=1, ops=GPTJ_OPS))))
    assert set(gptj) == set(GPTJ_OPS) and {entry["impl"] for entry in gptj.values()} == {"triton"}
    assert gptj["layer_norm"]["config"] == gptj["add_layer_norm"]["config"] == {"num_warps": 4}  # hidden 64
    assert gptj["gelu"]["config"] == {"BLOCK": 1024, "num_warps": 4}
    ops = KernelOps(gptj)
    x, weight, bias = layer_norm_inputs(3, 64, torch.float32)
    assert_close(ops.layer_norm(x, weight, bias, 1e-5), layer_norm_ref(x, weight, bias, 1e-5))
    assert ops.rms_norm is rms_norm_ref  # not in the plan: the reference
    # Untuned (kiln build --no-tune), every op has its default config: the quantized matmuls' included.
    assert set(_default_configs(TINY_MODEL, TINY_BUILD, num_sms=1, ops=OPS)) == set(OPS)


def test_tuning_only_the_ops_the_model_uses(monkeypatch):
    """A GPT-J op set: each of its ops timed on every candidate (a fake clock: time = warps, then BLOCK),
    no RMSNorm or SiLU timed, and the winners bound through KernelOps."""
    from kiln.builder import tuning

    timed = []

    def fake_median_ms(fn):
        fn()
        timed.append(fn.func)
        return fn.keywords["num_warps"] + fn.keywords.get("BLOCK", 0) / 1e4 + fn.keywords.get("BLOCK_N", 0) / 1e6

    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    configs = tuning.TuningRun(TINY_MODEL, TINY_BUILD, torch.float32, num_sms=1, device=DEVICE).tune(GPTJ_OPS)
    plan = json.loads(json.dumps(tuning._plan(configs)))
    assert set(plan) == set(GPTJ_OPS)
    assert plan["layer_norm"]["config"] == plan["add_layer_norm"]["config"] == {"num_warps": 4}
    assert plan["gelu"]["config"] == {"BLOCK": 1024, "num_warps": 4}
    assert timed.count(layer_norm_triton) == timed.count(add_layer_norm_triton) == 3 * len(tuning.NORM_CANDIDATES)
    assert timed.count(gelu_triton) == 3 * len(tuning.GELU_CANDIDATES)  # token counts 1, 3, 32
    assert rms_norm_triton not in timed
    x, weight, bias = layer_norm_inputs(2, 64, torch.float32)
    residual = randn(2, 64)
    expected = add_layer_norm_ref(x, residual.clone(), weight, bias, 1e-5)
    out, new_residual = KernelOps(plan).add_layer_norm(x, residual, weight, bias, 1e-5)
    assert_close(out, expected[0])
    assert_close(new_residual, expected[1])


def test_cpu_plan_covers_the_ops_the_model_uses():
    from kiln.builder.plan import kernel_plan

    assert set(kernel_plan("cpu", TINY_MODEL, TINY_BUILD, torch.float32, tune=False)) == set(LLAMA_OPS)
    gptj = kernel_plan("cpu", TINY_MODEL, TINY_BUILD, torch.float32, tune=False, ops=GPTJ_OPS)
    assert gptj == {op: {"impl": "reference", "config": {}} for op in GPTJ_OPS}


def test_plans_refuse_unknown_ops_naming_the_known_ones():
    from kiln.builder import tuning

    with pytest.raises(EngineError, match="unknown ops swiglu; known: rms_norm"):
        tuning.TuningRun(TINY_MODEL, TINY_BUILD, torch.float32, num_sms=1, device=DEVICE).tune(["gelu", "swiglu"])
    with pytest.raises(EngineError, match="unknown ops swiglu"):
        reference_plan(["swiglu"])


@gpu
def test_gpu_kernel_plan_for_gptj_ops_on_this_gpu():
    from kiln.builder.tuning import gpu_kernel_plan
    from kiln.engine.target import detect_target

    build = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=128, tokens_per_block=16,
                        dtype="bfloat16", target=detect_target())
    for tune in (False, True):
        plan = json.loads(json.dumps(gpu_kernel_plan(TINY_MODEL, build, torch.bfloat16, tune=tune, ops=GPTJ_OPS)))
        assert set(plan) == set(GPTJ_OPS) and {entry["impl"] for entry in plan.values()} == {"triton"}
        ops = KernelOps(plan)
        x, weight, bias = layer_norm_inputs(5, 64, torch.bfloat16)
        assert_close(ops.layer_norm(x, weight, bias, 1e-5), layer_norm_ref(x, weight, bias, 1e-5))
        assert_close(ops.gelu(x, "tanh"), gelu_ref(x, "tanh"))
