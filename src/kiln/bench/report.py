"""Benchmark figures and reports, with trtllm-bench's sections, definitions and JSON key names.

Definitions (TensorRT-LLM's): TTFT = first token - request start; TPOT = (end - first token) /
(output tokens - 1); system output throughput = all output tokens / (last end - first start);
per-user output throughput = mean over requests of output tokens / request latency; per-user output
speed = mean over requests of 1 / TPOT. Percentiles take the sorted value at index floor(q * n).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.bench.dataset import BenchRequest
from kiln.engine.manifest import EngineManifest
from kiln.models import num_params

PERCENTILE_KEYS = ("minimum", "maximum", "average", "p50", "p90", "p95", "p99")
RULE = "=" * 59
DATASET_ROW_LABELS = {"minimum": "MIN", "maximum": "MAX", "average": "AVG", "p50": "P50", "p90": "P90",
                      "p95": "P95", "p99": "P99"}


@dataclass(frozen=True)
class RequestRecord:
    """One finished request; times in seconds (``time.time()``)."""

    task_id: int
    num_input_tokens: int
    num_output_tokens: int
    start_time: float  # enqueued (kiln) or its static batch started (hf)
    first_token_time: float
    end_time: float

    @property
    def latency(self) -> float:
        return self.end_time - self.start_time

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.start_time

    @property
    def tpot(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.end_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class BenchRun:
    records: list[RequestRecord]
    iteration_stats: dict[str, Any] | None = None  # kiln's executor only


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    stats = {"minimum": ordered[0], "maximum": ordered[-1], "average": sum(ordered) / n}
    stats.update({f"p{q}": ordered[min(n - 1, n * q // 100)] for q in (50, 90, 95, 99)})
    return {k: stats[k] * scale for k in PERCENTILE_KEYS}


def build_report(run: BenchRun, *, engine: dict[str, Any], machine: dict[str, Any], world: dict[str, Any],
                 requests: list[BenchRequest], dataset_path: str | Path | None, streaming: bool,
                 concurrency: int | None) -> dict[str, Any]:
    """The report of one run as trtllm-bench writes it (plus kiln's ``iteration_stats``)."""
    records = run.records
    n = len(records)
    first_start = min(r.start_time for r in records)
    total_latency = max(r.end_time for r in records) - first_start
    output_tokens = sum(r.num_output_tokens for r in records)
    input_tokens = sum(r.num_input_tokens for r in records)
    latencies = [r.latency for r in records]
    issue_span = max(r.start_time for r in records) - first_start
    report: dict[str, Any] = {
        "engine": engine,
        "machine": machine,
        "world_info": {**world, "issue_rate": n / issue_span if issue_span > 0 else None},
        "request_info": {
            "num_requests": n,
            "max_concurrency": concurrency,
            "avg_num_concurrent_requests": sum(latencies) / total_latency,
            "avg_input_length": input_tokens / n,
            "avg_output_length": output_tokens / n,
            "streaming": streaming,
        },
        "performance": {
            "total_latency_ms": total_latency * 1e3,
            "avg_request_latency_ms": sum(latencies) / n * 1e3,
            "request_throughput_req_s": n / total_latency,
            "system_output_throughput_tok_s": output_tokens / total_latency,
            "system_total_throughput_tok_s": (output_tokens + input_tokens) / total_latency,
            "output_throughput_per_user_tok_s": sum(r.num_output_tokens / r.latency for r in records) / n,
            "output_throughput_per_gpu_tok_s": output_tokens / total_latency / world["world_size"],
            "request_latency_percentiles_ms": percentiles(latencies, 1e3),
        },
    }
    if streaming:
        tpots = [t for r in records if (t := r.tpot) is not None]
        speeds = [1.0 / t for t in tpots if t > 0]
        report["streaming_metrics"] = {
            "token_output_speed_tok_s": sum(speeds) / len(speeds) if speeds else None,
            "avg_ttft_ms": sum(r.ttft for r in records) / n * 1e3,
            "avg_tpot_ms": sum(tpots) / len(tpots) * 1e3 if tpots else None,
            "tpot_percentiles": percentiles(tpots, 1e3),
            "ttft_percentiles": percentiles([r.ttft for r in records], 1e3),
            "gen_tps_percentiles": percentiles(speeds),
        }
    if run.iteration_stats is not None:
        report["iteration_stats"] = run.iteration_stats
    report["dataset"] = dataset_details(requests, dataset_path)
    return report


def engine_details(engine_dir: str | Path, manifest: EngineManifest, backend: str, version: str,
                   dtype: str) -> dict[str, Any]:
    mc, bc = manifest.model_config, manifest.build_config
    params = num_params(mc)
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    return {"model": f"{mc.architecture} ({size} params)", "model_path": str(engine_dir),
            "engine_dir": str(engine_dir), "version": version, "backend": backend, "dtype": dtype,
            "kv_cache_dtype": "fp8" if bc.kv_cache_dtype == "fp8" else dtype,
            "quantization": None if bc.quantization == "none" else bc.quantization,
            "max_input_length": bc.max_input_len,
            "max_sequence_length": bc.max_seq_len, "model_config": mc.to_dict()}


def dataset_details(requests: list[BenchRequest], dataset_path: str | Path | None) -> dict[str, Any]:
    isl = [len(r.input_ids) for r in requests]
    osl = [r.output_tokens for r in requests]
    seq = [i + o for i, o in zip(isl, osl)]
    return {
        "isl_stats": percentiles(isl), "osl_stats": percentiles(osl), "seq_len_stats": percentiles(seq),
        "num_requests": len(requests), "dataset_path": None if dataset_path is None else str(dataset_path),
        "max_isl": max(isl), "max_osl": max(osl), "max_sequence_length": max(seq),
        "avg_isl": int(sum(isl) / len(isl)), "avg_osl": int(sum(osl) / len(osl)),
        "avg_sequence_length": int(sum(seq) / len(seq)),
    }


def machine_details(device: torch.device) -> dict[str, Any]:
    """The GPU (or, on the CPU, the processor) and the software the figures were measured with."""
    cpu = _cpu_name()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory
    else:
        name, memory = cpu, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"name": name, "memory.total": memory / 2**30, "device": device.type, "cpu": cpu,
            "num_cpus": os.cpu_count(), "python_version": platform.python_version(),
            "torch_version": torch.__version__, "cuda_version": torch.version.cuda}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _section(title: str, lines: list[str]) -> str:
    return "\n".join([RULE, f"= {title}", RULE, *lines, ""])


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def _breakdown(tag: str, stats: dict[str, float] | None) -> list[str]:
    if stats is None:
        return [f"[{tag}] n/a (no request has two or more output tokens)"]
    return [f"[{tag}] {key.upper():<7}: {stats[key]:.4f}" for key in PERCENTILE_KEYS]


