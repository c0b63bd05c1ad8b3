"""The FP8 KV cache (BuildConfig.kv_cache_dtype="fp8") and FP8 context attention (use_fp8_context_fmha).

Kernels against their references: the rotary + KV write stores exactly the reference's e4m3 bytes; paged
attention over an FP8 cache (context and decode), and FP8 context attention, match the references within
tolerance. On a CPU-only machine the kernels run in Triton's interpreter (conftest.py), whose
float32 -> e4m3 casts are routed through torch's (``rounding_fp8_casts``); it multiplies e4m3 dot operands
exactly, so FP8 context attention is tested there too. ``gpu`` cases run them compiled, at Llama-3-8B
shapes. Then the build: validation, the manifest and memory plan, a pre-quantized checkpoint's KV scales,
and stories260K's teacher-forced top-1 agreement with the unquantized engine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import DEVICE, ON_GPU, STORIES_DIR, build_engine, gpu
from kiln import LLM, BuildConfig, Builder, SamplingParams
from kiln.bench.report import engine_details
from kiln.convert import AutoModelForCausalLM
from kiln.engine import EngineManifest
from kiln.errors import ConfigError
from kiln.kernels.attention import fp8_kv_cache_refusal, paged_attention_ref, paged_attention_triton
from kiln.kernels.rotary import rope_cos_sin, rotary_kv_write_ref, rotary_kv_write_triton
from kiln.quantization.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8
from safetensors.torch import load_file
from test_fp8 import compile_for, compiled_apart
from test_fp8_prequantized import BUILD as PREQUANTIZED_BUILD
from test_fp8_prequantized import NUM_LAYERS, write_checkpoint
from test_fp8_linear_method import STORIES_BUILD, teacher_forced_top1_agreement
from test_kernels import (ATTENTION_DTYPES, CONTEXT_CASES, DECODE_CASES, DTYPE_ID, ROPES, TOLERANCES,
                          AttentionCase, fused_qkv_views)

pytest.importorskip("triton")

# k_scale, v_scale: awkward values, neither a power of two nor 1.0, so a scale applied twice or not at all shows.
KV_SCALE = (0.037, 0.011)


def kv_scale() -> torch.Tensor:
    return torch.tensor(KV_SCALE, device=DEVICE)


def bytes_of(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


# ---- rotary + KV write ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []),
                         ids=DTYPE_ID)  # the interpreter truncates bfloat16 casts: the rotated keys differ
@pytest.mark.parametrize("is_interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim,rotary_dim,block_size", [
    (7, 8, 2, 64, 64, 16), (3, 6, 1, 12, 8, 16), (5, 8, 4, 8, 8, 16), (9, 5, 5, 48, 32, 4),
    pytest.param(2048, 32, 8, 128, 128, 32, marks=gpu)])
def test_rotary_kv_write_stores_the_references_e4m3_bytes(num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim,
                                                          block_size, is_interleaved, dtype, rounding_fp8_casts):
    max_positions = 4096
    q, k, v = fused_qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    v[1] *= 100  # past 448 * v_scale: the clamp is exercised (token 1 is written; 0 is padding)
    cos_sin = rope_cos_sin(ROPES["llama3"], rotary_dim, max_positions).to(DEVICE)
    positions = torch.randint(0, max_positions, (num_tokens,), device=DEVICE)
    num_blocks = -(-num_tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::3] = -1  # padding tokens: no KV write
    # Poisoned with e4m3's NaN (0x7f): a byte written where it should not be, or left unwritten, shows.
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 0x7F, dtype=torch.uint8,
                         device=DEVICE).view(FP8_DTYPE)
    v_cache = k_cache.clone()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_q = rotary_kv_write_ref(q, k, v, positions, cos_sin, expected_k, expected_v, slots, is_interleaved,
                                     kv_scale=kv_scale())
    q_rot = rotary_kv_write_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slots, is_interleaved,
                                   kv_scale=kv_scale(), num_warps=2)
    torch.testing.assert_close(q_rot, expected_q, rtol=TOLERANCES[dtype][0], atol=TOLERANCES[dtype][1])
    assert torch.equal(bytes_of(k_cache), bytes_of(expected_k)) and torch.equal(bytes_of(v_cache), bytes_of(expected_v))
    written = slots[slots >= 0].long()
    stored_v = expected_v.view(-1, num_kv_heads, head_dim)[written]
    assert stored_v.float().abs().max() == FP8_MAX  # some values saturated
    # What was stored is v / v_scale rounded to e4m3: within half a step (2^-4 relative, from 2^-6 up).
    want = (v[slots >= 0].float() / KV_SCALE[1]).clamp(-FP8_MAX, FP8_MAX)
    assert ((stored_v.float() - want).abs() <= want.abs() * 2 ** -4 + 2 ** -10).all()


# ---- paged attention over an FP8 cache -----------------------------------------------------------
class Fp8AttentionCase(AttentionCase):
    """AttentionCase with its caches in e4m3 (k / k_scale, v / v_scale)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.k_cache = (self.k_cache.float() * 3 / KV_SCALE[0]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        self.v_cache = (self.v_cache.float() / KV_SCALE[1]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)

    def reference(self, fp8_context: bool = False) -> torch.Tensor:
        return paged_attention_ref(self.q, self.k_cache, self.v_cache, self.meta, self.scale, kv_scale(), fp8_context)

    def triton(self, fp8_context: bool = False, **config) -> torch.Tensor:
        return paged_attention_triton(self.q, self.k_cache, self.v_cache, self.meta, self.scale, kv_scale(),
                                      fp8_context, **config)

    def fp8_context_bound(self) -> torch.Tensor:
        """How far FP8 context attention's kernel may be from its reference: the kernel rounds each P to e4m3
        against its tile's running maximum, the reference against the row's; each is within e4m3's relative
        step 2^-4 of the exact P, so they are 2^-3 apart at most, weighted by |v|: 2^-3 * (P @ |V|) / l, plus
        the output dtype's rounding. (Q's rounding is the same in both: IEEE division, round to even.)"""
        abs_v = (self.v_cache.view(torch.uint8) & 0x7F).view(FP8_DTYPE)  # e4m3's sign bit cleared
        weighted = paged_attention_ref(self.q, self.k_cache, abs_v, self.meta, self.scale, kv_scale(), True).float()
        return 2 ** -3 * weighted + 2 ** -10 * (weighted + 1)

    def dequantized_reference(self) -> torch.Tensor:
        """The reference attention over float32 caches holding the dequantized values (float32: k * 0.037
        is not exact in 16 bits, and rounding it there moved a bfloat16 output past the tolerance on the
        H200), rounded to q's dtype at the end as the FP8 path rounds its float32 result."""
        k, v = dequantize_fp8(self.k_cache, KV_SCALE[0]), dequantize_fp8(self.v_cache, KV_SCALE[1])
        return paged_attention_ref(self.q.float(), k, v, self.meta, self.scale).to(self.q.dtype)


# (rtol, atol): as test_kernels.py's ATTENTION_TOLERANCES.
FP8_KV_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
SMALL_CONTEXT = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "num_stages": 1}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: tuple[float, float]) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tolerance[0], atol=tolerance[1])


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("case", list(CONTEXT_CASES.values()), ids=list(CONTEXT_CASES))
def test_context_attention_over_an_fp8_cache(case, dtype):
    attention = Fp8AttentionCase(*case, dtype=dtype)
    expected = attention.reference()
    # The reference's FP8 path is its float path over the dequantized cache.
    assert_close(expected, attention.dequantized_reference(), FP8_KV_TOLERANCES[dtype])
    assert_close(attention.triton(context=SMALL_CONTEXT), expected, FP8_KV_TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", list(DECODE_CASES.values()), ids=list(DECODE_CASES))
def test_decode_attention_over_an_fp8_cache(case, num_splits, dtype):
    seq_lens, *shape = case
    attention = Fp8AttentionCase([1] * len(seq_lens), seq_lens, *shape, dtype=dtype)
    decode = [{"max_batch_size": 256, "num_splits": num_splits, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}]
    out = attention.triton(decode=decode)
    assert_close(out, attention.reference(), FP8_KV_TOLERANCES[dtype])
    padded = torch.tensor(seq_lens, device=DEVICE) == 0
    assert torch.equal(out[padded], torch.zeros_like(out[padded]))
    # FP8 context attention leaves decode-only batches to the 16-bit dots.
    assert torch.equal(attention.triton(fp8_context=True, decode=decode), out)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("config", [None, SMALL_CONTEXT], ids=["default", "small_tiles"])
@pytest.mark.parametrize("case", list(CONTEXT_CASES.values()), ids=list(CONTEXT_CASES))
def test_fp8_context_attention_matches_its_rounding_reference(case, config, dtype, rounding_fp8_casts):
    attention = Fp8AttentionCase(*case, dtype=dtype)
    expected = attention.reference(fp8_context=True)
    got = attention.triton(fp8_context=True, context=config)
    assert got.dtype == expected.dtype
    assert ((got.float() - expected.float()).abs() <= attention.fp8_context_bound()).all()
    # The reference rounded Q and P: it differs from the 16-bit dots' result, within e4m3's relative step
    # on average (measured: 1.9-3.5% of the mean |output| over these cases).
    error = (expected.float() - attention.reference().float()).abs()
    assert 0 < error.mean() < 2 ** -4 * expected.float().abs().mean()


def test_fp8_context_attention_refuses_a_16_bit_cache():
    attention = AttentionCase([5], [5], 4, 2, 64, 16, torch.float32)
    with pytest.raises(AssertionError, match="FP8 context attention reads an FP8 KV cache"):
        paged_attention_triton(attention.q, attention.k_cache, attention.v_cache, attention.meta, attention.scale,
                               fp8_context=True)


# ---- compiled for the GPU, without one -----------------------------------------------------------
def compile_fp8_attention_kernels(capability: int) -> dict[str, str]:
    """PTX of the KV write into an FP8 cache and of FP8-cache attention (16-bit dots, and FP8 dots) for an
    NVIDIA GPU of this compute capability, bfloat16, head_dim 128; or the compile error's text."""
    from kiln.kernels.attention import DEFAULT_CONTEXT_CONFIG, _paged_attention_kernel
    from kiln.kernels.fp8 import FP8_CONSTEXPRS
    from kiln.kernels.rotary import _rotary_kv_write_kernel

    results = {}
    rotary_types = {name: "i32" for name in _rotary_kv_write_kernel.arg_names}
    rotary_types.update({name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr")})
    rotary_types.update(positions_ptr="*i64", cos_sin_ptr="*fp32", slot_mapping_ptr="*i64", k_cache_ptr="*fp8e4nv",
                        v_cache_ptr="*fp8e4nv", kv_scale_ptr="*fp32")
    attention_types = {name: "i32" for name in _paged_attention_kernel.arg_names}
    attention_types.update(q_ptr="*bf16", k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv", block_tables_ptr="*i32",
                           seq_lens_ptr="*i32", query_start_loc_ptr="*i32", out_ptr="*bf16", partial_out_ptr="*fp32",
                           partial_lse_ptr="*fp32", split_counts_ptr="*i32", kv_scale_ptr="*fp32", scale_log2="fp32")
    attention_constants = dict(GROUP=4, HEAD_DIM=128, KV_BLOCK_SIZE=32, BLOCK_Q=16, BLOCK_G=4, BLOCK_D=128,
                               BLOCK_H=4, MERGE_CHUNK=1, MIN_SPLIT_KEYS=64, IS_SPLIT=False, IS_FP8_KV=True, DOT_PRECISION="tf32", **FP8_CONSTEXPRS,
                               BLOCK_N=DEFAULT_CONTEXT_CONFIG["BLOCK_N"])
    kernels = {
        "kv_write": (_rotary_kv_write_kernel, rotary_types, dict(
            NUM_Q_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=128, ROTARY_DIM=128, IS_INTERLEAVED=False, IS_FP8=True,
            FP8_MAX=FP8_MAX, BLOCK_H=32, BLOCK_PAIRS=64, BLOCK_PASS=1, BLOCK_D=128), 4, 1),
        "attention": (_paged_attention_kernel, attention_types, {**attention_constants, "IS_FP8_DOT": False}, 4, 2),
        "fp8_context_attention": (_paged_attention_kernel, attention_types, {**attention_constants, "IS_FP8_DOT": True},
                                  4, 2),
    }
    for name, (kernel, types, constants, num_warps, num_stages) in kernels.items():
        try:
            results[name] = compile_for(kernel, capability, types, constants, num_warps, num_stages)
        except Exception as e:  # noqa: BLE001 - the error's text is what the caller checks
            results[name] = f"error: {e}"
    return results


def compile_fp8_attention_kernels_for_ampere_ada_hopper() -> dict[str, dict[str, str]]:
    return {str(capability): compile_fp8_attention_kernels(capability) for capability in (80, 89, 90)}


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the kernels themselves")
def test_fp8_kernels_compile_for_ada_and_hopper_and_not_for_ampere(tmp_path):
    """What the interpreter cannot show, and why kiln refuses an FP8 KV cache below sm89: for sm89 and sm90
    the kernels pass Triton's and ptxas's pipeline, quantizing with IEEE division and round-to-nearest-even
    saturating casts, and the FP8 context attention multiplies e4m3 on the tensor cores; for sm80 Triton
    refuses the e4m3 type itself. Compiled in a process of its own, without the interpreter."""
    ptx = compiled_apart(tmp_path, "test_fp8_kv_cache", "compile_fp8_attention_kernels_for_ampere_ada_hopper()")
    for name, code in ptx["80"].items():
        assert code.startswith("error:") and "fp8e4nv not supported in this architecture" in code, name
    for capability in ("89", "90"):
        kernels = ptx[capability]
        assert not any(code.startswith("error:") for code in kernels.values()), kernels
        assert "div.rn.f32" in kernels["kv_write"] and "cvt.rn.satfinite.e4m3x2.f32" in kernels["kv_write"]
        assert "e4m3" in kernels["attention"]  # the cache's values converted in registers
    assert "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32" in ptx["89"]["fp8_context_attention"]
    assert "wgmma" in ptx["90"]["fp8_context_attention"] and "e4m3" in ptx["90"]["fp8_context_attention"]


# ---- build -----------------------------------------------------------------------------------------
def stories_source():
    return AutoModelForCausalLM.from_hugging_face(STORIES_DIR)


@pytest.fixture
def no_weight_reading(monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read before validation")

    monkeypatch.setattr("kiln.convert.checkpoint.CheckpointReader.get", no_reading)


@pytest.mark.parametrize("options, message", [
    (dict(kv_cache_dtype="fp8", target="sm80"),
     "kv_cache_dtype='fp8' (--kv-cache-dtype fp8) for target sm80: kiln's Triton kernels read and write e4m3 only "
     "on sm89+ (Ada, Hopper), not on sm80 (the A100); leave --kv-cache-dtype at auto (float16 KV cache), or build "
     "for an sm89+ target"),
    (dict(kv_cache_dtype="fp8", target="sm86"), "e4m3 only on sm89+ (Ada, Hopper), not on sm86; leave"),
    (dict(kv_cache_dtype="fp8", use_fp8_context_fmha=True, target="sm80"),
     "use_fp8_context_fmha (--fp8-context-attention) for target sm80: FP8 dots need FP8 tensor cores (sm89+: Ada, "
     "Hopper) (the A100 has none); leave it off (int8_wo / int4_wo weight-only quantization runs there)"),
    (dict(use_fp8_context_fmha=True, target="sm90"),
     "use_fp8_context_fmha (--fp8-context-attention) multiplies the FP8 KV cache's keys and values, and this "
     "engine's KV cache is float16; add --kv-cache-dtype fp8"),
    (dict(kv_cache_dtype="bfloat16", target="sm90"),
     "kv_cache_dtype='bfloat16' (--kv-cache-dtype) differs from the engine dtype float16; the KV cache holds the "
     "engine dtype or fp8: use --kv-cache-dtype auto or fp8"),
    (dict(fp8_scaling="tensor", target="sm90"),
     "fp8_scaling='tensor' (--fp8-scaling) sets the scales of fp8 weights, and this engine's quantization is 'none'; "
     "add --quantization fp8, or leave --fp8-scaling out"),
])
def test_what_cannot_run_is_refused_before_any_weight_is_read(options, message, no_weight_reading):
    with pytest.raises(ConfigError) as error:
        Builder().build(stories_source(), BuildConfig(**STORIES_BUILD, dtype="float16", **options))
    assert message in str(error.value)


@pytest.mark.parametrize("options, message", [
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype 'int8' is not supported; choose one of auto, fp8, float32, "
                                  "float16, bfloat16"),
    (dict(fp8_scaling="block"), "fp8_scaling 'block' is not supported; choose one of channel, tensor"),
    (dict(use_fp8_context_fmha="yes"), "use_fp8_context_fmha must be True or False, got 'yes'"),
])
def test_build_config_refuses_unknown_values(options, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig(**options)


def test_kv_cache_refusal_by_target():
    assert fp8_kv_cache_refusal("cpu") is None and fp8_kv_cache_refusal("sm89") is None
    assert fp8_kv_cache_refusal("sm90") is None and "sm80 (the A100)" in fp8_kv_cache_refusal("sm80")


def test_cli_refuses_fp8_kv_for_an_a100_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "build", str(STORIES_DIR), "--output",
                             str(tmp_path / "engine"), "--target", "sm80", "--kv-cache-dtype", "fp8"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and not (tmp_path / "engine").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--kv-cache-dtype fp8" in lines[0] and "sm89+" in lines[0]


def test_trtllm_create_builder_config_takes_fp8_context_fmha(no_weight_reading):
    config = Builder().create_builder_config(precision="float16", use_fp8_context_fmha=True)
    assert config.use_fp8_context_fmha
    with pytest.raises(ConfigError, match="FP8 dots need FP8 tensor cores"):
        Builder().build(stories_source(), config.replace(kv_cache_dtype="fp8", target="sm80"))


@pytest.mark.parametrize("target", ["sm89", "sm90"])
def test_fp8_kv_engine_for_a_gpu_this_machine_lacks(target, tmp_path):
    """The manifest and memory plan of an FP8-KV engine: half the KV bytes per token of a bfloat16 one, a
    scale pair per layer (1.0: a float checkpoint has none), and kiln inspect / bench reporting it."""
    build = dict(STORIES_BUILD, dtype="bfloat16", target=target)
    fp8 = Builder().build(stories_source(), BuildConfig(**build, kv_cache_dtype="fp8", use_fp8_context_fmha=True))
    bf16 = Builder().build(stories_source(), BuildConfig(**build))
    assert bf16.manifest.build_config.kv_cache_dtype == "bfloat16"
    assert fp8.manifest.memory_plan["kv_bytes_per_token"] * 2 == bf16.manifest.memory_plan["kv_bytes_per_token"]
    assert fp8.manifest.memory_plan["kv_bytes_per_block"] * 2 == bf16.manifest.memory_plan["kv_bytes_per_block"]
    engine_dir = fp8.save(tmp_path / target, progress=False)
    manifest = EngineManifest.read(engine_dir)
    assert manifest.build_config.kv_cache_dtype == "fp8" and manifest.build_config.use_fp8_context_fmha
    num_layers = manifest.model_config.num_layers
    scales = [name for name in manifest.tensors if name.endswith("kv_scales.scale")]
    assert scales == [f"layers.{i}.attn.kv_scales.scale" for i in range(num_layers)]
    assert all(manifest.tensors[name] | {"crc32": 0} == {"shape": [2], "dtype": "F32", "crc32": 0} for name in scales)
    stored = load_file(str(engine_dir / "rank0.safetensors"))
    assert all(torch.equal(stored[name], torch.ones(2)) for name in scales)
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "inspect", str(engine_dir)], capture_output=True,
                         text=True, check=True).stdout
    assert "kv_cache_dtype fp8, FP8 context attention" in out
    assert engine_details(engine_dir, manifest, "kiln", "0", "bfloat16")["kv_cache_dtype"] == "fp8"


@pytest.mark.parametrize("layout", ["modelopt", "compressed_tensors"])
def test_a_checkpoints_kv_cache_scales_make_an_fp8_kv_engine(layout, tmp_path):
    """stories260K pre-quantized with FP8 KV-cache scales (ModelOpt's or compressed-tensors' names) builds an
    FP8 KV cache without a flag, and the engine stores each layer's (k_scale, v_scale) as the checkpoint has
    them; without the scales, the cache holds the engine dtype."""
    kv_scales = {i: (0.011 * (i + 1), 0.0625 / (i + 1)) for i in range(NUM_LAYERS)}
    write_checkpoint(tmp_path / "fp8", layout, kv_scales)
    engine = Builder().build(AutoModelForCausalLM.from_hugging_face(tmp_path / "fp8"),
                             BuildConfig(**PREQUANTIZED_BUILD))
    assert engine.manifest.build_config.kv_cache_dtype == "fp8"
    engine_dir = engine.save(tmp_path / "engine", progress=False)
    stored = load_file(str(engine_dir / "rank0.safetensors"))
    for i, scales in kv_scales.items():
        assert torch.equal(stored[f"layers.{i}.attn.kv_scales.scale"], torch.tensor(scales))
    with LLM(engine_dir, progress=False) as llm:  # the executor runs it over an e4m3 cache
        out = llm.generate([[1, 403, 407, 261, 378]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8
    write_checkpoint(tmp_path / "no_kv_scales", layout)
    plain = Builder().build(AutoModelForCausalLM.from_hugging_face(tmp_path / "no_kv_scales"),
                            BuildConfig(**PREQUANTIZED_BUILD))
    assert plain.manifest.build_config.kv_cache_dtype == "float32"


# ---- stories260K -----------------------------------------------------------------------------------
def test_fp8_kv_engine_agrees_with_the_unquantized_one_on_stories260k(stories_engine, tmp_path):
    """Teacher-forced top-1 agreement with the unquantized engine (the fp8 linear method's test and
    helper): the FP8 KV cache alone, and with FP8 context attention on top (the CPU reference's roundings)."""
    figures = {}
    for name, options in {"fp8 KV": dict(kv_cache_dtype="fp8"),
                          "fp8 KV + fp8 context attention": dict(kv_cache_dtype="fp8", use_fp8_context_fmha=True)
                          }.items():
        engine_dir = build_engine(STORIES_DIR, tmp_path / name.replace(" ", "_"), **STORIES_BUILD, **options)
        agree, total = teacher_forced_top1_agreement(stories_engine, engine_dir)
        figures[name] = agree / total
        print(f"{name} vs unquantized, stories260K, teacher-forced top-1 agreement: {agree}/{total} = "
              f"{agree / total:.1%}")
    # The bar for FP8 is 90% of the top-1 tokens. Measured: fp8 KV 1040/1091 = 95.3%, with FP8 context
    # attention 1027/1091 = 94.1% (the fp8 linear method: 96.3%). What is lost is e4m3's 3-bit mantissa on
    # stories260K's 8-dim heads, not its range: per-layer scales calibrated to amax / 448 over this same text
    # keep 1039/1091. The floors sit about two points under the figures: the CPU arithmetic is deterministic,
    # so only a real loss of accuracy (a mis-scaled or mis-rounded cache) moves them that far.
    assert figures["fp8 KV"] >= 0.93 and figures["fp8 KV + fp8 context attention"] >= 0.92
