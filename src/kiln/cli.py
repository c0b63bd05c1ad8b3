"""kiln's command line: build | generate | inspect | serve | bench | plan.

Errors print as one line on stderr with a non-zero exit; --debug shows the traceback. Ctrl-C exits 130
with one line. A reader of stdout that leaves early (``kiln generate ... | head``) ends the command
quietly with exit status 141 (128 + SIGPIPE), what the shell reports for Unix tools that SIGPIPE ends.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path

from kiln.config import (BUILD_DEFAULTS, DTYPES, FP8_SCALINGS, GROUP_SIZES, KV_CACHE_DTYPES, TARGETS, BuildConfig,
                         KvCacheConfig, SamplingParams)
from kiln.errors import KilnError, cannot_write
from kiln.flags import add_runtime_flags, runtime_config_from_args

LIMITS_HELP = """\
Engine limits are fixed at build time; the runtime may lower max batch size and max tokens, never
raise them. A request beyond a limit gets an error naming it (rebuild with a larger value)."""
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
KV_FRACTION = KvCacheConfig().free_gpu_memory_fraction


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="convert a Hugging Face checkpoint into an engine",
                       description="Convert a Hugging Face checkpoint (or a preset with --dummy-weights) into an "
                                   "engine folder for this machine's GPU (or the CPU).\n\n" + LIMITS_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face model folder, or a preset name with --dummy-weights "
                                 "(llama-2-7b, llama-3-8b, llama-3.1-8b, llama-3.2-1b, mistral-7b, qwen2.5-7b, qwen3-8b, "
                                 "gpt-j-6b)")
    p.add_argument("--output", "-o", required=True, help="engine folder to write")
    d = BUILD_DEFAULTS
    p.add_argument("--max-batch-size", type=int, help=f"most requests in one iteration (default {d['max_batch_size']})")
    p.add_argument("--max-input-len", type=int,
                   help=f"longest prompt in tokens (default min({d['max_input_len']}, max_seq_len))")
    p.add_argument("--max-seq-len", type=int,
                   help=f"longest prompt + output in tokens (default min({d['max_seq_len']}, the model's positions), "
                        "at least max_input_len)")
    p.add_argument("--max-num-tokens", type=int, help="most tokens in one iteration; below max_input_len, long "
                                                      f"prompts are chunked (default {d['max_num_tokens']})")
    p.add_argument("--tokens-per-block", type=int,
                   help=f"KV cache block size in tokens, a power of two (default {d['tokens_per_block']})")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight and activation dtype; auto keeps the checkpoint's (float32 on CPU for float16)")
    p.add_argument("--target", choices=TARGETS, default="auto",
                   help="GPU architecture (or cpu); auto detects this machine's")
    p.add_argument("--quantization", default="auto",
                   help="how every linear layer stores its weight and multiplies: none (the dtype's own), fp8 "
                        "(e4m3 weights, a scale per output channel, activations per token: needs sm89+ or the "
                        "CPU reference), int8_wo (INT8 weights, a scale per output channel), int4_wo (INT4 "
                        "weights in groups, round to nearest), int4_awq (INT4 with AWQ's activation-aware "
                        "scales, searched on --calibration-data), or another method this kiln knows; auto "
                        "(default): the checkpoint's own (fp8 for a ModelOpt / compressed-tensors FP8 folder; "
                        "int4_wo, int4_gptq, int8_wo or int8_gptq for an AutoAWQ / GPTQ folder), else none")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                   help="inputs per INT4 scale and zero point (int4_wo, int4_awq; default 128; a pre-quantized "
                        "checkpoint keeps its own)")
    p.add_argument("--calibration-data", metavar="FILE",
                   help="int4_awq: text whose activations choose the AWQ scales, a .txt file or a .jsonl file "
                        "with a \"text\" per line (default: a bundled public-domain text)")
    p.add_argument("--fp8-scaling", choices=FP8_SCALINGS,
                   help="fp8 weights: a scale per output channel (default) or one per tensor")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="what the KV cache stores: fp8 (e4m3 with a scale per layer for K and V: twice the tokens; "
                        "needs sm89+ or the CPU reference); auto (default): fp8 for a checkpoint with FP8 KV-cache "
                        "scales, else the engine dtype")
    p.add_argument("--fp8-context-attention", action="store_true",
                   help="context attention multiplies Q @ K^T and P @ V in FP8 (needs --kv-cache-dtype fp8 and "
                        "sm89+, or the CPU reference)")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel ranks (GPUs) to split the weights over: one weight file per rank; kiln "
                        "generate / serve / bench start the ranks themselves (default 1)")
    p.add_argument("--dummy-weights", action="store_true",
                   help="random weights of the model's shapes, made on the device (for presets; no download)")
    p.add_argument("--no-tune", action="store_true", help="skip kernel tuning on the GPU (default configs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an engine already in --output (a folder holding other files is never written)")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from kiln.builder import Builder

    source = _model_source(args.model, args.dummy_weights)
    _check_output(args.output, args.overwrite)  # before the build's work
    # Flags not given stay unset: the builder fits them to the model (resolve_build_config).
    config = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                         max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                         tokens_per_block=args.tokens_per_block, dtype=args.dtype, target=args.target,
                         quantization=args.quantization, group_size=args.group_size,
                         calibration_data=args.calibration_data, fp8_scaling=args.fp8_scaling,
                         kv_cache_dtype=args.kv_cache_dtype, use_fp8_context_fmha=args.fp8_context_attention,
                         tp_size=args.tp_size)
    engine = Builder().build(source, config, tune=not args.no_tune)
    out = _save(engine, args.output, args.overwrite)
    m = engine.manifest
    ranks = f", {m.tp_size} ranks of {m.memory_plan['weight_bytes'] / 2**30:.2f} GiB" if m.tp_size > 1 else ""
    print(f"engine written to {out} ({m.build_config.target}, {m.build_config.dtype}, "
          f"{m.memory_plan['weight_bytes'] * m.tp_size / 2**30:.2f} GiB of weights{ranks})")
    return 0


def _check_output(output: str, overwrite: bool) -> None:
    from kiln.engine.engine import check_output_dir

    try:
        check_output_dir(output, overwrite)
    except OSError as e:
        raise cannot_write(output, e) from e


def _save(engine, output: str, overwrite: bool) -> Path:
    """engine.save, its output's errors (read-only, full, ...) as one line naming the path and the fix."""
    try:
        return engine.save(output, overwrite=overwrite)
    except OSError as e:
        named, out = Path(e.filename or output).resolve(), Path(output).resolve()
        if not (named.is_relative_to(out) or out.is_relative_to(named)):
            raise  # reading the checkpoint failed, not writing the engine
        raise cannot_write(output, e) from e


