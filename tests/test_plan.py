"""``kiln plan``: the cost model against kiln's measurements, the GPU rules, the CLI and calibration."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.config import BuildConfig
from kiln.convert import AutoModelForCausalLM
from kiln.models import num_params
from kiln.plan import Workload, gpu_named, make_plan
from kiln.plan import calibration as calib
from kiln.errors import ConfigError
from kiln.kernels.weight_only import DEQUANT_MIN_ROWS
from kiln.plan.planner import KV_DTYPES, PRECISIONS, model_shape
from kiln.plan.roofline import EngineShape, PrecisionFactors

REPO = Path(__file__).resolve().parent.parent
LLAMA3_8B = AutoModelForCausalLM.from_preset("llama-3-8b").config
MEASURED = Counter(m.precision for m in calib.load_stored()[1])  # kiln's measurements per precision


def engine(gpu: str = "h100-80gb", precision: str = "bf16", kv: str = "bf16", tp: int = 1, batch: int = 512,
           tokens: int = 8192, config=LLAMA3_8B) -> EngineShape:
    return EngineShape(model_shape(config), gpu_named(gpu), PRECISIONS[precision], KV_DTYPES[kv], tp, batch, tokens)


def kiln(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# The stored measurements docs/plan.md lists as missing the 15% goal, with the error it states for each.
DOCUMENTED_MISSES = {
    # bf16's fit makes batch-512 decode host-bound; fp8's faster GPU shows the host is quicker than that
    "h200 llama-3-8b fp8: 128/128 output tok/s (2048 req)": 0.16,
    "h200 llama-3-8b fp8: TTFT ms, 128-token prompt": 0.17,  # the same host time, at a prompt's step
}


def test_stored_calibration_predicts_kilns_measurements():
    cal, measurements = calib.load_stored()
    errors = {m.label: m.predict(calib.engine_for(m), cal) / m.value - 1 for m in measurements}
    off = {label: f"{e:+.1%}" for label, e in errors.items() if abs(e) > DOCUMENTED_MISSES.get(label, 0.15)}
    assert not off, off
    assert statistics.median(abs(e) for e in errors.values()) < 0.05
    assert {m.precision for m in measurements} >= {"bf16", "fp8"}
    assert [f.name for f in cal.precisions] == ["fp8", "int4_wo", "int8_wo"]  # the measured quantizations, and only those


def test_docs_table_is_the_stored_calibrations():
    """docs/plan.md's predicted-against-measured table is what kiln plan --calibrate prints for the stored
    calibration: regenerate it with the command docs/plan.md gives when calibration.json changes."""
    table = calib.comparison(*calib.load_stored())
    assert table in (REPO / "docs/plan.md").read_text()


def test_kv_pool_matches_the_runtime_on_an_h100():
    # docs/results/h100/throughput_128_128.json: max batch 512, 8192 tokens per iteration, 90% of free
    # memory: the runtime made 14529 blocks of 32 tokens.
    cal, _ = calib.load_stored()
    blocks = engine().kv_tokens(cal) // 32
    assert abs(blocks / 14529 - 1) < 0.02


def test_weight_bytes_per_precision():
    e = {p: engine(precision=p) for p in ("bf16", "fp8", "int8_wo", "int4_wo")}
    linear = e["bf16"].linear_params
    assert linear == num_params(LLAMA3_8B) - 2 * 128256 * 4096
    assert e["bf16"].weight_bytes_per_gpu == 2 * num_params(LLAMA3_8B)
    assert e["fp8"].weight_bytes_read == linear + 2 * 128256 * 4096  # the LM head stays 16-bit
    # 4.5 bits per linear weight; the 1 GB LM head stays 16-bit.
    assert e["int4_wo"].weight_bytes_read == pytest.approx(linear * (0.5 + 4 / 128) + 2 * 128256 * 4096)
    assert engine(tp=2).weight_bytes_per_gpu == e["bf16"].weight_bytes_per_gpu / 2
    # 8 KV heads over tp 16 are replicated: each rank holds one head, not half of one.
    assert engine(tp=16).kv_bytes_per_token == engine(tp=8).kv_bytes_per_token


@pytest.mark.parametrize("precision, bits", [("int8_wo", 8), ("int4_wo", 4), ("int4_awq", 4)])
def test_the_dequantize_round_trip_is_counted_from_the_kernels_threshold(precision, bits):
    """From the kernels' DEQUANT_MIN_ROWS rows a weight-only matmul dequantizes each weight into a bf16
    scratch that cuBLAS reads: 4 bytes per linear weight more, once per iteration whatever its rows. One row
    fewer runs the Triton kernels on the packed weight alone."""
    cal, _ = calib.load_stored()
    gpu_only = dataclasses.replace(cal, context_step_ms=0.0, host_us_per_sequence=0.0)
    e = engine(gpu="h200", precision=precision)
    rows = DEQUANT_MIN_ROWS[bits]
    assert e.precision.dequantize_min_rows == rows  # the kernels' constant, not a copy
    assert e.dequantize_bytes(rows - 1) == 0
    assert e.dequantize_bytes(rows) == e.dequantize_bytes(8 * rows) == 4 * e.linear_params
    assert engine(gpu="h200", precision="fp8").dequantize_bytes(4096) == engine(gpu="h200").dequantize_bytes(4096) == 0

    def decode_ms(batch: int) -> float:
        return e.iteration_ms(gpu_only, batch, batch, batch, batch * 192, batch * 192, is_context=False)

    rate = e.gpu.bandwidth_tbps * 1e12 * cal.bandwidth_efficiency
    assert decode_ms(rows) - decode_ms(rows - 1) == pytest.approx(e.dequantize_bytes(rows) / rate * 1e3, rel=0.05)


def test_offline_simulation_bounds():
    cal, _ = calib.load_stored()
    e = engine(gpu="h200")
    ms = e.offline_ms(cal, 128, 128, 2048)
    # No faster than every token at the best decode rate, no slower than one request at a time.
    fastest = 2048 * 128 / e.decode_tok_s(cal, 512, 192) * 1e3
    serial = 2048 * (e.ttft_ms(cal, 128) + 127 / e.decode_tok_s(cal, 1, 192) * 1e3)
    assert fastest < ms < serial
    # A pool that holds fewer requests at once is slower; more requests take longer.
    small = dataclasses.replace(e, max_batch_size=32)
    assert small.offline_ms(cal, 128, 128, 2048) > ms
    assert e.offline_ms(cal, 128, 128, 4096) > ms
    assert e.offline_ms(cal, 128, 1, 64) > 0  # output length 1: every request ends at its prompt


def test_fp8_refused_on_an_a100_with_what_to_use_instead():
    cal, _ = calib.load_stored()
    plan = make_plan("llama-3-8b", LLAMA3_8B, gpu_named("a100-80gb"), cal, Workload(128, 128, 1000),
                     measured=MEASURED)
    fp8 = [r for r in plan.rows if r.quantization == "fp8"]
    assert fp8 and all(not r.fits and "sm89" in r.reason and "int4_wo" in r.reason for r in fp8)
    h200 = make_plan("llama-3-8b", LLAMA3_8B, gpu_named("h200"), cal, Workload(128, 128, 1000), measured=MEASURED)
    assert all(r.fits for r in h200.rows if r.quantization == "fp8")


def test_fp8_kv_rows_build_on_sm89_plus_and_say_why_not_on_an_a100():
    """bf16 weights with an fp8 KV cache: buildable on the H200 (twice the KV tokens, predicted, not measured),
    refused by kiln on the A100, where its kernels have no e4m3 conversion (TensorRT-LLM allows it there)."""
    cal, _ = calib.load_stored()
    h200 = make_plan("llama-3-8b", LLAMA3_8B, gpu_named("h200"), cal, Workload(128, 128, 1000), measured=MEASURED)
    rows = {r.kv_cache_dtype: r for r in h200.rows if (r.quantization, r.tp_size) == ("bf16", 1)}
    assert rows["fp8"].buildable and not rows["fp8"].is_measured and rows["bf16"].is_measured
    assert rows["fp8"].kv_tokens > 1.9 * rows["bf16"].kv_tokens
    assert rows["fp8"].note == "uncalibrated: bf16's efficiencies"
    a100 = make_plan("llama-3-8b", LLAMA3_8B, gpu_named("a100-80gb"), cal, Workload(128, 128, 1000),
                     measured=MEASURED)
    fp8_kv = next(r for r in a100.rows if (r.quantization, r.kv_cache_dtype, r.tp_size) == ("bf16", "fp8", 1))
    assert fp8_kv.fits and fp8_kv.reason == ("kiln's Triton kernels read and write e4m3 only on sm89+ (Ada, "
                                             "Hopper), not on sm80 (the A100)")


def test_a_model_too_large_for_one_gpu_says_so():
    cal, _ = calib.load_stored()
    big = dataclasses.replace(LLAMA3_8B, num_layers=80, hidden_size=8192, intermediate_size=28672, num_heads=64,
                              head_dim=128)
    plan = make_plan("70b", big, gpu_named("a100-40gb"), cal, Workload(128, 128, 100), tp_sizes=(1, 4, 8),
                     measured=MEASURED)
    bf16_tp1 = next(r for r in plan.rows if (r.quantization, r.kv_cache_dtype, r.tp_size) == ("bf16", "bf16", 1))
    assert not bf16_tp1.fits and "larger tp" in bf16_tp1.reason
    assert any(r.fits for r in plan.rows if r.tp_size == 8)
    forty_heads = dataclasses.replace(big, num_heads=40)
    odd = make_plan("odd", forty_heads, gpu_named("h200"), cal, Workload(128, 128, 100), tp_sizes=(16,),
                    measured=MEASURED)
    assert all(r.reason == "40 attention heads do not split over tp 16" for r in odd.rows)


def test_recommendations_are_buildable_here():
    cal, _ = calib.load_stored()
    plan = make_plan("llama-3-8b", LLAMA3_8B, gpu_named("h200"), cal, Workload(1000, 1000, 3000), measured=MEASURED)
    rec = plan.recommended()
    assert rec["throughput"] is not None and rec["latency"] is not None
    for r in rec.values():
        assert r.buildable and r.is_measured
        BuildConfig(max_batch_size=r.max_batch_size, max_input_len=1000, max_seq_len=2000,
                    max_num_tokens=r.max_num_tokens, tp_size=r.tp_size,
                    quantization="none" if r.quantization == "bf16" else r.quantization)
    # A latency bound lowers the batch the throughput engine may use.
    bounded = make_plan("llama-3-8b", LLAMA3_8B, gpu_named("h200"), cal, Workload(1000, 1000, 3000, 8_000),
                        measured=MEASURED)
    assert bounded.recommended()["throughput"].max_batch_size < rec["throughput"].max_batch_size


def test_weight_only_throughput_batch_is_not_one_just_under_the_dequantize_threshold():
    """Decode speed alone has a cliff at DEQUANT_MIN_ROWS (the first batch to pay the round trip pays it for
    few rows), so the batch just under it looks best; the max batch is chosen on the whole run instead
    (prefill and decode), where the round trip is spread over every row of a large batch."""
    cal, _ = calib.load_stored()
    plan = make_plan("llama-3-8b", LLAMA3_8B, gpu_named("h200"), cal, Workload(128, 128, 3000), kv_dtypes=("bf16",),
                     measured=MEASURED)
    rows = {r.quantization: r for r in plan.rows}
    for precision, bits in (("int8_wo", 8), ("int4_wo", 4)):
        under = DEQUANT_MIN_ROWS[bits] // 2  # the largest power of two below the threshold
        e = engine(gpu="h200", precision=precision, batch=under)
        assert e.decode_tok_s(cal, 2 * under, 192) < e.decode_tok_s(cal, under, 192)  # the cliff
        chosen = rows[precision]
        assert chosen.max_batch_size >= 2 * DEQUANT_MIN_ROWS[bits]
        assert chosen.throughput_tok_s > 1.2 * 3000 * 128 / e.offline_ms(cal, 128, 128, 3000) * 1e3


def test_cli_answers_the_a100_exercise(capsys):
    code, out, err = kiln(capsys, "plan", "llama-2-7b", "--gpu", "a100-80gb")
    assert code == 0, err
    assert "fp8 needs sm89+" in out
    assert "kiln build llama-2-7b --output ENGINE --dtype bfloat16" in out
    assert "--kv-cache-free-gpu-mem-fraction" in out
    data = json.loads(kiln(capsys, "plan", "llama-2-7b", "--gpu", "a100-80gb", "--json", "--tp", "1,2")[1])
    keys = {"quantization", "kv_cache_dtype", "tp_size", "fits", "weights_gib", "kv_tokens", "max_batch_size",
            "bs1_tok_s", "throughput_tok_s", "ttft_ms", "reason"}
    assert keys <= set(data["configs"][0]) and len(data["configs"]) == 20
    assert data["recommended"]["throughput"]["build_command"].startswith("kiln build llama-2-7b")


@pytest.mark.parametrize("args, message", [
    (("llama-2-7b", "--gpu", "b200"), "unknown GPU 'b200'; kiln plan knows a100-40gb"),
    (("llama-9b", "--gpu", "h200"), "neither a model folder nor a preset"),
    (("llama-2-7b", "--gpu", "h200", "--tp", "3"), "--tp '3': give powers of two"),
    (("llama-2-7b",), "needs a MODEL and --gpu"),
])
def test_cli_errors_are_one_line(capsys, args, message):
    code, _, err = kiln(capsys, "plan", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def bench_report(tmp_path: Path, quantization: str | None = None, dtype: str = "bfloat16") -> Path:
    """The H100's kiln bench throughput report, as an engine of ``quantization`` would have written it."""
    report = json.loads((REPO / "docs/results/h100/throughput_128_128.json").read_text())
    report["engine"].update(model_config=LLAMA3_8B.to_dict(), quantization=quantization, dtype=dtype)
    path = tmp_path / f"report_{quantization}_{dtype}.json"
    path.write_text(json.dumps(report))
    return path


