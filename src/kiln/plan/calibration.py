"""Fitting the cost model's efficiencies to measurements, and the measurements it was fitted on.

A measurement names the GPU, the model (a preset), the engine's limits and precision, and what was
measured: batch-1 decode rate, decode rate at a batch, TTFT of one prompt, or offline output throughput
of a fixed-length workload. ``fit`` searches the FITTED parameters of ``Calibration`` on the bf16
measurements, then each quantization's ``PrecisionFactors`` on that quantization's own measurements
with bf16's held (Nelder-Mead on their logarithms, for the smallest mean squared log error);
``kiln plan --calibrate`` adds the measurements of ``kiln bench`` reports, or of a measurements file,
to the stored ones and refits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError
from kiln.plan.roofline import Calibration, EngineShape, PrecisionFactors

KINDS = ("bs1_decode", "decode", "ttft", "throughput")


@dataclass(frozen=True)
class Measurement:
    gpu: str                 # key of gpus.json
    model: str               # preset name (or HF folder)
    kind: str                # one of KINDS
    value: float             # tok/s, or ms for ttft
    isl: int = 128
    osl: int = 128
    batch: int = 1           # decode: sequences per iteration
    num_requests: int = 1    # throughput
    max_batch_size: int = 512
    max_num_tokens: int = 8192
    precision: str = "bf16"
    source: str = ""
    model_config: dict[str, Any] | None = None  # a ModelConfig's fields, where ``model`` is not a preset

    def predict(self, engine: EngineShape, cal: Calibration) -> float | None:
        if self.kind == "bs1_decode":
            return engine.decode_tok_s(cal, 1, self.isl + self.osl // 2)
        if self.kind == "decode":
            return engine.decode_tok_s(cal, self.batch, self.isl + self.osl // 2)
        if self.kind == "ttft":
            return engine.ttft_ms(cal, self.isl)
        ms = engine.offline_ms(cal, self.isl, self.osl, self.num_requests)
        return None if ms is None else self.num_requests * self.osl / ms * 1e3

    @property
    def what(self) -> str:
        return {"bs1_decode": "batch-1 decode tok/s", "decode": f"decode tok/s at batch {self.batch}",
                "ttft": f"TTFT ms, {self.isl}-token prompt",
                "throughput": f"{self.isl}/{self.osl} output tok/s ({self.num_requests} req)"}[self.kind]

    @property
    def label(self) -> str:
        return f"{self.gpu} {self.model} {self.precision}: {self.what}"


def engine_for(m: Measurement) -> EngineShape:
    """The engine a measurement was taken on, as the cost model sees it."""
    from kiln.models.config import ModelConfig
    from kiln.models.presets import preset_hf_config
    from kiln.plan.planner import KV_DTYPES, PRECISIONS, load_gpus, model_shape

    gpus = load_gpus()
    if m.gpu not in gpus:
        raise ConfigError(f"measurement on unknown GPU {m.gpu!r}; kiln plan knows {', '.join(gpus)}")
    if m.precision not in PRECISIONS:
        raise ConfigError(f"measurement of unknown precision {m.precision!r}; kiln plan knows {', '.join(PRECISIONS)}")
    if m.kind not in KINDS:
        raise ConfigError(f"measurement of unknown kind {m.kind!r}; choose one of {', '.join(KINDS)}")
    if not (isinstance(m.value, (int, float)) and m.value > 0):
        raise ConfigError(f"{m.label}: the measured value must be a positive number, got {m.value!r}")
    config = (ModelConfig.from_dict(m.model_config) if m.model_config is not None
              else ModelConfig.from_hf_config(preset_hf_config(m.model)))
    return EngineShape(model_shape(config), gpus[m.gpu], PRECISIONS[m.precision], KV_DTYPES["bf16"], 1,
                       m.max_batch_size, m.max_num_tokens)


def refit(measurements: Sequence[Measurement], start: Calibration) -> Calibration:
    return fit([engine_for(m) for m in measurements], measurements, start)


def read_measurements(path: str | Path) -> list[Measurement]:
    """``--calibrate``'s inputs: a ``kiln bench throughput`` or ``kiln bench latency`` report, or a
    measurements file (``{"measurements": [...]}``, each as calibration.json stores one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a JSON file ({e})") from e
    if isinstance(data, dict) and "measurements" in data and "engine" not in data:
        return parse_measurements(data["measurements"], str(path))
    return from_report(data, str(path))


def parse_measurements(items: Any, source: str) -> list[Measurement]:
    """Measurements written by hand; one without a ``source`` is sourced to the file."""
    accepted = ", ".join(f.name for f in fields(Measurement))
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise ConfigError(f"{source}: 'measurements' must be a list of objects with the fields {accepted}")
    try:
        return [Measurement(**{"source": source, **m}) for m in items]
    except TypeError as e:
        raise ConfigError(f"{source}: a measurement {e}; accepted fields: {accepted}") from e


def from_report(report: Any, source: str) -> list[Measurement]:
    """Measurements in a ``kiln bench throughput`` or ``kiln bench latency`` report (parsed JSON); the
    precision is the engine's quantization (bf16 for a 16-bit engine without one)."""
    from kiln.plan.planner import PRECISIONS, load_gpus

    try:
        engine, machine, world = report["engine"], report["machine"], report["world_info"]
        requests, performance = report["request_info"], report["performance"]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{source}: not a kiln bench report (no {e}) nor a measurements file "
                          "({\"measurements\": [...]})") from e
    if engine.get("backend") != "kiln" or "model_config" not in engine:
        raise ConfigError(f"{source}: a report of kiln's own backend with the engine's model_config is needed "
                          "(rerun kiln bench with this kiln)")
    gpu = next((key for key, g in load_gpus().items() if g.name == machine.get("name")), None)
    if gpu is None:
        raise ConfigError(f"{source}: GPU {machine.get('name')!r} is not in kiln plan's table")
    if engine.get("dtype") not in ("bfloat16", "float16"):
        raise ConfigError(f"{source}: a {engine.get('dtype')} engine; kiln plan models engines with 16-bit "
                          "activations (bfloat16 or float16) only")
    if engine.get("kv_cache_dtype") == "fp8":
        raise ConfigError(f"{source}: an engine with an fp8 KV cache; kiln plan calibrates on 16-bit KV caches "
                          "only so far")
    precision = engine.get("quantization") or "bf16"  # the report says None for the dtype's own linear layers
    if precision not in PRECISIONS:
        raise ConfigError(f"{source}: quantization {precision!r} is not one kiln plan models; it knows "
                          f"{', '.join(PRECISIONS)}")
    common = dict(gpu=gpu, model=engine.get("model", ""), model_config=engine["model_config"], precision=precision,
                  isl=round(requests["avg_input_length"]), osl=round(requests["avg_output_length"]),
                  max_batch_size=world["max_batch_size"], max_num_tokens=world["max_num_tokens"], source=source)
    if world["max_batch_size"] == 1 and "streaming_metrics" in report:  # kiln bench latency
        s = report["streaming_metrics"]
        return [Measurement(kind="bs1_decode", value=s["token_output_speed_tok_s"], **common),
                Measurement(kind="ttft", value=s["avg_ttft_ms"], **common)]
    return [Measurement(kind="throughput", value=performance["system_output_throughput_tok_s"],
                        num_requests=requests["num_requests"], **common)]


