"""The kernel plan of a GPU engine: Triton for every op the model uses on sm80+, launch configs tuned at
build time.

Tuning times a few candidate configs per op with ``triton.testing.do_bench`` (median, L2 flushed
before each run) on random inputs of this engine's shapes and stores the winners in the plan, so the
runtime never tunes. Each op is timed at the sizes the runtime will see: decode batches (one token per
sequence, batch buckets 1, 2, 4, ... up to max_batch_size) and context batches (up to max_num_tokens);
the ops that quantize for an FP8 Linear (``*_fp8``) only where they run, above MAX_GEMV_ROWS rows;
``dense_linear`` at each unquantized weight shape of the model and row bucket of the GEMV (1, and 2-16 rows),
where cuBLAS competes with the GEMV's candidates and keeps the shape unless one is faster;
``rms_norm_linear`` at each unquantized weight an RMSNorm feeds, one row, where the norm's kernel followed by
``dense_linear`` (as just tuned) competes with the GEMV that normalizes the row itself; ``fp8_linear`` at each
FP8 weight shape, 2-16 rows, the GEMV's default config against its candidates (one row keeps the default);
``weight_only_linear`` at each INT8 / INT4 weight shape and bucket of rows its Triton kernels take.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from kiln.engine.target import compute_capability
from kiln.config import BuildConfig
from kiln.errors import EngineError
from kiln.kernels import LLAMA_OPS, OPS, check_ops, reference_plan
from kiln.kernels.activation import (DEFAULT_GELU_CONFIG, DEFAULT_SILU_MUL_CONFIG, gelu_triton, silu_mul_fp8_triton,
                                     silu_mul_triton)
from kiln.kernels.attention import (DEFAULT_CONTEXT_CONFIG, AttentionMetadata, default_decode_config,
                                    paged_attention_triton)
from kiln.kernels.fp8 import fp8_gemv
from kiln.kernels.gemv import GEMV_CANDIDATES, MAX_GEMV_ROWS, dense_linear_triton, gemv, shape_key
from kiln.kernels.norm import (add_layer_norm_triton, add_rms_norm_fp8_triton, add_rms_norm_triton, default_norm_warps,
                               layer_norm_triton, rms_norm_fp8_triton, rms_norm_linear_ref, rms_norm_triton)
from kiln.kernels.rotary import DEFAULT_ROTARY_CONFIG, rope_cos_sin, rotary_kv_write_triton
from kiln.kernels.triton_jit import MIN_TRITON_CAPABILITY
from kiln.kernels.weight_only import DEFAULT_CONFIGS, weight_only_linear_triton
from kiln.layers.linear import linear_method
from kiln.models.config import ModelConfig
from kiln.quantization.fp8 import FP8_DTYPE

logger = logging.getLogger(__name__)


# do_bench budget per candidate and shape, in ms. do_bench repeats a run for REP_MS over its estimated
# time including a 256 MB L2 flush (~0.1 ms on an H100 at 3 TB/s), so even the slowest run timed here
# (a full context batch, ~1 ms) gets several repeats and the sub-0.1 ms ones ~40+ for the median. An 8B
# engine with max_batch_size 64 makes ~150 timings: ~2 s. Compiling each candidate once comes on top
# (0.1 s for a norm kernel, 0.6 s for an attention variant on this CPU-only dev machine, for sm90).
WARMUP_MS = 2
REP_MS = 8

# Candidates: a handful per op around the defaults, covering fewer / more threads per row or tile.
NORM_CANDIDATES = [{"num_warps": w} for w in (4, 8, 16)]
SILU_MUL_CANDIDATES = [{"BLOCK": b, "num_warps": w} for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]
GELU_CANDIDATES = SILU_MUL_CANDIDATES  # the same elementwise shape: one row's columns in blocks
SILU_MUL_FP8_CANDIDATES = NORM_CANDIDATES  # a whole row per program, as a norm's: only the warps vary
ROTARY_CANDIDATES = [{"num_warps": w} for w in (1, 2, 4, 8)]
CONTEXT_CANDIDATES = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
                      for m, n, w, s in ((64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3))]
DECODE_KERNEL_CANDIDATES = [{"BLOCK_N": n, "num_warps": w, "num_stages": 2} for n, w in ((32, 4), (64, 4), (32, 2))]
DECODE_SPLITS = (1, 2, 4, 8, 16, 32)
# Splits beyond this many programs per SM only add reduction work: the batch already fills the GPU.
MAX_DECODE_PROGRAMS_PER_SM = 8
# Keys of one decode tuning batch at most (2 GiB of K and V for an 8B model's layer): the context length
# is lowered for the largest buckets of long-sequence engines to stay within it.
MAX_TUNING_KV_TOKENS = 1 << 19

# A norm's time does not depend on eps, nor GELU's on its formula (both are memory-bound).
TUNING_EPS = 1e-5
TUNING_GELU_APPROXIMATION = "tanh"


def gpu_kernel_plan(config: ModelConfig, build: BuildConfig, dtype: torch.dtype, tune: bool,
                    ops: Collection[str] = LLAMA_OPS, shapes: Mapping[str, Collection[tuple[int, int]]] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Triton for each of ``ops`` (the ops the model calls) on sm80+ (reference ops below), with configs
    tuned here when ``tune``; ``shapes``: per matmul op, the [out, in] weights it multiplies (matmul_shapes)."""
    check_ops(ops)
    if compute_capability(build.target) < MIN_TRITON_CAPABILITY:
        logger.warning("target %s is older than sm%d: the engine runs the reference (PyTorch) ops",
                       build.target, MIN_TRITON_CAPABILITY)
        return reference_plan(ops)
    device = torch.device("cuda", torch.cuda.current_device())
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    if not tune:
        return _plan(_default_configs(config, build, num_sms, ops))
    t0 = time.perf_counter()
    configs = TuningRun(config, build, dtype, num_sms, device).tune(ops, shapes)
    torch.cuda.empty_cache()  # the tuning inputs' memory goes back to the GPU, for a KV pool sized later
    logger.info("kernel tuning took %.1f s", time.perf_counter() - t0)
    return _plan(configs)


