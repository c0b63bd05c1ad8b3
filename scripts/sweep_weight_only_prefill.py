"""Where dequantize-then-cuBLAS overtakes the Triton W4A16 / W8A16 kernels: both paths, and the dense
bf16 matmul, timed at 16-2048 rows on the Llama-3-8B shapes, for kiln.kernels.weight_only's
DEQUANT_MIN_ROWS (and DEQUANTIZE_CONFIG's tile).

    PYTHONPATH=src python3 scripts/sweep_weight_only_prefill.py --out $OUT [--budget-s 150]

First the dequantization kernel alone, a few tiles per (bits, shape), with the bandwidth each reaches
(packed bytes read + 2 bytes per weight written); then per (bits, shape, rows): "triton" is
TENSOR_CORE_CONFIGS (the tensor-core kernel at every row count), "dequant+cublas" DEQUANTIZE_CONFIG's
tile forced at every row count, "dense" x @ W.T in bf16 (medians, L2 flushed: measure_weight_bandwidth).
Prints the fewest rows from which dequant+cublas wins at every larger count swept, per (bits, shape),
and the table last; writes everything to OUT/weight_only_prefill_sweep.json. About 1.5 minutes on an
H200, most of it compiling; --budget-s stops starting new measurements after that many seconds.
Correctness is pytest's job (tests/test_weight_only.py -m gpu).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from kiln.kernels.weight_only import (DEQUANT_MIN_ROWS, DEQUANTIZE_CONFIG, TENSOR_CORE_CONFIGS, measure_dequantize,
                                      measure_weight_bandwidth)

DEVICE = "cuda"
ROWS = (16, 32, 64, 128, 256, 512, 2048)
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down
BITS = (4, 8)
GROUP_SIZE = 128
TILES = [{"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4}, {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4},
         {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4}, {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 8}]


def shape_name(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def crossover(rows: list[dict]) -> int | None:
    """The fewest rows from which dequant+cublas is faster at every larger row count measured."""
    first = None
    for row in sorted(rows, key=lambda r: r["rows"]):
        if row["dequantize_seconds"] < row["seconds"]:
            first = first or row["rows"]
        else:
            first = None
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no measurement after this")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(torch.__version__, __import__("triton").__version__, device_name, flush=True)
    results = {"device": device_name, "group_size": GROUP_SIZE, "dequant_min_rows": DEQUANT_MIN_ROWS,
               "dequantize_config": DEQUANTIZE_CONFIG, "tiles": [], "matmuls": [], "skipped": []}

    for bits, (out_features, in_features) in itertools.product(BITS, SHAPES):
        for tile in TILES:
            if time.time() > deadline:
                results["skipped"].append({"bits": bits, "N": out_features, "K": in_features, "tile": tile})
                continue
            report = measure_dequantize(out_features, in_features, bits, GROUP_SIZE, config=tile, device=DEVICE)
            results["tiles"].append({"bits": bits, "N": out_features, "K": in_features, "tile": tile, **report})
            print(f"dequantize INT{bits} {shape_name(out_features, in_features)} {tile}: "
                  f"{report['seconds'] * 1e6:.1f} us, {report['bandwidth_GBps']:.0f} GB/s", flush=True)

    dense_seconds: dict[tuple[int, int, int], float] = {}  # the same for both bits: timed once
    for (out_features, in_features), rows, bits in itertools.product(SHAPES, ROWS, BITS):
        if time.time() > deadline:
            results["skipped"].append({"bits": bits, "N": out_features, "K": in_features, "rows": rows})
            continue
        key = (out_features, in_features, rows)
        report = measure_weight_bandwidth(rows, out_features, in_features, bits, GROUP_SIZE,
                                          configs=TENSOR_CORE_CONFIGS[bits], device=DEVICE,
                                          compare_dense=key not in dense_seconds, dequantize_config=DEQUANTIZE_CONFIG)
        dense_seconds.setdefault(key, report.get("dense_seconds"))
        results["matmuls"].append({"rows": rows, "bits": bits, "N": out_features, "K": in_features, **report,
                                   "dense_seconds": dense_seconds[key]})
        print(f"INT{bits} {shape_name(out_features, in_features)} rows {rows}: triton {report['seconds'] * 1e6:.1f} "
              f"us, dequant+cublas {report['dequantize_seconds'] * 1e6:.1f} us, "
              f"dense {dense_seconds[key] * 1e6:.1f} us", flush=True)
    (args.out / "weight_only_prefill_sweep.json").write_text(json.dumps(results, indent=1))

    if results["skipped"]:
        print(f"budget spent: {len(results['skipped'])} measurements skipped (listed in the JSON)")
    print("\nfastest dequantization tile, and the rows from which dequant+cublas wins "
          f"(DEQUANT_MIN_ROWS now {DEQUANT_MIN_ROWS}):")
    for bits, (out_features, in_features) in itertools.product(BITS, SHAPES):
        tiles = [t for t in results["tiles"] if (t["bits"], t["N"], t["K"]) == (bits, out_features, in_features)]
        rows = [r for r in results["matmuls"] if (r["bits"], r["N"], r["K"]) == (bits, out_features, in_features)]
        best = min(tiles, key=lambda t: t["seconds"], default=None)
        tile = f"{best['tile']} {best['seconds'] * 1e6:.1f} us {best['bandwidth_GBps']:.0f} GB/s" if best else "-"
        first = crossover(rows) if rows else None
        wins = f"from {first} rows" if first else f"at none up to {max(ROWS)} rows" if rows else "not measured"
        print(f"  INT{bits} {shape_name(out_features, in_features):<11} tile {tile}; dequant+cublas wins {wins}")
    print(f"\n{'rows':>5} {'shape (N x K)':>13} {'bits':>4} {'triton us':>10} {'dequant+cublas us':>18} "
          f"{'dense bf16 us':>14}")
    for r in sorted(results["matmuls"], key=lambda r: (r["bits"], r["N"], r["K"], r["rows"])):
        print(f"{r['rows']:>5} {shape_name(r['N'], r['K']):>13} {r['bits']:>4} {r['seconds'] * 1e6:>10.1f} "
              f"{r['dequantize_seconds'] * 1e6:>18.1f} {r['dense_seconds'] * 1e6:>14.1f}")


if __name__ == "__main__":
    main()
