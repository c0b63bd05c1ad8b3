"""Pre-quantized FP8 checkpoints: tiny ones written here from the published layouts, by a writer of
their own (nothing of kiln's quantization), read back with kiln.convert.fp8_checkpoints.

ModelOpt (TensorRT Model Optimizer's export, modelopt/torch/export): hf_quant_config.json; per linear a
float8_e4m3fn weight = (w / s).to(e4m3) with s = amax / 448 a float32 0-d weight_scale (one per tensor
for quant_algo FP8, so q, k and v each have their own), a float32 0-d input_scale; KV-cache scales as
<attn>.k_proj.k_scale / <attn>.v_proj.v_scale. compressed-tensors (llm-compressor's export): the
quantization_config of config.json; weight_scale in the model's dtype (bfloat16), [N, 1] per channel or
[1] per tensor; the weight quantized in that dtype, clamped to ±448 before the cast; input_scale [1] for
static activations; KV-cache scales as <attn>.k_scale / <attn>.v_scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kiln.errors import CheckpointError
from kiln.quantization.fp8 import fp8_linear_ref, fuse_fp8_linears, quantize_fp8_weight
from kiln.convert.fp8_checkpoints import Fp8CheckpointReader, detect_fp8_format, is_fp8_metadata

E4M3 = torch.float8_e4m3fn
HIDDEN, INTERMEDIATE, KV = 64, 96, 32
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
           "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
NUM_LAYERS = 2
ATTENTIONS = [f"model.layers.{i}.self_attn" for i in range(NUM_LAYERS)]
QUANTIZED = [f"model.layers.{i}.{name}" for i in range(NUM_LAYERS) for name in LINEARS]
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
                "intermediate_size": INTERMEDIATE, "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 128, "torch_dtype": "bfloat16"}


def float_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Llama's float weights, by Hugging Face name; one channel of each linear 20x the others."""
    generator = torch.Generator().manual_seed(seed)
    weights = {"model.embed_tokens.weight": torch.randn(128, HIDDEN, generator=generator),
               "model.norm.weight": torch.ones(HIDDEN), "lm_head.weight": torch.randn(128, HIDDEN, generator=generator)}
    for module in QUANTIZED:
        n, k = LINEARS[module.split(".", 3)[3]]
        w = torch.randn(n, k, generator=generator) / k ** 0.5
        w[int(torch.randint(n, (1,), generator=generator))] *= 20.0
        weights[f"{module}.weight"] = w
    return weights


class Written:
    """What a writer put in the folder, for the checks: per linear its fp8 bytes and scales as written,
    and the dequantized float weight they stand for (computed by the writer)."""

    def __init__(self, path: Path):
        self.path = path
        self.fp8: dict[str, torch.Tensor] = {}
        self.weight_scale: dict[str, torch.Tensor] = {}
        self.input_scale: dict[str, torch.Tensor] = {}
        self.dequantized: dict[str, torch.Tensor] = {}
        self.kv_scales: dict[str, tuple[float, float]] = {}


