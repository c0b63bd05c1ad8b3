"""Which engine to build for a model on a GPU: every candidate (precision, KV dtype, tensor parallelism)
predicted by the calibrated roofline, checked against the GPU and against what this kiln builds."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from kiln.config import BuildConfig
from kiln.errors import ConfigError, KilnError
from kiln.kernels.attention import fp8_kv_cache_refusal
from kiln.kernels.weight_only import DEQUANT_MIN_ROWS
from kiln.layers import LINEAR_METHODS
from kiln.models import ModelConfig, num_params
from kiln.plan.roofline import GIB, GPU, Calibration, EngineShape, ModelShape, Precision

# Weight-only methods dequantize in the matmul: at large batches they run below the dense bf16 rate.
# A lead (TensorRT-LLM's W4A16 trails its FP16 at high batch); the calibration's compute factor for a
# quantization kiln has measured corrects it (and fp8's 1.0).
WEIGHT_ONLY_COMPUTE_FACTOR = 0.8
INT4_GROUP_SIZE = 128  # one fp16 scale and one zero point per group of 128 weights

PRECISIONS = {
    "bf16": Precision("bf16", 2.0, "bf16", 80, 1.0),
    "fp8": Precision("fp8", 1.0, "fp8", 89, 1.0),
    "int8_wo": Precision("int8_wo", 1.0, "bf16", 80, WEIGHT_ONLY_COMPUTE_FACTOR, DEQUANT_MIN_ROWS[8]),
    "int4_wo": Precision("int4_wo", 0.5 + 4 / INT4_GROUP_SIZE, "bf16", 80, WEIGHT_ONLY_COMPUTE_FACTOR,
                         DEQUANT_MIN_ROWS[4]),
    "int4_awq": Precision("int4_awq", 0.5 + 4 / INT4_GROUP_SIZE, "bf16", 80, WEIGHT_ONLY_COMPUTE_FACTOR,
                          DEQUANT_MIN_ROWS[4]),
}
KV_DTYPES = {"bf16": 2, "fp8": 1}
# max_batch_size values tried for the throughput engine.
BATCH_SIZES = tuple(1 << i for i in range(12))
# The throughput engine's max batch: the smallest of BATCH_SIZES whose predicted throughput for the whole
# workload is within this factor of the best one's (a larger batch for less gain only lengthens requests).
USEFUL_BATCH_GAIN = 1.05
MAX_NUM_TOKENS = 8192  # TensorRT-LLM's default tokens per iteration; large enough for full-speed prefill


def load_gpus() -> dict[str, GPU]:
    data = json.loads(resources.files("kiln.plan").joinpath("gpus.json").read_text())
    return {key: GPU(key=key, **spec) for key, spec in data.items() if not key.startswith("_")}


def gpu_named(name: str) -> GPU:
    gpus = load_gpus()
    key = name.lower().replace("_", "-")
    if key not in gpus:
        raise ConfigError(f"unknown GPU {name!r}; kiln plan knows {', '.join(gpus)}")
    return gpus[key]


def model_shape(config: ModelConfig) -> ModelShape:
    """The sizes of a kiln ModelConfig that the cost model uses."""
    qkv = config.q_size + 2 * config.kv_size
    return ModelShape(num_layers=config.num_layers, hidden_size=config.hidden_size, num_heads=config.num_heads,
                      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
                      num_params=num_params(config), tie_word_embeddings=config.tie_word_embeddings,
                      widest_activation=max(qkv, 2 * config.intermediate_size, config.hidden_size))


@dataclass(frozen=True)
class Workload:
    isl: int
    osl: int
    num_requests: int
    max_latency_ms: float | None = None


@dataclass
class Row:
    quantization: str
    kv_cache_dtype: str
    tp_size: int
    fits: bool
    reason: str | None            # why it does not fit or run here (None: buildable now)
    weights_gib: float
    kv_gib: float
    kv_tokens: int
    concurrent_requests: int
    max_batch_size: int
    max_num_tokens: int
    bs1_tok_s: float | None
    throughput_tok_s: float | None
    throughput_per_gpu_tok_s: float | None
    ttft_ms: float | None
    request_latency_ms: float | None  # one request alone: TTFT + the rest of its tokens at batch 1
    num_measurements: int = 0  # kiln's measurements of this precision that the calibration was fitted on

    @property
    def is_measured(self) -> bool:
        """The predictions are calibrated on this precision, not extrapolated from bf16's efficiencies."""
        return self.num_measurements > 0

    @property
    def buildable(self) -> bool:
        return self.fits and self.reason is None

    @property
    def note(self) -> str:
        if self.reason:
            return self.reason
        if not self.fits:
            return ""
        if self.is_measured:
            return f"calibrated on {self.num_measurements} kiln measurement{'s' if self.num_measurements > 1 else ''}"
        return "uncalibrated: bf16's efficiencies"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gpu_refusal(gpu: GPU, precision: Precision, kv_dtype: str) -> str | None:
    """Why this GPU cannot run the candidate (TensorRT-LLM's precision matrix), or None."""
    if gpu.sm < precision.min_sm:
        return (f"{precision.name} needs sm{precision.min_sm}+ (FP8 tensor cores: Ada, Hopper); {gpu.key} is "
                f"sm{gpu.sm}: use int8_wo or int4_wo (weight-only)")
    return None


