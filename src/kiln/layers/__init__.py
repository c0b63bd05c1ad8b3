"""The blocks models are built from. Each declares its tensors once (``Layer.declare``); every matmul
goes through a ``Linear`` and its ``LinearMethod``; fused paths go through ``KernelOps``."""

from kiln.layers.attention import Attention
from kiln.layers.base import Layer, checkpoint_layers, load_parameters
from kiln.layers.context import LayerContext
from kiln.layers.embedding import Embedding, LMHead
from kiln.layers.linear import LINEAR_METHODS, DenseLinearMethod, Linear, LinearMethod, linear_method
from kiln.layers.mlp import MLP, GatedMLP
from kiln.layers.norm import LayerNorm, RMSNorm
from kiln.layers.rotary import Rotary

__all__ = ["Attention", "DenseLinearMethod", "Embedding", "GatedMLP", "LINEAR_METHODS", "LMHead", "Layer",
           "LayerContext", "LayerNorm", "Linear", "LinearMethod", "MLP", "RMSNorm", "Rotary", "checkpoint_layers",
           "linear_method", "load_parameters"]