def test_calibrate_from_a_bench_report(tmp_path):
    (m,) = calib.read_measurements(bench_report(tmp_path))
    assert (m.gpu, m.kind, m.isl, m.osl, m.num_requests, m.precision) == ("h100-80gb", "throughput", 128, 128, 2048,
                                                                          "bf16")
    assert m.value == pytest.approx(17437.4, rel=1e-3)
    cal, stored = calib.load_stored()
    start = dataclasses.replace(cal, bandwidth_efficiency=0.4, compute_efficiency=0.3)
    engines = [calib.engine_for(x) for x in stored[:3] + [m]]
    fitted = calib.fit(engines, stored[:3] + [m], start, iterations=40)
    assert calib.error(engines, stored[:3] + [m], fitted) < calib.error(engines, stored[:3] + [m], start)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not a kiln bench report .* nor a measurements file"):
        calib.read_measurements(bad)


@pytest.mark.parametrize("quantization", ["fp8", "int8_wo", "int4_wo"])
def test_a_quantized_report_round_trips(tmp_path, quantization):
    """A quantized engine's report is a measurement of that precision, and survives calibration.json."""
    (m,) = calib.read_measurements(bench_report(tmp_path, quantization))
    assert m.precision == quantization and m.kind == "throughput"
    assert calib.engine_for(m).precision is PRECISIONS[quantization]
    cal, stored = calib.load_stored()
    cal = dataclasses.replace(cal, precisions=(*cal.precisions, PrecisionFactors(quantization, 0.5, 0.7)))
    assert calib.parse(json.loads(calib.to_json(cal, [*stored, m]))) == (cal, [*stored, m])


