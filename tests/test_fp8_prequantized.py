"""Pre-quantized FP8 checkpoints of stories260K's shapes, written here in each published layout (ModelOpt,
compressed-tensors; see tests/test_fp8_checkpoints.py for the specs) from the bundled model's weights:
built with no quantization given, they make fp8 engines that store the checkpoint's bytes as they are
(Q/K/V and gate/up fused with a scale per row) and whose logits follow a float engine of the same
dequantized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import STORIES_DIR
from kiln import BuildConfig, Builder
from kiln.convert import AutoModelForCausalLM
from kiln.engine import EngineManifest
from kiln.errors import ConfigError
from kiln.runtime.loader import load_engine
from test_models_vs_hf import kiln_logits, random_prompts

E4M3 = torch.float8_e4m3fn
BUILD = dict(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=128, tokens_per_block=16,
             dtype="float32", target="cpu")
FUSED = {"attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn.o": ("self_attn.o_proj",),
         "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down": ("mlp.down_proj",)}
NUM_LAYERS = 5


def write_checkpoint(path: Path, layout: str, kv_scales: dict[int, tuple[float, float]] | None = None
                     ) -> dict[str, torch.Tensor]:
    """stories260K as ``layout`` writes it: "modelopt" (quant_algo FP8: float32 per-tensor weight scales and
    static input scales, hf_quant_config.json) or "compressed_tensors" (bfloat16 per-channel scales, the
    weight divided in bfloat16 and clamped, dynamic activations); ``kv_scales``: an FP8 KV cache's
    (k_scale, v_scale) by layer, under the layout's names. Returns the dequantized float weights by
    Hugging Face name (the reference checkpoint)."""
    path.mkdir(parents=True)
    config = json.loads((STORIES_DIR / "config.json").read_text())
    tensors, dequantized = {}, {}
    for name, w in load_file(str(STORIES_DIR / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if not name.startswith("model.layers.") or not module.endswith(("_proj")):
            tensors[name] = dequantized[name] = w
            continue
        if layout == "modelopt":
            scale = w.abs().amax().float() / 448.0
            fp8 = (w / scale).to(E4M3)
            tensors[f"{module}.input_scale"] = (w.abs().amax() * 4 / 448.0).float()  # not used: per token
        else:
            w = w.to(torch.bfloat16)
            scale = (w.abs().amax(dim=1, keepdim=True).float() / 448.0).to(torch.bfloat16)
            fp8 = (w / scale).clamp(-448.0, 448.0).to(E4M3)
        tensors[name], tensors[f"{module}.weight_scale"] = fp8, scale
        dequantized[name] = fp8.float() * scale.float()
    for i, (k_scale, v_scale) in (kv_scales or {}).items():
        attention = f"model.layers.{i}.self_attn"
        names = ((f"{attention}.k_proj.k_scale", f"{attention}.v_proj.v_scale") if layout == "modelopt" else
                 (f"{attention}.k_scale", f"{attention}.v_scale"))
        tensors.update(zip(names, (torch.tensor(k_scale), torch.tensor(v_scale))))
    if layout == "modelopt":
        (path / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.15.1"},
             "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_scales else None,
                              "exclude_modules": ["lm_head"]}}))
    else:
        group = {"targets": ["Linear"], "input_activations": {"num_bits": 8, "type": "float", "dynamic": True,
                                                              "strategy": "token", "symmetric": True},
                 "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                             "dynamic": False}}
        kv_cache_scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                           "symmetric": True} if kv_scales else None
        config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                         "config_groups": {"group_0": group}, "ignore": ["lm_head"],
                                         "kv_cache_scheme": kv_cache_scheme}
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return dequantized


@pytest.fixture(scope="module", params=["modelopt", "compressed_tensors"])
def fp8_checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    dequantized = write_checkpoint(root / "fp8", request.param)
    float_dir = root / "float"
    float_dir.mkdir()
    shutil.copy(STORIES_DIR / "config.json", float_dir)
    save_file(dequantized, str(float_dir / "model.safetensors"))
    return root / "fp8", float_dir


def test_fp8_checkpoint_builds_an_fp8_engine_of_its_own_bytes(fp8_checkpoint, tmp_path):
    fp8_dir, float_dir = fp8_checkpoint
    source = AutoModelForCausalLM.from_hugging_face(fp8_dir)
    engine_dir = Builder().build(source, BuildConfig(**BUILD)).save(tmp_path / "engine", progress=False)
    assert EngineManifest.read(engine_dir).build_config.quantization == "fp8"

    checkpoint = load_file(str(fp8_dir / "model.safetensors"))
    stored = load_file(str(engine_dir / "rank0.safetensors"))
    for i in range(NUM_LAYERS):
        for kiln_name, parts in FUSED.items():
            modules = [f"model.layers.{i}.{part}" for part in parts]
            want = torch.cat([checkpoint[f"{m}.weight"] for m in modules])
            got = stored[f"layers.{i}.{kiln_name}.weight"]
            assert got.dtype == E4M3 and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            want_scale = torch.cat([checkpoint[f"{m}.weight_scale"].float().reshape(-1, 1).expand(
                checkpoint[f"{m}.weight"].shape[0], 1) for m in modules])
            assert torch.equal(stored[f"layers.{i}.{kiln_name}.weight_scale"], want_scale)

    prompts = random_prompts(512, [40, 17, 5])
    reference_dir = Builder().build(AutoModelForCausalLM.from_hugging_face(float_dir),
                                    BuildConfig(**BUILD)).save(tmp_path / "reference", progress=False)
    got = kiln_logits(load_engine(engine_dir, progress=False), prompts, chunk=7)
    want = kiln_logits(load_engine(reference_dir, progress=False), prompts, chunk=7)
    # The weights are the same; what differs is the activations' per-token rounding to e4m3. Measured:
    # mean |difference| 1.1-1.9% of the mean |logit|, top-1 on 93-95% of these random tokens' positions.
    for g, w in zip(got, want):
        assert (g - w).abs().mean() < 0.04 * w.abs().mean()
    agree = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
    assert agree >= 0.9 * sum(map(len, prompts))


def test_a_quantization_that_disagrees_with_an_fp8_checkpoint_fails_before_reading_weights(fp8_checkpoint,
                                                                                           monkeypatch):
    source = AutoModelForCausalLM.from_hugging_face(fp8_checkpoint[0])

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read before validation")

    monkeypatch.setattr("kiln.convert.checkpoint.CheckpointReader.get", no_reading)
    with pytest.raises(ConfigError, match="FP8 .* weights, which build fp8 engines only; leave out "
                                          "quantization='none'"):
        Builder().build(source, BuildConfig(**BUILD, quantization="none"))


def test_per_tensor_scaling_requantizes_a_checkpoints_rows_to_their_largest_scale(fp8_checkpoint, tmp_path):
    """--fp8-scaling tensor on a pre-quantized checkpoint: each fused weight gets one scale, the largest of
    its rows' (requantize_fp8_per_tensor); rows that had it keep their bytes."""
    fp8_dir, _ = fp8_checkpoint
    engine_dir = Builder().build(AutoModelForCausalLM.from_hugging_face(fp8_dir),
                                 BuildConfig(**BUILD, fp8_scaling="tensor")).save(tmp_path / "engine", progress=False)
    assert EngineManifest.read(engine_dir).build_config.fp8_scaling == "tensor"
    checkpoint, stored = load_file(str(fp8_dir / "model.safetensors")), load_file(str(engine_dir / "rank0.safetensors"))
    modules = [f"model.layers.0.{part}" for part in FUSED["attn.qkv"]]
    scales = torch.cat([checkpoint[f"{m}.weight_scale"].float().reshape(-1, 1).expand(
        checkpoint[f"{m}.weight"].shape[0], 1) for m in modules]).flatten()
    weight = torch.cat([checkpoint[f"{m}.weight"] for m in modules])
    scale = stored["layers.0.attn.qkv.weight_scale"]
    assert scale.shape == () and scale == scales.max()
    kept = scales == scales.max()
    assert torch.equal(stored["layers.0.attn.qkv.weight"][kept].view(torch.uint8), weight[kept].view(torch.uint8))
