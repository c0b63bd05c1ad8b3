"""kiln bench runs on the bundled stories260K engine (CPU): reports consistent with the run, the
concurrency cap, latency mode, the Hugging Face baseline, the sweep plot, and the CLI's errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kiln.bench.dataset import BenchRequest, TokenSpace, token_norm_dist, write_dataset
from kiln.bench.hf_backend import HFBackend, hf_config_class, hf_state_dict
from kiln.bench.latency import run_latency
from kiln.bench.report import PERCENTILE_KEYS
from kiln.bench.throughput import BenchSampling, KilnBackend, benchmark
from kiln.engine import EngineManifest, load_weights
from kiln.cli import main
from kiln.config import BuildConfig, RuntimeConfig, SamplingParams
from kiln.convert.checkpoint import CheckpointReader
from kiln.errors import ConfigError
from kiln.models import PRESETS, ModelConfig
from kiln.models.presets import preset_hf_config
from kiln.runtime.llm import DEFAULT_MODEL_DIR, LLM, ensure_engine


@pytest.fixture(scope="module")
def engine():
    """stories260K on the CPU (also on GPU machines: the figures checked here need no GPU)."""
    build = BuildConfig(max_batch_size=64, max_input_len=256, max_seq_len=512, max_num_tokens=2048, target="cpu")
    return ensure_engine(None, build, progress=False)


@pytest.fixture(scope="module")
def requests(engine) -> list[BenchRequest]:
    return token_norm_dist(TokenSpace.from_engine(engine), 8, input_mean=24, input_stdev=6, output_mean=10,
                           output_stdev=3, seed=0)


@pytest.fixture(scope="module")
def dataset_file(requests, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "dataset.jsonl"
    with path.open("w") as f:
        write_dataset(requests, f)
    return path


def max_overlap(records) -> int:
    """Most requests in flight at once, from their start / end times."""
    events = sorted([(r.start_time, 1) for r in records] + [(r.end_time, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    return peak


def assert_ordered(stats):
    values = [stats[k] for k in ("minimum", "p50", "p90", "p95", "p99", "maximum")]
    assert values == sorted(values)
    assert stats["minimum"] <= stats["average"] <= stats["maximum"]


def test_throughput_cli_report_matches_the_run(engine, requests, dataset_file, tmp_path, capsys):
    report_file = tmp_path / "report.json"
    assert main(["bench", "throughput", "--engine", str(engine), "--dataset", str(dataset_file), "--streaming",
                 "--warmup", "1", "--report-json", str(report_file)]) == 0
    printed = capsys.readouterr().out
    for section in ("ENGINE DETAILS", "MACHINE DETAILS", "WORLD + RUNTIME INFORMATION", "REQUEST DETAILS",
                    "PERFORMANCE OVERVIEW", "DATASET DETAILS", "[TTFT] P99", "[TPOT] P90", "[Latency] P95"):
        assert section in printed
    report = json.loads(report_file.read_text())
    p, s, q, d = (report[k] for k in ("performance", "streaming_metrics", "request_info", "dataset"))
    output_tokens = sum(r.output_tokens for r in requests)
    input_tokens = sum(len(r.input_ids) for r in requests)
    assert q["num_requests"] == d["num_requests"] == len(requests)
    assert q["avg_output_length"] == pytest.approx(output_tokens / len(requests))
    assert q["avg_input_length"] == pytest.approx(input_tokens / len(requests))
    seconds = p["total_latency_ms"] / 1e3
    assert p["system_output_throughput_tok_s"] == pytest.approx(output_tokens / seconds)
    assert p["system_total_throughput_tok_s"] == pytest.approx((output_tokens + input_tokens) / seconds)
    assert p["request_throughput_req_s"] == pytest.approx(len(requests) / seconds)
    assert p["output_throughput_per_gpu_tok_s"] == pytest.approx(p["system_output_throughput_tok_s"])
    for stats in (p["request_latency_percentiles_ms"], s["ttft_percentiles"], s["tpot_percentiles"],
                  s["gen_tps_percentiles"], d["isl_stats"], d["osl_stats"]):
        assert set(stats) == set(PERCENTILE_KEYS)
        assert_ordered(stats)
    assert p["avg_request_latency_ms"] == pytest.approx(p["request_latency_percentiles_ms"]["average"])
    assert s["avg_ttft_ms"] < p["avg_request_latency_ms"] <= p["total_latency_ms"]
    assert d["osl_stats"]["average"] == pytest.approx(q["avg_output_length"])
    assert report["engine"]["backend"] == "kiln" and report["world_info"]["max_batch_size"] == 64
    stats = report["iteration_stats"]
    # Each iteration decodes one token per running request at most, so output tokens bound the work.
    assert 1 <= stats["max_batch_size"] <= len(requests)
    assert stats["num_iterations"] * stats["avg_batch_size"] >= output_tokens - len(requests)


def test_concurrency_cap_holds_and_counts_are_exact(engine, requests):
    backend = KilnBackend(engine, RuntimeConfig(), progress=False)
    try:
        run = backend.run(requests, concurrency=2, streaming=True, progress=False)
        report = benchmark(backend, requests, concurrency=3, progress=False)
    finally:
        backend.close()
    assert sorted((r.task_id, r.num_output_tokens) for r in run.records) == [(r.task_id, r.output_tokens)
                                                                             for r in requests]
    assert max_overlap(run.records) <= 2
    assert all(r.start_time <= r.first_token_time <= r.end_time for r in run.records)
    assert report["request_info"]["max_concurrency"] == 3
    assert report["request_info"]["avg_num_concurrent_requests"] <= 3
    assert "streaming_metrics" not in report


def test_a_sampled_run_counts_every_token_and_says_how_it_sampled(engine, dataset_file, tmp_path, capsys):
    report_file = tmp_path / "sampled.json"
    assert main(["bench", "throughput", "--engine", str(engine), "--dataset", str(dataset_file), "--warmup", "0",
                 "--temperature", "0.8", "--top-p", "0.95", "--seed", "7", "--report-json", str(report_file)]) == 0
    assert "Sampling:               temperature 0.8, top_p 0.95, seed 7 + task id" in capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert report["world_info"]["sampling"] == "temperature 0.8, top_p 0.95, seed 7 + task id"
    assert report["request_info"]["avg_output_length"] == pytest.approx(report["dataset"]["osl_stats"]["average"])


def test_bench_sampling_seeds_each_request_and_checks_its_values():
    sampling = BenchSampling(0.8, 0.95, seed=7)
    assert sampling.params(3, 10) == SamplingParams(max_tokens=10, temperature=0.8, top_p=0.95, seed=10,
                                                    ignore_eos=True, detokenize=False)  # token ids only, as hf
    assert not sampling.is_greedy and BenchSampling().is_greedy and BenchSampling().describe() == "greedy"
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\] \(--temperature 0.8, --top-p 1.5\)"):
        BenchSampling(0.8, 1.5)


def test_latency_runs_one_request_at_a_time(engine, requests):
    report = run_latency(engine, requests[:4], warmup=1, progress=False)
    assert report["world_info"]["max_batch_size"] == 1
    assert report["request_info"]["avg_num_concurrent_requests"] <= 1.0 + 1e-6
    assert report["iteration_stats"]["max_batch_size"] == 1
    s = report["streaming_metrics"]
    assert_ordered(s["ttft_percentiles"])
    assert_ordered(s["tpot_percentiles"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_hf_config_round_trips(preset):
    mc = ModelConfig.from_hf_config(preset_hf_config(preset))
    assert ModelConfig.from_hf_config(mc.to_hf_config()) == mc
    transformers_config = hf_config_class(mc.architecture)(**mc.to_hf_config())
    assert dataclasses.replace(ModelConfig.from_hf_config(transformers_config.to_dict()),
                               checkpoint_dtype=mc.checkpoint_dtype) == mc


def test_engine_weights_map_back_to_the_checkpoint(engine):
    manifest = EngineManifest.read(engine)
    weights = load_weights(engine, manifest, torch.device("cpu"), progress=False)
    reader = CheckpointReader(DEFAULT_MODEL_DIR)
    original = {name: reader.get(name) for name in reader.names()}
    shapes = {name: t.shape for name, t in original.items()}
    shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]  # tied: transformers lists both
    mapped = hf_state_dict(weights, manifest.model_config, shapes)
    assert set(mapped) == set(original) | {"lm_head.weight"}
    for name, tensor in original.items():
        assert torch.equal(mapped[name], tensor), name


def test_hf_backend_matches_kiln_tokens_and_counts(engine, requests):
    backend = HFBackend(engine, progress=False)
    try:
        run = backend.run(requests, concurrency=3, streaming=True, progress=False)
        # Left-padded greedy batch through transformers against kiln's greedy tokens, EOS ignored.
        prompts = [list(r.input_ids) for r in requests[:3]]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            hf_out = backend.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                                            do_sample=False, pad_token_id=0)[:, width:].tolist()
    finally:
        backend.close()
    assert [(r.task_id, r.num_output_tokens) for r in run.records] == [(r.task_id, r.output_tokens) for r in requests]
    assert max_overlap(run.records) <= 3
    with LLM(engine, progress=False) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert hf_out == [o.outputs[0].token_ids for o in outs]


def test_hf_model_folder_must_be_the_engines_model(engine, tmp_path):
    assert HFBackend(engine, hf_model=DEFAULT_MODEL_DIR, progress=False).model.dtype == torch.float32
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(ConfigError, match="not the model this engine was built from"):
        HFBackend(engine, hf_model=tmp_path, progress=False)


def test_sweep_plot_with_both_backends(engine, dataset_file, tmp_path, capsys):
    plot, report_file = tmp_path / "sweep.png", tmp_path / "sweep.json"
    assert main(["bench", "throughput", "--engine", str(engine), "--dataset", str(dataset_file), "--backend", "kiln,hf",
                 "--plot", str(plot), "--sweep", "1,2", "--sweep-waves", "2", "--warmup", "0",
                 "--report-json", str(report_file)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(report_file.read_text())["runs"]
    assert [(r["engine"]["backend"], r["request_info"]["max_concurrency"], r["request_info"]["num_requests"])
            for r in runs] == [("kiln", 1, 2), ("kiln", 2, 4), ("hf", 1, 2), ("hf", 2, 4)]
    out, err = capsys.readouterr()
    assert "kiln / hf output throughput at concurrency 2" in out
    assert "sequences a step" not in err  # the engine runs both concurrencies in one step


def test_concurrency_above_the_batch_limit_is_named(engine, dataset_file, capsys):
    """kiln runs at most max_batch_size sequences a step; a concurrency above it queues the rest, which a
    comparison with hf's one batch per concurrency would count against kiln: the bench says so."""
    assert main(["bench", "throughput", "--engine", str(engine), "--dataset", str(dataset_file), "--backend", "kiln",
                 "--concurrency", "3", "--max-batch-size", "2", "--num-requests", "3", "--warmup", "0"]) == 0
    err = capsys.readouterr().err
    assert ("note: kiln runs at most 2 sequences a step (max_batch_size); at concurrency 3 the other requests wait; "
            "raise --max-batch-size to 3 to run them together") in err


