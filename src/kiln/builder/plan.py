"""What the build decides besides weights: the memory plan and the kernel plan."""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Collection, Mapping
from typing import Any

import torch

from kiln.config import BuildConfig
from kiln.engine.weights import DTYPE_TO_ST, ST_TO_DTYPE
from kiln.kernels import LLAMA_OPS, reference_plan
from kiln.layers import Linear, checkpoint_layers
from kiln.models import CausalLM
from kiln.models.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


def rank_config(config: ModelConfig, tp_size: int) -> ModelConfig:
    """The shapes one tensor-parallel rank computes with: its share of the heads (one KV head where the
    ranks replicate fewer) and of the MLP; the model config itself at one rank."""
    if tp_size == 1:
        return config
    return replace(config, num_heads=config.num_heads // tp_size, num_kv_heads=max(1, config.num_kv_heads // tp_size),
                   intermediate_size=config.intermediate_size // tp_size)


def sharding_table(skeletons: list[CausalLM]) -> dict[str, dict[str, Any]]:
    """The manifest's sharding mapping: checkpoint tensor -> the dim it is split along and, per rank, the
    [start, stop) ranges of it that the rank holds (``padded``: zero-padded to that size first)."""
    table: dict[str, dict[str, Any]] = {}
    for skeleton in skeletons:  # at one rank nothing is sharded: an empty table
        for prefix, layer in checkpoint_layers(skeleton):
            for name, shard in layer.shards.items():
                entry = table.setdefault(prefix + name, {"dim": shard.dim, "padded": shard.padded, "ranks": []})
                entry["ranks"].append([list(r) for r in shard.ranges])
    return table


def tensor_table(model: CausalLM) -> dict[str, dict[str, Any]]:
    """The manifest's tensor list before any weight exists: name -> shape and dtype, in file order, as the
    model's blocks declare them (a model skeleton: meta parameters)."""
    return {name: {"shape": list(p.shape), "dtype": DTYPE_TO_ST[p.dtype]} for name, p in model.named_parameters()}


def linear_weights(model: CausalLM) -> dict[str, int]:
    """The Linears' prefixes ("layers.0.mlp.down.") -> weights each multiplies (out x in features): what
    their stored tensors hold, packed or not."""
    return {name + ".": module.out_features * module.in_features for name, module in model.named_modules()
            if isinstance(module, Linear)}


def linear_workspace_bytes(model: CausalLM, max_rows: int, dtype: torch.dtype) -> int:
    """The most any one Linear's matmul allocates besides its output for up to ``max_rows`` rows (a
    weight-only engine's dequantized weight, from DEQUANT_MIN_ROWS rows): the layers run one at a time,
    and the caching allocator (or a CUDA graph's pool) hands the next one the memory the last freed."""
    return max((module.method.workspace_bytes(module.out_features, module.in_features, dtype, max_rows)
                for module in model.modules() if isinstance(module, Linear)), default=0)


def memory_plan(config: ModelConfig, build: BuildConfig, kv_cache_dtype: torch.dtype, dtype: torch.dtype,
                tensors: dict[str, dict[str, Any]], linears: dict[str, int], linear_workspace: int) -> dict[str, int]:
    """Bytes the engine needs at its limits, so users can see what fits before loading: the KV cache's by
    its element size (an FP8 cache holds twice the tokens of a 16-bit one in the same bytes); ``linears``
    (from ``linear_weights``) tells how many bytes the linear layers' weights take as stored (packed INT4 /
    INT8 with their scales) for how many weights; ``linear_workspace`` (from ``linear_workspace_bytes``)
    the scratch of the largest Linear's matmul, which the runtime keeps free beside the activations
    (``reserved_bytes``). Per rank: ``config`` is the rank's shapes, ``tensors`` and ``linears`` one
    rank's."""
    sizes = {name: math.prod(t["shape"]) * ST_TO_DTYPE[t["dtype"]].itemsize for name, t in tensors.items()}
    weights = sum(sizes.values())
    linear_bytes = sum(size for name, size in sizes.items()
                       if name.rpartition(".")[0] + "." in linears and not name.endswith(".bias"))
    per_token = kv_bytes_per_token(config, kv_cache_dtype)
    blocks_per_seq = -(-build.max_seq_len // build.tokens_per_block)
    widest = max(config.q_size + 2 * config.kv_size, 2 * config.intermediate_size, config.hidden_size)
    activations = build.max_num_tokens * (widest + 3 * config.hidden_size) * dtype.itemsize
    logits = build.max_batch_size * config.vocab_size * 4
    return {
        "weight_bytes": weights,
        "linear_weight_bytes": linear_bytes,
        "linear_weights": sum(linears.values()),
        "kv_bytes_per_token": per_token,
        "kv_bytes_per_block": per_token * build.tokens_per_block,
        "kv_blocks_for_full_batch": build.max_batch_size * blocks_per_seq,
        "kv_bytes_for_full_batch": build.max_batch_size * blocks_per_seq * build.tokens_per_block * per_token,
        "activation_bytes": activations,
        "linear_workspace_bytes": linear_workspace,
        "logits_bytes": logits,
    }


def reserved_bytes(plan: dict[str, int]) -> int:
    """What the runtime keeps out of the KV pool: one iteration's activations, the largest Linear's
    workspace (absent from plans made before it was counted) and the float32 logits of a full decode batch
    (the buffer the CUDA graphs write them into). An eager step's own logits are not counted beside them:
    a step with prompt logprobs may compute up to max_num_tokens rows of them."""
    return plan["activation_bytes"] + plan.get("linear_workspace_bytes", 0) + plan["logits_bytes"]


def kernel_plan(target: str, config: ModelConfig, build: BuildConfig, dtype: torch.dtype,
                tune: bool, ops: Collection[str] = LLAMA_OPS,
                shapes: Mapping[str, Collection[tuple[int, int]]] | None = None) -> dict[str, dict[str, Any]]:
    """Reference ops on the CPU; Triton ops (tuned for this engine's shapes when ``tune``) on GPUs; for
    ``ops``, the ops the model calls; ``shapes``, the weights its matmul ops multiply (matmul_shapes)."""
    if target == "cpu":
        return reference_plan(ops)
    from kiln.builder.tuning import gpu_kernel_plan  # needs triton

    return gpu_kernel_plan(config, build, dtype, tune=tune, ops=ops, shapes=shapes)