def write_config(path: Path, quantization_config: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = dict(LLAMA_CONFIG, **({"quantization_config": quantization_config} if quantization_config else {}))
    (path / "config.json").write_text(json.dumps(config))


def save_sharded(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two safetensors shards and their index, as from_pretrained writes large models."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n].contiguous() for n in shard_names}, str(path / file))
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_modelopt(path: Path, quant_algo: str = "FP8", kv_cache: bool = True, config_only: bool = False,
                   seed: int = 0) -> Written:
    """ModelOpt's export of an FP8 model. quant_algo "FP8": per-tensor weight scales and static input
    scales (written here different for q, k and v, as exports before ModelOpt unified them);
    "FP8_PER_CHANNEL_PER_TOKEN": a weight scale per output channel (written [N]), no input scales.
    config_only: the quantization described in config.json's quantization_config (newer exports) only."""
    written, tensors = Written(path), {}
    generator = torch.Generator().manual_seed(seed + 1)
    for name, w in float_model(seed).items():
        module = name.removesuffix(".weight")
        if module not in QUANTIZED:
            tensors[name] = w.to(torch.bfloat16)
            continue
        w = w.to(torch.bfloat16).float()  # the model as calibrated
        amax = w.abs().amax(dim=1) if quant_algo == "FP8_PER_CHANNEL_PER_TOKEN" else w.abs().amax()
        scale = amax.float() / 448.0
        fp8 = (w / (scale[:, None] if scale.dim() else scale)).to(E4M3)
        tensors[name], tensors[f"{module}.weight_scale"] = fp8, scale
        written.fp8[module], written.weight_scale[module] = fp8, scale
        written.dequantized[module] = fp8.float() * (scale[:, None] if scale.dim() else scale)
        if quant_algo == "FP8":
            input_amax = 2.0 + 3.0 * torch.rand((), generator=generator)
            tensors[f"{module}.input_scale"] = written.input_scale[module] = input_amax / 448.0
    if kv_cache:
        for attention in ATTENTIONS:
            k_scale, v_scale = 0.011 + torch.rand((), generator=generator), torch.tensor(1.0)
            tensors[f"{attention}.k_proj.k_scale"], tensors[f"{attention}.v_proj.v_scale"] = k_scale, v_scale
            written.kv_scales[attention] = (k_scale.item(), v_scale.item())
    quantization = {"quant_algo": quant_algo, "kv_cache_quant_algo": "FP8" if kv_cache else None,
                    "exclude_modules": ["lm_head"]}
    if config_only:
        write_config(path, {"quant_method": "modelopt", "quant_algo": quant_algo, "ignore": ["lm_head"],
                            "producer": {"name": "modelopt", "version": "0.29.0"},
                            **({"kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}} if kv_cache
                               else {})})
    else:
        write_config(path)
        (path / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.15.1"}, "quantization": quantization}))
    save_sharded(path, tensors)
    return written


def compressed_tensors_config(weight_strategy: str = "channel", dynamic: bool = True, kv_cache: bool = False,
                              **weight_overrides) -> dict:
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic,
                   "strategy": "token" if dynamic else "tensor", "group_size": None, "observer": None}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": weight_strategy,
               "group_size": None, "block_structure": None, "observer": "minmax", **weight_overrides}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations, "output_activations": None}},
            "ignore": ["lm_head"], "global_compression_ratio": 1.5,
            "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                "symmetric": True} if kv_cache else None}


def write_compressed_tensors(path: Path, weight_strategy: str = "channel", dynamic: bool = True,
                             kv_cache: bool = False, seed: int = 0) -> Written:
    """llm-compressor's export: scales in bfloat16 (the model's dtype), the division done in bfloat16,
    clamped to ±448 before the cast."""
    written, tensors = Written(path), {}
    generator = torch.Generator().manual_seed(seed + 2)
    for name, w in float_model(seed).items():
        module = name.removesuffix(".weight")
        w = w.to(torch.bfloat16)
        if module not in QUANTIZED:
            tensors[name] = w
            continue
        amax = w.abs().amax(dim=1, keepdim=True) if weight_strategy == "channel" else w.abs().amax().reshape(1)
        scale = (amax.float() / 448.0).to(torch.bfloat16)
        fp8 = (w / scale).clamp(-448.0, 448.0).to(E4M3)
        tensors[name], tensors[f"{module}.weight_scale"] = fp8, scale
        written.fp8[module], written.weight_scale[module] = fp8, scale
        written.dequantized[module] = fp8.float() * scale.float()
        if not dynamic:
            input_scale = ((1.0 + torch.rand(1, generator=generator)) / 448.0).to(torch.bfloat16)
            tensors[f"{module}.input_scale"] = written.input_scale[module] = input_scale
    if kv_cache:
        for attention in ATTENTIONS:
            k_scale, v_scale = torch.tensor([0.02], dtype=torch.bfloat16), torch.tensor([0.03], dtype=torch.bfloat16)
            tensors[f"{attention}.k_scale"], tensors[f"{attention}.v_scale"] = k_scale, v_scale
            written.kv_scales[attention] = (k_scale.item(), v_scale.item())
    write_config(path, compressed_tensors_config(weight_strategy, dynamic, kv_cache))
    save_file(tensors, str(path / "model.safetensors"))
    return written


