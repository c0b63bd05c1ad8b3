"""Token embedding and the LM head (its own weight, or the embedding's when tied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.layers.base import SMALL_STD, Layer
from kiln.layers.context import LayerContext


class Embedding(Layer):
    """[vocab_size, hidden_size] rows looked up by token id. It knows the full vocabulary, so a
    vocab-parallel rank could hold a contiguous slice of the rows; at one rank it holds them all."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: LayerContext):
        super().__init__()
        self.vocab_size = vocab_size
        self.declare("weight", (vocab_size, hidden_size), SMALL_STD, ctx.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(Layer):
    """Logits x E^T (+ b). Tied to an embedding, it declares no weight and reads the embedding's."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: LayerContext, bias: bool = False,
                 tied: Embedding | None = None):
        super().__init__()
        self.vocab_size, self.tied = vocab_size, tied
        if tied is None:
            self.declare("weight", (vocab_size, hidden_size), SMALL_STD, ctx.dtype)
        if bias:
            self.declare("bias", (vocab_size,), SMALL_STD, ctx.dtype)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight if self.tied is None else self.tied.weight, self.bias)
