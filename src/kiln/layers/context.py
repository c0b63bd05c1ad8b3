"""LayerContext: what every block is built with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels import KernelOps
from kiln.layers.linear import LinearMethod


@dataclass(frozen=True)
class LayerContext:
    """The kernel ops blocks call (bound from the engine's kernel plan), the method of every Linear (from
    the engine's build config; a model never names one), the engine dtype and the device of buffers
    computed at load (rotary tables). Parameters are never allocated here: they come from the engine."""

    ops: KernelOps
    linear: LinearMethod
    dtype: torch.dtype
    device: torch.device