WRITERS = {
    "modelopt_fp8": lambda path: write_modelopt(path),
    "modelopt_config_json": lambda path: write_modelopt(path, config_only=True, kv_cache=False),
    "modelopt_per_channel": lambda path: write_modelopt(path, "FP8_PER_CHANNEL_PER_TOKEN", kv_cache=False),
    "ct_channel_dynamic": lambda path: write_compressed_tensors(path),
    "ct_tensor_static_kv": lambda path: write_compressed_tensors(path, "tensor", dynamic=False, kv_cache=True),
}
# name -> (producer, weight scaling, activation scaling, KV-cache scales)
EXPECTED_FORMATS = {
    "modelopt_fp8": ("ModelOpt", "tensor", "static", "fp8"),
    "modelopt_config_json": ("ModelOpt", "tensor", "static", None),
    "modelopt_per_channel": ("ModelOpt", "channel", "dynamic", None),
    "ct_channel_dynamic": ("compressed-tensors", "channel", "dynamic", None),
    "ct_tensor_static_kv": ("compressed-tensors", "tensor", "static", "fp8"),
}


@pytest.fixture(scope="module", params=list(WRITERS))
def checkpoint(request, tmp_path_factory) -> tuple[str, Written]:
    return request.param, WRITERS[request.param](tmp_path_factory.mktemp(request.param))


def test_detects_the_format(checkpoint):
    name, written = checkpoint
    detected = detect_fp8_format(written.path)
    assert (detected.producer, detected.weight_scaling, detected.activation_scaling,
            detected.kv_cache) == EXPECTED_FORMATS[name]
    assert detected.ignored == ("lm_head",) and "lm_head" in str(detected) and detected.producer in str(detected)


def test_reader_returns_kilns_convention_and_the_writers_dequantized_weights(checkpoint):
    name, written = checkpoint
    reader = Fp8CheckpointReader(written.path)
    assert not reader.is_quantized("lm_head") and not reader.is_quantized("model.layers.0.input_layernorm")
    for module in QUANTIZED:
        assert reader.is_quantized(module)
        weight, weight_scale, input_scale = reader.linear(module)
        assert torch.equal(weight.view(torch.uint8), written.fp8[module].view(torch.uint8))
        assert weight_scale.dtype == torch.float32
        assert weight_scale.shape == ((weight.shape[0], 1) if EXPECTED_FORMATS[name][1] == "channel" else ())
        # kiln's convention: the scale multiplies, w = weight * weight_scale, bit for bit the writer's.
        assert torch.equal(reader.dequantize(module), written.dequantized[module])
        if EXPECTED_FORMATS[name][2] == "static":
            assert input_scale.shape == () and input_scale.dtype == torch.float32
            assert input_scale == written.input_scale[module].float().reshape(())
        else:
            assert input_scale is None


def test_requantizing_the_dequantized_weights_gives_the_same_bytes(checkpoint):
    """kiln's quantizer and the exporters agree: both map each row's (tensor's) amax to ±448."""
    name, written = checkpoint
    reader = Fp8CheckpointReader(written.path)
    for module in QUANTIZED:
        stored = reader.linear(module)
        w_fp8, w_scale = quantize_fp8_weight(reader.dequantize(module), EXPECTED_FORMATS[name][1])
        assert torch.equal(w_fp8.view(torch.uint8), stored.weight.view(torch.uint8)), module
        torch.testing.assert_close(w_scale, stored.weight_scale, rtol=2e-7, atol=0)


def test_kv_cache_scales(checkpoint):
    name, written = checkpoint
    reader = Fp8CheckpointReader(written.path)
    for attention in ATTENTIONS:
        scales = reader.kv_cache_scales(attention)
        if not written.kv_scales:
            assert scales is None
            continue
        assert all(s.shape == () and s.dtype == torch.float32 for s in scales)
        assert (scales[0].item(), scales[1].item()) == pytest.approx(written.kv_scales[attention], rel=1e-7)


def test_fused_qkv_and_gate_up_from_modelopt_are_exact(tmp_path):
    """ModelOpt gives q, k and v (gate and up) each their own per-tensor scale: the fused layer keeps the
    bytes with a scale per row and computes what the three separate layers compute."""
    written = write_modelopt(tmp_path)
    reader = Fp8CheckpointReader(tmp_path)
    prefix = "model.layers.1."
    for parts in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
        linears = [reader.linear(prefix + part) for part in parts]
        assert len({float(linear.weight_scale) for linear in linears}) == len(parts)  # different scales
        fused = fuse_fp8_linears(linears)
        assert torch.equal(fused.weight.float() * fused.weight_scale,
                           torch.cat([written.dequantized[prefix + part] for part in parts]))
        assert fused.input_scale == max(linear.input_scale for linear in linears)
        x = torch.randn(5, linears[0].weight.shape[1])
        separate = torch.cat([fp8_linear_ref(x, linear.weight, linear.weight_scale, fused.input_scale)
                              for linear in linears], dim=1)
        torch.testing.assert_close(fp8_linear_ref(x, *fused), separate, rtol=1e-5, atol=1e-5)


