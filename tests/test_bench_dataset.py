"""kiln bench datasets and report arithmetic: distributions, seeds, the vocabulary, file formats, limits,
and the trtllm-bench definitions applied to known records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.bench.dataset import (BenchRequest, TokenSpace, check_fits_engine, read_dataset, text_dataset,
                                token_norm_dist, token_unif_dist, write_dataset)
from kiln.bench.report import BenchRun, RequestRecord, build_report, percentiles
from kiln.config import BuildConfig
from kiln.errors import ConfigError, KilnError
from kiln.runtime.llm import DEFAULT_MODEL_DIR, ensure_engine


@pytest.fixture(scope="module")
def space() -> TokenSpace:
    return TokenSpace.from_engine(ensure_engine(None, progress=False))


def test_engine_token_space_excludes_special_tokens(space):
    assert space.tokenizer is not None and space.vocab_size == 512
    assert {1, 2} <= space.special_token_ids  # stories260K's BOS and EOS
    usable = set(space.usable_token_ids().tolist())
    assert usable.isdisjoint(space.special_token_ids)
    assert usable | space.special_token_ids == set(range(space.vocab_size))


def test_tokenizer_folder_token_space_matches_engine(space):
    folder = TokenSpace.from_tokenizer_dir(DEFAULT_MODEL_DIR)
    assert folder.vocab_size == space.vocab_size
    assert folder.special_token_ids <= space.special_token_ids


def test_norm_dist_fixed_lengths_and_vocabulary(space):
    requests = token_norm_dist(space, 50, input_mean=40, input_stdev=0, output_mean=12, output_stdev=0, seed=3)
    assert [r.task_id for r in requests] == list(range(50))
    assert all(len(r.input_ids) == 40 and r.output_tokens == 12 for r in requests)
    ids = np.concatenate([r.input_ids for r in requests])
    assert np.isin(ids, space.usable_token_ids()).all()
    assert len(np.unique(ids)) > 400  # drawn over the whole usable vocabulary, not a corner of it


def test_norm_dist_moments(space):
    requests = token_norm_dist(space, 4000, input_mean=100, input_stdev=20, output_mean=50, output_stdev=5, seed=1)
    inputs = np.array([len(r.input_ids) for r in requests])
    outputs = np.array([r.output_tokens for r in requests])
    # Standard errors of the mean are 20/sqrt(4000) = 0.32 and 0.08: allow about four of them.
    assert abs(inputs.mean() - 100) < 1.3 and abs(inputs.std() - 20) < 1.0
    assert abs(outputs.mean() - 50) < 0.35 and abs(outputs.std() - 5) < 0.3
    assert inputs.min() >= 1 and outputs.min() >= 1


def test_unif_dist_covers_the_closed_range(space):
    requests = token_unif_dist(space, 600, input_min=5, input_max=9, output_min=1, output_max=3, seed=2)
    assert {len(r.input_ids) for r in requests} == set(range(5, 10))
    assert {r.output_tokens for r in requests} == {1, 2, 3}


def test_same_seed_same_dataset_other_seed_differs(space):
    make = lambda seed: token_unif_dist(space, 20, 4, 30, 2, 9, seed=seed)  # noqa: E731
    assert make(7) == make(7)
    assert make(7) != make(8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_requests=0, input_mean=4, input_stdev=0, output_mean=4, output_stdev=0), "--num-requests"),
    (dict(num_requests=2, input_mean=4, input_stdev=-1, output_mean=4, output_stdev=0), "stdev"),
])
def test_norm_dist_rejects_bad_parameters(space, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        token_norm_dist(space, **kwargs)


def test_unif_dist_rejects_inverted_range(space):
    with pytest.raises(ConfigError, match="--input-max .* must be >= --input-min"):
        token_unif_dist(space, 2, input_min=9, input_max=5, output_min=1, output_max=2)


def test_text_dataset_from_txt_and_jsonl(space, tmp_path):
    prompts = ["Once upon a time", "The little dog ran", "Lily had a red ball"]
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(prompts) + "\n\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)) + "\n")
    for path in (txt, jsonl):
        requests = text_dataset(space, path, 2, output_tokens=16)
        assert [r.prompt for r in requests] == prompts[:2]
        assert [list(r.input_ids) for r in requests] == [space.tokenizer.encode(p) for p in prompts[:2]]
        assert all(r.output_tokens == 16 for r in requests)
    with pytest.raises(ConfigError, match="holds 3 prompts, fewer than --num-requests 4"):
        text_dataset(space, txt, 4, output_tokens=16)
    with pytest.raises(ConfigError, match=r"\.txt .* or \.jsonl"):
        text_dataset(space, tmp_path / "p.csv", 1, output_tokens=16)


def test_text_dataset_needs_a_tokenizer(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match="need a tokenizer"):
        text_dataset(TokenSpace(16, frozenset(), None), tmp_path / "p.txt", 1, 4)


def test_write_read_round_trip_and_prompt_lines(space, tmp_path):
    requests = token_unif_dist(space, 5, 3, 8, 2, 4, seed=0) + [BenchRequest(5, (10, 11), 3, prompt="Hi there")]
    path = tmp_path / "d.jsonl"
    with path.open("w") as f:
        write_dataset(requests, f)
    assert read_dataset(path) == requests
    path.write_text(json.dumps({"task_id": 9, "prompt": "Once upon a time", "output_tokens": 5}) + "\n")
    (request,) = read_dataset(path, space.tokenizer)
    assert request == BenchRequest(9, tuple(space.tokenizer.encode("Once upon a time")), 5, "Once upon a time")
    with pytest.raises(ConfigError, match="line 1: has a prompt but the engine has no tokenizer"):
        read_dataset(path, None)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"input_ids": [1, 2]}', "line 2: no output_tokens"),
    ('{"input_len": 2, "input_ids": [1, 2], "output_len": 4, "task_id": 1}',
     r"line 2: no output_tokens \(its keys: input_ids, input_len, output_len, task_id\); kiln bench reads JSON lines "
     r'of \{"task_id", "input_ids" \| "prompt", "output_tokens"\}'),
    ('{"input_ids": [1, 2], "output_tokens": 0}', "line 2: output_tokens must be a positive integer"),
    ('{"output_tokens": 3}', "line 2: needs input_ids"),
    ('{"input_ids": [], "output_tokens": 3}', "line 2: input_ids must be a non-empty list"),
    ('[1, 2]', "line 2: expected a JSON object"),
])
def test_read_dataset_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"task_id": 0, "input_ids": [5], "output_tokens": 1}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message):
        read_dataset(path)


@pytest.mark.parametrize("indent", [None, 2])
def test_read_dataset_names_the_format_of_a_tensorrt_llm_workload_json(tmp_path, indent):
    """trtllm's prepare_dataset can write one JSON document: {"metadata": ..., "samples": [...]}."""
    workload = {"metadata": {"workload_type": "token-norm-dist", "num_requests": 1},
                "samples": [{"input_len": 2, "input_ids": [5, 6], "output_len": 3, "task_id": 0}]}
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(workload, indent=indent))
    with pytest.raises(ConfigError, match=r"workload.json: a TensorRT-LLM workload JSON \(metadata, samples\), "
                                          r'not JSON lines; kiln bench reads one request a line: \{"task_id", '
                                          r'"input_ids" \| "prompt", "output_tokens"\}'):
        read_dataset(path)
    path.write_text(json.dumps([{"task_id": 0, "input_ids": [5], "output_tokens": 1}], indent=indent))
    with pytest.raises(ConfigError, match=r"workload.json: one JSON document, not JSON lines"):
        read_dataset(path)


