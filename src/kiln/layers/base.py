"""What every block shares: its tensors, declared once.

A block (``Layer``) declares each tensor it is made of from the checkpoint: name, shape and how a dummy
engine fills it. From that one declaration come the engine's tensor table (the block's parameters: name,
shape, dtype), the conversion of checkpoint tensors at build time (``convert``) and the forward's
attributes. Parameters start empty on the meta device: the converter or the engine file fills them. A
tensor sharded over tensor-parallel ranks is declared with its ``Shard``: the checkpoint tensor keeps its
full shape, the parameter has the rank's, and ``convert`` takes the rank's slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.errors import EngineError
from kiln.layers.parallel import Shard

# Dummy-weight init: norm scales start at one; biases and embeddings get this std; matrices 1/sqrt(fan_in).
ONES = "ones"
SMALL_STD = 0.02


@dataclass(frozen=True)
class CheckpointTensor:
    """A float tensor of the checkpoint (fused where the family says so) that a block is made from."""

    shape: tuple[int, ...]
    init: str | float  # dummy weights: ONES, or the std of a zero-mean normal


def empty_parameter(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


class Layer(nn.Module):
    """A block whose tensors are declared once; by default each is stored as it is, in the engine dtype."""

    def __init__(self):
        super().__init__()
        self.checkpoint_tensors: dict[str, CheckpointTensor] = {}
        self.shards: dict[str, Shard] = {}  # checkpoint tensor -> the slice this rank holds (tp > 1 only)

    def declare(self, name: str, shape: tuple[int, ...], init: str | float, dtype: torch.dtype,
                shard: Shard | None = None) -> None:
        self.checkpoint_tensors[name] = CheckpointTensor(tuple(shape), init)
        self.register_parameter(name, empty_parameter(shard.local_shape(shape) if shard else tuple(shape), dtype))
        if shard is not None:
            self.shards[name] = shard

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of checkpoint tensor ``name`` (all of it when it is not sharded)."""
        return self.shards[name].take(tensor) if name in self.shards else tensor

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Build time: this block's stored tensors from its checkpoint tensors (float, fused)."""
        return {name: self.shard(name, tensors[name]).to(getattr(self, name).dtype) for name in self.checkpoint_tensors}


def checkpoint_layers(model: nn.Module) -> list[tuple[str, Layer]]:
    """(name prefix, block) for every block that declares checkpoint tensors, in engine file order."""
    return [(f"{name}." if name else "", module) for name, module in model.named_modules()
            if isinstance(module, Layer) and module.checkpoint_tensors]


def load_parameters(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Puts the engine's tensors in place of the declared (meta) parameters; names, shapes and dtypes
    must be exactly the declared ones."""
    declared = dict(model.named_parameters())
    if declared.keys() != weights.keys():
        raise EngineError(f"the engine's tensors do not match the model (missing "
                          f"{sorted(declared.keys() - weights.keys())[:3]}, unexpected "
                          f"{sorted(weights.keys() - declared.keys())[:3]}); rebuild the engine")
    for name, tensor in weights.items():
        want = declared[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise EngineError(f"tensor {name} is {tensor.dtype}{list(tensor.shape)}, the model declares "
                              f"{want.dtype}{list(want.shape)}; rebuild the engine")
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
