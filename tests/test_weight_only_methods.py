"""The int8_wo and int4_wo linear methods: their stored tensors, their matmul against the dequantized
float weight at awkward shapes, and the accuracy of stories260K engines built with them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import STORIES_DIR
from kiln import BuildConfig, Builder, KvCacheConfig
from kiln.convert import AutoModelForCausalLM
from kiln.cli import main
from kiln.convert.calibration import DEFAULT_CALIBRATION_TEXT
from kiln.engine import EngineManifest
from kiln.engine.tokenizer import Tokenizer
from kiln.errors import ConfigError
from kiln.kernels import KernelOps
from kiln.kernels.weight_only import DEQUANT_MIN_ROWS
from kiln.layers import LinearMethod
from kiln.layers.weight_only import (Int4AwqMethod, Int4GptqMethod, Int4WeightOnlyMethod, Int8GptqMethod,
                                     Int8WeightOnlyMethod)
from kiln.quantization.weight_only import ActivationScaledWeight, dequantize_int4, dequantize_int8
from kiln.runtime.llm import LLM, SamplingParams
from kiln.runtime.loader import load_engine, num_kv_blocks
from test_models_vs_hf import kiln_logits

BUILD = dict(max_batch_size=4, max_input_len=64, max_seq_len=320, max_num_tokens=256, dtype="float32", target="cpu")


METHODS = {"int8_wo": Int8WeightOnlyMethod(), "int4_wo": Int4WeightOnlyMethod(),
           "int4_wo_g32": Int4WeightOnlyMethod(32), "int4_awq_g64": Int4AwqMethod(64),
           "int4_gptq_g64": Int4GptqMethod(64), "int8_gptq_g32": Int8GptqMethod(32)}


class FakeLinear:
    """What a method's ``apply`` reads of its layer: the stored tensors, the bias and the kernel ops
    (``weight_only_linear``: the Triton kernels for CUDA weights, the reference otherwise). int4_awq gets
    AWQ scales (random, in [0.71, 1.41]); the GPTQ methods an act-order permutation: the weight's inputs
    are stored in a random order and ``input_order`` says which."""

    def __init__(self, method: LinearMethod, weight: torch.Tensor, bias: torch.Tensor | None, dtype=torch.float32):
        gen = torch.Generator().manual_seed(7)
        in_features = weight.shape[1]
        order = None
        if isinstance(method, Int4AwqMethod):
            scales = (2.0 ** (torch.rand(in_features, generator=gen) - 0.5)).to(weight.device)
            weight = ActivationScaledWeight(weight, scales)
        elif isinstance(method, (Int4GptqMethod, Int8GptqMethod)):
            order = torch.randperm(in_features, generator=gen).to(weight.device)
            weight = weight[:, order]
        self.__dict__.update(method.convert(weight, dtype), bias=bias)
        self.ops = KernelOps({"weight_only_linear": {"impl": "triton" if self.qweight.is_cuda else "reference",
                                                      "config": {}}})
        if order is not None:
            self.input_order = order.to(torch.int32)


def dequantized(method: LinearMethod, layer: FakeLinear, in_features: int) -> torch.Tensor:
    """The weight the layer multiplies by, in float32, inputs in their original order."""
    order = getattr(layer, "input_order", None)
    if isinstance(method, Int8WeightOnlyMethod):
        return dequantize_int8(layer.qweight, layer.scales)
    if isinstance(method, Int8GptqMethod):
        return dequantize_int8(layer.qweight, layer.scales, layer.zeros, method.group_size, order)
    weight = dequantize_int4(layer.qweight, layer.scales, layer.zeros, method.group_size, in_features, order)
    return weight * layer.pre_quant_scale.float() if isinstance(method, Int4AwqMethod) else weight


@pytest.mark.parametrize("method", list(METHODS.values()), ids=list(METHODS))
# 130 rows: above DEQUANT_MIN_ROWS, where CUDA tensors take dequantize-then-cuBLAS; the CPU keeps the reference.
@pytest.mark.parametrize("out_features,in_features,num_rows", [(251, 172, 1), (71, 172, 5), (33, 300, 17),
                                                               (33, 300, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["", "bias"])
def test_apply_matches_dequantize_then_linear(method, out_features, in_features, num_rows, dtype, has_bias):
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    bias = torch.randn(out_features, generator=gen).to(dtype) if has_bias else None
    x = torch.randn(num_rows, in_features, generator=gen).to(dtype)
    layer = FakeLinear(method, weight, bias, dtype)
    declared = method.tensors(out_features, in_features, dtype)
    assert {name: (tuple(t.shape), t.dtype) for name, t in method.convert(weight, dtype).items()} == declared

    got = method.apply(layer, x)
    want = F.linear(x.float(), dequantized(method, layer, in_features)).to(dtype)
    if bias is not None:
        want = want + bias
    assert got.dtype == dtype and got.shape == (num_rows, out_features)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]  # bf16: one rounding of outputs ~1 (+ bias)
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    # The quantized weight is close to the float one: within half a step, so the outputs are near too.
    assert (got.float() - F.linear(x.float(), weight, None if bias is None else bias.float())).abs().max() < 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(METHODS.values()), ids=list(METHODS))
# The GEMV, a few rows on tensor cores, the tiled GEMM, and (from DEQUANT_MIN_ROWS) dequantize-then-cuBLAS.
@pytest.mark.parametrize("num_rows", [1, 5, 100, 300])
def test_apply_on_cuda_runs_the_triton_kernels_as_the_cpu_reference(method, num_rows):
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(251, 172, generator=gen) / 172 ** 0.5
    bias = torch.randn(251, generator=gen).to(torch.bfloat16)
    x = torch.randn(num_rows, 172, generator=gen).to(torch.bfloat16)
    on_cpu = FakeLinear(method, weight, bias, torch.bfloat16)
    on_cuda = FakeLinear(method, weight.cuda(), bias.cuda(), torch.bfloat16)
    torch.testing.assert_close(method.apply(on_cuda, x.cuda()).cpu(), method.apply(on_cpu, x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_group_size_is_built_kept_in_the_manifest_and_loaded(group_size, tmp_path):
    source = AutoModelForCausalLM.from_hugging_face(STORIES_DIR)
    engine = Builder().build(source, BuildConfig(**BUILD, quantization="int4_wo", group_size=group_size))
    manifest = engine.manifest
    assert manifest.build_config.group_size == group_size
    assert manifest.tensors["layers.0.mlp.down.scales"]["shape"] == [64, 256 // group_size]  # K 172 -> 256
    loaded = load_engine(engine.save(tmp_path / "engine", progress=False), progress=False)
    assert loaded.model.layers[0].mlp.down.method.group_size == group_size


def test_group_size_defaults_and_refusals():
    source = AutoModelForCausalLM.from_hugging_face(STORIES_DIR)
    resolved = {q: Builder().build(source, BuildConfig(**BUILD, quantization=q)).manifest.build_config.group_size
                for q in ("none", "int8_wo", "int4_wo")}
    assert resolved == {"none": None, "int8_wo": None, "int4_wo": 128}
    with pytest.raises(ConfigError, match="group_size=48 .--group-size. is not supported; choose one of 32, 64, 128"):
        BuildConfig(group_size=48)
    with pytest.raises(ConfigError, match="group_size=64 .--group-size. is for quantizations with groups "
                                          r"\(int4_wo, int4_awq, int4_gptq, int8_gptq\), not 'int8_wo'"):
        Builder().build(source, BuildConfig(**BUILD, quantization="int8_wo", group_size=64))
    with pytest.raises(ConfigError, match="calibration_data .--calibration-data. is for quantization int4_awq, "
                                          "not 'int4_wo'"):
        Builder().build(source, BuildConfig(**BUILD, quantization="int4_wo", calibration_data="text.txt"))
    with pytest.raises(ConfigError, match="calibration_data missing.txt .--calibration-data.: no such file"):
        Builder().build(source, BuildConfig(**BUILD, quantization="int4_awq", calibration_data="missing.txt"))
    with pytest.raises(ConfigError, match="give a .txt or .jsonl file"):
        BuildConfig(calibration_data="text.csv")


def test_cli_build_takes_group_size_and_calibration_data(tmp_path, capsys):
    text = tmp_path / "calibration.jsonl"
    text.write_text('{"text": "Once upon a time there was a little dog."}\n\n{"text": "The cat sat on the mat."}\n')
    args = ["build", str(STORIES_DIR), "-o", str(tmp_path / "e"), "--target", "cpu", "--dtype", "float32",
            "--max-seq-len", "128", "--quantization", "int4_awq", "--group-size", "32", "--calibration-data", str(text)]
    assert main(args) == 0
    build = EngineManifest.read(tmp_path / "e").build_config
    assert (build.quantization, build.group_size, build.calibration_data) == ("int4_awq", 32, str(text))
    text.write_text('{"prompt": "no text field"}\n')
    assert main(args[:-1] + [str(text), "--overwrite"]) == 1
    assert capsys.readouterr().err.strip().endswith('calibration.jsonl:1: each line must be an object with a "text" '
                                                    'string')
    with pytest.raises(SystemExit) as exit_:
        main(["build", str(STORIES_DIR), "-o", str(tmp_path / "f"), "--group-size", "48"])
    assert exit_.value.code == 2 and "invalid choice: 48 (choose from 32, 64, 128)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def stories_engines(tmp_path_factory):
    """Float, int8_wo, int4_wo and int4_awq engines of stories260K; int4_awq calibrated on the first 60% of
    the bundled calibration text's paragraphs (CALIBRATION_PART), the rest held out."""
    source = AutoModelForCausalLM.from_hugging_face(STORIES_DIR)
    root = tmp_path_factory.mktemp("weight_only_engines")
    calibration, _ = split_calibration_text()
    (root / "calibration.txt").write_text(calibration)
    engines = {}
    for quantization in ("none", "int8_wo", "int4_wo", "int4_awq"):
        data = str(root / "calibration.txt") if quantization == "int4_awq" else None
        engines[quantization] = Builder().build(source, BuildConfig(**BUILD, quantization=quantization,
                                                                    calibration_data=data)).save(
            root / quantization, progress=False)
    return engines


