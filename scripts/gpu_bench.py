"""kiln on one GPU, in one call: correctness checks, then the fast-path figures of issue 4.

    PYTHONPATH=src python3 scripts/gpu_bench.py --out $OUT

Steps (each recorded in OUT/gpu_bench.json, a short table printed last):
  1. ceilings: device-to-device copy bandwidth and a bf16 GEMM, measured here;
  2. checks: Triton kernels against their references at real sizes (pytest -m gpu), the bundled
     stories260K model's greedy tokens on the GPU identical to the CPU reference path, the 8B engine's
     logits (Triton plan) against the same weights through the reference kernels;
  3. build the llama-3-8b dummy-weight bf16 engine (time), load it (weights + CUDA graphs, time);
  4. batch-1 decode tok/s (128-token prompt, 256 new tokens) against the floor = weight bytes read per
     token / copy bandwidth; decode throughput at batch 8/32/64/128 (steady-state iterations);
     TTFT for 128- and 2048-token prompts; a profile of one batch-1 decode step by kernel;
  5. HF transformers eager generate on the same weights at batch 1 and 64 (128 in / 128 out).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kiln import Builder, BuildConfig, Executor, KvCacheConfig, Request, RuntimeConfig, SamplingParams
from kiln.convert import AutoModelForCausalLM
from kiln.kernels import AttentionMetadata, KernelOps, reference_plan
from kiln.layers import LayerContext, linear_method, load_parameters
from kiln.models import CausalLM, create_model
from kiln.runtime.llm import DEFAULT_MODEL_DIR

RESULTS: dict = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1. ceilings ----------------------------------------------------------------------------------
def measure_ceilings() -> None:
    n = 1 << 30  # 1 GiB per buffer, far beyond L2
    src = torch.randn(n // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    RESULTS["copy_bandwidth_TBps"] = 2 * n / statistics.median(times) / 1e12
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    RESULTS["gemm_bf16_TFLOPs"] = 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12
    del a, b
    torch.cuda.empty_cache()


# ---- 2. checks ------------------------------------------------------------------------------------
def run_gpu_pytest(targets: list[str], log: Path, key: str) -> None:
    """``pytest -m gpu`` over ``targets`` (files and options); its log at ``log``, its summary line and
    whether it passed in RESULTS under ``key`` and ``key``_ok."""
    with log.open("w") as f:  # written as it runs: a call cut off by its time limit still brings back the log
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               "--durations", "15", *targets], stdout=f, stderr=subprocess.STDOUT, text=True)
    tail = [line for line in log.read_text().strip().splitlines() if line.strip()]
    RESULTS[key] = tail[-1] if tail else f"exit {proc.returncode}"
    RESULTS[f"{key}_ok"] = proc.returncode == 0


def check_kernels(out: Path) -> None:
    run_gpu_pytest(["tests/test_kernels.py", "-x"], out / "pytest_gpu_kernels.log", "kernel_tests")


def check_stories_gpu_vs_cpu(tmp: Path) -> None:
    from kiln import LLM

    prompts = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy named Tom"]
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    source = AutoModelForCausalLM.from_hugging_face(DEFAULT_MODEL_DIR)
    config = BuildConfig(max_batch_size=8, max_input_len=256, max_seq_len=512, max_num_tokens=512)
    results = {}
    for target in ("cpu", "auto"):
        engine_dir = tmp / f"stories_{target}"
        Builder().build(source, config.replace(target=target)).save(engine_dir, progress=False)
        with LLM(engine_dir, progress=False) as llm:
            results[target] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    RESULTS["stories260K_gpu_tokens_equal_cpu"] = results["cpu"] == results["auto"]


def check_engine_logits(engine) -> None:
    """The engine (Triton plan, bf16) and the reference ops (bf16) on the same weights, each against a
    float32 copy of the model: a 128-token prefill then three decode steps, fed the same random tokens.
    The engine passes when its error is within 1.5x the reference path's own bf16 error."""
    model = engine.model
    max_len = engine.build_config.max_seq_len
    ref = _reference_copy(model, model.dtype, max_len)
    fp32 = _reference_copy(model, torch.float32, max_len)
    cfg = model.config
    block = engine.build_config.tokens_per_block
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (131,), device="cuda")
    logits = {}
    for name, m in (("engine", model), ("reference", ref), ("fp32", fp32)):
        kv = torch.zeros(cfg.num_layers, 2, 8, block, cfg.num_kv_heads, cfg.head_dim, dtype=m.dtype, device="cuda")
        logits[name] = []
        for start, n in ((0, 128), (128, 1), (129, 1), (130, 1)):
            pos = torch.arange(start, start + n, device="cuda")
            meta = AttentionMetadata(
                seq_lens=torch.tensor([start + n], dtype=torch.int32, device="cuda"),
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                block_tables=torch.arange(8, dtype=torch.int32, device="cuda")[None],
                seq_lens_host=[start + n], query_lens_host=[n])
            rows = torch.arange(n, device="cuda")
            logits[name].append(m.forward(tokens[start:start + n], pos, kv, pos.clone(), meta, rows))
        del kv
    del fp32
    torch.cuda.empty_cache()

    def rel(name: str) -> float:
        return max(((a - b).norm() / b.norm()).item() for a, b in zip(logits[name], logits["fp32"]))

    RESULTS["engine_logits_rel_err_vs_fp32"] = rel("engine")
    RESULTS["reference_bf16_logits_rel_err_vs_fp32"] = rel("reference")
    RESULTS["engine_greedy_agrees_with_fp32"] = all(
        torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(logits["engine"][1:], logits["fp32"][1:]))
    RESULTS["engine_logits_ok"] = rel("engine") <= 1.5 * rel("reference") + 1e-3