def _model_source(model: str, dummy_weights: bool):
    """What ``kiln build MODEL`` builds: a Hugging Face folder, or with --dummy-weights a preset (or a
    folder's config.json) with random weights."""
    from kiln.convert import AutoModelForCausalLM
    from kiln.models import PRESETS

    if dummy_weights and model in PRESETS:
        return AutoModelForCausalLM.from_preset(model)
    if not Path(model).exists():
        if model in PRESETS:
            raise KilnError(f"{model} is a preset with no checkpoint; add --dummy-weights for random weights")
        raise KilnError(f"{model}: neither a model folder nor a preset; give a Hugging Face model folder, or one "
                        f"of the presets with --dummy-weights: {', '.join(PRESETS)}")
    return _dummy_from_dir(model) if dummy_weights else AutoModelForCausalLM.from_hugging_face(model)


def _dummy_from_dir(path: str):
    from kiln.convert import ModelSource
    from kiln.models.config import ModelConfig

    return ModelSource(config=ModelConfig.from_hf_dir(path), checkpoint_dir=None, tokenizer_dir=Path(path),
                       name=Path(path).name)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                       description="Generate from PROMPT with an engine, a Hugging Face folder (built and cached on "
                                   "first use) or, given neither, the bundled stories260K model.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--engine", help="engine folder")
    src.add_argument("--model", help="Hugging Face model folder")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--token-ids", type=_token_ids, metavar="ID,ID,...",
                   help="the prompt as comma-separated token ids, e.g. 1,403,407 (engines without a tokenizer); "
                        "prints the new token ids, then their text when the engine has a tokenizer")
    p.add_argument("prompt", nargs="?", help="the prompt text")
    add_runtime_flags(p)
    p.set_defaults(func=cmd_generate)


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated token ids, e.g. 1,403,407")
    return ids