def decode_batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, then max_batch_size: a decode batch uses the first bucket that
    holds it."""
    return [b for b in (1 << i for i in range(max_batch_size.bit_length())) if b < max_batch_size] + [max_batch_size]


def _plan(configs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Triton for the ops configured; KernelOps binds any other op to its reference."""
    return {op: {"impl": "triton", "config": config} for op, config in configs.items()}


def _default_configs(config: ModelConfig, build: BuildConfig, num_sms: int, ops: Collection[str] = LLAMA_OPS
                     ) -> dict[str, Any]:
    norm = {"num_warps": default_norm_warps(config.hidden_size)}
    decode = [{"max_batch_size": b, **default_decode_config(b, config.num_kv_heads, num_sms)}
              for b in decode_batch_buckets(build.max_batch_size)]
    defaults = {"rms_norm": norm, "add_rms_norm": norm, "rms_norm_fp8": norm, "add_rms_norm_fp8": norm,
                "layer_norm": norm, "add_layer_norm": norm, "silu_mul": DEFAULT_SILU_MUL_CONFIG,
                "silu_mul_fp8": {"num_warps": default_norm_warps(config.intermediate_size)},
                "gelu": DEFAULT_GELU_CONFIG,
                "rotary_kv_write": DEFAULT_ROTARY_CONFIG,
                "attention": {"context": DEFAULT_CONTEXT_CONFIG, "decode": decode},
                "dense_linear": {},  # cuBLAS at every shape until timed
                "rms_norm_linear": {},  # nothing folded until timed
                "weight_only_linear": {},  # the kernels' DEFAULT_CONFIGS at every shape
                "fp8_linear": {}}  # the GEMV's default config at every shape
    return {op: defaults[op] for op in OPS if op in ops}


