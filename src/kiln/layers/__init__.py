"""The blocks models are built from. Each declares its tensors once (``Layer.declare``); every matmul
goes through a ``Linear`` and its ``LinearMethod``; fused paths go through ``KernelOps``."""

from kiln.kernels import MATMUL_OPS
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


def matmul_shapes(model) -> dict[str, tuple[tuple[int, int], ...]]:
    """Per kernel op that multiplies a weight (MATMUL_OPS), the [out, in] of each weight the model
    multiplies through it (its blocks' ``matmul_shape``): the shapes the build times that op at."""
    shapes: dict[str, set[tuple[int, int]]] = {}
    for module in model.modules():
        shape = getattr(module, "matmul_shape", None)
        for op in getattr(module, "kernel_ops", ()) if shape is not None else ():
            if op in MATMUL_OPS:
                shapes.setdefault(op, set()).add(shape)
    return {op: tuple(sorted(op_shapes)) for op, op_shapes in sorted(shapes.items())}


def fold_norm_weights(model) -> None:
    """Load time, after load_parameters: each RMSNorm that the plan folds into the Linear it feeds gives that
    Linear its weight (RMSNorm.fold_weight)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fold_weight()


__all__ = ["Attention", "DenseLinearMethod", "Embedding", "GatedMLP", "KvCacheScales", "LINEAR_METHODS", "LMHead",
           "Layer", "LayerContext", "LayerNorm", "Linear", "LinearMethod", "MLP", "RMSNorm", "Rotary", "SINGLE",
           "Shard", "TensorParallel", "checkpoint_layers", "fold_norm_weights", "kernel_ops_of", "layer_context",
           "linear_method", "load_parameters", "matmul_shapes"]
