"""Builder: validates a model against the build limits and the target, plans kernels and memory.

All validation happens here, before any weight is converted, and each error says what to change.
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kiln.builder.plan import (kernel_plan, linear_weights, linear_workspace_bytes, memory_plan, rank_config,
                               sharding_table, tensor_table)
from kiln.config import BUILD_DEFAULTS, BuildConfig
from kiln.convert import AutoModelForCausalLM, ModelSource, check_source
from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.converter import convert_checkpoint, dummy_weights
from kiln.convert.calibration import awq_input_scales
from kiln.convert.fp8_checkpoints import Fp8CheckpointFormat, detect_fp8_format
from kiln.convert.int_checkpoints import detect_checkpoint_quantization, engine_quantization
from kiln.engine import Engine, EngineManifest
from kiln.engine.target import compute_capability, detect_target, device_name, resolve_dtype
from kiln.engine.weights import DTYPE_NAMES
from kiln.errors import ConfigError
from kiln.kernels.attention import MIN_FP8_KV_CAPABILITY, fp8_kv_cache_refusal
from kiln.kernels.triton_jit import compile_cache
from kiln.layers import kernel_ops_of, linear_method, matmul_shapes
from kiln.layers import TensorParallel
from kiln.models import CausalLM, family, model_skeleton
from kiln.models.config import ModelConfig


def resolve_build_config(model: ModelConfig, build: BuildConfig, checkpoint_dir: str | Path | None = None
                         ) -> BuildConfig:
    """The one place build defaults are chosen (Builder.build, ``kiln build``, LLM on a Hugging Face
    folder): every unset field fitted to the model, its checkpoint (``checkpoint_dir``, None for dummy
    weights: its configs only, no weight is read) and this machine. A value given is kept, or refused
    naming its field, its flag and the fix; a default never conflicts with a value given or the model."""
    target = detect_target() if build.target == "auto" else build.target
    dtype = resolve_dtype(build.dtype, model.checkpoint_dtype, target)
    fp8_format = detect_fp8_format(checkpoint_dir) if checkpoint_dir is not None else None
    quantization, group_size = _resolve_quantization(build, checkpoint_dir, fp8_format)
    if build.fp8_scaling is not None and quantization != "fp8":
        raise ConfigError(f"fp8_scaling={build.fp8_scaling!r} (--fp8-scaling) sets the scales of fp8 weights, and "
                          f"this engine's quantization is {quantization!r}; add --quantization fp8, or leave "
                          "--fp8-scaling out")
    fp8_scaling = (build.fp8_scaling or "channel") if quantization == "fp8" else None
    # An unknown quantization or a group size it cannot take fails here, naming the known ones.
    method = linear_method(quantization, build.replace(quantization=quantization, fp8_scaling=fp8_scaling,
                                                       group_size=group_size))
    refusal = method.target_refusal(target)
    if refusal:
        raise ConfigError(f"quantization={quantization!r} (--quantization {quantization}) for target "
                          f"{target}: {refusal}")
    if build.calibration_data is not None:
        if quantization != "int4_awq":
            raise ConfigError(f"calibration_data (--calibration-data) is for quantization int4_awq, not "
                              f"{quantization!r}; leave it out")
        if not Path(build.calibration_data).is_file():
            raise ConfigError(f"calibration_data {build.calibration_data} (--calibration-data): no such file")
    kv_cache_dtype = _resolve_kv_cache_dtype(build, dtype, target, fp8_format)
    if model.sliding_window is not None and model.sliding_window < 1:
        raise ConfigError(f"sliding_window={model.sliding_window} leaves a query no key to attend to; set "
                          "sliding_window in config.json to the window the model was trained with (>= 1), or "
                          "to null for full attention")
    _check_tp_size(model, build.tp_size)
    if build.tp_size > 1:  # weights that arrive as packed integers or with AWQ scales are not sliced by rank yet
        int_format = detect_checkpoint_quantization(checkpoint_dir) if checkpoint_dir is not None else None
        if int_format is not None or quantization == "int4_awq":
            what = (f"{checkpoint_dir} holds {int_format} weights" if int_format is not None
                    else "quantization='int4_awq' (--quantization int4_awq)")
            raise ConfigError(f"tp_size={build.tp_size} (--tp-size {build.tp_size}): {what}, which this kiln does "
                              "not split over ranks yet; build with --tp-size 1, or from the float checkpoint with "
                              "int4_wo / int8_wo / fp8")
    longest, reason = _longest_sequence(model)
    for name in ("max_seq_len", "max_input_len"):  # max_input_len <= max_seq_len when both are given
        value = getattr(build, name)
        if value is not None and value > longest:
            raise ConfigError(f"{name}={value} exceeds {reason}; lower {name} (--{name.replace('_', '-')}) to "
                              f"{longest} or less")
    seq_len = build.max_seq_len or max(min(BUILD_DEFAULTS["max_seq_len"], longest), build.max_input_len or 0)
    return build.replace(
        target=target, dtype=dtype, quantization=quantization, group_size=method.group_size,
        fp8_scaling=fp8_scaling, kv_cache_dtype=kv_cache_dtype, max_seq_len=seq_len,
        max_input_len=build.max_input_len or min(BUILD_DEFAULTS["max_input_len"], seq_len),
        **{name: getattr(build, name) or BUILD_DEFAULTS[name]
           for name in ("max_batch_size", "max_num_tokens", "tokens_per_block")})


def _resolve_quantization(build: BuildConfig, checkpoint_dir: str | Path | None,
                          fp8_format: Fp8CheckpointFormat | None) -> tuple[str, int | None]:
    """(quantization, group size): "auto" -> the checkpoint's quantization. A pre-quantized checkpoint
    builds engines of its own format only (its weights are taken as stored): FP8 ones "fp8", AutoAWQ /
    GPTQ ones the weight-only method and group size that store them (``engine_quantization``), so
    another value given fails."""
    quantization = build.quantization
    int_format = detect_checkpoint_quantization(checkpoint_dir) if checkpoint_dir is not None else None
    if fp8_format is None and int_format is None:
        return ("none" if quantization == "auto" else quantization), build.group_size
    own, group_size = ("fp8", None) if fp8_format is not None else engine_quantization(int_format)
    if quantization not in ("auto", own):
        raise ConfigError(f"{checkpoint_dir} holds {fp8_format or int_format} weights, which build {own} engines "
                          f"only; leave out quantization={quantization!r} (--quantization), or build {quantization} "
                          "from the float checkpoint")
    if build.group_size not in (None, group_size):
        stored = f"stored in groups of {group_size}" if group_size else f"stored as {own}, which has no groups"
        raise ConfigError(f"{checkpoint_dir} holds {fp8_format or int_format} weights, {stored}; leave out "
                          f"group_size={build.group_size} (--group-size)")
    return own, group_size


def _resolve_kv_cache_dtype(build: BuildConfig, dtype: str, target: str,
                            fp8_format: Fp8CheckpointFormat | None) -> str:
    """"auto" -> "fp8" for a checkpoint with an FP8 KV cache (its scales are used), else the engine dtype;
    FP8 (and FP8 context attention, which reads it) only where the kernels can run it."""
    kv_cache_dtype = build.kv_cache_dtype
    if kv_cache_dtype == "auto":
        kv_cache_dtype = "fp8" if fp8_format is not None and fp8_format.kv_cache == "fp8" else dtype
    elif kv_cache_dtype != "fp8" and kv_cache_dtype != dtype:
        raise ConfigError(f"kv_cache_dtype={kv_cache_dtype!r} (--kv-cache-dtype) differs from the engine dtype "
                          f"{dtype}; the KV cache holds the engine dtype or fp8: use --kv-cache-dtype auto or fp8")
    if build.use_fp8_context_fmha:
        if compute_capability(target) < MIN_FP8_KV_CAPABILITY and target != "cpu":
            a100 = " (the A100 has none)" if target == "sm80" else ""
            raise ConfigError(f"use_fp8_context_fmha (--fp8-context-attention) for target {target}: FP8 dots need "
                              f"FP8 tensor cores (sm{MIN_FP8_KV_CAPABILITY}+: Ada, Hopper){a100}; leave it off "
                              "(int8_wo / int4_wo weight-only quantization runs there)")
        if kv_cache_dtype != "fp8":
            raise ConfigError("use_fp8_context_fmha (--fp8-context-attention) multiplies the FP8 KV cache's keys and "
                              f"values, and this engine's KV cache is {kv_cache_dtype}; add --kv-cache-dtype fp8")
    refusal = fp8_kv_cache_refusal(target) if kv_cache_dtype == "fp8" else None
    if refusal:
        raise ConfigError(f"kv_cache_dtype='fp8' (--kv-cache-dtype fp8) for target {target}: {refusal}; leave "
                          f"--kv-cache-dtype at auto ({dtype} KV cache), or build for an sm89+ target")
    return kv_cache_dtype


def _check_tp_size(model: ModelConfig, tp_size: int) -> None:
    """Every rank must hold whole attention heads, whole KV heads (an equal share, or a copy of one when
    there are fewer KV heads than ranks) and an equal share of the MLP; the vocabulary is padded instead."""
    if tp_size == 1:
        return
    keys = family(model.architecture).HF_CONFIG  # ModelConfig field -> its config.json key, for the messages
    flag = f"tp_size={tp_size} (--tp-size {tp_size})"

    def key(field: str) -> str:
        return keys.get(field, field)

    if model.num_heads % tp_size:
        raise ConfigError(f"{flag}: the model's {model.num_heads} attention heads ({key('num_heads')}) do not split "
                          f"over {tp_size} ranks; choose a tp_size that divides {model.num_heads}")
    if model.num_kv_heads % tp_size and tp_size % model.num_kv_heads:
        raise ConfigError(f"{flag}: the model's {model.num_kv_heads} KV heads ({key('num_kv_heads')}) neither split "
                          f"over {tp_size} ranks nor replicate evenly across them; choose a tp_size that divides "
                          f"{model.num_kv_heads} or is a multiple of it")
    if model.intermediate_size % tp_size:
        raise ConfigError(f"{flag}: the model's MLP width {model.intermediate_size} ({key('intermediate_size')}) does "
                          f"not split over {tp_size} ranks; choose a tp_size that divides {model.intermediate_size}")


def _longest_sequence(model: ModelConfig) -> tuple[int, str]:
    """The longest sequence an engine of ``model`` may hold, and what sets it (for error messages)."""
    limit = model.max_supported_positions
    scaled = " with rope scaling" if model.rope.rope_type != "default" else ""
    return limit, f"the model's {limit} positions (max_position_embeddings{scaled})"


# TensorRT-LLM's create_builder_config names -> BuildConfig fields (precision and max_output_len convert).
TRTLLM_NAMES = {"max_batch_size": "max_batch_size", "max_input_len": "max_input_len", "max_seq_len": "max_seq_len",
                "max_num_tokens": "max_num_tokens", "max_beam_width": "max_beam_width",
                "tokens_per_block": "tokens_per_block", "tensor_parallel": "tp_size", "tp_size": "tp_size"}
TRTLLM_PRECISIONS = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                     "float32": "float32", "fp32": "float32"}


class Builder:
    def create_builder_config(self, name: str | None = None, precision: str = "auto", max_output_len: int | None = None,
                              use_fp8_context_fmha: bool = False, **options: Any) -> BuildConfig:
        """TensorRT-LLM's ``Builder().create_builder_config(name=..., precision="float16", tensor_parallel=2,
        max_batch_size=128, max_input_len=..., max_output_len=...)`` as a BuildConfig. ``name`` labels the
        engine in TensorRT-LLM and changes nothing here; ``max_output_len`` is added to ``max_input_len``
        (a sequence holds both); unknown names fail, listing the accepted ones."""
        unknown = sorted(set(options) - set(TRTLLM_NAMES))
        if unknown:
            accepted = ", ".join(["name", "precision", "max_output_len", "use_fp8_context_fmha", *TRTLLM_NAMES])
            raise ConfigError(f"create_builder_config: unknown {', '.join(unknown)}; accepted: {accepted}")
        if precision != "auto" and precision not in TRTLLM_PRECISIONS:
            raise ConfigError(f"create_builder_config: precision {precision!r} is not one of "
                              f"{', '.join(TRTLLM_PRECISIONS)}")
        fields = {TRTLLM_NAMES[key]: value for key, value in options.items()}
        if max_output_len is not None:
            if fields.get("max_input_len") is None:
                raise ConfigError("create_builder_config: max_output_len needs max_input_len (max_seq_len = both)")
            fields.setdefault("max_seq_len", fields["max_input_len"] + max_output_len)
        return BuildConfig(dtype=TRTLLM_PRECISIONS.get(precision, "auto"), use_fp8_context_fmha=use_fp8_context_fmha,
                           **fields)

    def build(self, model: ModelSource | str | Path, config: BuildConfig | dict[str, Any] | None = None,
              tune: bool = True) -> Engine:
        """``model``: from ``AutoModelForCausalLM.from_hugging_face`` / ``from_preset``, or a Hugging Face
        folder's path. ``config``: a BuildConfig, a dict of its fields, or None; fields left unset are
        fitted to the model (``resolve_build_config``)."""
        if isinstance(model, (str, os.PathLike)):
            model = AutoModelForCausalLM.from_hugging_face(model)
        elif not isinstance(model, ModelSource):
            raise ConfigError(f"Builder.build takes a model from AutoModelForCausalLM.from_hugging_face(path) or "
                              f"from_preset(name), or a Hugging Face folder's path; got {type(model).__name__}")
        resolved = resolve_build_config(model.config, BuildConfig.of(config), model.checkpoint_dir)
        check_source(model)  # a source from a family class (LlamaForCausalLM.from_hugging_face) is checked here
        dtype = DTYPE_NAMES[resolved.dtype]
        tp_size = resolved.tp_size
        skeletons = [model_skeleton(model.config, resolved, dtype, TensorParallel(rank, tp_size))
                     for rank in range(tp_size)]  # every rank's tensors have rank 0's names and shapes
        per_rank = rank_config(model.config, tp_size)  # the shapes one rank's kernels and memory see
        here = detect_target()
        # A GPU the build machine lacks: the engine is converted and validated here, and its kernel plan is
        # made by the first load on such a GPU (kiln.runtime.loader), which saves it in the engine folder.
        is_foreign = resolved.target not in ("cpu", here)
        kernel_cache = None
        if is_foreign:
            plan, is_tuned, target_device_name = {}, False, f"any {resolved.target} GPU (built on {here})"
        else:
            # Kernels compiled while tuning are saved in the engine folder, so that loading compiles nothing.
            kernel_cache = tempfile.TemporaryDirectory(prefix="kiln-kernels-") if resolved.target != "cpu" else None
            with compile_cache(kernel_cache.name if kernel_cache else None):
                plan = kernel_plan(resolved.target, per_rank, resolved, dtype, tune=tune,
                                   ops=kernel_ops_of(skeletons[0]), shapes=matmul_shapes(skeletons[0]))
            is_tuned, target_device_name = True, device_name() if resolved.target != "cpu" else "cpu"
        tensors = tensor_table(skeletons[0])
        manifest = EngineManifest(
            model_config=model.config,
            build_config=resolved,
            target_device_name=target_device_name,
            kernel_plan=plan,
            memory_plan=memory_plan(per_rank, resolved, skeletons[0].kv_cache_dtype, dtype, tensors,
                                    linear_weights(skeletons[0]),
                                    linear_workspace_bytes(skeletons[0], resolved.max_num_tokens, dtype)),
            tensors=tensors,
            has_tokenizer=False,
            is_kernel_plan_tuned=is_tuned,
            sharding=sharding_table(skeletons),
        )
        if model.is_dummy:
            device = torch.device("cuda" if resolved.target != "cpu" and torch.cuda.is_available() else "cpu")
            produce = partial(_dummy, skeletons, device)
        else:
            # int4_awq: scales and clipping searched here, on the float model's activations (GPU if there is one).
            input_scales = awq_input_scales(model, resolved, dtype) if resolved.quantization == "int4_awq" else None
            produce = partial(_convert, skeletons, model.checkpoint_dir, input_scales)
        return Engine(manifest=manifest, produce_weights=produce, tokenizer_source=model.tokenizer_dir,
                      kernel_cache=kernel_cache)


# One rank's weights at a time: each rank's pass reads (or, seeded alike, draws) the full checkpoint tensors
# block by block and keeps its slices, so host memory stays near one block's tensors whatever the ranks.
def _convert(skeletons: list[CausalLM], checkpoint_dir, input_scales: dict[str, torch.Tensor] | None, rank: int):
    return convert_checkpoint(skeletons[rank], CheckpointReader(checkpoint_dir), input_scales)


def _dummy(skeletons: list[CausalLM], device: torch.device, rank: int):
    return dummy_weights(skeletons[rank], device)
