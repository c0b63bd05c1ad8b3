"""kiln's command line: build | generate | inspect | serve | bench.

Errors print as one line on stderr with a non-zero exit; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from kiln.config import DTYPES, TARGETS, BuildConfig, SamplingParams
from kiln.errors import KilnError

LIMITS_HELP = """\
Engine limits are fixed at build time; the runtime may lower max batch size and max tokens, never
raise them. A request beyond a limit gets an error naming it (rebuild with a larger value)."""


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="convert a Hugging Face checkpoint into an engine",
                       description="Convert a Hugging Face checkpoint (or a preset with --dummy-weights) into an "
                                   "engine folder for this machine's GPU (or the CPU).\n\n" + LIMITS_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face model folder, or a preset name with --dummy-weights "
                                 "(llama-2-7b, llama-3-8b, llama-3.1-8b, llama-3.2-1b, mistral-7b, qwen2.5-7b, qwen3-8b, "
                                 "gpt-j-6b)")
    p.add_argument("--output", "-o", required=True, help="engine folder to write")
    p.add_argument("--max-batch-size", type=int, help="most requests in one iteration (default 8)")
    p.add_argument("--max-input-len", type=int, help="longest prompt in tokens (default min(1024, max_seq_len))")
    p.add_argument("--max-seq-len", type=int,
                   help="longest prompt + output in tokens (default min(2048, the model's positions))")
    p.add_argument("--max-num-tokens", type=int,
                   help="most tokens in one iteration; below max_input_len, long prompts are chunked (default 2048)")
    p.add_argument("--tokens-per-block", type=int, help="KV cache block size in tokens, a power of two (default 32)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight and activation dtype; auto keeps the checkpoint's (float32 on CPU for float16)")
    p.add_argument("--target", choices=TARGETS, default="auto",
                   help="GPU architecture (or cpu); auto detects this machine's")
    p.add_argument("--linear-method", default="dense",
                   help="how every linear layer stores its weight and multiplies (default dense)")
    p.add_argument("--dummy-weights", action="store_true",
                   help="random weights of the model's shapes, made on the device (for presets; no download)")
    p.add_argument("--no-tune", action="store_true", help="skip kernel tuning on the GPU (default configs)")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from kiln.builder import Builder
    from kiln.convert import AutoModelForCausalLM
    from kiln.models import PRESETS
    from kiln.runtime.llm import default_build_config

    if args.dummy_weights:
        source = (AutoModelForCausalLM.from_preset(args.model) if args.model in PRESETS
                  else _dummy_from_dir(args.model))
    else:
        if args.model in PRESETS and not Path(args.model).exists():
            raise KilnError(f"{args.model} is a preset with no checkpoint; add --dummy-weights for random weights")
        source = AutoModelForCausalLM.from_hugging_face(args.model)
    config = default_build_config(source.config, max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                                  max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                                  tokens_per_block=args.tokens_per_block, dtype=args.dtype, target=args.target,
                                  linear_method=args.linear_method)
    engine = Builder().build(source, config, tune=not args.no_tune)
    out = engine.save(args.output)
    m = engine.manifest
    print(f"engine written to {out} ({m.build_config.target}, {m.build_config.dtype}, "
          f"{m.memory_plan['weight_bytes'] / 2**30:.2f} GiB of weights)")
    return 0


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
    p.add_argument("prompt", help="the prompt text")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from kiln.runtime.llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    with LLM(args.engine or args.model, progress=sys.stderr.isatty()) as llm:
        async def stream() -> str | None:
            """Writes the prompt once text starts, then the text as it arrives; returns a failure's error."""
            started = False
            async for out in llm.generate_async(args.prompt, params, streaming=True):
                if out.error:
                    if started:
                        sys.stdout.write("\n")
                    return out.error
                if not started:  # a rejected request writes nothing to stdout
                    sys.stdout.write(args.prompt)
                    started = True
                sys.stdout.write(out.outputs[0].text_diff)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return None

        error = asyncio.run(stream())
    if error:
        raise KilnError(error)
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show an engine's limits, target, plans and files")
    p.add_argument("engine", help="engine folder")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from kiln.engine.manifest import EngineManifest
    from kiln.models import num_params

    m = EngineManifest.read(args.engine)
    files = _file_sizes(Path(args.engine))
    summary = {
        "engine": str(args.engine), "kiln_version": m.kiln_version, "format_version": m.format_version,
        "target": {"name": m.target, "device": m.target_device_name},
        "model": m.model_config.to_dict(), "limits": m.build_config.to_dict(),
        "memory_plan": m.memory_plan, "kernel_plan": m.kernel_plan, "files": files,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    mc, bc = m.model_config, m.build_config
    print(f"engine        {args.engine}  (kiln {m.kiln_version}, format {m.format_version}, built {m.created})")
    print(f"target        {m.target} ({m.target_device_name}), dtype {bc.dtype}, linear {bc.linear_method}, "
          f"tp {bc.tp_size}")
    print(f"model         {mc.architecture}: {mc.num_layers} layers, hidden {mc.hidden_size}, heads {mc.num_heads}/"
          f"{mc.num_kv_heads} kv x {mc.head_dim}, mlp {mc.intermediate_size}, vocab {mc.vocab_size}, "
          f"rope {mc.rope.rope_type} theta {mc.rope.theta:g}, {num_params(mc) / 1e6:.1f}M params")
    print(f"limits        max_batch_size {bc.max_batch_size}, max_input_len {bc.max_input_len}, max_seq_len "
          f"{bc.max_seq_len}, max_num_tokens {bc.max_num_tokens}, tokens_per_block {bc.tokens_per_block}")
    print("memory plan")
    for k, v in m.memory_plan.items():
        print(f"  {k:<26} {_human(v) if k.endswith('bytes') or '_bytes' in k else v}")
    print("kernel plan")
    for op, entry in m.kernel_plan.items():
        config = entry.get("config") or {}
        print(f"  {op:<16} {entry['impl']:<10} {json.dumps(config) if config else ''}")
    print("files")
    for name, size in files.items():
        print(f"  {name:<34} {_human(size)}")
    return 0


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,generate,inspect,serve,bench}")
    _add_build(sub)
    _add_generate(sub)
    _add_inspect(sub)
    for module in ("kiln.serve.cli", "kiln.bench.cli"):
        try:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (KilnError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