def test_not_fp8_checkpoints_are_not_detected(tmp_path):
    write_config(tmp_path / "float")
    write_config(tmp_path / "awq", {"quant_method": "awq", "bits": 4, "group_size": 128})
    write_config(tmp_path / "int8_ct", compressed_tensors_config(num_bits=8, type="int"))
    for algo in ("NVFP4", "W4A8_NVFP4_FP8", None):  # 4-bit weights with FP8 scales or activations; KV only
        (tmp_path / str(algo)).mkdir()
        (tmp_path / str(algo) / "hf_quant_config.json").write_text(json.dumps(
            {"quantization": {"quant_algo": algo, "group_size": 16, "kv_cache_quant_algo": "FP8"}}))
    for folder in ("float", "awq", "int8_ct", "NVFP4", "W4A8_NVFP4_FP8", "None"):
        assert detect_fp8_format(tmp_path / folder) is None, folder
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "float" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not an FP8 checkpoint"):
        Fp8CheckpointReader(tmp_path / "float")


@pytest.mark.parametrize("config,match", [
    ({"quantization": {"quant_algo": "FP8_PB_WO"}}, "quant_algo 'FP8_PB_WO' is not supported; kiln reads FP8, "),
    (compressed_tensors_config("block", block_structure=[128, 128]), "strategy block is not supported"),
    (compressed_tensors_config(symmetric=False), "zero points"),
    (dict(compressed_tensors_config(), format="pack-quantized"), "format pack-quantized is not supported"),
], ids=["modelopt_block", "ct_block", "ct_asymmetric", "ct_packed"])
def test_unsupported_fp8_variants_are_refused_by_name(tmp_path, config, match):
    if "quantization" in config:
        tmp_path.joinpath("hf_quant_config.json").write_text(json.dumps(config))
    else:
        write_config(tmp_path, config)
    with pytest.raises(CheckpointError, match=match):
        detect_fp8_format(tmp_path)


def test_malformed_tensors_are_refused_by_name(tmp_path):
    write_config(tmp_path, compressed_tensors_config("tensor", dynamic=False))
    w = torch.randn(32, 64)
    save_file({
        "e5m2.weight": w.to(torch.float8_e5m2), "e5m2.weight_scale": torch.ones(1), "e5m2.input_scale": torch.ones(1),
        "blocks.weight": w.to(E4M3), "blocks.weight_scale": torch.ones(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous(),
        "no_input.weight": w.to(E4M3), "no_input.weight_scale": torch.ones(1),
        "negative.weight": w.to(E4M3), "negative.weight_scale": -torch.ones(1), "negative.input_scale": torch.ones(1),
        "offset.weight": w.to(E4M3), "offset.weight_scale": torch.ones(1), "offset.input_scale": torch.ones(1),
        "offset.weight_zero_point": torch.ones(1),
    }, str(tmp_path / "model.safetensors"))
    reader = Fp8CheckpointReader(tmp_path)
    for module, match in [("e5m2", "float8_e5m2; kiln reads FP8 weights in float8_e4m3fn only"),
                          ("blocks", r"shape \(1, 1, 2, 2\); kiln reads one scale per tensor or per output channel"),
                          ("no_input", "no_input.input_scale is missing"), ("negative", "not positive and finite"),
                          ("offset", "not zero; asymmetric FP8 is not supported"),
                          ("absent", "absent is not stored in FP8")]:
        with pytest.raises(CheckpointError, match=match):
            reader.linear(module)


def test_scales_are_told_apart_from_weights():
    assert all(is_fp8_metadata(f"model.layers.0.self_attn.{name}") for name in (
        "q_proj.weight_scale", "q_proj.input_scale", "k_proj.k_scale", "v_proj.v_scale", "k_scale",
        "k_proj.output_scale", "q_proj.weight_zero_point"))
    assert not any(is_fp8_metadata(name) for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                                                      "model.norm.weight"))