CALIBRATION_PART = 0.6


def split_calibration_text() -> tuple[str, str]:
    """The bundled calibration text (Peter Rabbit) as (first CALIBRATION_PART of its paragraphs, the rest)."""
    paragraphs = DEFAULT_CALIBRATION_TEXT.read_text().split("\n\n")
    cut = int(len(paragraphs) * CALIBRATION_PART)
    return "\n\n".join(paragraphs[:cut]), "\n\n".join(paragraphs[cut:])


def test_engines_store_the_packed_tensors_and_count_their_bytes(stories_engines):
    manifests = {q: EngineManifest.read(d) for q, d in stories_engines.items()}
    down = {q: {name.rpartition(".")[2]: {"shape": t["shape"], "dtype": t["dtype"]} for name, t in m.tensors.items()
                if name.startswith("layers.0.mlp.down.")} for q, m in manifests.items()}
    assert down["none"] == {"weight": {"shape": [64, 172], "dtype": "F32"}}
    assert down["int8_wo"] == {"qweight": {"shape": [64, 172], "dtype": "I8"},
                               "scales": {"shape": [64], "dtype": "F32"}}
    assert down["int4_wo"] == {"qweight": {"shape": [64, 32], "dtype": "I32"},  # K 172 padded to 256
                               "scales": {"shape": [64, 2], "dtype": "F16"}, "zeros": {"shape": [64, 2], "dtype": "U8"}}
    assert manifests["int4_wo"].tensors["embed.weight"]["dtype"] == "F32"  # embedding and LM head stay float
    weight_bytes = {q: m.memory_plan["weight_bytes"] for q, m in manifests.items()}
    # Per layer: qkv 128 x 64, o 64 x 64, gate_up 344 x 64, down 64 x 172 (INT4: K 64 -> 128, 172 -> 256).
    linear_floats = 5 * (128 * 64 + 64 * 64 + 344 * 64 + 64 * 172)
    others = weight_bytes["none"] - 4 * linear_floats
    assert weight_bytes["int8_wo"] == others + linear_floats + 5 * 4 * (128 + 64 + 344 + 64)
    int4_inputs = 5 * (128 * 128 + 64 * 128 + 344 * 128 + 64 * 256)
    assert weight_bytes["int4_wo"] == others + int4_inputs // 2 + int4_inputs // 128 * 3


