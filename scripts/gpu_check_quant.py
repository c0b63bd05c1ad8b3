"""Quantized engines and the hot path on one GPU, in one call per group of phases:

    PYTHONPATH=src python3 scripts/gpu_check_quant.py --out $OUT --phases tests,tuning,none,fp8
    PYTHONPATH=src python3 scripts/gpu_check_quant.py --out $OUT --phases gemv,int8_wo,int4_wo
    PYTHONPATH=src python3 scripts/gpu_check_quant.py --out $OUT --isolate --phases none@1024:128_128,fp8:b1

Phases:
  tests    pytest -m gpu over the whole suite (every GPU-marked test: kernels, executor, engines);
  tuning   an engine built for sm90 with the GPU hidden (kernel plan untuned) tunes at its first load on
           the GPU, saves the plan, and the second load does nothing (issue 15 part 4);
  sampler  a step's sampling over Llama-3's vocabulary at 1 and 512 rows, by part (sampler_costs);
  gemv     weight bandwidth of the batch-1 matmuls (W4A16, W8A16, FP8 W8A16 GEMV, dense bf16) at
           Llama-3-8B shapes against the copy bandwidth measured in the same run;
  none / fp8 / int8_wo / int4_wo
           a llama-3-8b dummy engine of that quantization (max batch 512, 8192 tokens per iteration):
           batch-1 decode (against the floor: weight bytes read per token / copy bandwidth), the batch-1
           graph replay, the same two with the kernels launched without PDL (b1_nopdl) and with the plan
           less its norm fold (b1_unfolded: the same engine, the norms' kernels between the GEMVs) and without
           the KV write folded into qkv's GEMV (b1_rotary: the rotary kernel after it), batch-16 decode,
           TTFT at 128 and 2048 tokens, offline 128/128 (2048 requests);
           the same sampled (temperature 0.8, top-p 0.95, seeded: 128_128_sampled), 2048/128 (256
           requests), a batch-1 and a batch-16 profile by kernel (profile, profile16; profileN for batch N);
           ``fp8:ttft+128_128`` picks figures; ``none@1024:128_128`` builds for max batch 1024 (not 512).
OUT/gpu_check_quant.json holds every figure; a short table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import unittest.mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402
from gpu_bench import RESULTS, log  # noqa: E402

from kiln import Builder, BuildConfig, Executor, KvCacheConfig, RuntimeConfig  # noqa: E402
from kiln.convert import AutoModelForCausalLM  # noqa: E402
from kiln.kernels.triton_jit import pdl_disabled  # noqa: E402
from kiln.layers import DenseLinearMethod  # noqa: E402
from kiln.runtime.llm import DEFAULT_MODEL_DIR  # noqa: E402
from kiln.runtime.loader import load_engine  # noqa: E402

PRESET = "llama-3-8b"
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def run_tests(out: Path) -> None:
    # openai and schemathesis are not on the GPU machine; these files hold no GPU tests
    gpu_bench.run_gpu_pytest(["tests", "--ignore", "tests/test_serve.py", "--ignore", "tests/test_serve_fuzz.py",
                              "--timeout", "600"], out / "pytest_gpu.log", "gpu_tests")


def first_load_tuning(tmp: Path) -> None:
    engine_dir = tmp / "stories_sm90_untuned"
    shutil.rmtree(engine_dir, ignore_errors=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "kiln.cli", "build", str(DEFAULT_MODEL_DIR), "--output", str(engine_dir),
                    "--target", "sm90", "--max-batch-size", "8"], env=env, check=True, capture_output=True)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    RESULTS["tuning_built_untuned"] = not manifest.get("kernel_plan_tuned", True)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        engine = load_engine(engine_dir, progress=False)
        times.append(time.perf_counter() - t0)
        del engine
    RESULTS["tuning_first_load_s"], RESULTS["tuning_second_load_s"] = times
    RESULTS["tuning_saved_plan"] = json.loads((engine_dir / "manifest.json").read_text()).get("kernel_plan_tuned")


def gemv_bandwidth() -> None:
    """Median over 50 launches after warm-up of y = x W^T at one row; L2 (50 MB) is flushed by the
    weights themselves for every shape above 28 MB, and for the smaller ones by a 256 MB scratch write."""
    from kiln.kernels.fp8 import fp8_linear
    from kiln.kernels.weight_only import w4a16_matmul_triton, w8a16_matmul_triton
    from kiln.quantization.fp8 import quantize_fp8_weight
    from kiln.quantization.weight_only import quantize_int4, quantize_int8

    scratch = torch.empty(64 << 20, dtype=torch.float32, device="cuda")

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(50):
            scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        q8, s8 = quantize_int8(w, torch.float32)
        q4, s4, z4 = quantize_int4(w, 128, torch.float16)
        f8, f8s = quantize_fp8_weight(w.float(), "channel")
        cases = {
            "bf16": (lambda: x @ w.T, w.numel() * 2),
            "int8": (lambda: w8a16_matmul_triton(x, q8, s8), q8.numel() + s8.numel() * 4),
            "int4": (lambda: w4a16_matmul_triton(x, q4, s4, z4, 128), q4.numel() * 4 + s4.numel() * 3),
            "fp8": (lambda: fp8_linear(x, f8, f8s), f8.numel() + f8s.numel() * 4),
        }
        for kind, (fn, nbytes) in cases.items():
            seconds = timed(fn)
            RESULTS[f"gemv_{name}_{kind}_us"] = seconds * 1e6
            RESULTS[f"gemv_{name}_{kind}_TBps"] = nbytes / seconds / 1e12
        del w, q8, s8, q4, s4, z4, f8, f8s
    del scratch
    torch.cuda.empty_cache()


FIGURES = ("b1_nopdl", "b1_unfolded", "b1_rotary", "b1", "b16", "ttft", "128_128", "128_128_sampled", "2048_128",
           "profile", "profile16")


def sampler_costs() -> None:
    """GPU time (CUDA events, median of 20 after warm-up) of a step's sampling over [rows, 128256] float32
    logits (N(0, 2), so top-p 0.95 keeps a large share, as on dummy weights): greedy argmax (torch's, and
    the Triton kernel's the sampler takes on CUDA), the race in
    torch (noise passes, then argmax) and in the Triton kernel, the nucleus race kernel at top-p 0.95 (and
    its mean races per row), the sort and masks alone (now top-k's path only), and sample() whole at
    temperature 0.8 with and without top-p 0.95 and with top-k 50 + top-p 0.95 (the sort's path; seeded
    rows)."""
    from kiln.config import SamplingParams
    from kiln.kernels.sampling import (argmax_triton, exponential_race_ref, exponential_race_triton,
                                       nucleus_race_triton)
    from kiln.runtime.sampler import SamplingRow, build_sampling_tensors, sample, top_k_top_p_min_p
    from kiln.runtime.staging import HostStaging

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    vocab = 128256
    staging = HostStaging(torch.device("cuda"), capacity=1 << 16)
    for rows in (1, 512):
        logits = torch.randn(rows, vocab, device="cuda") * 2
        seeds = torch.arange(rows, device="cuda", dtype=torch.int64)
        steps = torch.full((rows,), 7, device="cuda", dtype=torch.int64)
        figures = {"argmax": lambda: logits.argmax(dim=-1), "argmax_triton": lambda: argmax_triton(logits),
                   "race_torch": lambda: exponential_race_ref(logits, seeds, steps),
                   "race_triton": lambda: exponential_race_triton(logits, seeds, steps)}
        nucleus = (logits, torch.full((rows,), 0.95, device="cuda"), torch.full((rows,), float("-inf"), device="cuda"),
                   seeds, steps)
        figures["nucleus_triton"] = lambda nucleus=nucleus: nucleus_race_triton(*nucleus)
        RESULTS[f"sampler_b{rows}_nucleus_races_mean"] = nucleus_race_triton(*nucleus)[1].float().mean().item()
        for top_k, top_p in ((0, 1.0), (0, 0.95), (50, 0.95)):
            params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, seed=0)
            batch = [SamplingRow(params, i, (), [1] * 128, 128, 5) for i in range(rows)]
            name = "top_k_top_p" if top_k else "top_p" if top_p < 1 else "temperature"
            figures[f"sample_{name}"] = lambda batch=batch: (staging.next_step(), sample(logits, batch, staging))
            if top_k:
                t = build_sampling_tensors(batch, vocab, staging)  # cloned: the staging buffers are reused
                t = dataclasses.replace(t, top_k=t.top_k.clone(), top_p=t.top_p.clone(), min_p=t.min_p.clone())
                figures["top_k_top_p_masks"] = lambda t=t: top_k_top_p_min_p(logits, t)
        for name, fn in figures.items():
            RESULTS[f"sampler_b{rows}_{name}_ms"] = timed(fn)


def timeline(stats: list, wall_s: float, path: Path) -> None:
    """Where an offline run's time went: steps with prompt tokens (context, maybe with decodes beside them)
    against decode-only steps, their counts, tokens and summed times, and the wall time no step covered;
    every step's (time ms, context tokens, decode tokens, batch) in ``path``."""
    context = [s for s in stats if s.num_context_tokens]
    decode = [s for s in stats if not s.num_context_tokens]

    def summary(steps: list) -> dict:
        ms = sum(s.iteration_time_ms for s in steps)
        return {"steps": len(steps), "ms": ms, "context_tokens": sum(s.num_context_tokens for s in steps),
                "decode_tokens": sum(s.num_decode_tokens for s in steps),
                "median_batch": statistics.median(s.batch_size for s in steps) if steps else 0}

    doc = {"wall_ms": wall_s * 1e3, "context_steps": summary(context), "decode_steps": summary(decode),
           "uncovered_ms": wall_s * 1e3 - sum(s.iteration_time_ms for s in stats),
           "steps": [(round(s.iteration_time_ms, 3), s.num_context_tokens, s.num_decode_tokens, s.batch_size)
                     for s in stats]}
    path.write_text(json.dumps(doc))


def batch1_decode(ex: Executor, key: str) -> None:
    """Batch-1 decode rate (median of 3 requests of 256 tokens after a 128-token prompt, first token
    excluded) and the batch-1 graph replay's time."""
    vocab = ex.engine.model_config.vocab_size
    rates = []
    for _ in range(3):
        (res,) = gpu_bench.run_requests(ex, [torch.randint(0, vocab, (128,)).tolist()], 256)
        rates.append(255 / (res.finish_time - res.first_token_time))
    RESULTS[f"{key}_b1_tok_s"] = sorted(rates)[1]
    RESULTS[f"{key}_b1_replay_ms"] = gpu_bench.graph_replay_ms(ex, 1)


def engine_phase(quant: str, tmp: Path, out: Path, figures: set[str], max_batch_size: int = 512) -> None:
    engine_dir = tmp / f"engine_{quant}"
    key = quant if max_batch_size == 512 else f"{quant}_mb{max_batch_size}"  # another engine shape: apart
    shutil.rmtree(engine_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cfg = BuildConfig(max_batch_size=max_batch_size, max_input_len=2048, max_seq_len=4096, max_num_tokens=8192,
                      dtype="bfloat16", quantization=quant)
    Builder().build(AutoModelForCausalLM.from_preset(PRESET), cfg).save(engine_dir, progress=False)
    RESULTS[f"{key}_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = load_engine(engine_dir, verify=False, progress=False)
    engine_load_s = time.perf_counter() - t0
    # The weight shapes whose build timing moved them off their default kernel: the GEMV instead of cuBLAS
    # for an unquantized weight (with its row buckets), other tiles for a weight-only one, other GEMV configs
    # (with their row buckets) for an FP8 one.
    for op in ("dense_linear", "rms_norm_linear", "weight_only_linear", "fp8_linear"):
        tuned = engine.manifest.kernel_plan.get(op, {}).get("config", {}).get("shapes", {})
        if op in engine.manifest.kernel_plan:
            buckets = {shape: ":" + "+".join(tuned[shape]) if op in ("dense_linear", "fp8_linear") else ""
                       for shape in tuned}
            RESULTS[f"{key}_{op}_tuned"] = ", ".join(shape + buckets[shape] for shape in sorted(tuned)) or "none"

    def executor() -> tuple[Executor, float]:
        """An executor (KV pool, CUDA graphs), warmed up, and the seconds its making took (warm-up apart).
        Its memory in GB goes to RESULTS (key_memory): free and allocated before it, its KV pool, allocated
        after it and at its peak."""
        gib = 2 ** 30
        memory = RESULTS.setdefault(f"{key}_memory", {})
        memory.update(free_before=torch.cuda.mem_get_info()[0] / gib,
                      allocated_before=torch.cuda.memory_allocated() / gib)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ex = Executor(engine, RuntimeConfig(kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.9)))
        made_s = time.perf_counter() - t0
        memory.update(kv_pool=ex.pool.num_blocks * engine.manifest.memory_plan["kv_bytes_per_block"] / gib,
                      allocated_after=torch.cuda.memory_allocated() / gib, peak=torch.cuda.max_memory_allocated() / gib)
        try:
            gpu_bench.run_requests(ex, torch.randint(0, vocab, (4, 128)).tolist(), 8)  # warm-up
        except Exception:
            ex.shutdown()  # its loop thread would keep it, and its KV pool, alive
            raise
        return ex, made_s

    mcfg = engine.model_config
    vocab = mcfg.vocab_size
    if "b1_unfolded" in figures and "rms_norm_linear" in engine.manifest.kernel_plan:
        # The same engine loaded with its plan less the norm fold (the norms' kernels run, the Linears keep
        # their weights), apart from and before the usual one: batch 1 with and without the fold.
        plan = {op: entry for op, entry in engine.manifest.kernel_plan.items() if op != "rms_norm_linear"}
        unfolded = load_engine(engine_dir, verify=False, progress=False, kernel_plan=plan)
        ex = Executor(unfolded, RuntimeConfig(kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.5)))
        try:
            gpu_bench.run_requests(ex, torch.randint(0, vocab, (4, 128)).tolist(), 8)  # warm-up
            batch1_decode(ex, f"{key}_unfolded")
        finally:
            ex.shutdown()
            del ex, unfolded
            gc.collect()
            torch.cuda.empty_cache()
    def batch1_apart(name: str, context) -> None:
        """Batch 1 of an executor of its own, made and run inside ``context`` (which changes a choice its CUDA
        graphs capture), before the usual one."""
        with context:
            ex, _ = executor()
            try:
                batch1_decode(ex, f"{key}_{name}")
            finally:
                ex.shutdown()
                del ex
                gc.collect()

    if "b1_rotary" in figures:
        # The KV write not folded into qkv's GEMV (the rotary kernel runs after it): the method says it does
        # not fold it. (A plain function: a Mock would keep every call's arguments, each forward's activations.)
        batch1_apart("rotary", unittest.mock.patch.object(DenseLinearMethod, "folds_kv_write", lambda *args: False))
    if "b1_nopdl" in figures:  # graphs captured without PDL
        batch1_apart("nopdl", pdl_disabled())
    ex, made_s = executor()
    RESULTS[f"{key}_load_s"] = engine_load_s + made_s  # the engine and its executor, as in earlier results
    try:
        if "b1" in figures:
            batch1_decode(ex, key)
            embedding = vocab * mcfg.hidden_size * 2
            read = engine.manifest.memory_plan["weight_bytes"] - (0 if mcfg.tie_word_embeddings else embedding)
            RESULTS[f"{key}_floor_tok_s"] = RESULTS["copy_bandwidth_TBps"] * 1e12 / read
            RESULTS[f"{key}_b1_pct_floor"] = 100 * RESULTS[f"{key}_b1_tok_s"] / RESULTS[f"{key}_floor_tok_s"]
        if "b16" in figures:
            RESULTS[f"{key}_b16_tok_s"] = gpu_bench.decode_throughput(ex, 16, vocab)
        if "ttft" in figures:
            RESULTS[f"{key}_ttft128_ms"] = gpu_bench.ttft(ex, 128, vocab)
            RESULTS[f"{key}_ttft2048_ms"] = gpu_bench.ttft(ex, 2048, vocab)
        gpu_bench.write_results(out / "gpu_check_quant.json")
        for isl, osl, count, sampled in ((128, 128, 2048, False), (128, 128, 2048, True), (2048, 128, 256, False)):
            figure = f"{isl}_{osl}" + ("_sampled" if sampled else "")
            if figure not in figures:
                continue
            prompts = torch.randint(0, vocab, (count, isl)).tolist()
            ex.get_latest_iteration_stats()
            t0 = time.perf_counter()
            gpu_bench.run_requests(ex, prompts, osl, sampled)
            wall = time.perf_counter() - t0
            RESULTS[f"{key}_{figure}_tok_s"] = count * osl / wall
            timeline(ex.get_latest_iteration_stats(), wall, out / f"timeline_{key}_{figure}.json")
            gpu_bench.write_results(out / "gpu_check_quant.json")
        # profile: batch 1; profileN: batch N (profile16 among the defaults; profile1024 for a max-batch-1024 engine)
        for figure in sorted(f for f in figures if f.startswith("profile")):
            batch = int(figure.removeprefix("profile") or 1)
            gpu_bench.profile_decode(ex, vocab, out, batch)
            os.replace(out / f"profile_decode_b{batch}.txt", out / f"profile_b{batch}_{key}.txt")
    finally:
        ex.shutdown()
        del ex, engine
        gc.collect()
        torch.cuda.empty_cache()
        shutil.rmtree(engine_dir, ignore_errors=True)


def run_isolated(phases: list[str], out: Path) -> None:
    """Each phase by this script in a process of its own, one after another; every process's figures (its
    ceilings keyed by the phase) merged into OUT/gpu_check_quant.json and printed as one table."""
    for n, phase in enumerate(phases):
        phase_out = out / f"{n}_{phase.replace(':', '_').replace('+', '_').replace('@', '_')}"
        log(f"{phase} (in its own process: {phase_out})")
        proc = subprocess.run([sys.executable, __file__, "--out", str(phase_out), "--phases", phase],
                              capture_output=True, text=True)
        (phase_out / "log.txt").write_text(proc.stdout + proc.stderr)
        results_file = phase_out / "gpu_check_quant.json"
        figures = json.loads(results_file.read_text()) if results_file.exists() else {}
        if proc.returncode:
            figures[f"{phase}_exit"] = f"exit {proc.returncode}: {proc.stderr[-300:]}"
        for name, value in figures.items():
            shared = name in ("device", "torch", "copy_bandwidth_TBps", "gemm_bf16_TFLOPs")
            RESULTS[f"{name} ({phase})" if shared and name in RESULTS else name] = value
        gpu_bench.write_results(out / "gpu_check_quant.json")
    gpu_bench.write_results(out / "gpu_check_quant.json", "quantized engines and the hot path")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--phases", default="tests,tuning,none,fp8",
                    help="comma list; an engine phase may name its figures: fp8:b1+ttft (default: all of "
                         + "+".join(FIGURES) + ")")
    ap.add_argument("--isolate", action="store_true",
                    help="run each phase in a Python process of its own (OUT/<n>_<phase>/), so that no phase "
                         "inherits another's GPU memory or failure; their figures merged into OUT's table")
    args = ap.parse_args()
    out, tmp = Path(args.out), Path("/tmp/kiln_quant")
    out.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    if args.isolate:
        run_isolated(args.phases.split(","), out)
        return
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    gpu_bench.measure_ceilings()
    phases = {"tests": lambda: run_tests(out), "tuning": lambda: first_load_tuning(tmp), "gemv": gemv_bandwidth,
              "sampler": sampler_costs}
    for phase in args.phases.split(","):
        log(phase)
        try:
            if phase in phases:
                phases[phase]()
            else:
                engine, _, figures = phase.partition(":")
                quant, _, max_batch = engine.partition("@")
                engine_phase(quant, tmp, out, set(figures.split("+")) if figures else set(FIGURES),
                             int(max_batch or 512))
        except Exception as e:  # one phase's failure is recorded; the next still runs
            RESULTS[f"{phase}_error"] = f"{type(e).__name__}: {e}"[:300]
            RESULTS[f"{phase}_error_memory_GB"] = {"allocated": torch.cuda.memory_allocated() / 2 ** 30,
                                                   "peak": torch.cuda.max_memory_allocated() / 2 ** 30}
            RESULTS[f"{phase}_error_at"] = traceback.format_exc()[-1500:]
        # Out of the except block, where the exception (its frames: a failed phase's executor and engine) is
        # no longer held: freed before the next phase loads its own.
        gc.collect()
        torch.cuda.empty_cache()
        gpu_bench.write_results(out / "gpu_check_quant.json")
    gpu_bench.write_results(out / "gpu_check_quant.json", "quantized engines and the hot path")


if __name__ == "__main__":
    main()
