"""The blocks models are built from. Each declares its tensors once (``Layer.declare``); every matmul
goes through a ``Linear`` and its ``LinearMethod``; fused paths go through ``KernelOps``."""

from kiln.layers.attention import Attention, KvCacheScales
from kiln.layers.base import Layer, checkpoint_layers, load_parameters
from kiln.layers.context import LayerContext, layer_context
from kiln.layers.embedding import Embedding, LMHead
from kiln.layers.linear import LINEAR_METHODS, DenseLinearMethod, Linear, LinearMethod, linear_method
from kiln.layers.mlp import MLP, GatedMLP
from kiln.layers.norm import LayerNorm, RMSNorm
from kiln.layers.parallel import SINGLE, Shard, TensorParallel
from kiln.layers.rotary import Rotary


def kernel_ops_of(model) -> tuple[str, ...]:
    """The KernelOps a model calls: those its blocks declare (``kernel_ops``), so the build tunes only those."""
    return tuple(sorted({op for module in model.modules() for op in getattr(module, "kernel_ops", ())}))


def dense_linear_shapes(model) -> tuple[tuple[int, int], ...]:
    """[out, in] of each weight a model multiplies through the ``dense_linear`` op (its Linears of a dense
    method, its LM head): the shapes the build times that op at."""
    return tuple(sorted({tuple(module.dense_weight.shape) for module in model.modules()
                         if getattr(module, "dense_weight", None) is not None}))


__all__ = ["Attention", "DenseLinearMethod", "Embedding", "GatedMLP", "KvCacheScales", "LINEAR_METHODS", "LMHead",
           "Layer", "LayerContext", "LayerNorm", "Linear", "LinearMethod", "MLP", "RMSNorm", "Rotary", "SINGLE",
           "Shard", "TensorParallel", "checkpoint_layers", "dense_linear_shapes", "kernel_ops_of", "layer_context", "linear_method",
           "load_parameters"]
