"""kiln bench on one H100 in one command (10 minutes at most): the measured figures of docs/benchmarks.md.

    python3 scripts/bench_h100.py          # from the repository root; writes under $OUT (default ./bench_out)

Every step is a ``kiln`` command, printed before it runs (its output goes to OUT/logs/):
  1. build the llama-3-8b dummy-weight bf16 engine (kept in --engine-dir, outside OUT; an engine already
     there is reused);
  2. prepare fixed-length datasets (TensorRT-LLM's recipe: synthetic ids, stdev 0; EOS is ignored);
  3. in order of importance: throughput at ISL/OSL 128/128; the concurrency sweep at 128/128 with the
     Hugging Face transformers baseline and kiln (one line each in sweep_128_128.png); latency at
     128/128; throughput at 2048/128, 1000/1000 and 128/2048;
  4. OUT/summary.md: the tables of docs/benchmarks.md filled from the reports.

Request counts are scaled down from TensorRT-LLM's (30000 / 3000) to fit the time; both are in the
summary. Each step gets at most what is left of --budget-seconds; a step cut short says so there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ISL_OSL_128 = (128, 128)
# (ISL, OSL, requests here, TensorRT-LLM's requests, TensorRT-LLM v0.13 H100 FP16 output tok/s), in run order.
THROUGHPUT_CASES = [
    (128, 128, 2048, 30000, 15648),
    (2048, 128, 256, 3000, 1859),
    (1000, 1000, 256, 3000, 7161),
    (128, 2048, 256, 3000, 8883),
]
# One static batch per point for hf (--sweep-waves 1): 128 new tokens take ~13 s at batch 1 and at batch 64
# (HF generate measured on this GPU at 10 and 650 tok/s, ../shared/TARGETS.md).
SWEEP_CONCURRENCIES = "1,4,16,64"
LATENCY_REQUESTS = 16
# A kiln command starts Python and torch and loads a 16 GB engine before it measures anything: with
# less than this left, a step is skipped rather than cut part-way.
MIN_STEP_SECONDS = 30


class Steps:
    """Runs kiln commands under one deadline and remembers how each ended."""

    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.outcomes: dict[str, str] = {}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def kiln(self, name: str, *args: str) -> bool:
        left = self.deadline - time.monotonic()
        if left < MIN_STEP_SECONDS:
            self.outcomes[name] = "skipped: out of time"
            print(f"[bench_h100] {name}: skipped, {left:.0f} s left", flush=True)
            return False
        command = [sys.executable, "-m", "kiln.cli", *args]
        print(f"[bench_h100] {name}: kiln {' '.join(args)}  (at most {left:.0f} s)", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                          os.environ.get("PYTHONPATH")])),
               "TQDM_MININTERVAL": "10"}
        start = time.monotonic()
        with (self.out / "logs" / f"{name}.log").open("w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=left).returncode
            except subprocess.TimeoutExpired:
                code = None
        seconds = time.monotonic() - start
        self.outcomes[name] = (f"ok in {seconds:.0f} s" if code == 0 else
                               f"cut at the deadline after {seconds:.0f} s" if code is None else
                               f"failed (exit {code}) after {seconds:.0f} s, see logs/{name}.log")
        print(f"[bench_h100] {name}: {self.outcomes[name]}", flush=True)
        if code not in (0, None):
            print((self.out / "logs" / f"{name}.log").read_text()[-2000:], flush=True)
        return code == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "./bench_out"), help="reports, plots, logs")
    parser.add_argument("--engine-dir", default="/tmp/kiln-bench/llama-3-8b-bf16", help="the 16 GB engine")
    parser.add_argument("--budget-seconds", type=float, default=570.0, help="all steps together")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the throughput request counts")
    parser.add_argument("--max-batch-size", type=int, default=512)
    args = parser.parse_args()
    out, engine = Path(args.out).resolve(), Path(args.engine_dir)
    data = Path(tempfile.gettempdir()) / "kiln-bench-datasets"  # reproducible by seed: not worth bringing back
    data.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, args.budget_seconds)

    if (engine / "manifest.json").is_file():
        steps.outcomes["build"] = f"reused {engine}"
    elif not steps.kiln("build", "build", "llama-3-8b", "--dummy-weights", "--output", str(engine),
                        "--dtype", "bfloat16", "--max-batch-size", str(args.max_batch_size), "--max-input-len",
                        "2048", "--max-seq-len", "4096", "--max-num-tokens", "8192"):
        return write_summary(out, steps, args.scale)

    counts = {(isl, osl): max(1, round(n * args.scale)) for isl, osl, n, _, _ in THROUGHPUT_CASES}
    for (isl, osl), n in counts.items():
        steps.kiln(f"dataset_{isl}_{osl}", "bench", "prepare-dataset", "--engine", str(engine), "--seed", "0",
                   "--output", str(data / f"{isl}_{osl}.jsonl"), "token-norm-dist", "--num-requests", str(n),
                   "--input-mean", str(isl), "--input-stdev", "0", "--output-mean", str(osl), "--output-stdev", "0")

    def throughput(isl: int, osl: int) -> None:
        steps.kiln(f"throughput_{isl}_{osl}", "bench", "throughput", "--engine", str(engine), "--dataset",
                   str(data / f"{isl}_{osl}.jsonl"), "--report-json", str(out / f"throughput_{isl}_{osl}.json"))

    throughput(*ISL_OSL_128)
    has_matplotlib = subprocess.run([sys.executable, "-c", "import matplotlib"], capture_output=True).returncode == 0
    steps.kiln("sweep_128_128", "bench", "throughput", "--engine", str(engine), "--dataset",
               str(data / "128_128.jsonl"), "--backend", "hf,kiln", "--sweep", SWEEP_CONCURRENCIES,
               "--sweep-waves", "1", "--streaming", "--report-json", str(out / "sweep_128_128.json"),
               *(["--plot", str(out / "sweep_128_128.png")] if has_matplotlib else []))
    steps.kiln("latency_128_128", "bench", "latency", "--engine", str(engine), "--dataset",
               str(data / "128_128.jsonl"), "--num-requests", str(LATENCY_REQUESTS),
               "--report-json", str(out / "latency_128_128.json"))
    for isl, osl, *_ in THROUGHPUT_CASES[1:]:
        throughput(isl, osl)
    if not has_matplotlib:
        steps.outcomes["plot"] = "matplotlib missing here: plot sweep_128_128.json with kiln.bench.plot.plot_sweep"
    return write_summary(out, steps, args.scale)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_summary(out: Path, steps: Steps, scale: float) -> int:
    """Markdown tables in the layout of docs/benchmarks.md, from the reports this run wrote."""
    lines = ["# kiln bench on one GPU: measured", ""]
    sweep = (_load(out / "sweep_128_128.json") or {}).get("runs", [])
    first = next((r for r in map(_load, sorted(out.glob("throughput_*.json"))) if r), None)
    if first:
        e, m, w = first["engine"], first["machine"], first["world_info"]
        lines += [f"Engine: {e['model']}, {e['dtype']}, max batch size {w['max_batch_size']}, max tokens "
                  f"{w['max_num_tokens']}, {w['kv_cache_blocks']} KV blocks of {w['tokens_per_block']} tokens. "
                  f"Machine: {m['name']} ({m['memory.total']:.0f} GiB), torch {m['torch_version']}, "
                  f"CUDA {m['cuda_version']}.", ""]
    hf_at = {r["request_info"]["max_concurrency"]: r for r in sweep if r["engine"]["backend"] == "hf"}
    lines += ["| ISL/OSL | requests (TensorRT-LLM's) | kiln output tok/s | TensorRT-LLM H100 FP16 | kiln / TRT-LLM "
              "| HF transformers, batch 64 | kiln / HF |", "|---|---|---|---|---|---|---|"]
    for isl, osl, n, trt_n, trt in THROUGHPUT_CASES:
        report = _load(out / f"throughput_{isl}_{osl}.json")
        kiln = report["performance"]["system_output_throughput_tok_s"] if report else None
        hf_report = hf_at.get(64) if (isl, osl) == ISL_OSL_128 else None
        hf = hf_report["performance"]["system_output_throughput_tok_s"] if hf_report else None
        requests = report["request_info"]["num_requests"] if report else max(1, round(n * scale))
        lines.append(f"| {isl}/{osl} | {requests} ({trt_n}) | {_num(kiln)} | {trt:,} | {_ratio(kiln, trt)} | "
                     f"{_num(hf)} | {_ratio(kiln, hf)} |")
    latency = _load(out / "latency_128_128.json")
    if latency:
        s, p = latency["streaming_metrics"], latency["performance"]
        lines += ["", "| latency mode, 128/128, batch 1 | TTFT ms (avg / p99) | TPOT ms (avg / p99) | tok/s/user "
                  "| request latency ms (p50 / p99) |", "|---|---|---|---|---|",
                  f"| {latency['request_info']['num_requests']} requests | {s['avg_ttft_ms']:.1f} / "
                  f"{s['ttft_percentiles']['p99']:.1f} | {s['avg_tpot_ms']:.2f} / {s['tpot_percentiles']['p99']:.2f} | "
                  f"{s['token_output_speed_tok_s']:.1f} | {p['request_latency_percentiles_ms']['p50']:.0f} / "
                  f"{p['request_latency_percentiles_ms']['p99']:.0f} |"]
    if sweep:
        lines += ["", "| sweep 128/128 | concurrency | output tok/s | tok/s/user | TTFT ms | TPOT ms |",
                  "|---|---|---|---|---|---|"]
        for r in sweep:
            s, p = r["streaming_metrics"], r["performance"]
            lines.append(f"| {r['engine']['backend']} | {r['request_info']['max_concurrency']} | "
                         f"{p['system_output_throughput_tok_s']:,.0f} | {p['output_throughput_per_user_tok_s']:.1f} | "
                         f"{s['avg_ttft_ms']:.1f} | {_num(s['avg_tpot_ms'], '.2f')} |")
    lines += ["", "Steps:", *(f"- {name}: {outcome}" for name, outcome in steps.outcomes.items())]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text, flush=True)
    return 0 if all(o.startswith(("ok", "reused")) for o in steps.outcomes.values()) else 1


def _num(value: float | None, spec: str = ",.0f") -> str:
    return "not measured" if value is None else format(value, spec)


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
