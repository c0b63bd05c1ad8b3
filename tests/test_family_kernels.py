"""The ops GPT-J and Qwen3 add: LayerNorm (+ residual add), GELU, partial and interleaved rotary, and
RMSNorm over many short rows (Qwen3's per-head q/k norm).

The references are checked against torch's and transformers' own functions; the Triton kernels against
the references, as in test_kernels.py (whose helpers and tolerance tables this file shares).
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import OPS, KernelOps, reference_plan
from kiln.kernels.activation import gelu_ref
from kiln.kernels.norm import add_layer_norm_ref, layer_norm_ref, rms_norm_ref
from kiln.kernels.rotary import rope_cos_sin, rotary_kv_write_ref
from kiln.models.config import RopeConfig
from test_kernels import ALL_DTYPES, DEVICE, DTYPE_ID, fused_qkv_views, randn


# ---- references against torch and transformers ---------------------------------------------------
def test_new_ops_are_registered_with_references():
    ops = KernelOps(reference_plan())
    for op, ref in (("layer_norm", layer_norm_ref), ("add_layer_norm", add_layer_norm_ref), ("gelu", gelu_ref)):
        assert op in OPS and getattr(ops, op) is ref


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