def _reference_copy(model: CausalLM, dtype: torch.dtype, max_len: int) -> CausalLM:
    """The engine's (dense) weights cast to ``dtype``, run by the reference ops."""
    ctx = LayerContext(KernelOps(reference_plan()), linear_method("none"), dtype, model.device)
    copy = create_model(model.config, ctx, max_len)
    load_parameters(copy, {name: p.detach().to(dtype) for name, p in model.named_parameters()})
    return copy


# ---- 3./4. kiln ----------------------------------------------------------------------------------
# Issue 16 part 4's sampled run: temperature 0.8, top-p 0.95, one seed per request.
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


def run_requests(ex: Executor, prompts: list[list[int]], max_tokens: int, sampled: bool = False) -> list:
    """Greedy, or (sampled) SAMPLED seeded per request, ignoring EOS; the final results in prompt order."""
    def params(i: int) -> SamplingParams:
        if sampled:
            return SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=i, **SAMPLED)
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [ex.enqueue_request(Request(p, sampling_params=params(i))) for i, p in enumerate(prompts)]
    done = {}
    while len(done) < len(ids):
        for r in ex.await_responses(timeout=5.0):
            if r.has_error():
                raise RuntimeError(r.error_msg)
            if r.result.is_final:
                done[r.request_id] = r.result
    return [done[i] for i in ids]


def graph_replay_ms(ex: Executor, batch: int) -> float | None:
    """GPU time of the batch-size decode graph alone (CUDA events, median of 50 replays)."""
    if batch not in ex.runner.graphs:
        return None
    graph, _ = ex.runner.graphs[batch]
    times = []
    for _ in range(60):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[10:])


def decode_throughput(ex: Executor, batch: int, vocab: int, new_tokens: int = 64) -> float:
    """Steady state: median time of iterations where every running sequence decodes."""
    prompts = torch.randint(0, vocab, (batch, 128)).tolist()
    ex.get_latest_iteration_stats()
    run_requests(ex, prompts, new_tokens)
    stats = [s for s in ex.get_latest_iteration_stats() if s.num_decode_tokens == batch and s.num_context_tokens == 0]
    return batch / (statistics.median(s.iteration_time_ms for s in stats) / 1e3)


def ttft(ex: Executor, length: int, vocab: int, reps: int = 5) -> float:
    times = []
    for _ in range(reps + 1):
        (res,) = run_requests(ex, [torch.randint(0, vocab, (length,)).tolist()], 1)
        times.append(res.first_token_time - res.arrival_time)
    return statistics.median(times[1:]) * 1e3


def profile_decode(ex: Executor, vocab: int, out: Path, batch: int) -> None:
    """Kernel time by name over 16 decode steps (after one 128-token prefill per sequence)."""
    from torch.profiler import ProfilerActivity, profile

    prompts = torch.randint(0, vocab, (batch, 128)).tolist()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run_requests(ex, prompts, 17)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (out / f"profile_decode_b{batch}.txt").write_text(table)


