"""Batch-1 (and few-row) matmuls at Llama-3-8B shapes, timed as the model runs them: each kernel replayed
from one CUDA graph over as many distinct weight copies as make >= 400 MB (so every weight comes from
HBM, as in a decode step), time per call = graph time / calls. Every format and launch config against
dense bf16 (cuBLAS) and the copy bandwidth measured in the same run.

    PYTHONPATH=src python3 scripts/sweep_gemv.py --out $OUT [--rows 1] [--formats bf16,fp8,int8,int4]

Prints each (format, shape)'s best config last; every measurement in OUT/sweep_gemv.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MIN_BYTES = 400 << 20


def cfg(n, k, w, s=1, **extra):
    return {"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s, **extra}


# 1 row. FP8 / INT8 sum along K every step, so BLOCK_K up to a whole row of K 4096 costs few registers;
# num_stages is 1 (it changed nothing: docs/results/h200/sweep_gemv_stages.json).
ROW_CANDIDATES = [cfg(n, k, w) for n, k, w in itertools.product((4, 8), (1024, 2048, 4096), (4, 8))]
CANDIDATES = {
    "bf16": [None],
    "fp8": ROW_CANDIDATES,
    "int8": ROW_CANDIDATES,
    # The nine tiles of the 2026-12-03 (sixth session) comparison (benchmarks.md), for the INT4 GEMV of the
    # src on PYTHONPATH (that comparison ran 543debb's and 8f82604's).
    "int4": [cfg(n, k, w) for n, k, w in [(8, 2048, 4), (4, 2048, 4), (16, 2048, 4), (8, 1024, 4), (8, 4096, 4),
                                          (16, 4096, 4), (8, 2048, 8), (16, 2048, 8), (8, 4096, 8)]],
}
# More than one row (--rows): the tensor-core tiles (BLOCK_M 16) of the weight-only kernels.
TILE_CANDIDATES = {
    "bf16": [None],
    "fp8": [None, "scaled_mm"],  # fp8_gemv's own default for the row count; per-token quantization + _scaled_mm
    "int8": [cfg(n, 64, w, st, BLOCK_M=16, GROUP_M=1) for n, w, st in itertools.product((32, 64), (4,), (3, 4))],
    "int4": [cfg(n, 128, w, st, BLOCK_M=16, GROUP_M=1) for n, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3))],
}


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * a.numel() / (start.elapsed_time(end) * 1e-3)


def make_weights(fmt: str, n: int, k: int, copies: int):
    from kiln.quantization.weight_only import quantize_int4, quantize_int8
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    if fmt == "bf16":
        t = (w.to(torch.bfloat16),)
    elif fmt == "fp8":
        scale = w.abs().amax(dim=1, keepdim=True).float() / 448.0
        t = ((w / scale).to(torch.float8_e4m3fn), scale)
    elif fmt == "int8":
        t = quantize_int8(w)
    else:
        t = quantize_int4(w, 128)
    del w
    nbytes = sum(x.numel() * x.element_size() for x in t)
    return [tuple(x.clone() for x in t) for _ in range(copies)], nbytes


def runner(fmt: str, config):
    from kiln.kernels.fp8 import fp8_gemv
    from kiln.kernels.weight_only import w4a16_matmul_triton, w8a16_matmul_triton
    if fmt == "bf16":
        return lambda x, t: x @ t[0].T
    if config == "scaled_mm":
        from kiln.kernels.fp8 import fp8_linear_gpu
        return lambda x, t: fp8_linear_gpu(x, t[0], t[1])
    if fmt == "fp8":
        return lambda x, t: fp8_gemv(x, t[0], t[1], **(config or {}))  # None: its default for the row count
    configs = config and [{"max_rows": 1 << 30, "BLOCK_M": 1, **config}]  # None: the kernels' defaults
    if fmt == "int8":
        return lambda x, t: w8a16_matmul_triton(x, *t, configs=configs)
    return lambda x, t: w4a16_matmul_triton(x, *t, 128, configs=configs)


def reference(fmt: str, x, t):
    from kiln.quantization.weight_only import dequantize_int4, dequantize_int8
    if fmt == "bf16":
        w = t[0].float()
    elif fmt == "fp8":
        w = t[0].float() * t[1]
    elif fmt == "int8":
        w = dequantize_int8(*t)
    else:
        w = dequantize_int4(*t, 128, x.shape[-1])
    return x.float() @ w.T


def time_graph(fn, x, weights, reps=20) -> float:
    outs = [fn(x, t) for t in weights]  # compile, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for t in weights:
            fn(x, t)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del outs
    return start.elapsed_time(end) * 1e-3 / (reps * len(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--formats", default="bf16,fp8,int8,int4")
    parser.add_argument("--budget-s", type=float, default=400)
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    print(torch.__version__, __import__("triton").__version__, torch.cuda.get_device_name(), flush=True)
    copy = copy_bandwidth()
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s", flush=True)
    results, best = [], {}
    for fmt in args.formats.split(","):
        for name, (n, k) in SHAPES.items():
            one, nbytes = make_weights(fmt, n, k, 1)
            copies = max(2, -(-MIN_BYTES // nbytes))
            weights, _ = make_weights(fmt, n, k, copies)
            del one
            x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
            expected = reference(fmt, x, weights[0])
            for config in (CANDIDATES if args.rows == 1 else TILE_CANDIDATES)[fmt]:
                if time.time() > deadline:
                    break
                fn = runner(fmt, config)
                try:
                    err = ((fn(x, weights[0]).float() - expected).abs().max() / expected.abs().max()).item()
                    seconds = time_graph(fn, x, weights)
                except Exception as e:  # a config the compiler refuses
                    print(f"skip {fmt} {name} {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                row = {"format": fmt, "shape": name, "N": n, "K": k, "rows": args.rows, "config": config,
                       "us": seconds * 1e6, "TBps": nbytes / seconds / 1e12, "of_copy": nbytes / seconds / copy,
                       "rel_err": err}
                results.append(row)
                print(json.dumps(row), flush=True)
                key = (fmt, name)
                if key not in best or row["us"] < best[key]["us"]:
                    best[key] = row
            del weights
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep_gemv.json").write_text(json.dumps({"copy_TBps": copy / 1e12, "results": results}, indent=1))
    print(f"\n{'format':6} {'shape':8} {'us':>8} {'TB/s':>6} {'%copy':>6} {'err':>8}  config")
    for (fmt, name), row in best.items():
        print(f"{fmt:6} {name:8} {row['us']:8.1f} {row['TBps']:6.2f} {100 * row['of_copy']:5.0f}% "
              f"{row['rel_err']:8.1e}  {row['config']}")


if __name__ == "__main__":
    main()