def float_engine_texts(engine_dir, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    """Prompt + output token ids of the float engine for each prompt."""
    with LLM(engine_dir, progress=False) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [out.prompt_token_ids + out.outputs[0].token_ids for out in outs]


def test_stories260k_top1_agreement_with_the_float_engine(stories_engines):
    """Teacher-forced: greedy text of the float engine fed through each engine; at every position the
    quantized engine's argmax is compared with the float engine's. int4_awq (its scales searched on the
    bundled calibration text) must beat int4_wo's round to nearest."""
    prompts = ["Once upon a time", "Lily and Ben went to the park", "The little dog was sad because", "One day"]
    texts = float_engine_texts(stories_engines["none"], prompts,
                               SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True))
    top1 = {q: torch.cat([logits.argmax(-1) for logits in kiln_logits(load_engine(d, progress=False), texts, chunk=64)])
            for q, d in stories_engines.items()}
    agreement = {q: (top1[q] == top1["none"]).float().mean().item() for q in ("int8_wo", "int4_wo", "int4_awq")}
    print(f"stories260K top-1 agreement with the float engine over {top1['none'].numel()} positions: "
          + ", ".join(f"{q} {a:.1%}" for q, a in agreement.items()))
    assert agreement["int8_wo"] >= 0.97 and agreement["int4_wo"] >= 0.80
    assert agreement["int4_awq"] > agreement["int4_wo"]


