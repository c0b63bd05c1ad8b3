"""RMSNorm and LayerNorm, each fused with the residual add before it (one kernel op either way).

An RMSNorm whose output goes to one Linear alone may be told so (``feeds``): where that Linear's method
wants its input quantized to e4m3 (an FP8 Linear above 16 rows on a GPU), the norm's kernel writes it so,
and no quantization kernel runs between them.
"""

from __future__ import annotations

import torch

from kiln.layers.base import ONES, SMALL_STD, Layer
from kiln.layers.context import LayerContext
from kiln.layers.linear import Linear
from kiln.quantization.fp8 import Fp8Activation


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
    def __init__(self, hidden_size: int, eps: float, ctx: LayerContext):
        super().__init__(hidden_size, eps, ctx)
        self.consumer: tuple[Linear, ...] = ()  # a tuple, so that the Linear is not a submodule of the norm

    def feeds(self, linear: Linear) -> None:
        """Declares ``linear`` the one consumer of this norm's output (the x of forward's (x, residual)):
        where its method wants its input as an Fp8Activation (``Linear.wants_fp8_input``), forward returns
        one, quantized in the norm's kernel. Not for a norm whose output goes anywhere else too."""
        self.consumer = (linear,)

    @property
    def kernel_ops(self) -> tuple[str, ...]:
        is_fp8 = any(linear.method.takes_fp8_input for linear in self.consumer)
        return ("rms_norm", "add_rms_norm") + (("rms_norm_fp8", "add_rms_norm_fp8") if is_fp8 else ())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
        if self.consumer and self.ops.planned("add_rms_norm_fp8") and self.consumer[0].wants_fp8_input(x):
            if residual is None:
                return self.ops.rms_norm_fp8(x, self.weight, self.eps), x
            return self.ops.add_rms_norm_fp8(x, residual, self.weight, self.eps)
        return super().forward(x, residual)

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
