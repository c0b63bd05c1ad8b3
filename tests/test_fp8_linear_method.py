"""The "fp8" linear method (kiln.layers.fp8): its stored tensors and matmul at awkward shapes, the target
checks at build, and its accuracy on stories260K against the unquantized engine (CPU reference path)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import STORIES_DIR, build_engine
from kiln import LLM, BuildConfig, Builder, SamplingParams
from kiln.convert import AutoModelForCausalLM
from kiln.bench.report import engine_details
from kiln.engine import EngineManifest
from kiln.errors import ConfigError
from kiln.kernels import KernelOps, reference_plan
from kiln.layers import linear_method
from kiln.layers.fp8 import Fp8LinearMethod, large_batch_kernel
from kiln.quantization.fp8 import FP8_DTYPE, fp8_linear_ref
from kiln.runtime.loader import load_engine
from test_models_vs_hf import kiln_logits

STORIES_BUILD = dict(max_batch_size=4, max_input_len=128, max_seq_len=512, max_num_tokens=512, tokens_per_block=16)


class FakeLinear:
    """What apply reads of a Linear: its stored tensors and bias."""

    def __init__(self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None):
        self.weight, self.weight_scale, self.bias = stored["weight"], stored["weight_scale"], bias
        self.ops = KernelOps(reference_plan())  # a CPU engine's


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows, out_features, in_features", [(1, 77, 173), (5, 1, 64), (33, 129, 31)])
def test_apply_matches_dequantize_then_linear_at_awkward_shapes(dtype, num_rows, out_features, in_features, scaling):
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    weight[0] *= 30.0  # an outlier channel: per-channel scales keep the other rows' precision
    x = torch.randn(num_rows, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    method = linear_method("fp8", BuildConfig(quantization="fp8", fp8_scaling=scaling))
    stored = method.convert(weight.to(dtype), dtype)
    declared = method.tensors(out_features, in_features, dtype)
    assert {name: (tuple(t.shape), t.dtype) for name, t in stored.items()} == declared
    assert declared["weight"][1] == FP8_DTYPE and declared["weight_scale"][1] == torch.float32
    assert declared["weight_scale"][0] == ((out_features, 1) if scaling == "channel" else ())

    dequantized = stored["weight"].float() * stored["weight_scale"]
    # Round to nearest on e4m3's 3 mantissa bits: each weight within 2^-4 of itself (normals), or half the
    # smallest subnormal step (2^-9 of the row's scale).
    err = (dequantized - weight.to(dtype).float()).abs()
    assert (err <= weight.to(dtype).float().abs() * 2 ** -4 + stored["weight_scale"] * 2 ** -10).all()
    if scaling == "tensor" and out_features > 1:  # the outlier row sets the one scale: the others lose precision
        assert err[1:].max() > 0

    got = method.apply(FakeLinear(stored, bias), x)
    assert got.dtype == dtype and got.shape == (num_rows, out_features)
    torch.testing.assert_close(got, fp8_linear_ref(x, stored["weight"], stored["weight_scale"], bias=bias),
                               atol=0, rtol=0)
    want = F.linear(x.float(), dequantized, bias.float())
    # What is left is the activations' per-token rounding to e4m3: up to 2^-4 of each |x| term.
    bound = (x.float().abs() @ dequantized.abs().t()) * 2 ** -4 + (1e-2 if dtype == torch.bfloat16 else 1e-5) * (
        want.abs() + 1)
    assert ((got.float() - want).abs() <= bound).all()
    assert (got.float() - want).abs().max() > 0  # the activations were quantized


@pytest.mark.parametrize("target", ["sm80", "sm86"])
def test_fp8_for_a_gpu_without_fp8_tensor_cores_fails_at_build_naming_what_runs_there(target, monkeypatch):
    source = AutoModelForCausalLM.from_hugging_face(STORIES_DIR)

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read before validation")

    monkeypatch.setattr("kiln.convert.checkpoint.CheckpointReader.get", no_reading)
    with pytest.raises(ConfigError) as error:
        Builder().build(source, BuildConfig(**STORIES_BUILD, dtype="float16", target=target, quantization="fp8"))
    message = str(error.value)
    assert "--quantization fp8" in message and f"target {target}" in message
    assert "FP8 needs FP8 tensor cores (sm89+: Ada, Hopper)" in message and "use int8_wo or int4_wo" in message
    assert ("the A100" in message) == (target == "sm80")


def test_fp8_large_batch_kernel_is_decided_by_target_and_dtype():
    assert "row-wise" in large_batch_kernel("sm90", torch.bfloat16)
    # Per-tensor weight scales change nothing: activations are per token, so _scaled_mm stays row-wise.
    assert "per-tensor weight scales broadcast" in large_batch_kernel("sm90", torch.bfloat16, "tensor")
    ada = large_batch_kernel("sm89", torch.bfloat16, "tensor")
    assert ada.startswith("the W8A16 GEMV at every batch size") and "Hopper (sm90+)" in ada
    assert "one activation scale per batch" in ada
    assert "W8A16 GEMV at every batch size" in large_batch_kernel("sm90", torch.float16)
    assert "CPU reference" in large_batch_kernel("cpu", torch.float32)
    assert Fp8LinearMethod().target_refusal("sm89") is None and Fp8LinearMethod().target_refusal("cpu") is None


@pytest.mark.parametrize("target", ["sm89", "sm90"])
def test_fp8_engine_for_a_gpu_this_machine_lacks_builds_and_inspect_says_how_it_multiplies(target, tmp_path):
    source = AutoModelForCausalLM.from_hugging_face(STORIES_DIR)
    engine = Builder().build(source, BuildConfig(**STORIES_BUILD, dtype="bfloat16", target=target,
                                                 quantization="fp8"))
    engine_dir = engine.save(tmp_path / target, progress=False)
    tensors = EngineManifest.read(engine_dir).tensors
    assert tensors["layers.0.attn.qkv.weight"]["dtype"] == "F8_E4M3"
    assert tensors["embed.weight"]["dtype"] == "BF16" and "lm_head.weight" not in tensors  # tied, unquantized
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "inspect", str(engine_dir)], capture_output=True,
                         text=True, check=True).stdout
    assert "quantization fp8" in out
    assert ("W8A16 GEMV at every batch size" in out) == (target == "sm89")
    summary = json.loads(subprocess.run([sys.executable, "-m", "kiln.cli", "inspect", str(engine_dir), "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert summary["limits"]["quantization"] == "fp8" and "GEMV" in summary["linear_kernels"]
    report = engine_details(engine_dir, EngineManifest.read(engine_dir), "kiln", "0", "bfloat16")
    assert report["quantization"] == "fp8"  # kiln bench's report


STORY_PROMPTS = ["Once upon a time, there was a little girl named Lily.", "Tom and his dog went to the park.",
                 "The sun was hot, so the bird", "One day, a big bear found a red ball in the forest."]
NUM_GENERATED = 256


def teacher_forced_top1_agreement(reference_dir, engine_dir, chunk: int = 512) -> tuple[int, int]:
    """(agreeing positions, positions): the reference engine's greedy continuations of STORY_PROMPTS fed
    through both engines; at every position of each sequence both see the same tokens, and their
    argmaxes are compared."""
    with LLM(reference_dir, progress=False) as llm:
        outs = llm.generate(STORY_PROMPTS, SamplingParams(max_tokens=NUM_GENERATED, temperature=0.0,
                                                          ignore_eos=True), use_tqdm=False)
    sequences = [out.prompt_token_ids + out.outputs[0].token_ids for out in outs]
    assert all(len(out.outputs[0].token_ids) == NUM_GENERATED for out in outs)
    reference = kiln_logits(load_engine(reference_dir, progress=False), sequences, chunk=chunk)
    logits = kiln_logits(load_engine(engine_dir, progress=False), sequences, chunk=chunk)
    assert any((r != q).any() for r, q in zip(reference, logits))  # the engine differs: its quantization ran
    return sum(int((r.argmax(-1) == q.argmax(-1)).sum()) for r, q in zip(reference, logits)), sum(map(len, sequences))


def test_fp8_engine_agrees_with_the_unquantized_one_on_stories260k(stories_engine, tmp_path):
    fp8_dir = build_engine(STORIES_DIR, tmp_path / "fp8", **STORIES_BUILD, quantization="fp8")
    agree, total = teacher_forced_top1_agreement(stories_engine, fp8_dir)
    print(f"fp8 vs unquantized, stories260K, teacher-forced top-1 agreement: {agree}/{total} = {agree / total:.1%}")
    assert agree / total >= 0.90  # the bar; measured 1051/1091 = 96.3% (W8A8, per-channel weights)


def test_per_tensor_fp8_engine_stores_one_scale_per_weight_and_agrees_on_stories260k(stories_engine, tmp_path):
    engine_dir = build_engine(STORIES_DIR, tmp_path / "fp8_tensor", **STORIES_BUILD, quantization="fp8",
                              fp8_scaling="tensor")
    manifest = EngineManifest.read(engine_dir)
    assert manifest.build_config.fp8_scaling == "tensor"
    assert manifest.tensors["layers.0.attn.qkv.weight_scale"]["shape"] == []
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "inspect", str(engine_dir)], capture_output=True,
                         text=True, check=True).stdout
    assert "quantization fp8 (tensor scales)" in out
    agree, total = teacher_forced_top1_agreement(stories_engine, engine_dir)
    print(f"fp8 per-tensor vs unquantized, stories260K, teacher-forced top-1 agreement: {agree}/{total} = "
          f"{agree / total:.1%}")
    assert agree / total >= 0.90  # the bar; measured 1041/1091 = 95.4% (per channel: 96.3%)