def test_options_without_effect_are_named(engine, dataset_file, capsys):
    assert main(["bench", "throughput", "--engine", str(engine), "--dataset", str(dataset_file), "--backend", "hf",
                 "--num-requests", "2", "--warmup", "0", "--scheduler-policy", "max_utilization",
                 "--kv-cache-free-gpu-mem-fraction", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "note: --kv-cache-free-gpu-mem-fraction has no effect here: a CPU engine" in err
    assert "note: --scheduler-policy, --kv-cache-free-gpu-mem-fraction have no effect here: the hf backend" in err


@pytest.fixture(scope="module")
def engine_without_tokenizer(tmp_path_factory):
    from kiln.builder import Builder
    from kiln.convert import ModelSource

    source = ModelSource(ModelConfig.from_hf_dir(DEFAULT_MODEL_DIR), checkpoint_dir=None, tokenizer_dir=None,
                         name="stories-dummy")
    build = BuildConfig(max_batch_size=4, max_input_len=16, max_seq_len=64, max_num_tokens=64, target="cpu")
    return Builder().build(source, build).save(tmp_path_factory.mktemp("dummy_engine"), progress=False)


def test_prepare_dataset_cli_is_reproducible(engine, engine_without_tokenizer, tmp_path, capsys):
    args = ["token-unif-dist", "--num-requests", "6", "--input-min", "3", "--input-max", "9", "--output-min", "2",
            "--output-max", "5"]
    assert main(["bench", "prepare-dataset", "--engine", str(engine), "--seed", "4", *args]) == 0
    to_stdout = capsys.readouterr().out
    assert main(["bench", "prepare-dataset", "--engine", str(engine), "--seed", "4", "-o", str(tmp_path / "a.jsonl"),
                 *args]) == 0
    assert (tmp_path / "a.jsonl").read_text() == to_stdout and len(to_stdout.splitlines()) == 6
    assert main(["bench", "prepare-dataset", "--tokenizer", str(DEFAULT_MODEL_DIR), "--seed", "5", *args]) == 0
    assert capsys.readouterr().out != to_stdout
    # An engine without a tokenizer still has a vocabulary: its ids exclude the model's BOS / EOS.
    assert main(["bench", "prepare-dataset", "--engine", str(engine_without_tokenizer), "token-norm-dist",
                 "--num-requests", "30", "--input-mean", "20", "--output-mean", "4"]) == 0
    ids = {t for line in capsys.readouterr().out.splitlines() for t in json.loads(line)["input_ids"]}
    assert ids.isdisjoint({1, 2}) and max(ids) < 512


def cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln bench: error: ") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line(engine, engine_without_tokenizer, dataset_file, tmp_path, capsys):
    e, d = str(engine), str(dataset_file)
    assert "no such file" in cli_error(capsys, "bench", "throughput", "--engine", e, "--dataset", str(tmp_path / "x"))
    assert "holds 8 requests" in cli_error(capsys, "bench", "throughput", "--engine", e, "--dataset", d,
                                           "--num-requests", "9")
    assert "no such engine folder" in cli_error(capsys, "bench", "latency", "--engine", str(tmp_path / "none"),
                                                "--dataset", d)
    assert "kiln, hf" in cli_error(capsys, "bench", "throughput", "--engine", e, "--dataset", d, "--backend", "vllm")
    assert "hf backend samples greedily only" in cli_error(capsys, "bench", "throughput", "--engine", e, "--dataset",
                                                           d, "--backend", "kiln,hf", "--temperature", "0.8")
    assert "top_p must be in (0, 1]" in cli_error(capsys, "bench", "latency", "--engine", e, "--dataset", d,
                                                  "--top-p", "0")
    assert "--backend hf only" in cli_error(capsys, "bench", "throughput", "--engine", e, "--dataset", d,
                                            "--hf-model", str(DEFAULT_MODEL_DIR))
    assert "exceeds the engine's 64" in cli_error(capsys, "bench", "throughput", "--engine", e, "--dataset", d,
                                                  "--max-batch-size", "65")
    assert "free_gpu_memory_fraction" in cli_error(capsys, "bench", "latency", "--engine", e, "--dataset", d,
                                                   "--kv-cache-free-gpu-mem-fraction", "1.5")
    assert "max_input_len 16" in cli_error(capsys, "bench", "throughput", "--engine", str(engine_without_tokenizer),
                                           "--dataset", d)
    (tmp_path / "p.txt").write_text("Once upon a time\n")
    assert "--tokenizer DIR" in cli_error(capsys, "bench", "prepare-dataset", "--engine", str(engine_without_tokenizer),
                                          "text", "--file", str(tmp_path / "p.txt"), "--num-requests", "1",
                                          "--output-tokens", "4")
    (tmp_path / "a_file").write_text("")
    for option in ("--report-json", "--plot"):  # an output that cannot be written fails before the run
        message = cli_error(capsys, "bench", "throughput", "--engine", e, "--dataset", d, option,
                            str(tmp_path / "a_file" / "out"))
        assert f"cannot write {tmp_path / 'a_file' / 'out'} ({tmp_path / 'a_file'}): a file is in the way" in message
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and the message, exit status 2
        main(["bench", "throughput", "--engine", e, "--dataset", d, "--concurrency", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err
