"""Token embedding and the LM head (its own weight, or the embedding's when tied).

Under tensor parallelism both are vocab-parallel: the vocabulary is zero-padded to a multiple of the
ranks and each rank holds an equal slice of the rows. The embedding looks up the rows it holds (zeros for
the others) and sums over the ranks; the LM head computes its slice of the logits and gathers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.layers.base import SMALL_STD, Layer
from kiln.layers.context import LayerContext
from kiln.layers.parallel import Shard, TensorParallel


def vocab_shard(vocab_size: int, tp: TensorParallel) -> Shard | None:
    """The vocabulary rows a rank holds (None at one rank)."""
    if tp.size == 1:
        return None
    rows = -(-vocab_size // tp.size)
    return Shard(0, ((tp.rank * rows, (tp.rank + 1) * rows),), padded=rows * tp.size)


class Embedding(Layer):
    """[vocab_size, hidden_size] rows looked up by token id (a tensor-parallel rank holds a slice)."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: LayerContext):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, ctx.tp
        shard = vocab_shard(vocab_size, ctx.tp)
        self.first_row, self.num_rows = (shard.ranges[0][0], shard.size) if shard else (0, vocab_size)
        self.declare("weight", (vocab_size, hidden_size), SMALL_STD, ctx.dtype, shard=shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        rows = input_ids - self.first_row
        is_here = (rows >= 0) & (rows < self.num_rows)
        hidden = F.embedding(torch.where(is_here, rows, 0), self.weight)
        return self.tp.all_reduce(hidden.masked_fill_(~is_here.unsqueeze(-1), 0.0))


class LMHead(Layer):
    """Logits x E^T (+ b) through the ``dense_linear`` op (in the engine dtype, quantized engines included).
    Tied to an embedding, it declares no weight and reads the embedding's."""

    kernel_ops = ("dense_linear",)

    def __init__(self, vocab_size: int, hidden_size: int, ctx: LayerContext, bias: bool = False,
                 tied: Embedding | None = None):
        super().__init__()
        self.vocab_size, self.tied, self.tp, self.ops = vocab_size, tied, ctx.tp, ctx.ops
        shard = vocab_shard(vocab_size, ctx.tp)
        if tied is None:
            self.declare("weight", (vocab_size, hidden_size), SMALL_STD, ctx.dtype, shard=shard)
        if bias:
            self.declare("bias", (vocab_size,), SMALL_STD, ctx.dtype, shard=shard)
        else:
            self.register_parameter("bias", None)

    @property
    def matmul_shape(self) -> tuple[int, int]:
        """[out, in] of the weight ``dense_linear`` multiplies (this rank's rows of the vocabulary)."""
        return tuple(self._weight.shape)

    @property
    def _weight(self) -> torch.Tensor:
        return self.weight if self.tied is None else self.tied.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.ops.dense_linear(x, self._weight, self.bias)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[:, :self.vocab_size]