@pytest.mark.parametrize("quantization, dtype, message", [
    ("int2_wo", "bfloat16", "quantization 'int2_wo' is not one kiln plan models; it knows bf16, fp8"),
    (None, "float32", "a float32 engine; kiln plan models engines with 16-bit activations"),
])
def test_a_report_kiln_plan_does_not_model_is_refused(tmp_path, quantization, dtype, message):
    with pytest.raises(ConfigError, match=message):
        calib.read_measurements(bench_report(tmp_path, quantization, dtype))


def test_fit_recovers_known_factors():
    """bf16's parameters from the bf16 measurements, then each quantization's factors from its own."""
    stored, _ = calib.load_stored()
    truth = dataclasses.replace(stored, precisions=(PrecisionFactors("fp8", 0.8, 0.6),
                                                    PrecisionFactors("int4_wo", 0.3, 1.2)))
    # A short prompt's TTFT pins context_step_ms (the host's part of a context step): without it the fit may
    # drift it until a 2048-token prompt is host-bound and fp8's compute factor no longer shows.
    shapes = [dict(kind="bs1_decode", isl=128, osl=256), dict(kind="decode", batch=8, isl=128, osl=64),
              dict(kind="ttft", isl=128), dict(kind="ttft", isl=2048)]
    synthetic = []
    for precision in ("bf16", "fp8", "int4_wo"):
        for gpu in ("h200", "h100-80gb"):
            for shape in shapes:
                m = calib.Measurement(gpu=gpu, model="llama-3-8b", value=1.0, precision=precision, **shape)
                synthetic.append(dataclasses.replace(m, value=m.predict(calib.engine_for(m), truth)))
    start = dataclasses.replace(truth, precisions=())
    fitted = calib.fit([calib.engine_for(m) for m in synthetic], synthetic, start, iterations=200)
    assert [f.name for f in fitted.precisions] == ["fp8", "int4_wo"]
    for want, got in zip(truth.precisions, fitted.precisions):
        assert (got.bandwidth, got.compute) == (pytest.approx(want.bandwidth, rel=0.02),
                                                pytest.approx(want.compute, rel=0.02))
    assert fitted.bandwidth_efficiency == pytest.approx(truth.bandwidth_efficiency, rel=0.02)
    assert fitted.factors("int8_wo") == PrecisionFactors("int8_wo", 1.0, 1.0)  # unmeasured: bf16's efficiencies
    quantized = [m for m in synthetic if m.precision != "bf16"]
    with pytest.raises(ConfigError, match="no bf16 measurements"):
        calib.fit([calib.engine_for(m) for m in quantized], quantized, start)


