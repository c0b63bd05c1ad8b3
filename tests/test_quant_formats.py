"""AutoAWQ and GPTQ checkpoints read into kiln's layouts.

Each test quantizes a random float weight the way the format's quantizer does, packs it with a packer
written here from the format's published code (AutoAWQ's ``WQLinear_GEMM.from_linear``, AutoGPTQ's
``QuantLinear.pack``: word-by-word ORs in numpy uint32, independent of the reader's vectorized
unpacking), reads it back through kiln, and requires the dequantized weight to equal (q - z) * s of the
original integers exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kiln.errors import CheckpointError
from kiln.kernels.weight_only import w4a16_matmul_ref, w4a16_matmul_triton, w8a16_matmul_ref
from kiln.convert.int_checkpoints import (CheckpointQuantization, detect_checkpoint_quantization, engine_quantization,
                                         parse_quantization_config, read_quantized_linear)

AWQ_ORDER_FROM_AUTOAWQ = [0, 2, 4, 6, 1, 3, 5, 7]  # WQLinear_GEMM.from_linear's order_map


def quantize_asymmetric(w: torch.Tensor, group_of_row: torch.Tensor, num_groups: int, bits: int,
                        is_symmetric: bool = False):
    """w [N, K] -> (q [K, N], z [G, N], s fp16 [G, N], reference (q - z) * s as [N, K] float32), with the
    groups' min/max rule of AutoAWQ / GPTQ (GPTQ sym: z = 2**(bits-1), s from the largest magnitude)."""
    maxq = 2 ** bits - 1
    wt = w.T.float()  # [K, N], the orientation both formats store
    scales = torch.empty(num_groups, w.shape[0])
    zeros = torch.empty(num_groups, w.shape[0])
    for group in range(num_groups):
        rows = wt[group_of_row == group]
        low, high = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        if is_symmetric:
            high = torch.maximum(high, -low)
            low = -high
        scales[group] = ((high - low) / maxq).clamp(min=1e-5)
        zeros[group] = (maxq + 1) // 2 if is_symmetric else torch.round(-low / scales[group])
    scales = scales.half()
    s, z = scales.float()[group_of_row], zeros[group_of_row]
    q = torch.clamp(torch.round(wt / s) + z, 0, maxq).to(torch.int64)
    reference = ((q - z) * s).T.contiguous()
    return q, zeros.to(torch.int64), scales, reference


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM packing, [rows, N] -> int32 [rows, N / 8]: nibble i of word c holds column
    8c + order_map[i]."""
    values = values.numpy().astype(np.uint32)
    packed = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for col in range(packed.shape[1]):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + AWQ_ORDER_FROM_AUTOAWQ[i]] << (i * 4)
    return torch.from_numpy(packed.astype(np.int32))


def pack_gptq_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight packing, [K, N] -> int32 [K * bits / 32, N]: row r holds rows r*p .. r*p + p - 1."""
    values = values.numpy().astype(np.uint32)
    per_word = 32 // bits
    packed = np.zeros((values.shape[0] // per_word, values.shape[1]), dtype=np.uint32)
    for row in range(packed.shape[0]):
        for j in range(per_word):
            packed[row] |= values[row * per_word + j] << (bits * j)
    return torch.from_numpy(packed.astype(np.int32))


def pack_gptq_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """GPTQ qzeros packing, [G, N] -> int32 [G, N * bits / 32], columns in plain order; v1 ("gptq")
    stores z - 1 (here masked to its bits, so a zero point of 0 stays within its own field)."""
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    stored = (stored & (2 ** bits - 1)).numpy().astype(np.uint32)
    per_word = 32 // bits
    packed = np.zeros((stored.shape[0], stored.shape[1] // per_word), dtype=np.uint32)
    for col in range(packed.shape[1]):
        for j in range(per_word):
            packed[:, col] |= stored[:, col * per_word + j] << (bits * j)
    return torch.from_numpy(packed.astype(np.int32))


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    w[0, :] = w[0, :].abs()  # an all-positive row: zero point 0 in every group
    return w


# ---- AutoAWQ --------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [64, 128])
def test_awq_gemm_checkpoint_repacks_exactly(group_size):
    out_features, in_features = 72, 256
    w = random_weight(out_features, in_features, seed=group_size)
    rows = torch.arange(in_features) // group_size
    q, zeros, scales, reference = quantize_asymmetric(w, rows, in_features // group_size, bits=4)
    assert (zeros == 0).any()
    tensors = {"qweight": pack_awq(q), "qzeros": pack_awq(zeros), "scales": scales}
    quantization = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": group_size,
                                              "zero_point": True, "version": "gemm"})
    unpacked = read_quantized_linear(quantization, tensors)
    assert torch.equal(unpacked.dequantize(), reference)
    weight = unpacked.to_int4(group_size)
    assert weight.bits == 4 and weight.input_order is None and weight.scales.dtype == torch.float16
    assert torch.equal(weight.dequantize(), reference)
    x = torch.randn(3, in_features)
    torch.testing.assert_close(w4a16_matmul_ref(x, weight.qweight, weight.scales, weight.zeros, group_size),
                               x @ reference.T)


def test_awq_rejects_malformed_tensors():
    quantization = CheckpointQuantization("awq", 4, 64, "gemm")
    tensors = {"qweight": torch.zeros(128, 9, dtype=torch.int32), "qzeros": torch.zeros(2, 9, dtype=torch.int32),
               "scales": torch.zeros(2, 70, dtype=torch.float16)}
    with pytest.raises(CheckpointError, match="AWQ scales"):
        read_quantized_linear(quantization, tensors)
    with pytest.raises(CheckpointError, match="lacks qzeros"):
        read_quantized_linear(quantization, {"qweight": tensors["qweight"], "scales": tensors["scales"]})


# ---- GPTQ -----------------------------------------------------------------------------------------
# (bits, group size (-1: one group), desc_act, sym, checkpoint_format); K = 192: with g = 128 the last
# group is partial, and kiln's INT4 layout pads K to 256.
GPTQ_CASES = {
    "4bit_g128_v1_asym": (4, 128, False, False, "gptq"),
    "4bit_g32_v1_sym": (4, 32, False, True, "gptq"),
    "4bit_g64_act_order_v1": (4, 64, True, False, "gptq"),
    "4bit_g128_act_order_v2_partial_group": (4, 128, True, False, "gptq_v2"),
    "4bit_per_channel_v2": (4, -1, False, False, "gptq_v2"),
    "8bit_g64_v1_sym": (8, 64, False, True, "gptq"),
    "8bit_g32_act_order_v1_asym": (8, 32, True, False, "gptq"),
    "8bit_per_channel_sym": (8, -1, False, True, "gptq"),
}


def make_gptq_checkpoint(bits: int, group_size: int, desc_act: bool, is_symmetric: bool, checkpoint_format: str,
                         out_features: int = 40, in_features: int = 192, seed: int = 0):
    w = random_weight(out_features, in_features, seed)
    g = in_features if group_size == -1 else group_size
    num_groups = -(-in_features // g)
    if desc_act:
        # GPTQ's act-order: columns are quantized in a permuted order (by the Hessian's diagonal) and the
        # i-th column in that order joins group i // g; g_idx records each input row's group.
        perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed + 1))
        rows = torch.empty(in_features, dtype=torch.int64)
        rows[perm] = torch.arange(in_features) // g
    else:
        rows = torch.arange(in_features) // g
    q, zeros, scales, reference = quantize_asymmetric(w, rows, num_groups, bits, is_symmetric)
    tensors = {"qweight": pack_gptq_rows(q, bits), "qzeros": pack_gptq_zeros(zeros, bits, checkpoint_format),
               "scales": scales, "g_idx": rows.to(torch.int32)}
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
              "sym": is_symmetric, "checkpoint_format": checkpoint_format}
    return tensors, config, reference, zeros


@pytest.mark.parametrize("case", list(GPTQ_CASES.values()), ids=list(GPTQ_CASES))
def test_gptq_checkpoint_repacks_exactly(case):
    bits, group_size, desc_act, is_symmetric, checkpoint_format = case
    tensors, config, reference, zeros = make_gptq_checkpoint(*case)
    if not is_symmetric:
        assert (zeros == 0).any()  # v1 stores those as -1: the off-by-one must wrap back
    quantization = parse_quantization_config(config)
    _, engine_group_size = engine_quantization(quantization)
    unpacked = read_quantized_linear(quantization, tensors)
    assert unpacked.is_act_order == desc_act and torch.equal(unpacked.dequantize(), reference)
    weight = unpacked.to_int4(engine_group_size) if bits == 4 else unpacked.to_int8(engine_group_size)
    assert weight.bits == bits and (weight.input_order is not None) == desc_act
    assert torch.equal(weight.dequantize(), reference)
    x = torch.randn(2, reference.shape[1])
    if bits == 4:
        actual = w4a16_matmul_ref(x, weight.qweight, weight.scales, weight.zeros, weight.group_size, weight.input_order)
    else:
        actual = w8a16_matmul_ref(x, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                  weight.input_order)
    torch.testing.assert_close(actual, x @ reference.T)
    if bits == 8 and is_symmetric and group_size == -1 and not desc_act:  # int8_wo: per channel, q - 128 alone
        per_channel = unpacked.to_int8(None)
        assert per_channel.zeros is None and per_channel.scales.shape == (reference.shape[0],)
        assert torch.equal(per_channel.dequantize(), reference)


@pytest.mark.parametrize("engine_group_size", [32, 64])
def test_a_checkpoint_group_repacks_into_smaller_engine_groups(engine_group_size):
    """A group of 128 rows is 128 / g engine groups with its scale and zero point repeated: the same weight."""
    tensors, config, reference, _ = make_gptq_checkpoint(4, 128, True, False, "gptq")
    weight = read_quantized_linear(parse_quantization_config(config), tensors).to_int4(engine_group_size)
    assert weight.scales.shape == (40, 256 // engine_group_size) and torch.equal(weight.dequantize(), reference)


def test_engine_quantization_of_each_checkpoint_kind():
    def engine(**config):
        return engine_quantization(parse_quantization_config({"quant_method": "gptq", "checkpoint_format": "gptq",
                                                              **config}))

    assert engine_quantization(CheckpointQuantization("awq", 4, 64, "gemm")) == ("int4_wo", 64)
    assert engine(bits=4, group_size=128, desc_act=False) == ("int4_wo", 128)
    assert engine(bits=4, group_size=32, desc_act=True) == ("int4_gptq", 32)
    assert engine(bits=4, group_size=-1) == ("int4_wo", 128)  # one group per channel: its scale repeated
    assert engine(bits=4, group_size=256) == ("int4_wo", 128)
    assert engine(bits=8, group_size=-1, sym=True) == ("int8_wo", None)
    assert engine(bits=8, group_size=-1, sym=False) == ("int8_gptq", 128)
    assert engine(bits=8, group_size=64, sym=True) == ("int8_gptq", 64)
    with pytest.raises(CheckpointError, match="group size 48 is not supported"):
        engine(bits=4, group_size=48)


def test_gptq_act_order_checkpoint_runs_in_the_triton_kernel():
    """The act-order permutation as the kernels consume it, not only as dequantize() applies it."""
    tensors, config, reference, _ = make_gptq_checkpoint(4, 64, True, False, "gptq")
    weight = read_quantized_linear(parse_quantization_config(config), tensors).to_int4(64)
    x = torch.randn(1, reference.shape[1], dtype=torch.float16)
    actual = w4a16_matmul_triton(x, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                 weight.input_order)
    torch.testing.assert_close(actual, (x.float() @ reference.T).half(), rtol=2e-3, atol=2e-3)


def test_gptq_v1_zero_point_of_zero_written_as_minus_one_reads_back_as_zero():
    """AutoGPTQ's packer ORs z - 1 = -1 (all ones) into the word: the low 4 bits read 15, + 1 wraps to 0."""
    quantization = CheckpointQuantization("gptq", 4, 32, "gptq")
    qzeros = torch.tensor([[-1]], dtype=torch.int32)  # 8 zero points, all written as -1
    tensors = {"qweight": torch.zeros(4, 8, dtype=torch.int32), "qzeros": qzeros,
               "scales": torch.ones(1, 8, dtype=torch.float16)}
    weight = read_quantized_linear(quantization, tensors).to_int4(32)
    assert torch.equal(weight.zeros, torch.zeros(8, 4, dtype=torch.uint8))  # padded to 4 groups by kiln


def test_gptq_g_idx_that_cannot_form_contiguous_groups_is_refused():
    tensors, config, _, _ = make_gptq_checkpoint(4, 64, True, False, "gptq")
    tensors["g_idx"] = (torch.arange(192) % 2).to(torch.int32)  # two groups of 96 rows
    with pytest.raises(CheckpointError, match="do not split into runs of 64 inputs"):
        read_quantized_linear(parse_quantization_config(config), tensors).to_int4(64)


# ---- detection ------------------------------------------------------------------------------------
def write_json(path, content) -> None:
    path.write_text(json.dumps(content))


def test_detects_awq_and_gptq_from_config_json(tmp_path):
    write_json(tmp_path / "config.json", {"architectures": ["LlamaForCausalLM"], "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM",
        "modules_to_not_convert": ["visual"]}})
    assert detect_checkpoint_quantization(tmp_path) == CheckpointQuantization(
        "awq", 4, 128, "gemm", modules_to_not_convert=("visual",))
    write_json(tmp_path / "config.json", {"quantization_config": {
        "quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq_v2"}})
    found = detect_checkpoint_quantization(tmp_path)
    assert found == CheckpointQuantization("gptq", 8, None, "gptq_v2", is_symmetric=False, desc_act=True)
    assert found.zero_point_offset == 0
    assert parse_quantization_config({"quant_method": "gptq", "bits": 4}).zero_point_offset == 1  # v1 default


def test_detects_older_gptq_and_awq_config_files(tmp_path):
    write_json(tmp_path / "config.json", {"architectures": ["LlamaForCausalLM"]})
    assert detect_checkpoint_quantization(tmp_path) is None
    write_json(tmp_path / "quantize_config.json", {"bits": 4, "group_size": 128, "damp_percent": 0.01,
                                                    "desc_act": False, "sym": True, "true_sequential": True})
    assert detect_checkpoint_quantization(tmp_path) == CheckpointQuantization("gptq", 4, 128, "gptq", True, False)
    (tmp_path / "quantize_config.json").unlink()
    write_json(tmp_path / "quant_config.json", {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
    assert detect_checkpoint_quantization(tmp_path) == CheckpointQuantization("awq", 4, 64, "gemm")


def test_other_methods_are_left_to_other_readers(tmp_path):
    write_json(tmp_path / "config.json",
               {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}})
    assert detect_checkpoint_quantization(tmp_path) is None


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm", "zero_point": False}, "without zero points"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3 bits is not supported"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"bits": 4, "is_marlin_format": True}, "'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "pack_dtype": "int64"}, "pack_dtype"),
])
def test_unsupported_settings_fail_before_any_tensor_is_read(config, message):
    with pytest.raises(CheckpointError, match=message) as error:
        parse_quantization_config(config)
    assert "kiln reads" in str(error.value) or "not supported" in str(error.value)