def format_report(report: dict[str, Any]) -> str:
    """The report as trtllm-bench prints it: engine, machine, runtime, requests, performance, dataset."""
    e, m, w, q, p = (report[k] for k in ("engine", "machine", "world_info", "request_info", "performance"))
    kv_fraction, issue_rate = w.get("kv_cache_percentage"), w["issue_rate"]
    parts = [
        _section("ENGINE DETAILS", [
            f"Model:                  {e['model']}",
            f"Engine Directory:       {e['engine_dir']}",
            f"Backend:                {e['backend']} {e['version']}",
            f"Dtype:                  {e['dtype']}",
            f"KV Cache Dtype:         {e['kv_cache_dtype']}",
            f"Quantization:           {e['quantization']}",
            f"Max Input Length:       {e['max_input_length']}",
            f"Max Sequence Length:    {e['max_sequence_length']}",
        ]),
        _section("MACHINE DETAILS", [
            f"{m['name']}, memory {m['memory.total']:.2f} GiB ({m['device']})",
            f"CPU {m['cpu']} x {m['num_cpus']}; Python {m['python_version']}, torch {m['torch_version']}"
            f"{', CUDA ' + m['cuda_version'] if m['cuda_version'] else ''}",
        ]),
        _section("WORLD + RUNTIME INFORMATION", [
            f"TP Size:                {w['tp_size']}",
            f"PP Size:                {w['pp_size']}",
            f"Max Runtime Batch Size: {w['max_batch_size']}",
            f"Max Runtime Tokens:     {_fmt(w['max_num_tokens'])}",
            f"Scheduling Policy:      {w['scheduling_policy']}",
            f"Sampling:               {w['sampling']}",
            f"KV Memory Percentage:   {'n/a' if kv_fraction is None else f'{kv_fraction * 100:.2f}%'}",
            f"Issue Rate (req/sec):   {'all at once' if issue_rate is None else f'{issue_rate:.4E}'}",
            *_iteration_lines(report.get("iteration_stats")),
        ]),
        _section("REQUEST DETAILS", [
            f"Number of requests:             {q['num_requests']}",
            f"Max concurrency:                {q['max_concurrency'] or 'unlimited'}",
            f"Number of concurrent requests:  {q['avg_num_concurrent_requests']:.4f}",
            f"Average Input Length (tokens):  {q['avg_input_length']:.4f}",
            f"Average Output Length (tokens): {q['avg_output_length']:.4f}",
        ]),
    ]
    perf = [
        f"Request Throughput (req/sec):                     {p['request_throughput_req_s']:.4f}",
        f"Total Output Throughput (tokens/sec):             {p['system_output_throughput_tok_s']:.4f}",
        f"Total Token Throughput (tokens/sec):              {p['system_total_throughput_tok_s']:.4f}",
        f"Total Latency (ms):                               {p['total_latency_ms']:.4f}",
        f"Average request latency (ms):                     {p['avg_request_latency_ms']:.4f}",
        f"Per User Output Throughput [w/ ctx] (tps/user):   {p['output_throughput_per_user_tok_s']:.4f}",
        f"Per GPU Output Throughput (tps/gpu):              {p['output_throughput_per_gpu_tok_s']:.4f}",
    ]
    s = report.get("streaming_metrics")
    if s is not None:
        perf += [
            f"Average time-to-first-token [TTFT] (ms):          {s['avg_ttft_ms']:.4f}",
            f"Average time-per-output-token [TPOT] (ms):        {_fmt(s['avg_tpot_ms'])}",
            f"Per User Output Speed (tps/user):                 {_fmt(s['token_output_speed_tok_s'])}",
            "", "-- Per-Request Time-per-Output-Token [TPOT] Breakdown (ms)", "",
            *_breakdown("TPOT", s["tpot_percentiles"]),
            "", "-- Per-Request Time-to-First-Token [TTFT] Breakdown (ms)", "",
            *_breakdown("TTFT", s["ttft_percentiles"]),
            "", "-- Per-Request Generation Throughput [GTPS] Breakdown (tps/user)", "",
            *_breakdown("GTPS", s["gen_tps_percentiles"]),
        ]
    perf += ["", "-- Request Latency Breakdown (ms) -----------------------", "",
             *_breakdown("Latency", p["request_latency_percentiles_ms"])]
    parts.append(_section("PERFORMANCE OVERVIEW", perf))
    d = report["dataset"]
    rows = [f"{DATASET_ROW_LABELS[key]}:  " + "".join(f"{d[col][key]:>12.4f}      " for col in
                                               ("isl_stats", "osl_stats", "seq_len_stats")).rstrip()
            for key in PERCENTILE_KEYS]
    parts.append(_section("DATASET DETAILS", [
        f"Dataset Path:         {d['dataset_path']}",
        f"Number of Sequences:  {d['num_requests']}",
        "", "-- Percentiles statistics ---------------------------------", "",
        "             Input             Output        Seq. Length",
        "-" * 59, *rows,
    ]))
    return "\n".join(parts)