def cmd_generate(args) -> int:
    from kiln.runtime.llm import LLM

    if (args.prompt is None) == (args.token_ids is None):
        raise KilnError("give a PROMPT or --token-ids, not both" if args.prompt is not None
                        else "give a PROMPT (text) or --token-ids")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    config = runtime_config_from_args(args)  # LLM takes RuntimeConfig's fields as keyword arguments
    with LLM(args.engine or args.model, progress=sys.stderr.isatty(),
             **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}) as llm:
        if args.prompt is not None and llm.tokenizer is None:
            raise KilnError("this engine has no tokenizer; give the prompt as token ids: --token-ids 1,403,407")
        error = asyncio.run(_stream(llm, args.prompt if args.token_ids is None else args.token_ids, params))
    if error:
        raise KilnError(error)
    return 0


async def _stream(llm, prompt: str | list[int], params: SamplingParams) -> str | None:
    """Writes the output as it arrives: the prompt, then the new text; or for token ids, the new ids, then
    their text when the engine has a tokenizer. Returns a failure's error; a rejected request writes nothing."""
    started = False
    async for out in llm.generate_async(prompt, params, streaming=True):
        if out.error:
            if started:
                sys.stdout.write("\n")
            return out.error
        completion = out.outputs[0]
        if isinstance(prompt, str):
            sys.stdout.write(completion.text_diff if started else prompt + completion.text_diff)
            started = True
        elif completion.token_ids_diff:
            sys.stdout.write(("," if started else "") + ",".join(map(str, completion.token_ids_diff)))
            started = True
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not isinstance(prompt, str) and llm.tokenizer is not None:
        sys.stdout.write(completion.text + "\n")
    return None


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show an engine's limits, target, plans and files")
    p.add_argument("engine", help="engine folder")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from kiln.engine.manifest import EngineManifest
    from kiln.layers import linear_method
    from kiln.models import num_params

    m = EngineManifest.read(args.engine)
    files = _file_sizes(Path(args.engine))
    linear_kernels = linear_method(m.build_config.quantization, m.build_config).kernels(m.target, m.dtype)
    plan = m.memory_plan
    bytes_per_weight = plan["linear_weight_bytes"] / plan["linear_weights"] if "linear_weights" in plan else None
    kv_pools = _kv_pools(m)
    summary = {
        "engine": str(args.engine), "kiln_version": m.kiln_version, "format_version": m.format_version,
        "target": {"name": m.target, "device": m.target_device_name},
        "model": m.model_config.to_dict(), "limits": m.build_config.to_dict(),
        "memory_plan": m.memory_plan, "kernel_plan": m.kernel_plan, "kernel_plan_tuned": m.is_kernel_plan_tuned,
        "files": files, "linear_kernels": linear_kernels, "linear_bytes_per_weight": bytes_per_weight,
        "kv_pool_tokens": kv_pools, "tp_size": m.tp_size, "sharding": m.sharding,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    mc, bc = m.model_config, m.build_config
    print(f"engine        {args.engine}  (kiln {m.kiln_version}, format {m.format_version}, built {m.created})")
    fp8_scaling = f" ({bc.fp8_scaling} scales)" if bc.fp8_scaling else ""
    fp8_context = ", FP8 context attention" if bc.use_fp8_context_fmha else ""
    print(f"target        {m.target} ({m.target_device_name}), dtype {bc.dtype}, quantization {bc.quantization}"
          f"{fp8_scaling}, kv_cache_dtype {bc.kv_cache_dtype}{fp8_context}, tp {bc.tp_size}")
    if linear_kernels:
        print(f"linear layers {linear_kernels}")
    print(f"model         {mc.architecture}: {mc.num_layers} layers, hidden {mc.hidden_size}, heads {mc.num_heads}/"
          f"{mc.num_kv_heads} kv x {mc.head_dim}, mlp {mc.intermediate_size}, vocab {mc.vocab_size}, "
          f"rope {mc.rope.rope_type} theta {mc.rope.theta:g}, {num_params(mc) / 1e6:.1f}M params")
    print(f"limits        max_batch_size {bc.max_batch_size}, max_input_len {bc.max_input_len}, max_seq_len "
          f"{bc.max_seq_len}, max_num_tokens {bc.max_num_tokens}, tokens_per_block {bc.tokens_per_block}")
    if bc.tp_size > 1:
        rank_bytes = [files.get(f"rank{rank}.safetensors", 0) for rank in range(bc.tp_size)]
        print(f"tensor parallel {bc.tp_size} ranks, one weight file each ({', '.join(map(_human, rank_bytes))}); "
              f"{len(m.sharding)} tensors sharded, the rest replicated")
    print("memory plan" + (" (per rank)" if bc.tp_size > 1 else ""))
    for k, v in m.memory_plan.items():
        print(f"  {k:<26} {_human(v) if k.endswith('bytes') or '_bytes' in k else v}")
    if bytes_per_weight is not None:
        groups = f", groups of {bc.group_size}" if bc.group_size else ""
        print(f"  {'bytes per weight':<26} {bytes_per_weight:.3f} in the linear layers as stored ({bc.quantization}"
              f"{groups}; scales and zero points included)")
    for gpu, tokens in kv_pools.items():
        print(f"  {'KV pool on ' + gpu:<26} ~{tokens:,} tokens in what the weights leave ({KV_FRACTION:.0%} of the "
              "memory after weights, activations and workspace)")
    print("kernel plan" if m.is_kernel_plan_tuned else
          f"kernel plan   not made yet: built without a {m.target} GPU, the first load on one tunes it (and saves it "
          "here when the folder is writable)")
    for op, entry in m.kernel_plan.items():
        config = entry.get("config") or {}
        print(f"  {op:<16} {entry['impl']:<10} {json.dumps(config) if config else ''}")
    print("files")
    for name, size in files.items():
        print(f"  {name:<34} {_human(size)}")
    return 0


def _kv_pools(m) -> dict[str, int]:
    """Tokens the KV pool would hold on each GPU of kiln plan's table that the engine's target is (an sm80
    engine: the A100s), at the default free_gpu_memory_fraction; none for CPU engines."""
    from kiln.builder.plan import reserved_bytes
    from kiln.plan.planner import load_gpus

    if m.target == "cpu" or "linear_weights" not in m.memory_plan:
        return {}
    plan = m.memory_plan
    used = plan["weight_bytes"] + reserved_bytes(plan)
    return {gpu.name: max(0, int((gpu.memory_gib * 2**30 - used) * KV_FRACTION) // plan["kv_bytes_per_token"])
            for gpu in load_gpus().values() if f"sm{gpu.sm}" == m.target}


def _file_sizes(engine_dir: Path) -> dict[str, int]:
    """Each file of the engine, except the Triton cache, which counts as one entry (files summed)."""
    sizes: dict[str, int] = {}
    for f in sorted(engine_dir.rglob("*")):
        if f.is_file():
            name = f.relative_to(engine_dir).as_posix()
            if name.startswith("triton_cache/"):
                name = "triton_cache/ (compiled kernels)"
            sizes[name] = sizes.get(name, 0) + f.stat().st_size
    return sizes


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: LLM inference compiler and runtime.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,generate,inspect,serve,bench,plan}")
    _add_build(sub)
    _add_generate(sub)
    _add_inspect(sub)
    for module in ("kiln.serve.cli", "kiln.bench.cli", "kiln.plan.cli"):
        try:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


# Commands that run an engine: under torchrun, ranks other than 0 serve rank 0's steps instead.
RANK_COMMANDS = ("generate", "serve", "bench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in RANK_COMMANDS:
            from kiln.runtime.distributed import is_torchrun_worker, run_worker

            if is_torchrun_worker():
                return run_worker()
        code = args.func(args) or 0
        sys.stdout.flush()  # a reader that left shows here, not as a message at the interpreter's exit
        return code
    except BrokenPipeError:
        # Python's recipe: stdout's later writes (the final flush at exit) go to /dev/null, not the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (KilnError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
