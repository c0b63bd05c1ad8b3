"""Feed-forward blocks: gated SiLU (Llama family) and plain GELU with biases (GPT-J)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.layers.context import LayerContext
from kiln.layers.linear import Linear, NormedInput, PendingOutput
from kiln.quantization.fp8 import Fp8Activation


class GatedMLP(nn.Module):
    """down(SiLU(gate(x)) * up(x)), gate and up in one fused projection. Where down's method wants its
    input quantized to e4m3 (``Linear.wants_fp8_input``), SiLU·up's kernel writes it so; where gate_up's
    method takes SiLU·up in its own kernel (``folds_silu_mul``: the GEMV's epilogue), no SiLU·up kernel runs."""

    def __init__(self, hidden_size: int, intermediate_size: int, ctx: LayerContext):
        super().__init__()
        first, last = ctx.tp.share(intermediate_size)  # gate and up split alike, before they are fused
        self.gate_up = Linear(hidden_size, 2 * intermediate_size, ctx, shard_dim=0,
                              shard_ranges=((first, last), (intermediate_size + first, intermediate_size + last)))
        self.down = Linear(intermediate_size, hidden_size, ctx, shard_dim=1)
        self.ops = ctx.ops

    @property
    def kernel_ops(self) -> tuple[str, ...]:
        return ("silu_mul", "silu_mul_fp8") if self.down.method.takes_fp8_input else ("silu_mul",)

    def forward(self, x: torch.Tensor | Fp8Activation | NormedInput) -> torch.Tensor | PendingOutput:
        if self.gate_up.method.folds_silu_mul(self.gate_up, x):
            return self.down(self.gate_up.method.apply_silu_mul(self.gate_up, x))
        gate_up = self.gate_up(x)
        if self.ops.planned("silu_mul_fp8") and self.down.wants_fp8_input(gate_up):
            return self.down(self.ops.silu_mul_fp8(gate_up))
        return self.down(self.ops.silu_mul(gate_up))


class MLP(nn.Module):
    """fc_out(GELU(fc_in(x))); ``approximate`` is "tanh" (HF's gelu_new) or "none" (exact erf GELU)."""

    kernel_ops = ("gelu",)

    def __init__(self, hidden_size: int, intermediate_size: int, approximate: str, ctx: LayerContext,
                 bias: bool = True):
        super().__init__()
        self.fc_in = Linear(hidden_size, intermediate_size, ctx, bias=bias, shard_dim=0)
        self.fc_out = Linear(intermediate_size, hidden_size, ctx, bias=bias, shard_dim=1)
        self.approximate, self.ops = approximate, ctx.ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.ops.gelu(self.fc_in(x), self.approximate))