def load_stored() -> tuple[Calibration, list[Measurement]]:
    data = json.loads(resources.files("kiln.plan").joinpath("calibration.json").read_text())
    return parse(data)


def parse(data: dict[str, Any]) -> tuple[Calibration, list[Measurement]]:
    names = {f.name for f in fields(Calibration)}
    values = {k: v for k, v in data["calibration"].items() if k in names}
    values["precisions"] = tuple(PrecisionFactors(**f) for f in values.get("precisions", ()))
    return Calibration(**values), [Measurement(**m) for m in data.get("measurements", [])]


def load_file(path: str | Path) -> tuple[Calibration, list[Measurement]]:
    try:
        return parse(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a kiln plan calibration ({e}); write one with kiln plan --calibrate") from e


def to_json(cal: Calibration, measurements: Sequence[Measurement]) -> str:
    return json.dumps({"calibration": asdict(cal), "measurements": [asdict(m) for m in measurements]}, indent=1)


def comparison(cal: Calibration, measurements: Sequence[Measurement]) -> str:
    """Predicted against measured under ``cal``, one markdown row per measurement (docs/plan.md's table)."""
    lines = ["| GPU | model | precision | measurement | measured | predicted | error |",
             "|---|---|---|---|---|---|---|"]
    for m in measurements:
        p = m.predict(engine_for(m), cal)
        predicted, error_pct = ("unservable", "-") if p is None else (f"{p:,.1f}", f"{100 * (p / m.value - 1):+.1f}%")
        lines.append(f"| {m.gpu} | {m.model} | {m.precision} | {m.what} | {m.value:,.1f} | {predicted} | {error_pct} |")
    return "\n".join(lines)


def error(engines: Sequence[EngineShape], measurements: Sequence[Measurement], cal: Calibration) -> float:
    """Mean squared log ratio of predicted to measured (an unservable prediction counts as 10x off)."""
    total = 0.0
    for engine, m in zip(engines, measurements):
        p = m.predict(engine, cal)
        total += math.log(p / m.value) ** 2 if p else math.log(10.0) ** 2
    return total / max(1, len(measurements))


FITTED = ("bandwidth_efficiency", "compute_efficiency", "decode_step_ms", "context_step_ms", "host_us_per_sequence")
BOUNDS = {"bandwidth_efficiency": (0.05, 1.0), "compute_efficiency": (0.05, 1.0),
          "decode_step_ms": (0.0, 50.0), "context_step_ms": (0.0, 200.0), "host_us_per_sequence": (0.0, 1000.0)}
# A quantization's factors, relative to bf16's efficiencies: its kernels may stream weights or run matmuls
# far slower than bf16's, or somewhat faster (bf16 streams at ~0.7 of the datasheet bandwidth).
FACTOR_BOUNDS = {"bandwidth": (0.05, 2.0), "compute": (0.05, 4.0)}


def fit(engines: Sequence[EngineShape], measurements: Sequence[Measurement], start: Calibration,
        iterations: int = 300) -> Calibration:
    """bf16's FITTED parameters on the bf16 measurements, then each quantization's ``PrecisionFactors`` on
    its own measurements with bf16's held; each minimises ``error`` from ``start``'s values (Nelder-Mead
    over log-parameters, kept in BOUNDS and FACTOR_BOUNDS). A quantization without measurements keeps
    factors of 1.0."""
    groups: dict[str, tuple[list[EngineShape], list[Measurement]]] = {}
    for engine, m in zip(engines, measurements):
        group = groups.setdefault(m.precision, ([], []))
        group[0].append(engine)
        group[1].append(m)
    if "bf16" not in groups:
        raise ConfigError("no bf16 measurements to calibrate on: a quantization's efficiencies are fitted "
                          "relative to bf16's; add a kiln bench report of a 16-bit engine")
    bf16_engines, bf16_measurements = groups.pop("bf16")
    values = _minimise(lambda v: error(bf16_engines, bf16_measurements, replace(start, **dict(zip(FITTED, v)))),
                       [getattr(start, name) for name in FITTED], [BOUNDS[name] for name in FITTED], iterations)
    cal = replace(start, **dict(zip(FITTED, values)), precisions=())
    for name, (group_engines, group_measurements) in sorted(groups.items()):
        held = cal
        factors = _minimise(lambda v: error(group_engines, group_measurements, _with_factors(held, name, v)),
                            [getattr(start.factors(name), f) for f in FACTOR_BOUNDS], list(FACTOR_BOUNDS.values()),
                            iterations)
        cal = _with_factors(held, name, factors)
    return cal


def _with_factors(cal: Calibration, name: str, values: Sequence[float]) -> Calibration:
    others = tuple(f for f in cal.precisions if f.name != name)
    return replace(cal, precisions=(*others, PrecisionFactors(name, *values)))


def _minimise(cost: Callable[[Sequence[float]], float], start: Sequence[float],
              bounds: Sequence[tuple[float, float]], iterations: int) -> tuple[float, ...]:
    """Nelder-Mead over the logarithms of positive parameters, each kept within its bounds."""

    def values(x: Sequence[float]) -> tuple[float, ...]:
        return tuple(min(hi, max(lo, math.exp(v))) for v, (lo, hi) in zip(x, bounds))

    x0 = [math.log(max(1e-3, v)) for v in start]
    return values(_nelder_mead(lambda x: cost(values(x)), x0, iterations))


def _nelder_mead(f: Callable[[Sequence[float]], float], x0: list[float], iterations: int,
                 step: float = 0.3) -> list[float]:
    simplex = [x0] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(len(x0))]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = sorted(range(len(simplex)), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centroid = [sum(xs) / (len(simplex) - 1) for xs in zip(*simplex[:-1])]

        def toward(t: float) -> list[float]:
            return [c + t * (w - c) for c, w in zip(centroid, simplex[-1])]

        reflected = toward(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = toward(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = toward(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, xs)] for xs in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[min(range(len(simplex)), key=values.__getitem__)]