def _median_ms(fn: Callable[[], Any]) -> float:
    """Median time of one call replayed from a CUDA graph, as the runtime's decode steps run: timed
    eagerly, a kernel of a few microseconds measures Python launch overhead (Triton's launcher, the
    split buffers' allocation) instead, which favours configs with the fewest launches (on the H100 it
    chose 2 decode splits for the 8B engine at batch 1)."""
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return triton.testing.do_bench(graph.replay, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    finally:
        del graph


def _fastest(candidates: list[dict[str, Any]], runs: list[Callable[..., Any]], op: str,
             accept: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The candidate whose times, each relative to the best candidate at that shape, sum lowest (the first
    listed on a tie). ``runs``: one callable per input shape, taking the candidate's config as keyword
    arguments. A candidate this GPU cannot launch (more shared memory or registers than it has) is passed
    over, and so is one that ``accept`` (its check of the candidate's results) refuses."""
    times = [[_launchable_ms(partial(run, **candidate), op) for run in runs] for candidate in candidates]
    best = [min(column) for column in zip(*times)]
    if any(math.isinf(b) for b in best):
        raise EngineError(f"tuning {op}: none of its {len(candidates)} candidate configs launches on this GPU")
    scores = [sum(t / b for t, b in zip(row, best)) for row in times]
    launchable = [i for i in sorted(range(len(candidates)), key=scores.__getitem__) if not math.isinf(scores[i])]
    for winner in launchable:
        if accept is None or accept(candidates[winner]):
            break
        logger.warning("tuning %s: %s disagrees with the default's results; passed over", op, candidates[winner])
    else:
        raise EngineError(f"tuning {op}: no candidate config that launches gives the expected results")
    logger.info("tuned %s: %s (%s ms; candidates %s)", op, candidates[winner],
                ", ".join(f"{t:.4f}" for t in times[winner]), len(candidates))
    return candidates[winner]


def _launchable_ms(fn: Callable[[], Any], op: str) -> float:
    """_median_ms, or infinity for a config the GPU's resources refuse."""
    from triton.runtime.errors import OutOfResources

    try:
        return _median_ms(fn)
    except OutOfResources as e:
        logger.info("%s: %s does not launch here (%s)", op, fn.keywords, e)
        return math.inf


def _dense_candidate(x: torch.Tensor, weight: torch.Tensor, **config: Any) -> torch.Tensor:
    """A dense_linear candidate: the GEMV with ``config``, cuBLAS with none."""
    return gemv(x, weight, **config) if config else F.linear(x, weight)


def _weight_only_candidate(x: torch.Tensor, operands: tuple, **config: Any) -> torch.Tensor:
    """A weight_only_linear candidate: the Triton kernels with ``config`` for every row count."""
    shapes = {shape_key(operands[1].shape[0], x.shape[-1]): [{**config, "max_rows": 1 << 30}]}
    return weight_only_linear_triton(x, *operands, shapes=shapes)


# Weights of fewer bytes (in the engine dtype; FP8 ones at a byte a weight) than this keep their default
# kernel untimed: read in about a microsecond at the bandwidths kiln targets, so the candidates differ there by
# their launches alone, and timing them would compile every candidate into the build of a small model
# (stories260K's are all below).
MIN_TUNED_MATMUL_BYTES = 1 << 20

# How far a candidate's product may be from the default's (relative, of the largest output) before the
# tuner distrusts it: both sum exact products in float32 in different orders and round once to the dtype.
MATMUL_AGREEMENT = {torch.float32: 1e-4, torch.float16: 2.0 ** -8, torch.bfloat16: 2.0 ** -6}


def _agrees(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    expected = expected.float()
    tolerance = MATMUL_AGREEMENT[actual.dtype] * expected.abs().max().item()
    return bool(((actual.float() - expected).abs() <= tolerance).all())


def _variants(config: dict[str, Any]) -> list[dict[str, Any]]:
    """A weight-only bucket's config and its variants, one launch option changed at a time: BLOCK_N (more,
    narrower programs where N is small) and, for the GEMV, BLOCK_K and num_warps. The INT4 GEMV's best
    tiles on the H200 in-graph (docs/benchmarks.md, "H200: 2026-12-03, sixth session": down BLOCK_N 8 with
    8 warps, o BLOCK_N 8 with BLOCK_K 4096) are two options from its default and so not among these; the
    engine figures of that section were measured with these variants, and a search over every tile was
    not (this timing, one launch at a time, has picked configs slower in a decode step: tune_fp8_linear)."""
    options = {"BLOCK_N": (4, 8, 16), "BLOCK_K": (1024, 2048, 4096), "num_warps": (4, 8)} if config[
        "BLOCK_M"] == 1 else {"BLOCK_N": (16, 32, 64, 128)}
    return [config] + [{**config, name: value} for name, values in options.items() for value in values
                       if value != config[name]]


class TuningRun:
    """Random inputs of one engine's shapes on ``device``, and the timing of each op on them."""

    def __init__(self, config: ModelConfig, build: BuildConfig, dtype: torch.dtype, num_sms: int,
                 device: torch.device):
        self.config, self.build, self.dtype, self.num_sms, self.device = config, build, dtype, num_sms, device
        # An FP8 KV cache is timed as it runs: e4m3 caches and their scales, FP8 context dots if built so.
        self.is_fp8_kv = build.kv_cache_dtype == "fp8"
        self.kv_options = ({"kv_scale": torch.ones(2, device=device)} if self.is_fp8_kv else {})
        # Token counts of a batch-1 and a full-batch decode iteration, and of a full context iteration.
        self.token_counts = sorted({1, min(build.max_batch_size, build.max_num_tokens), build.max_num_tokens})
        # The *_fp8 ops run for FP8 Linears that take _scaled_mm: above MAX_GEMV_ROWS rows (the largest
        # count where an engine has none: the op then never runs, and any config does).
        self.fp8_token_counts = [t for t in self.token_counts if t > MAX_GEMV_ROWS] or self.token_counts[-1:]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=self.dtype, device=self.device)

    def tune(self, ops: Collection[str] = LLAMA_OPS, shapes: Mapping[str, Collection[tuple[int, int]]] | None = None
             ) -> dict[str, Any]:
        """The fastest config of each of ``ops``; inputs are made only for the ops tuned. ``shapes``: per
        matmul op, the weights it is timed at."""
        shapes = shapes or {}
        check_ops(ops)
        cfg, counts = self.config, self.token_counts
        tuners = {
            "rms_norm": lambda: _fastest(NORM_CANDIDATES, self.norm_runs(rms_norm_triton), "rms_norm"),
            "add_rms_norm": lambda: _fastest(NORM_CANDIDATES, self.norm_runs(add_rms_norm_triton, is_residual_add=True),
                                             "add_rms_norm"),
            "layer_norm": lambda: _fastest(NORM_CANDIDATES, self.norm_runs(layer_norm_triton, has_bias=True),
                                           "layer_norm"),
            "add_layer_norm": lambda: _fastest(
                NORM_CANDIDATES, self.norm_runs(add_layer_norm_triton, is_residual_add=True, has_bias=True),
                "add_layer_norm"),
            "rms_norm_fp8": lambda: _fastest(NORM_CANDIDATES, self.norm_runs(rms_norm_fp8_triton, is_fp8=True),
                                             "rms_norm_fp8"),
            "add_rms_norm_fp8": lambda: _fastest(
                NORM_CANDIDATES, self.norm_runs(add_rms_norm_fp8_triton, is_residual_add=True, is_fp8=True),
                "add_rms_norm_fp8"),
            "silu_mul": lambda: _fastest(SILU_MUL_CANDIDATES, [
                partial(silu_mul_triton, self.randn(t, 2 * cfg.intermediate_size)) for t in counts], "silu_mul"),
            "silu_mul_fp8": lambda: _fastest(SILU_MUL_FP8_CANDIDATES, [
                partial(silu_mul_fp8_triton, self.randn(t, 2 * cfg.intermediate_size)) for t in self.fp8_token_counts],
                "silu_mul_fp8"),
            "gelu": lambda: _fastest(GELU_CANDIDATES, [
                partial(gelu_triton, self.randn(t, cfg.intermediate_size), TUNING_GELU_APPROXIMATION)
                for t in counts], "gelu"),
            "rotary_kv_write": lambda: _fastest(ROTARY_CANDIDATES, [self.rotary_run(t) for t in counts],
                                                "rotary_kv_write"),
            "attention": lambda: {"context": self.tune_context(), "decode": self.tune_decode()},
            "dense_linear": lambda: self.tune_dense_linear(shapes.get("dense_linear", ())),
            "rms_norm_linear": lambda: self.tune_rms_norm_linear(shapes.get("rms_norm_linear", ()),
                                                                 configs.get("dense_linear", {}),
                                                                 configs.get("add_rms_norm", {})),
            "weight_only_linear": lambda: self.tune_weight_only_linear(shapes.get("weight_only_linear", ())),
            "fp8_linear": lambda: self.tune_fp8_linear(shapes.get("fp8_linear", ())),
        }
        configs: dict[str, Any] = {}
        for op in OPS:  # in order: rms_norm_linear is timed against add_rms_norm's and dense_linear's tuned configs
            if op in ops:
                configs[op] = tuners[op]()
        return configs

    def tune_dense_linear(self, shapes: Collection[tuple[int, int]]) -> dict[str, Any]:
        """Per weight shape (of MIN_TUNED_MATMUL_BYTES or more) and row bucket ("1": one row; "16": 2 to 16,
        timed at 2 and 16), the fastest of cuBLAS and the GEMV's candidates for that bucket (cuBLAS on a
        tie); a GEMV whose product is not cuBLAS's within the dtype's rounding is passed over. The plan config
        lists the GEMV's shapes only."""
        chosen: dict[str, dict[str, dict[str, int]]] = {}
        for n, k in shapes:
            if n * k * self.dtype.itemsize < MIN_TUNED_MATMUL_BYTES:
                continue
            weight = self.randn(n, k) * k ** -0.5
            buckets = self.gemv_choices(f"dense_linear {n}x{k}", k, ("1", "16"),
                                        lambda x, **config: _dense_candidate(x, weight, **config))
            if buckets:
                chosen[shape_key(n, k)] = buckets
            del weight
        return {"shapes": chosen} if chosen else {}

    def gemv_choices(self, name: str, k: int, buckets: Collection[str], run: Callable[..., torch.Tensor]
                     ) -> dict[str, dict[str, int]]:
        """Per row bucket of the GEMV of ``buckets`` ("1": one row; "16": 2 to 16 rows, up to max_num_tokens:
        a step's rows are its tokens, decodes and prompts alike) that the engine runs, the fastest of ``run``'s
        default (``run(x)``: cuBLAS for dense_linear, the GEMV's default config for fp8_linear) and the GEMV's
        candidates for the bucket (``run(x, **config)``), timed at the bucket's first and last row counts on
        random inputs of ``k`` features; the default on a tie, and a candidate whose product is not the
        default's within the dtype's rounding is passed over. Returns the buckets a candidate won."""
        rows = {"1": [1], "16": sorted({2, min(MAX_GEMV_ROWS, self.build.max_num_tokens)})
                if self.build.max_num_tokens >= 2 else []}
        chosen = {}
        for bucket in buckets:
            xs = [self.randn(r, k) for r in rows[bucket]]
            if not xs:
                continue
            candidates = [{}] + [c for c in GEMV_CANDIDATES if str(c["BLOCK_M"]) == bucket]
            best = _fastest(candidates, [partial(run, x) for x in xs], f"{name}, {bucket} row(s)",
                            accept=lambda c: not c or all(_agrees(run(x, **c), run(x)) for x in xs))
            if best:
                chosen[bucket] = best
        return chosen

    def tune_fp8_linear(self, shapes: Collection[tuple[int, int]]) -> dict[str, Any]:
        """Per FP8 weight shape (of MIN_TUNED_MATMUL_BYTES or more: a byte a weight), at 2 to 16 rows (the
        "16" bucket of gemv_choices), the fastest of the GEMV's default config and its candidates (the default
        on a tie); a candidate whose product is not the default's within the dtype's rounding is passed
        over. One row keeps the default, chosen in-graph (kiln.kernels.gemv): timed here, one launch at a
        time, the build moved Llama-3-8B's qkv to a config that made batch-1 decode slower on the H200
        (replay 2.628 -> 2.656 ms; docs/benchmarks.md, "H200: 2026-12-03, sixth session"). Above
        MAX_GEMV_ROWS rows fp8_linear takes _scaled_mm, which has no config. The plan config lists the
        shapes whose 16-row config changed."""
        method = linear_method(self.build.quantization, self.build)
        chosen: dict[str, dict[str, dict[str, int]]] = {}
        for n, k in shapes:
            if n * k < MIN_TUNED_MATMUL_BYTES:
                continue
            stored = method.convert(torch.randn(n, k, device=self.device) * k ** -0.5, self.dtype)
            buckets = self.gemv_choices(f"fp8_linear {n}x{k}", k, ("16",), lambda x, **config: fp8_gemv(
                x, stored["weight"], stored["weight_scale"], **config))
            if buckets:
                chosen[shape_key(n, k)] = buckets
            del stored
        return {"shapes": chosen} if chosen else {}

    def tune_rms_norm_linear(self, shapes: Collection[tuple[int, int]], dense: dict[str, Any],
                             norm: dict[str, Any]) -> dict[str, Any]:
        """Per weight shape (of MIN_TUNED_MATMUL_BYTES or more) an RMSNorm feeds, at one row: the GEMV that
        normalizes the row itself with each one-row GEMV candidate, against add_rms_norm's kernel with its
        plan config ``norm`` and then dense_linear with its plan config ``dense`` (kept on a tie: the fold's
        residual add, in the GEMV before the norm, is not timed); a fold whose product is not the
        reference's within the dtype's rounding is passed over. The plan config lists the shapes that fold."""
        chosen: dict[str, dict[str, int]] = {}
        for n, k in shapes:
            if n * k * self.dtype.itemsize < MIN_TUNED_MATMUL_BYTES:
                continue
            weight = self.randn(n, k) * k ** -0.5
            # The norm's kernel adds x to its residual in place at every run: its own tensors.
            x, residual, norm_weight = self.randn(1, k), self.randn(1, k), torch.ones(k, dtype=self.dtype,
                                                                                     device=self.device)
            row = self.randn(1, k)

            def run(**config: Any) -> torch.Tensor:
                if config:
                    return gemv(row, weight, rms_eps=TUNING_EPS, **config)
                normed, _ = add_rms_norm_triton(x, residual, norm_weight, TUNING_EPS, **norm)
                return dense_linear_triton(normed, weight, None, **dense)

            expected = rms_norm_linear_ref(row, TUNING_EPS, weight, None)
            best = _fastest([{}] + [c for c in GEMV_CANDIDATES if c["BLOCK_M"] == 1], [run],
                            f"rms_norm_linear {n}x{k}", accept=lambda c: not c or _agrees(run(**c), expected))
            if best:
                chosen[shape_key(n, k)] = best
            del weight
        return {"shapes": chosen} if chosen else {}

    def tune_weight_only_linear(self, shapes: Collection[tuple[int, int]]) -> dict[str, Any]:
        """Per weight shape (of MIN_TUNED_MATMUL_BYTES or more) of the engine's weight-only method, each bucket
        of rows its Triton kernels take (DEFAULT_CONFIGS: the GEMV's one row, the tensor-core tiles' buckets
        below DEQUANT_MIN_ROWS), timed at the bucket's first and last row counts the engine runs: the
        fastest of the bucket's default config and its _variants (the default on a tie), kept where its
        product matches the default's. The plan config lists the shapes whose buckets changed."""
        method = linear_method(self.build.quantization, self.build)
        limit = self.build.max_num_tokens  # a step's rows are its tokens, decodes and prompts alike
        chosen: dict[str, list[dict[str, Any]]] = {}
        for n, k in shapes:
            if n * k * self.dtype.itemsize < MIN_TUNED_MATMUL_BYTES:
                continue
            stored = method.convert(torch.randn(n, k, device=self.device) * k ** -0.5, self.dtype)
            operands = method.operands(SimpleNamespace(**stored))
            configs, first_row = [], 1
            for default in DEFAULT_CONFIGS[operands[0]]:
                lowest, highest = first_row, min(default["max_rows"], limit)
                first_row = default["max_rows"] + 1
                if default.get("dequantize") or lowest > highest:  # not this bucket's kernel, or no batch of it
                    configs.append(default)
                    continue
                xs = [self.randn(r, k) for r in sorted({lowest, highest})]
                configs.append(_fastest(
                    _variants(default), [partial(_weight_only_candidate, x, operands) for x in xs],
                    f"weight_only_linear {n}x{k}, up to {default['max_rows']} rows",
                    accept=lambda c: c is default or all(_agrees(_weight_only_candidate(x, operands, **c),
                                                                 _weight_only_candidate(x, operands, **default))
                                                         for x in xs)))
            if configs != DEFAULT_CONFIGS[operands[0]]:
                chosen[shape_key(n, k)] = configs
            del stored
        return {"shapes": chosen} if chosen else {}

    def norm_runs(self, norm: Callable[..., Any], is_residual_add: bool = False, has_bias: bool = False,
                  is_fp8: bool = False) -> list[Callable[..., Any]]:
        """One run of an RMSNorm / LayerNorm op (with the residual add or not, quantizing or not) per token
        count."""
        hidden_size = self.config.hidden_size
        weight = self.randn(hidden_size)
        params = (weight, weight) if has_bias else (weight,)
        return [partial(norm, *[self.randn(t, hidden_size) for _ in range(1 + is_residual_add)], *params, TUNING_EPS)
                for t in (self.fp8_token_counts if is_fp8 else self.token_counts)]

    def kv_cache(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V caches with room for num_tokens tokens."""
        cfg, block_size = self.config, self.build.tokens_per_block
        num_blocks = -(-num_tokens // block_size)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = FP8_DTYPE if self.is_fp8_kv else self.dtype
        return self.randn(*shape).to(dtype), self.randn(*shape).to(dtype)

    def rotary_run(self, num_tokens: int) -> Callable[..., torch.Tensor]:
        cfg = self.config
        qkv = self.randn(num_tokens, cfg.q_size + 2 * cfg.kv_size)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        k_cache, v_cache = self.kv_cache(num_tokens)
        positions = torch.randint(0, self.build.max_seq_len, (num_tokens,), device=self.device)
        slots = torch.randperm(k_cache.shape[0] * k_cache.shape[1], device=self.device)[:num_tokens]
        cos_sin = rope_cos_sin(cfg.rope, cfg.head_dim, self.build.max_seq_len).to(self.device)
        return partial(rotary_kv_write_triton, q.view(num_tokens, cfg.num_heads, cfg.head_dim),
                       k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim),
                       v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), positions, cos_sin, k_cache, v_cache, slots,
                       **self.kv_options)

    def attention_run(self, q_lens: list[int], seq_lens: list[int], key: str) -> Callable[..., torch.Tensor]:
        """Attention over sequences with scattered cache blocks; the run takes one context / decode config."""
        cfg, block_size = self.config, self.build.tokens_per_block
        blocks_per_seq = -(-max(seq_lens) // block_size)
        k_cache, v_cache = self.kv_cache(len(seq_lens) * blocks_per_seq * block_size)
        tables = torch.randperm(k_cache.shape[0], device=self.device, dtype=torch.int32).view(len(seq_lens), -1)
        meta = AttentionMetadata(
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=self.device),
            block_tables=tables, seq_lens_host=seq_lens, query_lens_host=q_lens)
        q = self.randn(sum(q_lens), cfg.num_heads, cfg.head_dim)
        attention = partial(paged_attention_triton, q, k_cache, v_cache, meta, cfg.head_dim ** -0.5,
                            fp8_context=self.build.use_fp8_context_fmha, **self.kv_options)
        if key == "context":
            return lambda **config: attention(context=config)
        return lambda **config: attention(decode=[{"max_batch_size": len(seq_lens), **config}])

    def tune_context(self) -> dict[str, Any]:
        """Full context iterations: max_num_tokens of prompts of max_input_len tokens (or one shorter)."""
        prompt_len = min(self.build.max_input_len, self.build.max_num_tokens)
        q_lens = [prompt_len] * (self.build.max_num_tokens // prompt_len)
        return _fastest(CONTEXT_CANDIDATES, [self.attention_run(q_lens, q_lens, "context")], "attention context")

    def tune_decode(self) -> list[dict[str, Any]]:
        """Per batch bucket, at a representative context length: half of max_seq_len, the mean length of a
        sequence that grows to the limit (at most MAX_TUNING_KV_TOKENS keys in all)."""
        entries = []
        for batch in decode_batch_buckets(self.build.max_batch_size):
            context_len = max(1, min(self.build.max_seq_len // 2, MAX_TUNING_KV_TOKENS // batch))
            max_splits = max(1, MAX_DECODE_PROGRAMS_PER_SM * self.num_sms // (batch * self.config.num_kv_heads))
            candidates = [{**kernel, "num_splits": s} for kernel in DECODE_KERNEL_CANDIDATES
                          for s in DECODE_SPLITS if s == 1 or s <= max_splits]
            run = self.attention_run([1] * batch, [context_len] * batch, "decode")
            entries.append({"max_batch_size": batch, **_fastest(candidates, [run], f"attention decode batch {batch}")})
        return entries
