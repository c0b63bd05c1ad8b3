"""Programmatic dependent launch (PDL): the decode step's Triton kernels wait for the kernel before them
(``wait_for_producer``) before reading what it wrote, and the GEMVs read their first weight tile before
that wait. The CPU checks the launch arguments and the compiled code; the GPU suite runs every kernel
and model with PDL on (sm90), and the graph test below replays a chain whose inputs change."""

from __future__ import annotations

import os
import re

import pytest
import torch

from conftest import ON_GPU, gpu
from test_fp8 import compile_for, compiled_apart

from kiln.kernels import triton_jit
from kiln.kernels.triton_jit import pdl_disabled, pdl_launch


def test_pdl_is_off_for_cpu_tensors_in_the_interpreter_and_when_disabled(monkeypatch):
    assert pdl_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_jit._has_pdl.cache_clear()
    try:
        assert pdl_launch(torch.device("cuda", 0)) == {"PDL": False}
    finally:
        triton_jit._has_pdl.cache_clear()
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    with pdl_disabled():
        assert pdl_launch(torch.device("cuda", 0)) == {"PDL": False}
    assert "KILN_PDL" not in os.environ
    try:
        assert pdl_launch(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    finally:
        triton_jit._has_pdl.cache_clear()  # the tests after this one run in the interpreter


@pytest.mark.parametrize("capability,setting,expected", [(9, None, True), (9, "0", False), (8, None, False)])
def test_pdl_needs_sm90_and_can_be_turned_off(monkeypatch, capability, setting, expected):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if setting is None:
        monkeypatch.delenv("KILN_PDL", raising=False)
    else:
        monkeypatch.setenv("KILN_PDL", setting)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (capability, 0))
    triton_jit._has_pdl.cache_clear()
    try:
        launch = pdl_launch(torch.device("cuda", 0))
    finally:
        triton_jit._has_pdl.cache_clear()
    assert launch == ({"PDL": True, "launch_pdl": True} if expected else {"PDL": False})


# _gemv_kernel's KV_WRITE constants for Llama-3-8B's qkv (32 query heads, 8 KV heads of 128 dims, rotate_half).
KV_WRITE_8B = dict(KV_WRITE=True, Q_SIZE=4096, KV_SIZE=1024, HEAD_DIM=128, ROTARY_DIM=128)