def bench_kiln(engine_dir: Path, out: Path, check: bool) -> None:
    from kiln.runtime.loader import load_engine

    t0 = time.perf_counter()
    engine = load_engine(engine_dir)
    load_s = time.perf_counter() - t0
    if check:
        check_engine_logits(engine)
    t0 = time.perf_counter()
    ex = Executor(engine, RuntimeConfig(max_batch_size=128, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.5)))
    RESULTS["engine_load_s"] = load_s + time.perf_counter() - t0  # weights, KV pool, graphs
    RESULTS["graph_capture_s"] = ex.runner.graph_capture_seconds
    RESULTS["kv_blocks"] = ex.pool.num_blocks
    cfg = ex.engine.model_config
    vocab = cfg.vocab_size
    run_requests(ex, torch.randint(0, vocab, (4, 128)).tolist(), 8)  # warm-up
    # batch-1 decode: 128-token prompt, 256 new tokens; decode rate from first token to finish
    rates = []
    for _ in range(3):
        (res,) = run_requests(ex, [torch.randint(0, vocab, (128,)).tolist()], 256)
        rates.append(255 / (res.finish_time - res.first_token_time))
    RESULTS["b1_decode_tok_s"] = statistics.median(rates)
    stats = [s for s in ex.get_latest_iteration_stats() if s.batch_size == 1 and s.num_context_tokens == 0]
    RESULTS["b1_iteration_ms_median"] = statistics.median(s.iteration_time_ms for s in stats) if stats else None
    RESULTS["b1_graph_replay_ms"] = graph_replay_ms(ex, 1)
    if RESULTS["b1_iteration_ms_median"] is not None and RESULTS["b1_graph_replay_ms"] is not None:
        RESULTS["b1_host_overhead_ms"] = RESULTS["b1_iteration_ms_median"] - RESULTS["b1_graph_replay_ms"]
    weight_bytes = ex.engine.manifest.memory_plan["weight_bytes"] - cfg.vocab_size * cfg.hidden_size * 2 * (not cfg.tie_word_embeddings)
    RESULTS["bytes_per_token_GB"] = weight_bytes / 1e9
    RESULTS["floor_tok_s"] = RESULTS["copy_bandwidth_TBps"] * 1e12 / weight_bytes
    RESULTS["b1_pct_of_floor"] = 100 * RESULTS["b1_decode_tok_s"] / RESULTS["floor_tok_s"]
    for b in (8, 32, 64, 128):
        RESULTS[f"decode_b{b}_tok_s"] = decode_throughput(ex, b, vocab)
    RESULTS["ttft_128_ms"] = ttft(ex, 128, vocab)
    RESULTS["ttft_2048_ms"] = ttft(ex, 2048, vocab)
    for batch in (1, 64):
        profile_decode(ex, vocab, out, batch)
    ex.shutdown()
    del ex
    gc.collect()
    torch.cuda.empty_cache()


# ---- 5. HF baseline ------------------------------------------------------------------------------
def bench_hf(engine_dir: Path) -> None:
    """HF eager generate on the engine's own weights (mapped back to HF names by the bench tool)."""
    from kiln.bench.hf_backend import model_from_engine
    from kiln.engine.manifest import EngineManifest

    manifest = EngineManifest.read(engine_dir)
    model = model_from_engine(engine_dir, manifest, torch.device("cuda"), progress=False)
    vocab = manifest.model_config.vocab_size
    for batch in (1, 64):
        ids = torch.randint(0, vocab, (batch, 128), device="cuda")
        with torch.inference_mode():
            model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
        RESULTS[f"hf_eager_b{batch}_tok_s"] = batch * 128 / (time.perf_counter() - t0)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--engine-dir", default="/tmp/kiln_engine_8b")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: checks,kernels,hf,build")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    logging.basicConfig(level=logging.INFO, filename=out / "gpu_bench.log", format="%(asctime)s %(name)s %(message)s")
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    log("ceilings")
    measure_ceilings()
    if "kernels" not in skip:
        log("kernel tests (pytest -m gpu)")
        check_kernels(out)
    if "checks" not in skip:
        log("stories260K GPU vs CPU")
        check_stories_gpu_vs_cpu(Path("/tmp/kiln_stories"))
    engine_dir = Path(args.engine_dir)
    if "build" not in skip or not (engine_dir / "manifest.json").exists():
        log(f"build {args.preset} dummy bf16")
        t0 = time.perf_counter()
        source = AutoModelForCausalLM.from_preset(args.preset)
        cfg = BuildConfig(max_batch_size=128, max_input_len=2048, max_seq_len=4096, max_num_tokens=8192, dtype="bfloat16")
        engine = Builder().build(source, cfg)
        RESULTS["build_plan_s"] = time.perf_counter() - t0
        engine.save(engine_dir)
        RESULTS["build_total_s"] = time.perf_counter() - t0
        (out / "kernel_plan.json").write_text(json.dumps(engine.manifest.kernel_plan, indent=1))
    log("kiln benchmarks")
    bench_kiln(engine_dir, out, check="checks" not in skip)
    if "hf" not in skip:
        log("HF eager baseline")
        bench_hf(engine_dir)
        RESULTS["b64_kiln_over_hf"] = RESULTS["decode_b64_tok_s"] / RESULTS["hf_eager_b64_tok_s"]
    write_results(out / "gpu_bench.json", "kiln GPU bench")


def write_results(path: Path, title: str | None = None) -> None:
    """RESULTS as JSON at ``path``; with a title, also printed as a table (the device call's last lines)."""
    path.write_text(json.dumps(RESULTS, indent=1))
    if title is not None:
        print(f"\n=== {title} ===")
        for k, v in RESULTS.items():
            print(f"{k:<52} {v:.4g}" if isinstance(v, float) else f"{k:<52} {v}")


if __name__ == "__main__":
    main()
