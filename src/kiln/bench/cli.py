"""``kiln bench prepare-dataset | throughput | latency``, added to kiln's command line by ``add_parser``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.errors import ConfigError, cannot_write
from kiln.flags import add_runtime_flags, given_runtime_flags, runtime_config_from_args, runtime_flags

DEFAULT_WARMUP = 2
DEFAULT_SWEEP_WAVES = 4


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="datasets, throughput and latency benchmarks",
                                  description="Benchmark an engine the way trtllm-bench does: prepare a dataset, "
                                              "then measure offline throughput or one-at-a-time latency.")
    sub = bench.add_subparsers(dest="bench_command", required=True,
                               metavar="{prepare-dataset,throughput,latency}")
    _add_prepare_dataset(sub)
    _add_throughput(sub)
    _add_latency(sub)


def _add_prepare_dataset(sub) -> None:
    p = sub.add_parser("prepare-dataset", help="write a benchmark dataset (JSON lines)",
                       description="Write a dataset of {task_id, input_ids, output_tokens} lines: synthetic token "
                                   "ids from the vocabulary without special tokens, or tokenized real prompts.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine", help="engine folder (its vocabulary and tokenizer)")
    src.add_argument("--tokenizer", help="Hugging Face tokenizer or model folder")
    p.add_argument("--seed", type=int, default=0, help="random seed; one seed gives one dataset (default 0)")
    p.add_argument("--output", "-o", help="file to write (default: stdout)")
    kinds = p.add_subparsers(dest="source", required=True, metavar="{token-norm-dist,token-unif-dist,text}")
    norm = kinds.add_parser("token-norm-dist", help="lengths from normal distributions (stdev 0: fixed)")
    norm.add_argument("--num-requests", type=_positive_int, required=True)
    norm.add_argument("--input-mean", type=_positive_int, required=True)
    norm.add_argument("--input-stdev", type=float, default=0.0)
    norm.add_argument("--output-mean", type=_positive_int, required=True)
    norm.add_argument("--output-stdev", type=float, default=0.0)
    unif = kinds.add_parser("token-unif-dist", help="lengths uniform over [min, max]")
    unif.add_argument("--num-requests", type=_positive_int, required=True)
    for name in ("--input-min", "--input-max", "--output-min", "--output-max"):
        unif.add_argument(name, type=_positive_int, required=True)
    text = kinds.add_parser("text", help="real prompts from a .txt (one a line) or .jsonl file (prompt field)")
    text.add_argument("--file", required=True)
    text.add_argument("--num-requests", type=_positive_int, required=True)
    text.add_argument("--output-tokens", type=_positive_int, required=True)
    p.set_defaults(func=cmd_prepare_dataset)


def cmd_prepare_dataset(args) -> int:
    from kiln.bench import dataset

    space = (dataset.TokenSpace.from_engine(args.engine) if args.engine
             else dataset.TokenSpace.from_tokenizer_dir(args.tokenizer))
    if args.source == "token-norm-dist":
        requests = dataset.token_norm_dist(space, args.num_requests, args.input_mean, args.input_stdev,
                                           args.output_mean, args.output_stdev, seed=args.seed)
    elif args.source == "token-unif-dist":
        requests = dataset.token_unif_dist(space, args.num_requests, args.input_min, args.input_max,
                                           args.output_min, args.output_max, seed=args.seed)
    else:
        requests = dataset.text_dataset(space, args.file, args.num_requests, args.output_tokens)
    if args.output is None:
        dataset.write_dataset(requests, sys.stdout)
        return 0
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            dataset.write_dataset(requests, f)
    except OSError as e:
        raise cannot_write(out, e) from e
    print(f"{len(requests)} requests written to {out}", file=sys.stderr)
    return 0


def _add_run_options(p) -> None:
    p.add_argument("--engine", required=True, help="engine folder")
    p.add_argument("--dataset", required=True, help="dataset file from kiln bench prepare-dataset")
    p.add_argument("--num-requests", type=_positive_int, help="use the first N requests (default: all)")
    p.add_argument("--warmup", type=_non_negative_int, default=DEFAULT_WARMUP,
                   help=f"requests run (and not measured) before the benchmark (default {DEFAULT_WARMUP})")
    p.add_argument("--report-json", help="write the report as JSON (trtllm-bench key names) to this file")
    sampling = p.add_argument_group("sampling", "how every request samples (default: greedy); "
                                                "--temperature 0.8 --top-p 0.95 is the sampled run to set beside "
                                                "a greedy one")
    sampling.add_argument("--temperature", type=float, default=0.0,
                          help="sampling temperature; 0 is greedy (default 0)")
    sampling.add_argument("--top-p", type=float, default=1.0,
                          help="keep the most likely tokens up to this probability mass (default 1.0: all)")
    sampling.add_argument("--seed", type=int, default=0,
                          help="a request samples with this seed plus its task id, so runs repeat (default 0)")
    add_runtime_flags(p)


def _add_throughput(sub) -> None:
    p = sub.add_parser("throughput", help="offline maximum throughput of a dataset",
                       description="Run a dataset through the engine (EOS ignored: every request produces exactly "
                                   "its output_tokens) and report trtllm-bench's figures. With --sweep, run once "
                                   "per concurrency; with --plot, draw that sweep's latency-throughput curve, one "
                                   "line per backend.")
    _add_run_options(p)
    p.add_argument("--concurrency", type=_positive_int, help="most requests in flight (default: all at once)")
    p.add_argument("--streaming", action="store_true", help="stream tokens; adds TTFT / TPOT / per-user speed")
    p.add_argument("--backend", default="kiln",
                   help="kiln, hf (Hugging Face transformers generate, static batches), or both: kiln,hf")
    p.add_argument("--hf-model", help="for hf: the checkpoint the engine was built from (default: the engine's "
                                      "weights in a transformers model)")
    p.add_argument("--sweep", type=_positive_int_list,
                   help="run once per concurrency, e.g. 1,4,16,64 (with --plot, default: powers of two up to "
                        "--concurrency or the max batch size)")
    p.add_argument("--plot", help="sweep the concurrency and plot output tok/s against tok/s/user to this PNG")
    p.add_argument("--sweep-waves", type=_positive_int, default=DEFAULT_SWEEP_WAVES,
                   help=f"a sweep point at concurrency c runs the first waves x c requests (default "
                        f"{DEFAULT_SWEEP_WAVES})")
    p.set_defaults(func=cmd_throughput)


def _add_latency(sub) -> None:
    p = sub.add_parser("latency", help="one request at a time: TTFT, TPOT and end-to-end latency",
                       description="Run a dataset one request at a time with streaming and report TTFT, TPOT "
                                   "and end-to-end latency percentiles.")
    _add_run_options(p)
    p.set_defaults(func=cmd_latency)


def _note_no_effect(args, options, why: str) -> None:
    """Says so on stderr when options given have no effect on this run."""
    given = [f"--{name.replace('_', '-')}" for name in given_runtime_flags(args) if name in options]
    if given:
        print(f"kiln bench: note: {', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect here: {why}",
              file=sys.stderr)


def _note_batch_limit(max_batch_size: int, engine_max_batch_size: int, concurrencies: list[int | None],
                      with_hf: bool) -> None:
    """Says so on stderr when kiln cannot run a concurrency in one step: the requests beyond its
    max_batch_size wait, which a comparison with the hf backend (one batch of the whole concurrency)
    would count against kiln."""
    above = [c for c in concurrencies if c is not None and c > max_batch_size]
    if not above:
        return
    hf = ", while the hf backend runs each as one batch" if with_hf else ""
    fix = (f"raise --max-batch-size to {max(above)}" if max(above) <= engine_max_batch_size
           else f"build the engine with --max-batch-size {max(above)}")
    print(f"kiln bench: note: kiln runs at most {max_batch_size} sequences a step (max_batch_size); at concurrency "
          f"{', '.join(map(str, above))} the other requests wait{hf}; {fix} to run them together", file=sys.stderr)


def _load_requests(args):
    from kiln.bench.dataset import TokenSpace, check_fits_engine, read_dataset
    from kiln.engine.manifest import EngineManifest

    manifest = EngineManifest.read(args.engine)
    requests = read_dataset(args.dataset, TokenSpace.from_engine(args.engine).tokenizer)
    if args.num_requests is not None:
        if args.num_requests > len(requests):
            raise ConfigError(f"--num-requests {args.num_requests} but {args.dataset} holds {len(requests)} "
                              "requests; lower it or prepare a larger dataset")
        requests = requests[:args.num_requests]
    check_fits_engine(requests, manifest.build_config, manifest.model_config.vocab_size)
    if manifest.target == "cpu":
        _note_no_effect(args, ("kv_cache_free_gpu_mem_fraction",), "a CPU engine's KV cache holds a full batch")
    return manifest, requests


def _check_writable(*paths: str | None) -> None:
    """Output files that cannot be written fail before the benchmark runs, not after: each is opened for
    appending (its folders made), and removed again if it was not there."""
    for path in filter(None, paths):
        out = Path(path)
        existed = out.exists()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.open("a").close()
        except OSError as e:
            raise cannot_write(out, e) from e
        if not existed:
            out.unlink()


def _finish(reports: list[dict], report_json: str | None) -> None:
    from kiln.bench.report import format_comparison, format_report, write_json

    print(format_report(reports[0]) if len(reports) == 1 else format_comparison(reports))
    if report_json:
        try:
            write_json(report_json, reports[0] if len(reports) == 1 else {"runs": reports})
        except OSError as e:
            raise cannot_write(report_json, e) from e
        print(f"report written to {report_json}", file=sys.stderr)


def cmd_throughput(args) -> int:
    from kiln.bench.throughput import BACKENDS, HF_GREEDY_ONLY, BenchSampling, run_throughput

    backends = [b.strip() for b in args.backend.split(",")]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or len(set(backends)) != len(backends):
        raise ConfigError(f"--backend {args.backend!r}: give each of {', '.join(BACKENDS)} at most once, "
                          "comma-separated")
    if args.hf_model and "hf" not in backends:
        raise ConfigError("--hf-model applies to --backend hf only; add hf to --backend")
    sampling = BenchSampling(args.temperature, args.top_p, args.seed)
    if "hf" in backends and not sampling.is_greedy:
        raise ConfigError(HF_GREEDY_ONLY)
    if args.plot:
        _require_matplotlib()
    _check_writable(args.report_json, args.plot)
    config = runtime_config_from_args(args)
    manifest, requests = _load_requests(args)
    max_batch_size, _ = config.resolve(manifest.build_config)  # limits above the engine's fail here
    if "kiln" not in backends:
        _note_no_effect(args, [rf.dest for rf in runtime_flags() if rf.dest != "max_batch_size"],
                        "the hf backend runs static batches without kiln's scheduler or KV cache")
    if args.sweep or args.plot:
        top = args.concurrency or config.max_batch_size or manifest.build_config.max_batch_size
        concurrencies, waves = args.sweep or _powers_of_two_up_to(top), args.sweep_waves
    else:
        concurrencies, waves = [args.concurrency], None
    if "kiln" in backends:
        _note_batch_limit(max_batch_size, manifest.build_config.max_batch_size, concurrencies, "hf" in backends)
    reports = run_throughput(args.engine, requests, backends=backends, config=config, concurrencies=concurrencies,
                             waves=waves, streaming=args.streaming, warmup=args.warmup, hf_model=args.hf_model,
                             dataset_path=args.dataset, progress=True, sampling=sampling)
    _finish(reports, args.report_json)
    if args.plot:
        from kiln.bench.plot import plot_sweep

        try:
            print(f"plot written to {plot_sweep(reports, args.plot)}", file=sys.stderr)
        except OSError as e:
            raise cannot_write(args.plot, e) from e
    return 0


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as e:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib, or leave --plot out and plot the "
                          "--report-json runs elsewhere with kiln.bench.plot.plot_sweep") from e


def _powers_of_two_up_to(top: int) -> list[int]:
    values = [1 << i for i in range(top.bit_length()) if 1 << i < top]
    return values + [top]


def cmd_latency(args) -> int:
    from kiln.bench.latency import run_latency
    from kiln.bench.throughput import BenchSampling

    sampling = BenchSampling(args.temperature, args.top_p, args.seed)
    _check_writable(args.report_json)
    config = runtime_config_from_args(args)
    _note_no_effect(args, ("max_batch_size",), "latency runs one request at a time")
    _, requests = _load_requests(args)
    report = run_latency(args.engine, requests, config=config, warmup=args.warmup, dataset_path=args.dataset,
                         sampling=sampling)
    _finish([report], args.report_json)
    return 0