def test_read_dataset_missing_or_empty(tmp_path):
    with pytest.raises(KilnError, match="no such file; make one with kiln bench prepare-dataset"):
        read_dataset(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="the dataset is empty"):
        read_dataset(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("request_, message", [
    (BenchRequest(3, (1,) * 65, 1), "exceeds the engine's max_input_len 64 .*task 3"),
    (BenchRequest(4, (1,) * 60, 69), "exceed the engine's max_seq_len 128 .*task 4, 60 input \\+ 69 output"),
    (BenchRequest(5, (1, 600), 1), "outside the vocabulary \\[0, 512\\)"),
])
def test_check_fits_engine(request_, message):
    build = BuildConfig(max_input_len=64, max_seq_len=128)
    fine = BenchRequest(0, (1,) * 64, 64)
    check_fits_engine([fine], build, vocab_size=512)
    with pytest.raises(ConfigError, match=message):
        check_fits_engine([fine, request_], build, vocab_size=512)


def test_percentiles_follow_trtllm_bench():
    stats = percentiles([float(v) for v in range(100, 0, -1)])  # 1..100, unsorted
    assert stats == {"minimum": 1.0, "maximum": 100.0, "average": 50.5, "p50": 51.0, "p90": 91.0, "p95": 96.0,
                     "p99": 100.0}
    assert percentiles([]) is None
    assert percentiles([2.0], scale=1e3)["p99"] == 2000.0


def test_report_applies_the_definitions():
    # Two requests: A from t=10 s, first token at 10.5 s, 5 tokens by 12 s; B from 11 s, 1 token at 13 s.
    records = [RequestRecord(0, 7, 5, 10.0, 10.5, 12.0), RequestRecord(1, 3, 1, 11.0, 13.0, 13.0)]
    requests = [BenchRequest(0, (1,) * 7, 5), BenchRequest(1, (1,) * 3, 1)]
    world = {"tp_size": 1, "pp_size": 1, "world_size": 1, "max_batch_size": 2, "max_num_tokens": 64,
             "scheduling_policy": "guaranteed_no_evict", "kv_cache_percentage": None}
    report = build_report(BenchRun(records), engine={}, machine={}, world=world, requests=requests,
                          dataset_path="d.jsonl", streaming=True, concurrency=None)
    p, s, q = report["performance"], report["streaming_metrics"], report["request_info"]
    assert p["total_latency_ms"] == pytest.approx(3000.0)  # last end - first start
    assert p["system_output_throughput_tok_s"] == pytest.approx(6 / 3)
    assert p["system_total_throughput_tok_s"] == pytest.approx(16 / 3)
    assert p["request_throughput_req_s"] == pytest.approx(2 / 3)
    assert p["avg_request_latency_ms"] == pytest.approx((2000 + 2000) / 2)
    assert p["output_throughput_per_user_tok_s"] == pytest.approx((5 / 2 + 1 / 2) / 2)
    assert s["avg_ttft_ms"] == pytest.approx((500 + 2000) / 2)
    assert s["avg_tpot_ms"] == pytest.approx(1500 / 4)  # B has one token: no TPOT
    assert s["token_output_speed_tok_s"] == pytest.approx(4 / 1.5)
    assert q["avg_num_concurrent_requests"] == pytest.approx(4 / 3)
    assert report["world_info"]["issue_rate"] == pytest.approx(2 / 1)
    assert report["dataset"]["avg_isl"] == 5 and report["dataset"]["max_sequence_length"] == 12