def kiln_refusal(gpu: GPU, precision: Precision, kv_dtype: str, tp_size: int) -> str | None:
    """Why this kiln cannot build the candidate yet (asked of BuildConfig and the kernels themselves), or
    None. An fp8 KV cache, which TensorRT-LLM keeps on Ampere as storage, kiln's kernels keep on sm89+."""
    options: dict[str, Any] = {"tp_size": tp_size}
    if precision.name != "bf16":
        if precision.name not in LINEAR_METHODS:
            return f"this kiln does not build {precision.name} engines yet"
        options["quantization"] = precision.name
    if kv_dtype != "bf16":
        refusal = fp8_kv_cache_refusal(f"sm{gpu.sm}")
        if refusal:
            return refusal
        options["kv_cache_dtype"] = kv_dtype
    try:
        BuildConfig(**options)
    except KilnError as e:
        return str(e)
    return None


def tp_refusal(shape: ModelShape, tp_size: int) -> str | None:
    if shape.num_heads % tp_size:
        return f"{shape.num_heads} attention heads do not split over tp {tp_size}"
    if shape.num_kv_heads % tp_size and tp_size % shape.num_kv_heads:
        return f"{shape.num_kv_heads} KV heads neither split over nor replicate across tp {tp_size}"
    return None


def plan_row(shape: ModelShape, gpu: GPU, cal: Calibration, workload: Workload, quantization: str,
             kv_dtype: str, tp_size: int) -> Row:
    precision = PRECISIONS[quantization]
    probe = EngineShape(shape, gpu, precision, KV_DTYPES[kv_dtype], tp_size, 1, MAX_NUM_TOKENS)
    weights_gib = probe.weight_bytes_per_gpu / GIB
    reason = gpu_refusal(gpu, precision, kv_dtype) or tp_refusal(shape, tp_size)
    row = Row(quantization, kv_dtype, tp_size, fits=False, reason=reason, weights_gib=weights_gib, kv_gib=0.0,
              kv_tokens=0, concurrent_requests=0, max_batch_size=0, max_num_tokens=MAX_NUM_TOKENS, bs1_tok_s=None,
              throughput_tok_s=None, throughput_per_gpu_tok_s=None, ttft_ms=None, request_latency_ms=None)
    if reason:
        return row
    seq_len = workload.isl + workload.osl
    max_num_tokens = max(MAX_NUM_TOKENS, 1 << math.ceil(math.log2(workload.isl)))
    probe = dataclasses.replace(probe, max_num_tokens=max_num_tokens)
    runs = _offline_runs(probe, cal, workload)
    if not runs:
        kv_tokens = probe.kv_tokens(cal)
        row.reason = (f"weights take {weights_gib:.1f} GiB of {gpu.memory_gib:.0f} GiB per GPU, leaving KV room for "
                      f"{kv_tokens} tokens (< {seq_len} for one request): use a larger tp or a smaller precision")
        return row
    best = max(throughput for _, throughput in runs)
    engine, throughput = next((e, t) for e, t in runs if t * USEFUL_BATCH_GAIN >= best)
    kv_tokens = engine.kv_tokens(cal)
    # Requests the KV pool holds at once, each reserving its worst case (guaranteed_no_evict).
    concurrency = kv_tokens // engine.tokens_per_block // math.ceil(seq_len / engine.tokens_per_block)
    bs1 = engine.decode_tok_s(cal, 1, workload.isl + workload.osl // 2)
    ttft = engine.ttft_ms(cal, workload.isl)
    row.fits = True
    row.reason = kiln_refusal(gpu, precision, kv_dtype, tp_size)
    row.kv_tokens, row.kv_gib = kv_tokens, kv_tokens * engine.kv_bytes_per_token / GIB
    row.concurrent_requests = concurrency
    row.max_batch_size, row.max_num_tokens = engine.max_batch_size, max_num_tokens
    row.bs1_tok_s, row.ttft_ms = bs1, ttft
    row.request_latency_ms = ttft + (workload.osl - 1) / bs1 * 1e3
    row.throughput_tok_s = throughput
    row.throughput_per_gpu_tok_s = throughput / tp_size
    return row


def _offline_runs(engine: EngineShape, cal: Calibration, workload: Workload) -> list[tuple[EngineShape, float]]:
    """The workload's offline run (prefill and decode, every request) predicted for each max_batch_size of
    BATCH_SIZES, smallest first, as (engine, output tok/s): up to the first batch the KV pool cannot fill
    (past it the pool, not the batch, bounds the requests in flight), and only batches whose steady-state
    request latency meets the workload's bound (batch 1 if none does). Empty: one request does not fit."""
    runs = []
    for batch in BATCH_SIZES:
        sized = dataclasses.replace(engine, max_batch_size=batch)
        concurrency = sized.max_concurrency(cal, workload.isl, workload.osl)
        if concurrency < 1:
            break
        if batch == 1 or _meets_latency(sized, cal, workload):
            offline_ms = sized.offline_ms(cal, workload.isl, workload.osl, workload.num_requests)
            runs.append((sized, workload.num_requests * workload.osl / offline_ms * 1e3))
        if concurrency < batch:
            break
    return runs


def _meets_latency(engine: EngineShape, cal: Calibration, workload: Workload) -> bool:
    """A request's latency at a full batch (its TTFT, then its tokens at the batch's decode step) is
    within the workload's bound, if it has one."""
    if workload.max_latency_ms is None:
        return True
    batch = engine.max_batch_size
    step_ms = batch / engine.decode_tok_s(cal, batch, workload.isl + workload.osl // 2) * 1e3
    return engine.ttft_ms(cal, workload.isl) + workload.osl * step_ms <= workload.max_latency_ms


@dataclass
class Plan:
    model: str
    gpu: GPU
    workload: Workload
    rows: list[Row]

    def recommended(self) -> dict[str, Row | None]:
        """The best buildable rows whose predictions are calibrated (a precision kiln has measured)."""
        buildable = [r for r in self.rows if r.buildable and r.is_measured]
        latency_ok = [r for r in buildable if self.workload.max_latency_ms is None
                      or (r.request_latency_ms or math.inf) <= self.workload.max_latency_ms]
        throughput = max(latency_ok, key=lambda r: ((r.throughput_per_gpu_tok_s or 0), -r.tp_size), default=None)
        latency = max(latency_ok, key=lambda r: ((r.bs1_tok_s or 0), -r.tp_size), default=None)
        return {"throughput": throughput, "latency": latency}

    def best_unavailable(self) -> Row | None:
        """The fastest candidate that fits the GPU but is not recommended: this kiln cannot build it yet, or
        has not measured its precision."""
        later = [r for r in self.rows if r.fits and (r.reason or not r.is_measured)]
        return max(later, key=lambda r: r.throughput_per_gpu_tok_s or 0, default=None)


def make_plan(model_name: str, config: Any, gpu: GPU, cal: Calibration, workload: Workload,
              tp_sizes: tuple[int, ...] = (1,), quantizations: tuple[str, ...] = tuple(PRECISIONS),
              kv_dtypes: tuple[str, ...] = tuple(KV_DTYPES), *, measured: Mapping[str, int]) -> Plan:
    """``measured``: how many kiln measurements of each precision the calibration was fitted on."""
    shape = model_shape(config)
    rows = [plan_row(shape, gpu, cal, workload, q, kv, tp) for tp in tp_sizes for q in quantizations for kv in kv_dtypes]
    for row in rows:  # an fp8 KV cache is never measured: calibration takes 16-bit KV engines only
        row.num_measurements = measured.get(row.quantization, 0) if row.kv_cache_dtype == "bf16" else 0
    return Plan(model_name, gpu, workload, rows)
