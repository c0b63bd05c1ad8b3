"""Pre-quantized AutoAWQ and GPTQ checkpoints of stories260K, written here in the published formats (the
packers of tests/test_quant_formats.py, from AutoAWQ's and AutoGPTQ's code) from the bundled model's
weights: built with no quantization given, they make weight-only engines of their own integers, whose
logits follow a float engine of the same dequantized weights.

4-bit formats pack 8 values per word along N (AWQ; GPTQ's zero points) or K (GPTQ's weights), which
stories260K's MLP (172 = 8 x 21.5) does not fit: those layers stay float in the 4-bit checkpoints, as
a checkpoint's unquantized modules do, and the engine rounds them to nearest (the reference does too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import STORIES_DIR
from kiln import BuildConfig, Builder
from kiln.cli import main
from kiln.convert import AutoModelForCausalLM
from kiln.engine import EngineManifest
from kiln.errors import ConfigError
from kiln.quantization.weight_only import dequantize_int4, quantize_int4
from kiln.runtime.llm import LLM, SamplingParams
from kiln.runtime.loader import load_engine
from test_models_vs_hf import kiln_logits, random_prompts
from test_quant_formats import pack_awq, pack_gptq_rows, pack_gptq_zeros, quantize_asymmetric

BUILD = dict(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=128, tokens_per_block=16,
             dtype="float32", target="cpu")
# name -> (quantization_config, engine quantization and group size it builds)
CASES = {
    "awq_g64": ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
                ("int4_wo", 64)),
    "gptq_4bit_g32": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
                       "checkpoint_format": "gptq"}, ("int4_wo", 32)),
    "gptq_4bit_g32_act_order": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True,
                                 "checkpoint_format": "gptq"}, ("int4_gptq", 32)),
    "gptq_8bit_g64_act_order_asym": ({"quant_method": "gptq", "bits": 8, "group_size": 64, "desc_act": True,
                                      "sym": False, "checkpoint_format": "gptq_v2"}, ("int8_gptq", 64)),
    "gptq_8bit_per_channel_sym": ({"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False,
                                   "sym": True, "checkpoint_format": "gptq"}, ("int8_wo", None)),
}
INPUTS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp",
          "down_proj": "down"}  # modules that read the same input share GPTQ's act-order permutation


def fits_packing(w: torch.Tensor, bits: int) -> bool:
    per_word = 32 // bits
    return w.shape[0] % per_word == 0 and w.shape[1] % per_word == 0


def write_checkpoint(path: Path, config: dict, engine_group_size: int | None) -> dict[str, torch.Tensor]:
    """stories260K in ``config``'s format; returns the reference float checkpoint (the weights the engine
    must compute with: the checkpoint's dequantized, or round-to-nearest INT4 for those kept float)."""
    path.mkdir(parents=True)
    bits, method = config["bits"], config["quant_method"]
    group_size = config["group_size"]
    tensors, reference = {}, {}
    for name, w in load_file(str(STORIES_DIR / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        kind = module.rpartition(".")[2]
        if kind not in INPUTS:
            tensors[name] = reference[name] = w
            continue
        if not fits_packing(w, bits):
            tensors[name] = w
            reference[name] = dequantize_int4(*quantize_int4(w, engine_group_size), engine_group_size, w.shape[1])
            continue
        in_features = w.shape[1]
        g = in_features if group_size == -1 else group_size
        rows = torch.arange(in_features) // g
        if config.get("desc_act"):
            layer = int(module.split(".")[2])
            perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(10 * layer + len(INPUTS[kind])))
            rows = torch.empty(in_features, dtype=torch.int64)
            rows[perm] = torch.arange(in_features) // g
        q, zeros, scales, reference[name] = quantize_asymmetric(w, rows, -(-in_features // g), bits,
                                                                config.get("sym", False))
        if method == "awq":
            tensors.update({f"{module}.qweight": pack_awq(q), f"{module}.qzeros": pack_awq(zeros),
                            f"{module}.scales": scales})
        else:
            tensors.update({f"{module}.qweight": pack_gptq_rows(q, bits),
                            f"{module}.qzeros": pack_gptq_zeros(zeros, bits, config["checkpoint_format"]),
                            f"{module}.scales": scales, f"{module}.g_idx": rows.to(torch.int32)})
    hf_config = json.loads((STORIES_DIR / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf_config, "quantization_config": config}))
    save_file(tensors, str(path / "model.safetensors"))
    return reference


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def int_checkpoint(request, tmp_path_factory):
    config, (quantization, group_size) = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    reference = write_checkpoint(root / "quantized", config, group_size)
    (root / "float").mkdir()
    (root / "float" / "config.json").write_text((STORIES_DIR / "config.json").read_text())
    save_file(reference, str(root / "float" / "model.safetensors"))
    return root, quantization, group_size


def test_checkpoint_builds_its_own_weight_only_engine_with_the_dequantized_logits(int_checkpoint):
    root, quantization, group_size = int_checkpoint
    source = AutoModelForCausalLM.from_hugging_face(root / "quantized")
    engine_dir = Builder().build(source, BuildConfig(**BUILD)).save(root / "engine", progress=False)
    build = EngineManifest.read(engine_dir).build_config
    assert (build.quantization, build.group_size) == (quantization, group_size)

    reference_dir = Builder().build(AutoModelForCausalLM.from_hugging_face(root / "float"),
                                    BuildConfig(**BUILD)).save(root / "reference", progress=False)
    prompts = random_prompts(512, [40, 17, 5])
    got = kiln_logits(load_engine(engine_dir, progress=False), prompts, chunk=7)
    want = kiln_logits(load_engine(reference_dir, progress=False), prompts, chunk=7)
    for g, w in zip(got, want):  # the same weights, dequantized in float32: only summation order differs
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_a_quantization_or_group_size_that_disagrees_with_the_checkpoint_fails_before_reading_weights(
        int_checkpoint, monkeypatch):
    root, quantization, group_size = int_checkpoint
    source = AutoModelForCausalLM.from_hugging_face(root / "quantized")

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read before validation")

    monkeypatch.setattr("kiln.convert.checkpoint.CheckpointReader.get", no_reading)
    other = "int4_awq" if quantization != "int4_awq" else "int8_wo"
    with pytest.raises(ConfigError, match=f"weights, which build {quantization} engines only; leave out "
                                          f"quantization='{other}'"):
        Builder().build(source, BuildConfig(**BUILD, quantization=other))
    other_group = 128 if group_size != 128 else 64
    stored = f"stored in groups of {group_size}" if group_size else "stored as int8_wo, which has no groups"
    with pytest.raises(ConfigError, match=f"{stored}; leave out group_size={other_group}"):
        Builder().build(source, BuildConfig(**BUILD, group_size=other_group))


def test_kiln_build_and_llm_detect_the_checkpoint_with_no_flag(int_checkpoint, tmp_path, monkeypatch):
    root, quantization, group_size = int_checkpoint
    assert main(["build", str(root / "quantized"), "-o", str(tmp_path / "engine"), "--target", "cpu",
                 "--max-seq-len", "128"]) == 0
    build = EngineManifest.read(tmp_path / "engine").build_config
    assert (build.quantization, build.group_size) == (quantization, group_size)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    with LLM(root / "quantized", build_config={"max_seq_len": 128}, progress=False) as llm:
        built = llm.executor.engine.build_config
        assert (built.quantization, built.group_size) == (quantization, group_size)
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(llm.generate([[1, 403, 407]], params, use_tqdm=False)[0].outputs[0].token_ids) == 3