def _iteration_lines(stats: dict[str, Any] | None) -> list[str]:
    if stats is None:
        return []
    return [f"Iterations:             {stats['num_iterations']} (batch size avg {stats['avg_batch_size']:.2f}, "
            f"max {stats['max_batch_size']}; {stats['num_preempted']} preemptions)",
            f"KV Cache Blocks:        peak {stats['peak_kv_blocks_used']} of {stats['kv_blocks_total']} in use"]


def format_comparison(reports: list[dict[str, Any]]) -> str:
    """One row per run (backend x concurrency) and the kiln / hf output-throughput ratio at each concurrency."""
    header = (f"{'backend':<8}{'concurrency':>12}{'requests':>10}{'output tok/s':>14}{'req/s':>10}"
              f"{'tok/s/user':>12}{'latency ms':>12}{'TTFT ms':>10}{'TPOT ms':>10}")
    lines = [header, "-" * len(header)]
    by_point: dict[tuple[str, Any], float] = {}
    for r in reports:
        backend, concurrency = r["engine"]["backend"], r["request_info"]["max_concurrency"]
        p, s = r["performance"], r.get("streaming_metrics") or {}
        by_point[backend, concurrency] = p["system_output_throughput_tok_s"]
        lines.append(f"{backend:<8}{concurrency or 'all':>12}{r['request_info']['num_requests']:>10}"
                     f"{p['system_output_throughput_tok_s']:>14.1f}{p['request_throughput_req_s']:>10.2f}"
                     f"{p['output_throughput_per_user_tok_s']:>12.2f}{p['avg_request_latency_ms']:>12.1f}"
                     f"{_fmt(s.get('avg_ttft_ms'), '.1f'):>10}{_fmt(s.get('avg_tpot_ms'), '.2f'):>10}")
    for (backend, concurrency), throughput in by_point.items():
        if backend == "kiln" and ("hf", concurrency) in by_point:
            lines.append(f"kiln / hf output throughput at concurrency {concurrency or 'all'}: "
                         f"{throughput / by_point['hf', concurrency]:.2f}x")
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