def perplexity(engine_dir, texts: list[list[int]]) -> float:
    logits = kiln_logits(load_engine(engine_dir, progress=False), texts, chunk=64)
    nll = [F.cross_entropy(part[:-1].float(), torch.tensor(text[1:]), reduction="sum")
           for part, text in zip(logits, texts)]
    return torch.exp(sum(nll) / sum(len(text) - 1 for text in texts)).item()


def test_stories260k_int4_awq_perplexity_on_held_out_text_beats_int4_wo(stories_engines):
    """Perplexity of text the calibration never saw: the held-out 40% of the calibration text (in
    sequences of 256 tokens), and stories sampled from the float engine (temperature 0.8, fixed seeds)."""
    _, held_out = split_calibration_text()
    tokens = Tokenizer(STORIES_DIR, bos_token_id=1).encode(held_out)
    held_out_texts = [tokens[start:start + 256] for start in range(0, len(tokens), 256)]
    prompts = ["A girl named Sue", "The cat", "Tom had a ball", "It was a sunny day", "Mom said",
               "Once there was a big tree"]
    stories = float_engine_texts(stories_engines["none"], prompts,
                                 SamplingParams(max_tokens=300, temperature=0.8, seed=1, ignore_eos=True))
    for name, texts in (("the calibration text's held-out part", held_out_texts), ("sampled stories", stories)):
        found = {q: perplexity(stories_engines[q], texts) for q in ("none", "int4_wo", "int4_awq")}
        print(f"stories260K perplexity of {name}: " + ", ".join(f"{q} {p:.3f}" for q, p in found.items()))
        assert found["none"] < found["int4_awq"] < found["int4_wo"]


