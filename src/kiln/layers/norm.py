"""RMSNorm and LayerNorm, each fused with the residual add before it (one kernel op either way)."""

from __future__ import annotations

import torch

from kiln.layers.base import ONES, SMALL_STD, Layer
from kiln.layers.context import LayerContext


class _Norm(Layer):
    def __init__(self, hidden_size: int, eps: float, ctx: LayerContext):
        super().__init__()
        self.eps, self.ops = eps, ctx.ops
        self.declare("weight", (hidden_size,), ONES, ctx.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual). Before the first layer there is no residual yet: (norm(x), x)."""
        if residual is None:
            return self.norm(x), x
        return self.add_norm(x, residual)


class RMSNorm(_Norm):
    kernel_ops = ("rms_norm", "add_rms_norm")

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(_Norm):
    """With a bias (GPT-J's ln_1, ln_f)."""

    kernel_ops = ("layer_norm", "add_layer_norm")

    def __init__(self, hidden_size: int, eps: float, ctx: LayerContext):
        super().__init__(hidden_size, eps, ctx)
        self.declare("bias", (hidden_size,), SMALL_STD, ctx.dtype)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)