def test_precision_factors_scale_only_their_precision():
    stored, _ = calib.load_stored()
    cal = dataclasses.replace(stored, precisions=tuple(p for p in stored.precisions if p.name != "int8_wo"))
    slow = dataclasses.replace(cal, precisions=(*cal.precisions, PrecisionFactors("int8_wo", 0.5, 0.5)))
    for other in (engine(gpu="h200"), engine(gpu="h200", precision="fp8")):
        assert other.decode_tok_s(slow, 1, 192) == other.decode_tok_s(cal, 1, 192)
        assert other.ttft_ms(slow, 4096) == other.ttft_ms(cal, 4096)
    int8 = engine(gpu="h200", precision="int8_wo")
    # Batch 1 streams the int8 linear weights at half bf16's rate (the LM head and KV as in bf16): each token
    # takes the linear weights' bytes at bf16's rate longer.
    rate = int8.gpu.bandwidth_tbps * 1e12 * cal.bandwidth_efficiency
    extra_s = 1 / int8.decode_tok_s(slow, 1, 192) - 1 / int8.decode_tok_s(cal, 1, 192)
    assert extra_s == pytest.approx(int8.linear_bytes_read / rate, rel=0.02)
    assert int8.ttft_ms(slow, 4096) > 1.8 * int8.ttft_ms(cal, 4096)  # compute-bound prefill at half the rate