@pytest.mark.parametrize("quantization,bytes_per_weight", [("int8_wo", "1.053"), ("int4_wo", "0.982")])
def test_sm80_weight_only_engine_builds_and_inspect_shows_packed_sizes_and_kv_pool(quantization, bytes_per_weight,
                                                                                   tmp_path, capsys):
    """An A100 (sm80) engine with INT8 / INT4 weights is allowed (fp8 is not). Stories260K's linears hold
    226,560 weights: INT8 adds a float32 scale per row; INT4 pads K (64 -> 128, 172 -> 256) and adds a
    float16 scale and a uint8 zero point per 128 inputs."""
    engine_dir = tmp_path / "engine"
    assert main(["build", str(STORIES_DIR), "-o", str(engine_dir), "--target", "sm80", "--dtype", "bfloat16",
                 "--quantization", quantization]) == 0
    capsys.readouterr()
    assert main(["inspect", str(engine_dir)]) == 0
    out = capsys.readouterr().out
    assert f"bytes per weight           {bytes_per_weight} in the linear layers as stored ({quantization}" in out
    assert "KV pool on NVIDIA A100-SXM4-80GB ~" in out and "KV pool on NVIDIA H100" not in out
    # From DEQUANT_MIN_ROWS rows the weight is dequantized: the largest (gate_up, 344 x 64) in bfloat16.
    assert "linear_workspace_bytes     43.0 KiB" in out
    last_tile_rows = DEQUANT_MIN_ROWS[int(quantization[3])] - 1
    assert (f"linear layers W{quantization[3]}A16 Triton: GEMV for 1 row, tensor-core tiles up to {last_tile_rows} rows; "
            in out)


@pytest.mark.parametrize("quantization,max_num_tokens,workspace", [
    ("none", 256, 0),
    ("int8_wo", 256, 344 * 64 * 4),  # gate_up's dequantized weight, float32
    ("int4_wo", 256, 344 * 64 * 4),
    ("int4_wo", DEQUANT_MIN_ROWS[4] - 1, 0),  # no batch dequantizes
    ("int4_gptq", 256, (64 + 256) * 172 * 4),  # down's weight and x gathered through input_order
])
def test_memory_plan_and_kv_pool_leave_room_for_the_dequantized_weight(quantization, max_num_tokens, workspace,
                                                                        monkeypatch):
    """The builder's memory plan holds the largest Linear's workspace for max_num_tokens rows, and the
    runtime sizes the KV pool from the memory left after it, the activations and a full batch's logits (on a
    GPU: CUDA's free memory, faked here)."""
    source = AutoModelForCausalLM.from_hugging_face(STORIES_DIR)
    build = {**BUILD, "max_num_tokens": max_num_tokens, "max_input_len": min(64, max_num_tokens)}
    manifest = Builder().build(source, BuildConfig(**build, quantization=quantization)).manifest
    plan = manifest.memory_plan
    assert plan["linear_workspace_bytes"] == workspace
    blocks = plan["kv_blocks_for_full_batch"]
    free = plan["activation_bytes"] + workspace + plan["logits_bytes"] + blocks * plan["kv_bytes_per_block"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    on_gpu = SimpleNamespace(manifest=manifest, device=torch.device("cuda"))
    assert num_kv_blocks(on_gpu, KvCacheConfig(free_gpu_memory_fraction=1.0)) == blocks
    assert workspace == 0 or workspace > plan["kv_bytes_per_block"]  # so leaving it out would give more blocks


def test_llm_engine_cache_rebuilds_int4_awq_when_its_calibration_file_changes(tmp_path, monkeypatch):
    from kiln.runtime.llm import ensure_engine

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "calibration.txt"
    text.write_text("Once upon a time there was a cat. " * 20)
    config = {"quantization": "int4_awq", "calibration_data": str(text), "max_seq_len": 128, "target": "cpu"}
    first = ensure_engine(STORIES_DIR, config, progress=False)
    assert ensure_engine(STORIES_DIR, config, progress=False) == first
    text.write_text("The dog ran to the park. " * 30)
    assert ensure_engine(STORIES_DIR, config, progress=False) != first
