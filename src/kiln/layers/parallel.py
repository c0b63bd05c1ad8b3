"""Tensor parallelism inside the blocks: which slice of a checkpoint tensor a rank holds (``Shard``) and
the collectives of a forward (``TensorParallel``), which do nothing at one rank.

Column-parallel layers (QKV, gate/up, fc_in, the LM head) hold a slice of the outputs; row-parallel ones
(O, down, fc_out) a slice of the inputs, and their outputs are summed over the ranks (all-reduce); the
embedding holds a slice of the vocabulary rows (each token's row is on one rank, the others add zeros).
A fused projection is split part by part (Q, K, V; gate, up) so each rank holds whole heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """The slice of a checkpoint tensor a rank holds: ``ranges`` [start, stop) along ``dim``, concatenated
    in order; ``padded``: the checkpoint's dim is zero-padded to this size first (a vocabulary that does
    not split evenly over the ranks)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    padded: int | None = None

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.size if d == self.dim else n for d, n in enumerate(shape))

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the (float, fused) checkpoint tensor."""
        if self.padded is not None and tensor.shape[self.dim] < self.padded:
            pad = list(tensor.shape)
            pad[self.dim] = self.padded - tensor.shape[self.dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=self.dim)
        parts = [tensor.narrow(self.dim, start, stop - start) for start, stop in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


class TensorParallel:
    """This process's ``rank`` of ``size`` and the process group of the forward's collectives (NCCL on
    GPUs, gloo on the CPU). At one rank there is no group: the collectives return their input."""

    def __init__(self, rank: int = 0, size: int = 1, group: dist.ProcessGroup | None = None):
        self.rank, self.size, self.group = rank, size, group

    def share(self, num_units: int) -> tuple[int, int]:
        """The units [first, last) of ``num_units`` (heads, rows) this rank holds: an equal share, or, with
        fewer units than ranks (MQA's one KV head), the one unit its group of ranks replicates."""
        if num_units >= self.size:
            n = num_units // self.size
            return self.rank * n, (self.rank + 1) * n
        unit = self.rank * num_units // self.size
        return unit, unit + 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[T, n] per rank -> [T, size * n], rank 0's columns first."""
        if self.size == 1:
            return x
        out = torch.empty((self.size * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)  # rank-major
        _all_gather_single(out, x.contiguous(), group=self.group)
        return out.view(self.size, *x.shape).permute(1, 0, 2).reshape(x.shape[0], -1)


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single, which 2.11 lacks.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

SINGLE = TensorParallel()  # one rank: nothing split, no collective
