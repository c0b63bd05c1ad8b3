"""``kiln plan``: which engine to build for a model on a GPU, predicted before any GPU is touched."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

DESCRIPTION = """\
Predicts, for a model on a GPU you name, every engine kiln could build: precision (bf16, fp8, int8 /
int4 weight-only), KV cache dtype and tensor parallelism. For each: whether it fits (weights and KV
cache per GPU) or why not, the KV capacity in tokens and in concurrent requests of the workload, the
max_batch_size that serves the workload fastest, and predicted batch-1 decode speed, offline throughput
and TTFT. Rows a GPU cannot run (FP8 on an A100) or this kiln cannot build yet say so. It recommends one
engine for throughput and one for latency, as the exact kiln build command and runtime flags.

Predictions come from a roofline (bytes and FLOPs per iteration over the GPU's datasheet rates) with
efficiencies fitted on kiln's own measurements (docs/plan.md shows predicted against measured): bf16's
on the bf16 measurements, and for each quantization kiln has measured, factors of its own on top.
--calibrate adds kiln bench reports (or a file of measurements) to the stored measurements and refits."""

# A latency-minded engine keeps each user's decode speed within this fraction of batch 1.
LATENCY_BATCH_SPEED = 0.9
TRTLLM_REQUESTS = 3000  # TensorRT-LLM's perf-overview request count for most lengths


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="which engine to build for a model on a GPU (predicted, no GPU needed)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="Hugging Face model folder (only config.json is read) or a preset name")
    p.add_argument("--gpu", help="GPU to plan for (a100-40gb, a100-80gb, h100-80gb, h200, l40s, l4, rtx-4090)")
    p.add_argument("--isl", type=int, default=128, help="input length of the workload in tokens (default 128)")
    p.add_argument("--osl", type=int, default=128, help="output length of the workload in tokens (default 128)")
    p.add_argument("--dataset", help="a kiln bench dataset (JSON lines): its mean lengths and request count")
    p.add_argument("--num-requests", type=int, default=TRTLLM_REQUESTS,
                   help=f"requests in the offline run (default {TRTLLM_REQUESTS}, TensorRT-LLM's count)")
    p.add_argument("--tp", default="1", help="tensor-parallel sizes to consider, comma separated (default 1)")
    p.add_argument("--max-latency-ms", type=float,
                   help="bound on a request's latency: rows above it are not recommended, batches are capped")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibration", help="a calibration file written by --calibrate (default: kiln's own)")
    p.add_argument("--calibrate", nargs="+", metavar="FILE",
                   help="refit the efficiencies on kiln's stored measurements plus those of these files (kiln bench "
                        "reports, or {\"measurements\": [...]} files as calibration.json holds them), print predicted "
                        "against measured and write the result to --calibration-out")
    p.add_argument("--calibration-out", default="kiln_plan_calibration.json",
                   help="where --calibrate writes (default ./kiln_plan_calibration.json)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from kiln.plan import calibration as calib

    cal, stored = calib.load_file(args.calibration) if args.calibration else calib.load_stored()
    if args.calibrate:
        return _calibrate(args, cal, stored)
    if not args.model or not args.gpu:
        raise ConfigError("kiln plan needs a MODEL and --gpu (or --calibrate FILE...)")
    from kiln.plan.planner import Workload, gpu_named, make_plan

    gpu = gpu_named(args.gpu)
    config = _model_config(args.model)
    isl, osl, n = args.isl, args.osl, args.num_requests
    if args.dataset:
        isl, osl, n = _dataset_lengths(args.dataset)
    for name, value in (("--isl", isl), ("--osl", osl), ("--num-requests", n)):
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    tp_sizes = _tp_sizes(args.tp)
    plan = make_plan(args.model, config, gpu, cal, Workload(isl, osl, n, args.max_latency_ms), tp_sizes,
                     measured=Counter(m.precision for m in stored))
    if args.json:
        print(json.dumps(plan_json(plan, config, cal), indent=1))
    else:
        print(render(plan, config, cal))
    return 0


def _model_config(name: str):
    from kiln.models import PRESETS
    from kiln.models.config import ModelConfig
    from kiln.models.presets import preset_hf_config

    if name in PRESETS and not Path(name).exists():
        return ModelConfig.from_hf_config(preset_hf_config(name))
    if not Path(name).is_dir():
        raise ConfigError(f"{name}: neither a model folder nor a preset; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_hf_dir(name)


def _dataset_lengths(path: str) -> tuple[int, int, int]:
    from kiln.bench.dataset import read_dataset

    requests = read_dataset(path)
    if not requests:
        raise ConfigError(f"{path}: no requests")
    isl = round(sum(len(r.input_ids) for r in requests) / len(requests))
    osl = round(sum(r.output_tokens for r in requests) / len(requests))
    return isl, osl, len(requests)


def _tp_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 or s & (s - 1) for s in sizes):
        raise ConfigError(f"--tp {text!r}: give powers of two separated by commas, e.g. 1,2,4")
    return sizes


def build_command(plan, row, model: str, max_batch_size: int) -> str:
    w = plan.workload
    parts = [f"kiln build {model}", "--output ENGINE", "--dtype bfloat16", f"--max-batch-size {max_batch_size}",
             f"--max-input-len {w.isl}", f"--max-seq-len {w.isl + w.osl}", f"--max-num-tokens {row.max_num_tokens}",
             f"--target sm{plan.gpu.sm}"]
    if row.quantization != "bf16":
        parts.append(f"--quantization {row.quantization}")
    if row.kv_cache_dtype != "bf16":
        parts.append(f"--kv-cache-dtype {row.kv_cache_dtype}")
    if row.tp_size > 1:
        parts.append(f"--tp-size {row.tp_size}")
    return " ".join(parts)


def runtime_flags(max_batch_size: int, cal) -> str:
    return (f"--max-batch-size {max_batch_size} --kv-cache-free-gpu-mem-fraction {cal.kv_memory_fraction} "
            "--scheduler-policy guaranteed_no_evict")


def latency_batch(plan, row, config, cal) -> int:
    """The largest power-of-two batch at which each user still decodes at LATENCY_BATCH_SPEED of batch 1."""
    from kiln.plan.planner import KV_DTYPES, PRECISIONS, model_shape
    from kiln.plan.roofline import EngineShape

    engine = EngineShape(model_shape(config), plan.gpu, PRECISIONS[row.quantization], KV_DTYPES[row.kv_cache_dtype],
                         row.tp_size, row.max_batch_size, row.max_num_tokens)
    context = plan.workload.isl + plan.workload.osl // 2
    batch = 1
    while (batch * 2 <= row.max_batch_size and engine.decode_tok_s(cal, batch * 2, context) / (batch * 2)
           >= LATENCY_BATCH_SPEED * engine.decode_tok_s(cal, 1, context)):
        batch *= 2
    return batch


def plan_json(plan, config, cal) -> dict[str, Any]:
    rec = plan.recommended()

    def recommended(kind: str, r) -> dict[str, Any] | None:
        if r is None:
            return None
        batch = r.max_batch_size if kind == "throughput" else latency_batch(plan, r, config, cal)
        return {**r.to_dict(), "build_command": build_command(plan, r, plan.model, batch),
                "runtime_flags": runtime_flags(batch, cal)}

    return {
        "model": plan.model, "gpu": plan.gpu.key,
        "workload": {"isl": plan.workload.isl, "osl": plan.workload.osl, "num_requests": plan.workload.num_requests,
                     "max_latency_ms": plan.workload.max_latency_ms},
        "configs": [r.to_dict() for r in plan.rows],
        "recommended": {k: recommended(k, r) for k, r in rec.items()},
    }


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render(plan, config, cal) -> str:
    w, gpu = plan.workload, plan.gpu
    from kiln.models import num_params

    lines = [f"kiln plan: {plan.model} ({num_params(config) / 1e9:.2f}B params) on {gpu.key} ({gpu.name}, "
             f"{gpu.memory_gib:.0f} GiB, {gpu.bandwidth_tbps} TB/s, sm{gpu.sm})",
             f"workload: ISL {w.isl} / OSL {w.osl}, {w.num_requests} requests offline"
             + (f", request latency <= {w.max_latency_ms:g} ms" if w.max_latency_ms else ""), ""]
    header = ("quant", "kv", "tp", "fits", "weights GiB/GPU", "KV tokens", "conc req", "max batch", "bs1 tok/s",
              "tok/s", "tok/s/GPU", "TTFT ms", "note")
    table = [header]
    for r in plan.rows:
        note = r.note
        table.append((r.quantization, r.kv_cache_dtype, str(r.tp_size), "yes" if r.fits else "no",
                      _fmt(r.weights_gib, ".1f"), _fmt(r.kv_tokens or None), _fmt(r.concurrent_requests or None),
                      _fmt(r.max_batch_size or None), _fmt(r.bs1_tok_s), _fmt(r.throughput_tok_s),
                      _fmt(r.throughput_per_gpu_tok_s), _fmt(r.ttft_ms, ".1f"), note))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        lines.append("  ".join(c.rjust(wd) if i > 2 else c.ljust(wd) for i, (c, wd) in enumerate(zip(row, widths)))
                     + "  " + row[-1])
    rec = plan.recommended()
    lines.append("")
    for kind, r in rec.items():
        if r is None:
            fastest = min((x.request_latency_ms for x in plan.rows if x.buildable), default=None)
            lines.append(f"{kind}: no engine this kiln builds fits {gpu.key} for this workload" if fastest is None else
                         f"{kind}: no engine this kiln builds meets {w.max_latency_ms:g} ms per request "
                         f"(the fastest: {fastest:,.0f} ms); shorten --osl or pick a faster GPU")
            continue
        batch = r.max_batch_size if kind == "throughput" else latency_batch(plan, r, config, cal)
        lines.append(f"{kind}: {r.quantization} weights, {r.kv_cache_dtype} KV, tp {r.tp_size}: predicted "
                     f"{_fmt(r.throughput_per_gpu_tok_s)} tok/s/GPU offline, {_fmt(r.bs1_tok_s)} tok/s at batch 1, "
                     f"TTFT {_fmt(r.ttft_ms, '.1f')} ms")
        lines.append(f"  {build_command(plan, r, plan.model, batch)}")
        lines.append(f"  runtime: {runtime_flags(batch, cal)}")
    later = plan.best_unavailable()
    best = rec["throughput"]
    if later is not None and (best is None or (later.throughput_per_gpu_tok_s or 0) > (best.throughput_per_gpu_tok_s or 0)):
        lines.append(f"later: {later.quantization} weights / {later.kv_cache_dtype} KV / tp {later.tp_size} would give "
                     f"{_fmt(later.throughput_per_gpu_tok_s)} tok/s/GPU; {later.note}")
    return "\n".join(lines)


def _calibrate(args, cal, stored) -> int:
    from kiln.plan import calibration as calib

    measurements = list(stored)
    for m in (m for path in args.calibrate for m in calib.read_measurements(path)):
        if m not in measurements:  # a file given again adds nothing twice
            measurements.append(m)
    fitted = calib.refit(measurements, cal)
    print(calib.comparison(fitted, measurements))
    Path(args.calibration_out).write_text(calib.to_json(fitted, measurements) + "\n")
    print(f"wrote {args.calibration_out}; use it with kiln plan ... --calibration {args.calibration_out}")
    return 0
