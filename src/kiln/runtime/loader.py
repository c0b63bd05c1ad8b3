"""Engine on disk -> engine in memory: weights on the device, kernels bound, KV pool sized once."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kiln.engine import EngineManifest, engine_device, load_weights
from kiln.engine.manifest import COMPILE_CACHE_DIR, TOKENIZER_DIR
from kiln.config import KvCacheConfig
from kiln.builder.plan import rank_config, reserved_bytes
from kiln.errors import ConfigError, EngineError
from kiln.kernels import KernelOps
from kiln.kernels.triton_jit import compile_cache, use_compile_cache
from kiln.layers import (SINGLE, TensorParallel, fold_norm_weights, kernel_ops_of, layer_context, load_parameters,
                         matmul_shapes)
from kiln.models import CausalLM, create_model, model_skeleton
from kiln.runtime.kv_cache import max_live_blocks
from kiln.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_POOL_FULL_BATCHES = 4


@dataclass
class LoadedEngine:
    engine_dir: Path
    manifest: EngineManifest
    model: CausalLM
    tokenizer: Tokenizer | None
    device: torch.device

    @property
    def build_config(self):
        return self.manifest.build_config

    @property
    def model_config(self):
        return self.manifest.model_config


def load_engine(engine_dir: str | Path, device: str | None = None, verify: bool = True,
                progress: bool = True, tp: TensorParallel = SINGLE, kernel_plan: dict | None = None) -> LoadedEngine:
    """The engine on ``device`` (default: its target's), as tensor-parallel rank ``tp.rank`` of an engine
    built for ``tp.size`` ranks: that rank's weight file. ``kernel_plan``: the plan rank 0 tuned for an
    engine built without its GPU (the other ranks take it rather than tune again)."""
    t0 = time.perf_counter()
    engine_dir = Path(engine_dir)
    manifest = EngineManifest.read(engine_dir)
    if manifest.tp_size != tp.size:
        raise EngineError(f"{engine_dir} is built for tp_size={manifest.tp_size}, loaded as {tp.size} rank(s); "
                          "load it with LLM / Executor / kiln, which start its ranks")
    if kernel_plan is not None:
        manifest = replace(manifest, kernel_plan=kernel_plan, is_kernel_plan_tuned=True)
    dev = torch.device(device) if device else engine_device(manifest)
    if not manifest.is_kernel_plan_tuned and dev.type == "cuda":
        manifest = tune_at_first_load(engine_dir, manifest, dev)
    weights = load_weights(engine_dir, manifest, dev, verify=verify, progress=progress, rank=tp.rank)
    ops = KernelOps(manifest.kernel_plan)
    if ops.uses_triton:
        use_compile_cache(engine_dir / COMPILE_CACHE_DIR)
    ctx = layer_context(manifest.build_config, ops, manifest.dtype, dev, tp)
    model = create_model(manifest.model_config, ctx, manifest.build_config.max_seq_len)
    load_parameters(model, weights)
    fold_norm_weights(model)
    tokenizer = None
    if manifest.has_tokenizer:
        cfg = manifest.model_config
        tokenizer = Tokenizer(engine_dir / TOKENIZER_DIR, eos_token_ids=cfg.eos_token_ids, bos_token_id=cfg.bos_token_id)
    logger.info("loaded %s onto %s in %.1f s", engine_dir, dev, time.perf_counter() - t0)
    return LoadedEngine(engine_dir, manifest, model, tokenizer, dev)


def tune_at_first_load(engine_dir: Path, manifest: EngineManifest, device: torch.device) -> EngineManifest:
    """An engine built for this GPU on a machine without one: tune its kernel plan here, and keep the plan and
    the compiled kernels in the engine folder when it is writable, so that later loads do nothing."""
    from kiln.builder.tuning import gpu_kernel_plan

    build = manifest.build_config
    skeleton = model_skeleton(manifest.model_config, build, manifest.dtype, TensorParallel(0, build.tp_size))
    ops = kernel_ops_of(skeleton)  # rank 0's shapes are every rank's
    per_rank = rank_config(manifest.model_config, build.tp_size)
    is_writable = os.access(engine_dir, os.W_OK)
    print(f"kiln: tuning the kernels of {engine_dir} for this {build.target} GPU (first load of an engine built "
          f"without one){'' if is_writable else '; the folder is read-only, so every load tunes again'}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with compile_cache(str(engine_dir / COMPILE_CACHE_DIR) if is_writable else None):  # on the current GPU
        plan = gpu_kernel_plan(per_rank, build, manifest.dtype, tune=True, ops=ops,
                               shapes=matmul_shapes(skeleton))
    tuned = replace(manifest, kernel_plan=plan, is_kernel_plan_tuned=True,
                    target_device_name=torch.cuda.get_device_name(device))
    if is_writable:
        tuned.write(engine_dir)
    logger.info("tuned %s's kernel plan in %.1f s%s", engine_dir, time.perf_counter() - t0,
                " (saved)" if is_writable else "")
    return tuned


def num_kv_blocks(engine: LoadedEngine, kv: KvCacheConfig) -> int:
    """Blocks for the pool: ``max_tokens`` if given, and on a GPU at most ``free_gpu_memory_fraction`` of
    the memory free after weights, activations, the largest Linear's workspace (a weight-only engine's
    dequantized weight) and a full batch's logits (the memory plan's ``reserved_bytes``); on the CPU,
    enough for a full batch at max_seq_len.
    Never more than MAX_POOL_FULL_BATCHES full batches at max_seq_len: beyond that, extra blocks only
    keep more cached prefixes, while a small model would otherwise take the whole GPU."""
    m = engine.manifest
    block_size = m.build_config.tokens_per_block
    block_bytes = m.memory_plan["kv_bytes_per_block"]
    limits = []
    if kv.max_tokens is not None:
        limits.append(-(-kv.max_tokens // block_size))
    if engine.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(engine.device)
        limits.append(int((free - reserved_bytes(m.memory_plan)) * kv.free_gpu_memory_fraction) // block_bytes)
    elif kv.max_tokens is None:
        limits.append(m.memory_plan["kv_blocks_for_full_batch"])
    blocks = min(limits + [MAX_POOL_FULL_BATCHES * m.memory_plan["kv_blocks_for_full_batch"]])
    build = m.build_config
    min_blocks = max_live_blocks(build.max_seq_len, block_size, m.model_config.sliding_window, build.max_num_tokens)
    if blocks < min_blocks:
        raise ConfigError(f"the KV cache would hold {blocks} blocks of {block_size} tokens, fewer than one "
                          f"max_seq_len sequence needs ({min_blocks}); raise free_gpu_memory_fraction / "
                          "kv max_tokens, or rebuild with a smaller --max-seq-len")
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", blocks, block_size, blocks * block_bytes / 2**30)
    return blocks
