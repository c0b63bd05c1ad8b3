"""Where a short prompt's time goes: host (Python, launches) against device, for an eager context step.

    PYTHONPATH=src python3 scripts/gpu_profile_prefill.py --out $OUT

A Llama-3-8B-shaped model with narrow layers (32 layers, hidden 1024, 8 heads of 128, 2 KV heads,
vocabulary 32000: the same kernels per step as the 8B model, little device work) in bf16 and fp8:
  * the Executor's TTFT for a 128-token prompt (median of 5 after one warm-up);
  * one eager 128-token forward: host time until it returns (no sync) and device time (CUDA events);
  * cProfile of 10 such forwards: OUT/prefill_host_profile_{quant}.txt, functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402
from gpu_bench import RESULTS, log  # noqa: E402

from kiln import Builder, BuildConfig, Executor, RuntimeConfig  # noqa: E402
from kiln.models.config import ModelConfig  # noqa: E402
from kiln.models.presets import preset_hf_config  # noqa: E402
from kiln.models.source import ModelSource  # noqa: E402
from kiln.runtime.loader import load_engine  # noqa: E402

NARROW = {"hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8, "num_key_value_heads": 2,
          "head_dim": 128, "vocab_size": 32000}


def measure(quant: str, out: Path) -> None:
    engine_dir = Path(f"/tmp/kiln_narrow_{quant}")
    shutil.rmtree(engine_dir, ignore_errors=True)
    config = ModelConfig.from_hf_config({**preset_hf_config("llama-3-8b"), **NARROW})
    source = ModelSource(config=config, checkpoint_dir=None, tokenizer_dir=None, name="llama-3-8b-narrow")
    cfg = BuildConfig(max_batch_size=64, max_input_len=2048, max_seq_len=4096, max_num_tokens=4096,
                      dtype="bfloat16", quantization=quant)
    Builder().build(source, cfg).save(engine_dir, progress=False)
    ex = Executor(load_engine(engine_dir, progress=False), RuntimeConfig())
    vocab = config.vocab_size
    gpu_bench.run_requests(ex, torch.randint(0, vocab, (2, 128)).tolist(), 4)
    RESULTS[f"{quant}_executor_ttft128_ms"] = gpu_bench.ttft(ex, 128, vocab)
    RESULTS[f"{quant}_executor_ttft2048_ms"] = gpu_bench.ttft(ex, 2048, vocab)
    runner = ex.runner
    ex.shutdown()  # the loop thread is gone; the model and buffers stay for the direct forwards below
    model = runner.model
    block = ex.engine.build_config.tokens_per_block
    kv = torch.zeros(config.num_layers, 2, 16, block, config.num_kv_heads, config.head_dim, dtype=torch.bfloat16,
                     device="cuda")
    from kiln.kernels import AttentionMetadata

    n = 128
    tokens = torch.randint(0, vocab, (n,), device="cuda")
    pos = torch.arange(n, device="cuda")
    meta = AttentionMetadata(seq_lens=torch.tensor([n], dtype=torch.int32, device="cuda"),
                             query_start_loc=torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                             block_tables=torch.arange(16, dtype=torch.int32, device="cuda")[None],
                             seq_lens_host=[n], query_lens_host=[n])
    rows = torch.tensor([n - 1], device="cuda")

    def forward():
        with torch.inference_mode():
            return model.forward(tokens, pos, kv, pos.clone(), meta, rows)

    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    host, device = [], []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        forward()
        end.record()
        host.append(time.perf_counter() - t0)
        end.synchronize()
        device.append(start.elapsed_time(end) / 1e3)
    RESULTS[f"{quant}_forward128_host_ms"] = sorted(host)[5] * 1e3
    RESULTS[f"{quant}_forward128_device_ms"] = sorted(device)[5] * 1e3
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        forward()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
    (out / f"prefill_host_profile_{quant}.txt").write_text(text.getvalue())
    shutil.rmtree(engine_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--quant", default="none,fp8")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for quant in args.quant.split(","):
        log(quant)
        measure(quant, out)
        gpu_bench.write_results(out / "gpu_profile_prefill.json")
    gpu_bench.write_results(out / "gpu_profile_prefill.json", "short-prompt host profile")


if __name__ == "__main__":
    main()