def compile_decode_kernels(capability: int, names: list[str] | None = None) -> dict[str, str]:
    """PTX of the kernels of a Llama decode step (those of ``names``, else all) for a GPU of this compute
    capability, bfloat16 at Llama-3-8B's widths, with the PDL kiln launches them with there (on from sm90)."""
    from kiln.kernels.activation import _gelu_kernel, _silu_mul_fp8_kernel, _silu_mul_kernel
    from kiln.kernels.attention import _paged_attention_kernel
    from kiln.kernels.fp8 import FP8_CONSTEXPRS, FP8_MAX, _quantize_fp8_kernel
    from kiln.kernels.gemv import NO_KV_WRITE, _gemv_kernel
    from kiln.kernels.norm import _layer_norm_kernel, _rms_norm_kernel
    from kiln.kernels.rotary import _rotary_kv_write_kernel
    from kiln.kernels.weight_only import (TENSOR_CORE_CONFIGS, _int4_gemv_kernel, _int8_gemv_kernel,
                                         _weight_only_gemm_kernel)

    def ints(kernel, **pointers):
        return {**{name: "i32" for name in kernel.arg_names}, **pointers}

    def gemv(w_ptr="*bf16", w_scale_ptr="*bf16", num_stages=1, **constants):
        """The GEMV (one row, a bf16 weight with a bias, unless told otherwise), as compile_for takes it."""
        types = ints(_gemv_kernel, x_ptr="*bf16", w_ptr=w_ptr, w_scale_ptr=w_scale_ptr, bias_ptr="*bf16",
                     out_ptr="*bf16", eps="fp32")
        types.update(positions_ptr="*i64", cos_sin_ptr="*fp32", slot_mapping_ptr="*i64", k_cache_ptr="*bf16",
                     v_cache_ptr="*bf16", kv_scale_ptr="*fp32")
        return (_gemv_kernel, types, {"HAS_SCALE": False, "HAS_BIAS": True, "NORM": False, "ADD_RESIDUAL": False,
                                      "SILU_MUL": False, **NO_KV_WRITE, "BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 1024,
                                      "DOT_PRECISION": "tf32", **constants}, 4, num_stages)

    int4, int8 = TENSOR_CORE_CONFIGS[4][0], TENSOR_CORE_CONFIGS[8][0]
    kernels = {
        "fp8_gemv": gemv(w_ptr="*fp8e4nv", w_scale_ptr="*fp32", HAS_SCALE=True, HAS_BIAS=False, BLOCK_K=2048),
        "dense_gemv": gemv(),
        # The batch-1 folds: the norm in qkv's / gate_up's GEMV (SiLU·up in gate_up's), the residual add in o's /
        # down's.
        "dense_norm_gemv": gemv(NORM=True, BLOCK_K=2048),
        # qkv's, writing the KV cache (rotate_half, Llama-3-8B's heads)
        "dense_norm_kv_write_gemv": gemv(NORM=True, BLOCK_K=2048, **KV_WRITE_8B),
        "dense_silu_mul_gemv": gemv(NORM=True, SILU_MUL=True, BLOCK_K=2048),
        "dense_residual_gemv": gemv(ADD_RESIDUAL=True, BLOCK_K=2048),
        "dense_gemv_16_rows": gemv(BLOCK_M=16, BLOCK_N=16, BLOCK_K=512, num_stages=3),
        "int4_gemv": (_int4_gemv_kernel, ints(_int4_gemv_kernel, x_ptr="*bf16", input_order_ptr="*i32", w_ptr="*i32",
                                              scales_ptr="*fp16", zeros_ptr="*u8", out_ptr="*bf16"),
                      dict(GROUP_SIZE=128, HAS_INPUT_ORDER=False, BLOCK_N=int4["BLOCK_N"],
                           BLOCKS=int4["BLOCK_K"] // 128, EVEN=True), int4["num_warps"], 1),
        "int8_gemv": (_int8_gemv_kernel, ints(_int8_gemv_kernel, x_ptr="*bf16", input_order_ptr="*i32", w_ptr="*i8",
                                              scales_ptr="*fp32", zeros_ptr="*fp32", out_ptr="*bf16"),
                      dict(GROUP_SIZE=0, HAS_ZEROS=False, HAS_INPUT_ORDER=False, BLOCK_N=int8["BLOCK_N"],
                           TILE_RUNS=1, RUN_K=int8["BLOCK_K"]), int8["num_warps"], 1),
        "add_rms_norm": (_rms_norm_kernel, ints(_rms_norm_kernel, x_ptr="*bf16", residual_ptr="*bf16",
                                                weight_ptr="*bf16", out_ptr="*bf16", scale_ptr="*bf16", eps="fp32"),
                         dict(HAS_RESIDUAL=True, IS_FP8_OUT=False, **FP8_CONSTEXPRS, BLOCK_ROWS=1, BLOCK=4096), 8, 1),
        "silu_mul": (_silu_mul_kernel, ints(_silu_mul_kernel, gate_up_ptr="*bf16", out_ptr="*bf16"),
                     dict(BLOCK=1024), 4, 1),
        "silu_mul_fp8": (_silu_mul_fp8_kernel, ints(_silu_mul_fp8_kernel, gate_up_ptr="*bf16", out_ptr="*fp8e4nv",
                                                    scale_ptr="*fp32"), dict(**FP8_CONSTEXPRS, BLOCK=16384), 16, 1),
        "gelu": (_gelu_kernel, ints(_gelu_kernel, x_ptr="*bf16", out_ptr="*bf16"), dict(IS_TANH=True, BLOCK=1024),
                 4, 1),
        "add_layer_norm": (_layer_norm_kernel, ints(_layer_norm_kernel, x_ptr="*bf16", residual_ptr="*bf16",
                                                    weight_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16", eps="fp32"),
                           dict(HAS_RESIDUAL=True, BLOCK_ROWS=1, BLOCK=4096), 8, 1),
        "quantize_fp8": (_quantize_fp8_kernel, ints(_quantize_fp8_kernel, x_ptr="*bf16", scale_ptr="*fp32",
                                                    out_ptr="*fp8e4nv"),
                         dict(IS_DYNAMIC=True, **FP8_CONSTEXPRS, BLOCK=4096), 16, 1),
        "int4_tiles": (_weight_only_gemm_kernel, ints(_weight_only_gemm_kernel, x_ptr="*bf16", input_order_ptr="*i32",
                                                      w_ptr="*i32", scales_ptr="*fp16", zeros_ptr="*u8",
                                                      out_ptr="*bf16"),
                       dict(BITS=4, GROUP_SIZE=128, HAS_ZEROS=True, HAS_INPUT_ORDER=False, BLOCK_M=16, BLOCK_N=64,
                            RUN_K=16, GROUP_M=1, DOT_PRECISION="tf32"), 4, 3),
        "rotary_kv_write": (_rotary_kv_write_kernel, ints(
            _rotary_kv_write_kernel, q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", q_out_ptr="*bf16",
            positions_ptr="*i64", cos_sin_ptr="*fp32", slot_mapping_ptr="*i64", k_cache_ptr="*bf16",
            v_cache_ptr="*bf16", kv_scale_ptr="*fp32"),
            dict(NUM_Q_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=128, ROTARY_DIM=128, IS_INTERLEAVED=False, IS_FP8=False,
                 FP8_MAX=FP8_MAX, BLOCK_H=32, BLOCK_PAIRS=64, BLOCK_PASS=1, BLOCK_D=128), 4, 1),
        "decode_attention": (_paged_attention_kernel, ints(
            _paged_attention_kernel, q_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16", block_tables_ptr="*i32",
            seq_lens_ptr="*i32", query_start_loc_ptr="*i32", out_ptr="*bf16", partial_out_ptr="*fp32",
            partial_lse_ptr="*fp32", split_counts_ptr="*i32", kv_scale_ptr="*fp32", scale_log2="fp32"),
            dict(GROUP=4, HEAD_DIM=128, KV_BLOCK_SIZE=32, BLOCK_Q=1, BLOCK_G=16, BLOCK_N=32, BLOCK_D=128,
                 BLOCK_H=4, MERGE_CHUNK=16, MIN_SPLIT_KEYS=64, IS_SPLIT=True, IS_FP8_KV=False, IS_FP8_DOT=False,
                 DOT_PRECISION="tf32", **FP8_CONSTEXPRS), 4, 2),
    }
    return {name: compile_for(kernel, capability, types, constants, num_warps, num_stages)
            for name, (kernel, types, constants, num_warps, num_stages) in kernels.items()
            if names is None or name in names}


def compile_for_ada_and_hopper() -> dict[str, dict[str, str]]:
    return {str(capability): compile_decode_kernels(capability) for capability in (89, 90)}


def compile_split_decode_attention() -> dict[str, str]:
    return {str(capability): compile_decode_kernels(capability, ["decode_attention"])["decode_attention"]
            for capability in (89, 90)}


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the kernels themselves")
def test_decode_kernels_wait_for_their_producer_on_hopper_and_the_gemvs_read_weights_first(tmp_path):
    """For sm90 each kernel waits (griddepcontrol.wait) before it lets the next kernel launch; the
    one-row GEMVs issue global loads (their first weight tile) before the wait, the other kernels none
    (the 16-row GEMV included): what they read is written by the kernel before them. For sm89 (no PDL)
    neither instruction is there."""
    ptx = compiled_apart(tmp_path, "test_pdl", "compile_for_ada_and_hopper()")
    for name, code in ptx["89"].items():
        assert "griddepcontrol" not in code, name
    for name, code in ptx["90"].items():
        wait, launch = code.find("griddepcontrol.wait"), code.find("griddepcontrol.launch_dependents")
        assert 0 <= wait < launch, name
        before = code[:wait]
        assert not re.search(r"cp\.async|st\.global|atom\.|red\.", before), name  # no copy or write before it
        loads_before = re.findall(r"ld\.global", before)
        assert bool(loads_before) == name.endswith("_gemv"), (name, len(loads_before))


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the kernels themselves")
def test_split_decode_counts_after_its_partials_and_merges_after_the_count(tmp_path):
    """What split decode attention's in-kernel merge relies on, which the interpreter (one program at a time)
    cannot show: every thread's partial stores, then a barrier, then one thread's acq_rel GPU-scope count,
    handed to the other threads through shared memory behind a barrier; the merge's loads after it, all at
    L2 (.cg); then the count's reset."""
    for capability, code in compiled_apart(tmp_path, "test_pdl", "compile_split_decode_attention()").items():
        count = re.search(r"@%p\d+ atom\.global\.gpu\.acq_rel\.add\.u32", code)
        assert count and code.count("atom.global") == 2, capability
        before, after = code[:count.start()], code[count.end():]
        assert "bar.sync" in before[before.rfind("st.global"):], capability
        broadcast = re.search(r"st\.shared\S* .*\n\s*(//.*\n\s*)*bar\.sync\s+0;\n\s*ld\.shared", after)
        assert broadcast and "ld.global" not in after[:broadcast.start()], capability
        loads = re.findall(r"ld\.global\S*", after)
        assert loads and set(loads) <= {"ld.global.cg.b32", "ld.global.cg.v4.b32"}, (capability, set(loads))
        reset = after.find("atom.global.gpu.relaxed.exch.b32")
        assert reset > after.rfind("ld.global"), capability


@gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm90")
@pytest.mark.parametrize("method", ["fp8", "int4", "int8"])
def test_gpu_graph_of_pdl_kernels_matches_eager_reference_as_inputs_change(method):
    """A norm -> GEMV -> SiLU·up -> GEMV chain captured in a CUDA graph with PDL, replayed over new inputs
    each time: every replay equals the same kernels launched one by one without PDL (each waits for the
    last write it reads; the GEMVs read only weights before waiting)."""
    from kiln.kernels import activation, norm
    from kiln.kernels.fp8 import fp8_gemv
    from kiln.kernels.weight_only import w4a16_matmul_triton, w8a16_matmul_triton
    from kiln.quantization.fp8 import quantize_fp8_weight
    from kiln.quantization.weight_only import quantize_int4, quantize_int8

    torch.manual_seed(0)
    hidden, inter = 4096, 14336
    w_up = torch.randn(2 * inter, hidden, device="cuda") / hidden ** 0.5
    w_down = torch.randn(hidden, inter, device="cuda") / inter ** 0.5
    if method == "fp8":
        up, down = quantize_fp8_weight(w_up), quantize_fp8_weight(w_down)
        matmul = fp8_gemv
    elif method == "int4":
        up, down = quantize_int4(w_up, 128), quantize_int4(w_down, 128)
        matmul = lambda x, *w: w4a16_matmul_triton(x, *w, 128)  # noqa: E731
    else:
        up, down = quantize_int8(w_up), quantize_int8(w_down)
        matmul = w8a16_matmul_triton
    norm_weight = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5

    def step(x, residual):
        normed, _ = norm.add_rms_norm_triton(x, residual, norm_weight, 1e-5)
        return matmul(activation.silu_mul_triton(matmul(normed, *up)), *down)

    x = torch.zeros(1, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.zeros_like(x)
    step(x, residual)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(x, residual)
    for i in range(20):
        new_x, new_residual = torch.randn_like(x), torch.randn_like(x)
        x.copy_(new_x)
        residual.copy_(new_residual)
        graph.replay()
        expected_residual = new_residual.clone()
        with pdl_disabled():
            expected = step(new_x.clone(), expected_residual)
        torch.cuda.synchronize()
        assert torch.equal(residual, expected_residual), i
        assert torch.equal(out, expected), i
