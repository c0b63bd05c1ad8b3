"""RMSNorm and LayerNorm, each fused with the residual add before it (one kernel op either way).

An RMSNorm whose output goes to one Linear alone may be told so (``feeds``): where that Linear's method
wants its input quantized to e4m3 (an FP8 Linear above 16 rows on a GPU), the norm's kernel writes it so,
and no quantization kernel runs between them. Where that Linear folds the norm into its own kernel
(``folds``: an unquantized Linear at one row, at the shapes the build timed it faster at; its weight holds
the norm's, ``fold_weight`` at load), the norm runs no kernel: the Linear before it adds its product to the
residual in its own kernel (a PendingOutput), and the one after takes that residual as a NormedInput.
"""

from __future__ import annotations

import torch

from kiln.layers.base import ONES, SMALL_STD, Layer
from kiln.layers.context import LayerContext
from kiln.layers.linear import Linear, NormedInput, PendingOutput
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
        return (("rms_norm", "add_rms_norm") + (("rms_norm_fp8", "add_rms_norm_fp8") if is_fp8 else ())
                + (("rms_norm_linear",) if self.matmul_shape else ()))

    @property
    def matmul_shape(self) -> tuple[int, int] | None:
        """[out, in] of the Linear it feeds where that Linear may fold it in (rms_norm_linear's shapes)."""
        folding = [linear for linear in self.consumer if "rms_norm_linear" in linear.method.folding_ops]
        return folding[0].matmul_shape if folding else None

    def folds(self, num_rows: int) -> bool:
        """Whether the Linear it feeds normalizes ``num_rows`` rows itself (LinearMethod.folds_norm)."""
        return bool(self.consumer) and self.consumer[0].method.folds_norm(self.consumer[0], num_rows)

    def fold_weight(self) -> None:
        """Load time: where the Linear it feeds may fold it in (at one row), that Linear's weight takes this
        norm's weight and this one becomes ones, so that the norm's kernel (at other row counts) followed by
        the Linear computes what it did before, rounded once more in the weight instead of in the norm."""
        if self.consumer and self.consumer[0].method.folds_norm(self.consumer[0], 1):
            self.consumer[0].method.fold_norm_weight(self.consumer[0], self.weight)
            self.weight.fill_(1)

    def forward(self, x: torch.Tensor | PendingOutput, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor | Fp8Activation | NormedInput, torch.Tensor]:
        if isinstance(x, PendingOutput):  # the Linear before adds its product to the residual in its kernel
            residual = x.linear.method.apply_add(x.linear, x.x, residual)
            return NormedInput(residual, self.eps), residual
        if residual is None and self.folds(x.shape[0]):
            return NormedInput(x, self.eps), x
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
