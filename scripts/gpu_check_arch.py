"""The architecture step on one GPU, in one short call: kernels, correctness and speed of the new model layer.

    PYTHONPATH=src python3 scripts/gpu_check_arch.py --out $OUT

  1. ceilings (copy bandwidth, bf16 GEMM) and the Triton kernel tests at real sizes (pytest -m gpu:
     tests/test_kernels.py, tests/test_family_kernels.py, tests/test_weight_only.py, tests/test_fp8.py);
  2. stories260K: greedy tokens on the GPU equal the CPU reference path;
  3. llama-3-8b dummy bf16 (max batch 512, 8192 tokens per iteration, as docs/benchmarks.md): engine
     logits against a float32 copy, batch-1 decode against the floor, offline 128/128 (2048 requests);
  4. gpt-j-6b dummy bf16: engine logits against a float32 copy (LayerNorm, GELU, interleaved partial
     rotary through Triton), batch-1 decode from its CUDA graph against the floor.
A short table is printed last; OUT/gpu_check_arch.json holds every figure.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (the shared checks: ceilings, stories, engine logits, request helpers)
from gpu_bench import RESULTS, log  # noqa: E402

from kiln import Builder, BuildConfig, Executor, KvCacheConfig, RuntimeConfig  # noqa: E402
from kiln.convert import AutoModelForCausalLM  # noqa: E402
from kiln.runtime.loader import load_engine  # noqa: E402


def kernel_tests(out: Path) -> None:
    gpu_bench.run_gpu_pytest(["tests/test_kernels.py", "tests/test_family_kernels.py", "tests/test_weight_only.py",
                              "tests/test_fp8.py"], out / "pytest_gpu_kernels.log", "kernel_tests")


def build(preset: str, engine_dir: Path, max_batch_size: int) -> None:
    t0 = time.perf_counter()
    cfg = BuildConfig(max_batch_size=max_batch_size, max_input_len=1024, max_num_tokens=8192,
                      dtype="bfloat16")
    Builder().build(AutoModelForCausalLM.from_preset(preset), cfg).save(engine_dir, progress=False)
    RESULTS[f"{preset}_build_s"] = time.perf_counter() - t0


def measure(preset: str, engine_dir: Path, throughput_requests: int) -> None:
    engine = load_engine(engine_dir, progress=False)
    gpu_bench.check_engine_logits(engine)
    for key in ("engine_logits_rel_err_vs_fp32", "reference_bf16_logits_rel_err_vs_fp32", "engine_greedy_agrees_with_fp32",
                "engine_logits_ok"):
        RESULTS[f"{preset}_{key}"] = RESULTS.pop(key)
    ex = Executor(engine, RuntimeConfig(kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.9)))
    cfg = engine.model_config
    vocab = cfg.vocab_size
    gpu_bench.run_requests(ex, torch.randint(0, vocab, (4, 128)).tolist(), 8)  # warm-up
    rates = []
    for _ in range(3):
        (res,) = gpu_bench.run_requests(ex, [torch.randint(0, vocab, (128,)).tolist()], 256)
        rates.append(255 / (res.finish_time - res.first_token_time))
    RESULTS[f"{preset}_b1_decode_tok_s"] = statistics.median(rates)
    RESULTS[f"{preset}_b1_graph_replay_ms"] = gpu_bench.graph_replay_ms(ex, 1)
    embedding = cfg.vocab_size * cfg.hidden_size * 2
    read = engine.manifest.memory_plan["weight_bytes"] - (0 if cfg.tie_word_embeddings else embedding)
    RESULTS[f"{preset}_floor_tok_s"] = RESULTS["copy_bandwidth_TBps"] * 1e12 / read
    RESULTS[f"{preset}_b1_pct_of_floor"] = 100 * RESULTS[f"{preset}_b1_decode_tok_s"] / RESULTS[f"{preset}_floor_tok_s"]
    if throughput_requests:
        prompts = torch.randint(0, vocab, (throughput_requests, 128)).tolist()
        t0 = time.perf_counter()
        gpu_bench.run_requests(ex, prompts, 128)
        RESULTS[f"{preset}_128_128_tok_s"] = throughput_requests * 128 / (time.perf_counter() - t0)
    ex.shutdown()
    del ex, engine
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--skip", default="", help="comma list: kernels,stories,llama,gptj")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    logging.basicConfig(level=logging.INFO, filename=out / "gpu_check_arch.log", format="%(asctime)s %(name)s %(message)s")
    RESULTS["device"] = torch.cuda.get_device_name()
    log("ceilings")
    gpu_bench.measure_ceilings()
    if "kernels" not in skip:
        log("kernel tests")
        kernel_tests(out)
    if "stories" not in skip:
        log("stories260K GPU vs CPU")
        gpu_bench.check_stories_gpu_vs_cpu(Path("/tmp/kiln_stories"))
    for key, preset, batch, requests in (("llama", "llama-3-8b", 512, 2048), ("gptj", "gpt-j-6b", 64, 0)):
        if key in skip:
            continue
        engine_dir = Path(f"/tmp/kiln_{preset}")
        log(f"{preset}: build")
        build(preset, engine_dir, batch)
        log(f"{preset}: measure")
        measure(preset, engine_dir, requests)
        shutil.rmtree(engine_dir, ignore_errors=True)
        gpu_bench.write_results(out / "gpu_check_arch.json")  # what is measured so far survives a time-out
    gpu_bench.write_results(out / "gpu_check_arch.json", "architecture step on the GPU")


if __name__ == "__main__":
    main()