def test_rows_say_what_their_figures_are_calibrated_on():
    cal, _ = calib.load_stored()
    plan = make_plan("llama-3-8b", LLAMA3_8B, gpu_named("h200"), cal, Workload(128, 128, 1000), kv_dtypes=("bf16",),
                     measured={"bf16": 21, "fp8": 3})
    notes = {r.quantization: r.note for r in plan.rows}
    assert notes["bf16"] == "calibrated on 21 kiln measurements"
    assert notes["fp8"] == "calibrated on 3 kiln measurements"
    assert notes["int8_wo"] == notes["int4_wo"] == notes["int4_awq"] == "uncalibrated: bf16's efficiencies"
    # Only calibrated rows are recommended; an uncalibrated one is named as a later option at most.
    assert all(r.is_measured for r in plan.recommended().values())


def test_calibrate_adds_a_measurements_file_and_refits(capsys, tmp_path):
    """The lead's path for a new quantization: a small measurements file, one command."""
    cal, stored = calib.load_stored()
    base = tmp_path / "base.json"  # two quick bf16 figures keep the refit fast
    base.write_text(calib.to_json(cal, [m for m in stored if m.kind == "bs1_decode" and m.precision == "bf16"][:2]))
    added = tmp_path / "int8.json"
    added.write_text(json.dumps({"measurements": [
        {"gpu": "h200", "model": "llama-3-8b", "kind": "bs1_decode", "value": 280.0, "isl": 128, "osl": 256,
         "precision": "int8_wo", "source": "kiln int8_wo 2026-12-02, scripts/gpu_check_quant.py, H200"}]}))
    out = tmp_path / "refit.json"
    code, printed, err = kiln(capsys, "plan", "--calibration", str(base), "--calibrate", str(added), str(added),
                              "--calibration-out", str(out))
    assert code == 0, err
    assert "| h200 | llama-3-8b | int8_wo | batch-1 decode tok/s | 280.0 |" in printed
    refit, measurements = calib.load_file(out)
    assert [m.precision for m in measurements] == ["bf16", "bf16", "int8_wo"]  # given twice, added once
    assert [f.name for f in refit.precisions] == ["int8_wo"]
    int8 = calib.engine_for(measurements[-1])
    assert int8.decode_tok_s(refit, 1, 192) == pytest.approx(280.0, rel=0.01)
    data = json.loads(kiln(capsys, "plan", "llama-3-8b", "--gpu", "h200", "--json", "--calibration", str(out))[1])
    int8_row = next(r for r in data["configs"] if (r["quantization"], r["kv_cache_dtype"]) == ("int8_wo", "bf16"))
    assert int8_row["num_measurements"] == 1
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"measurements": [{"gpu": "h200", "value": 1.0, "kind": "bs1_decode"}]}))
    code, _, err = kiln(capsys, "plan", "--calibrate", str(wrong))
    assert code == 1 and "missing 1 required positional argument: 'model'; accepted fields: gpu, model" in err
    wrong.write_text(json.dumps({"measurements": [{"gpu": "h200", "model": "llama-3-8b", "kind": "bs1_decode",
                                                   "value": 0.0, "precision": "int8_wo"}]}))
    code, _, err = kiln(capsys, "plan", "--calibrate", str(wrong))
    assert code == 1 and "int8_wo: batch-1 decode tok/s: the measured value must be a positive number, got 0.0" in err


def test_recommended_commands_parse_as_kiln_flags(capsys):
    """The build command and runtime flags kiln plan prints are real flags of kiln build and kiln serve."""
    from kiln.cli import build_parser

    data = json.loads(kiln(capsys, "plan", "llama-3-8b", "--gpu", "h200", "--json")[1])
    for rec in data["recommended"].values():
        build = rec["build_command"].replace("ENGINE", "/tmp/engine").split()[1:]
        build_parser().parse_args(build)
        args = build_parser().parse_args(["serve", "/tmp/engine", *rec["runtime_flags"].split()])
        assert args.max_batch_size >= 1
