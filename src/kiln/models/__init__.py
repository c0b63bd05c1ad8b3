"""Model families kiln runs, one short file each (``llama``, ``qwen2``, ``qwen3``, ``gptj``) behind a
registry keyed by the Hugging Face architecture (``registry.FAMILIES``), and the configs they are built from.

A model is created with its parameters declared on the meta device: a skeleton tells the builder every
tensor (the engine's tensor table, the checkpoint names to convert) without memory; at load the engine's
tensors take the declared parameters' places (``kiln.layers.load_parameters``).
"""

from __future__ import annotations

import math

import torch

from kiln.config import BuildConfig
from kiln.kernels import KernelOps, reference_plan
from kiln.layers import SINGLE, TensorParallel, checkpoint_layers, layer_context
from kiln.models.base import CausalLM
from kiln.models.config import ModelConfig
from kiln.models.presets import PRESETS, preset_hf_config
from kiln.models.registry import FAMILIES, family
from kiln.models.source import ModelSource


def create_model(config: ModelConfig, ctx: LayerContext, max_positions: int) -> CausalLM:
    return family(config.architecture).Model(config, ctx, max_positions)


def model_skeleton(config: ModelConfig, build: BuildConfig | None = None, dtype: torch.dtype = torch.float32,
                   tp: TensorParallel = SINGLE) -> CausalLM:
    """The model's declarations only: meta parameters in the engine dtype, of the linear method and KV
    cache of ``build`` (a resolved BuildConfig; None: unquantized), sharded for tensor-parallel rank
    ``tp.rank`` of ``tp.size``."""
    build = build or BuildConfig(quantization="none")
    return create_model(config, layer_context(build, KernelOps(reference_plan()), dtype, torch.device("meta"), tp),
                        max_positions=1)


def num_params(config: ModelConfig) -> int:
    """Parameters of the checkpoint the model is made from (before any linear method's conversion)."""
    return sum(math.prod(t.shape) for _, layer in checkpoint_layers(model_skeleton(config))
               for t in layer.checkpoint_tensors.values())


def __getattr__(name: str):
    """``from kiln.models import LlamaForCausalLM, GPTJForCausalLM``: each Hugging Face architecture name is
    its family's model class (imported on first use), with TensorRT-LLM's ``from_hugging_face``."""
    if name in FAMILIES:
        return family(name).Model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FAMILIES", "PRESETS", "CausalLM", "ModelConfig", "ModelSource", "create_model", "family",
           "model_skeleton", "num_params", "preset_hf_config"]
