"""Builder: validates a model against the build limits and the target, plans kernels and memory.

All validation happens here, before any weight is converted, and each error says what to change.
"""

from __future__ import annotations

import tempfile
from functools import partial

import torch

from kiln.builder.plan import kernel_plan, memory_plan, tensor_table
from kiln.config import BuildConfig
from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.converter import convert_checkpoint, dummy_weights
from kiln.engine import Engine, EngineManifest
from kiln.engine.target import detect_target, device_name, resolve_dtype
from kiln.engine.weights import DTYPE_NAMES
from kiln.errors import ConfigError
from kiln.kernels.triton_jit import compile_cache
from kiln.models import ModelSource
from kiln.models.config import ModelConfig


def validate(model: ModelConfig, build: BuildConfig) -> BuildConfig:
    """Returns the build config with target and dtype resolved, or raises naming the fix."""
    target = detect_target() if build.target == "auto" else build.target
    here = detect_target()
    if target != "cpu" and here != target:
        raise ConfigError(f"target {target} needs that GPU present to plan and tune kernels (this machine: "
                          f"{here}); build on the target machine or use --target auto")
    dtype = resolve_dtype(build.dtype, model.checkpoint_dtype, target)
    limit = model.max_supported_positions
    if build.max_seq_len > limit:
        raise ConfigError(f"max_seq_len={build.max_seq_len} exceeds the model's {limit} positions "
                          f"(max_position_embeddings{' with rope scaling' if model.rope.rope_type != 'default' else ''}); "
                          f"lower --max-seq-len to {limit} or less")
    if model.sliding_window is not None and model.sliding_window < 1:
        raise ConfigError(f"sliding_window={model.sliding_window} leaves a query no key to attend to; set "
                          "sliding_window in config.json to the window the model was trained with (>= 1), or "
                          "to null for full attention")
    return build.replace(target=target, dtype=dtype)


class Builder:
    def build(self, model: ModelSource, config: BuildConfig, tune: bool = True) -> Engine:
        resolved = validate(model.config, config)
        dtype = DTYPE_NAMES[resolved.dtype]
        # Kernels compiled while tuning are saved in the engine folder, so that loading compiles nothing.
        kernel_cache = tempfile.TemporaryDirectory(prefix="kiln-kernels-") if resolved.target != "cpu" else None
        with compile_cache(kernel_cache.name if kernel_cache else None):
            plan = kernel_plan(resolved.target, model.config, resolved, dtype, tune=tune)
        manifest = EngineManifest(
            model_config=model.config,
            build_config=resolved,
            target_device_name=device_name() if resolved.target != "cpu" else "cpu",
            kernel_plan=plan,
            memory_plan=memory_plan(model.config, resolved, dtype),
            tensors=tensor_table(model.config, dtype),
            has_tokenizer=False,
        )
        if model.is_dummy:
            device = torch.device("cpu" if resolved.target == "cpu" else "cuda")
            produce = partial(dummy_weights, model.config, dtype, device)
        else:
            produce = partial(_convert, model, dtype)
        return Engine(manifest=manifest, produce_weights=produce, tokenizer_source=model.tokenizer_dir,
                      kernel_cache=kernel_cache)


def _convert(model: ModelSource, dtype: torch.dtype):
    return convert_checkpoint(model.config, CheckpointReader(model.checkpoint_dir), dtype)
