"""The sweep behind kiln.kernels.weight_only.DEFAULT_CONFIGS: every candidate launch config of the
W8A16 / W4A16 matmuls timed at Llama-3-8B shapes, per batch bucket, on this GPU.

    PYTHONPATH=src python3 scripts/sweep_weight_only.py --out $OUT [--budget-s 400]

Prints each (rows, bits, shape)'s fastest config with its weight bandwidth and the dense bf16 matmul's
time; writes every measurement to OUT/weight_only_sweep.json. Correctness is pytest's job
(``tests/test_weight_only.py -m gpu``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from kiln.kernels.weight_only import measure_weight_bandwidth


def config(**launch) -> list[dict]:
    return [{"max_rows": 1 << 30, "GROUP_M": 1, "num_stages": 2, **launch}]


CANDIDATES = {
    1: [config(BLOCK_M=1, BLOCK_N=n, BLOCK_K=k, num_warps=4, num_stages=s)
        for n, k, s in itertools.product((2, 4, 8), (1024, 2048, 4096), (1, 3))]
       + [config(BLOCK_M=1, BLOCK_N=n, BLOCK_K=2048, num_warps=2, num_stages=1) for n in (2, 4)],
    4: [config(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, num_warps=4, num_stages=s)
        for n, k, s in itertools.product((32, 64, 128), (64, 128), (3, 4))],
    256: [config(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=3)
          for m, n, k, w in itertools.product((64, 128), (64, 128), (64, 128), (4, 8))],
}
SHAPES = [(4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): o_proj, gate_up, down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop starting new configs after this")
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    print(torch.__version__, __import__("triton").__version__, torch.cuda.get_device_name(), flush=True)
    results = []
    for rows, candidates in CANDIDATES.items():
        for bits, (out_features, in_features) in itertools.product((4, 8), SHAPES):
            best = None
            for configs in candidates:
                if time.time() > deadline:
                    break
                try:
                    report = measure_weight_bandwidth(rows, out_features, in_features, bits, configs=configs,
                                                      compare_dense=False)
                except Exception as e:  # a config over the GPU's shared memory or registers
                    print(f"skip {configs[0]}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                results.append({"rows": rows, "bits": bits, "N": out_features, "K": in_features,
                                "config": configs[0], **report})
                if best is None or report["seconds"] < best[1]["seconds"]:
                    best = (configs, report)
            if best:
                dense = measure_weight_bandwidth(rows, out_features, in_features, bits, configs=best[0])
                print(f"rows={rows} bits={bits} N={out_features} K={in_features}: {best[0][0]} "
                      f"{best[1]['seconds'] * 1e6:.1f} us, {best[1]['weight_bandwidth_GBps']:.0f} GB/s; "
                      f"dense bf16 {dense['dense_seconds'] * 1e6:.1f} us", flush=True)
    (args.out / "weight_only_sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
