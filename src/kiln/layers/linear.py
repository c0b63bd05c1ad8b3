"""Linear layers and the methods that own their weight storage and matmul.

A ``LinearMethod`` says (a) which tensors it stores for an [out, in] weight in an engine of a given dtype,
(b) how the builder makes them from the checkpoint's float weight, (c) the matmul at run time. The engine's
build config names the method (``BuildConfig.quantization``, kept in the manifest); model files never do,
so FP8 or INT4 weight-only is one new method class and one line in ``LINEAR_METHODS``.

A method that quantizes its input to e4m3 per token itself may say so (``wants_fp8_input``): the block
before the Linear (an RMSNorm that ``feeds`` it, GatedMLP's SiLU·up before ``down``) then hands it the
input already quantized, an Fp8Activation, from the epilogue of its own kernel.

Batch-1 decode may fold the RMSNorm between two Linears into their kernels (``folds_norm``: where the build
timed the op ``rms_norm_linear`` faster at the consumer's shape). The Linear before the norm (``Linear.then``)
returns a PendingOutput, which the norm hands back to it to add to the residual in its own kernel
(``apply_add``); the Linear after it, whose weight holds the norm's already (``fold_norm_weight``, at load),
takes the residual as a NormedInput and normalizes it in its kernel. No norm kernel runs between them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from kiln.config import BuildConfig
from kiln.errors import ConfigError
from kiln.kernels.gemv import gemv_config, kv_write_fits, shape_key
from kiln.kernels.rotary import KvWrite
from kiln.layers.base import SMALL_STD, CheckpointTensor, Layer, empty_parameter
from kiln.layers.parallel import Shard
from kiln.quantization.fp8 import Fp8Activation


class NormedInput(NamedTuple):
    """An RMSNorm's input row, left for the Linear after the norm to normalize in its own kernel (its weight
    holds the norm's: LinearMethod.fold_norm_weight)."""
    x: torch.Tensor
    eps: float


class PendingOutput(NamedTuple):
    """A Linear's input, its product not yet made: the RMSNorm after it (``Linear.then``) has the Linear add
    the product to the residual in its own kernel (LinearMethod.apply_add)."""
    linear: Linear
    x: torch.Tensor


class LinearMethod(ABC):
    takes_fp8_weights = False  # convert also accepts a pre-quantized FP8 checkpoint's Fp8Linear
    takes_int_weights = False  # convert also accepts an AWQ / GPTQ checkpoint's UnpackedWeight
    # The group sizes it quantizes in (BuildConfig.group_size) and its default; empty: no groups.
    group_sizes: tuple[int, ...] = ()
    default_group_size: int | None = None
    group_size: int | None = None  # this method's, where it has groups
    # apply also takes x as an Fp8Activation wherever wants_fp8_input says so; blocks then declare the
    # *_fp8 kernel ops that make one (so the build tunes them).
    takes_fp8_input = False
    # The ops that fold a neighbouring block into apply's kernel (folds_norm: rms_norm_linear), which that
    # block declares (so the build times the fold at this Linear's shape).
    folding_ops: tuple[str, ...] = ()
    # The kernel ops apply calls (layer.ops), which a Linear declares: the build tunes them at its shape.
    kernel_ops: tuple[str, ...] = ()

    @classmethod
    def from_build(cls, build: BuildConfig) -> LinearMethod:
        """The method as an engine's build config sets it up: one with groups takes ``build.group_size``
        (its default when None), any other refuses one; a method with other options reads its fields too
        (overriding this, with ``group_options``)."""
        return cls(**cls.group_options(build))

    @classmethod
    def group_options(cls, build: BuildConfig) -> dict[str, int]:
        """``{"group_size": ...}`` for a method with groups, else ``{}``; a group size it cannot take fails."""
        if not cls.group_sizes:
            if build.group_size is not None:
                grouped = [n for n in LINEAR_METHODS if _method_class(n).group_sizes]
                raise ConfigError(f"group_size={build.group_size} (--group-size) is for quantizations with groups "
                                  f"({', '.join(grouped)}), not {build.quantization!r}; leave it unset")
            return {}
        if build.group_size is not None and build.group_size not in cls.group_sizes:
            raise ConfigError(f"group_size={build.group_size} (--group-size) is not one of {build.quantization}'s: "
                              f"{', '.join(map(str, cls.group_sizes))}")
        return {"group_size": build.group_size or cls.default_group_size}

    @abstractmethod
    def tensors(self, out_features: int, in_features: int, dtype: torch.dtype
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of each tensor stored for one [out_features, in_features] weight."""

    @abstractmethod
    def convert(self, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Build time: the stored tensors (as ``tensors`` lists them) from the float checkpoint weight."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        """x [T, in_features] -> [T, out_features], with the layer's bias (None or [out_features]); x is an
        Fp8Activation only where ``wants_fp8_input`` said so."""

    def wants_fp8_input(self, layer: Linear, num_rows: int, device: torch.device) -> bool:
        """Whether ``apply``, given ``num_rows`` rows on ``device``, would first quantize them to e4m3 per
        token itself, so that the kernel before it had better write them so (an Fp8Activation, which
        apply then takes as it is). A function of shapes alone: a CUDA graph replays the answer it
        captured. Only for a method that ``takes_fp8_input``."""
        return False

    def folds_norm(self, layer: Linear, num_rows: int) -> bool:
        """Whether ``apply`` normalizes ``num_rows`` rows of the RMSNorm before it itself (takes a NormedInput),
        its weight holding the norm's (fold_norm_weight). A function of shapes and the plan alone: a CUDA
        graph replays the answer it captured."""
        return False

    def fold_norm_weight(self, layer: Linear, norm_weight: torch.Tensor) -> None:
        """Load time, where ``folds_norm`` may say yes: the weight's input columns times the RMSNorm's weight."""
        raise NotImplementedError(f"{type(self).__name__} does not fold an RMSNorm")

    def adds_residual(self, layer: Linear, num_rows: int) -> bool:
        """Whether ``apply_add`` adds the product to the residual in the matmul's own kernel, at ``num_rows``."""
        return False

    def apply_add(self, layer: Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + apply(x), written in place of ``residual`` and returned (where ``adds_residual``)."""
        raise NotImplementedError(f"{type(self).__name__} does not add the residual in its kernel")

    def folds_silu_mul(self, layer: Linear, x) -> bool:
        """Whether ``apply_silu_mul`` takes SiLU·up of this fused gate / up projection's product of ``x`` in
        the matmul's own kernel. A function of shapes and the plan alone."""
        return False

    def apply_silu_mul(self, layer: Linear, x) -> torch.Tensor:
        """silu(gate) * up of apply(x) [T, 2I] -> [T, I], where ``folds_silu_mul``."""
        raise NotImplementedError(f"{type(self).__name__} does not take SiLU·up in its kernel")

    def folds_kv_write(self, layer: Linear, x, write: KvWrite) -> bool:
        """Whether ``apply_kv_write`` rotates and writes to the cache this fused QKV projection's product of
        ``x`` in the matmul's own kernel (``write``: the cache and the rotation). A function of shapes and the
        plan alone."""
        return False

    def apply_kv_write(self, layer: Linear, x, write: KvWrite) -> torch.Tensor:
        """qkv_rotary_kv_write_ref of apply(x) [T, q_size + 2 * kv_size] -> rotated q [T, q_size], where
        ``folds_kv_write``."""
        raise NotImplementedError(f"{type(self).__name__} does not write the KV cache in its kernel")

    def shard(self, weight, shard: Shard):
        """Build time, tensor parallelism: a rank's part of what ``convert`` takes (the float weight; a
        method that takes other inputs slices them here), before ``convert`` makes its tensors."""
        return shard.take(weight)

    def target_refusal(self, target: str) -> str | None:
        """Why an engine for ``target`` (``sm90``, ``cpu``) cannot use this method, or None. Asked at build,
        of the target rather than the build machine; the CPU runs every method's reference."""
        return None

    def kernels(self, target: str, dtype: torch.dtype) -> str | None:
        """Which matmul an engine for ``target`` in ``dtype`` runs, where it depends on them (kiln inspect
        prints it), or None."""
        return None

    def workspace_bytes(self, out_features: int, in_features: int, dtype: torch.dtype, max_rows: int) -> int:
        """Bytes its matmul allocates on a GPU besides its output (a scratch the weight is dequantized into)
        for batches of up to ``max_rows`` rows of ``dtype``: the memory plan keeps the largest Linear's out
        of the KV pool."""
        return 0


class DenseLinearMethod(LinearMethod):
    """The weight as it is, in the engine dtype (float32, float16 or bfloat16), multiplied by the kernel op
    ``dense_linear``: cuBLAS, or the GEMV at the shapes and row counts the build timed it faster at. One row
    of a NormedInput goes to ``rms_norm_linear``, the GEMV with the norm folded in, at the shapes the build
    timed that faster than the norm's kernel and ``dense_linear`` apart; ``dense_linear`` adds the residual
    in its kernel where the GEMV runs (else right after cuBLAS). Wherever a fused gate / up projection runs
    the GEMV, its epilogue takes SiLU·up (bit for bit SiLU·up's kernel after it, which then does not run);
    wherever a fused QKV projection does, its epilogue rotates q and k and writes k and v to the KV cache
    (rotary_kv_write's work, whose kernel then does not run)."""

    kernel_ops = ("dense_linear",)
    folding_ops = ("rms_norm_linear",)

    def tensors(self, out_features, in_features, dtype):
        return {"weight": ((out_features, in_features), dtype)}

    def convert(self, weight, dtype):
        return {"weight": weight.to(dtype)}

    def folds_norm(self, layer, num_rows):
        # Not a row-parallel Linear: its rank's slice of the row would give the slice's RMS.
        return num_rows == 1 and not layer.is_row_parallel and shape_key(layer.out_features, layer.in_features) in \
            layer.ops.config("rms_norm_linear").get("shapes", {})

    def fold_norm_weight(self, layer, norm_weight):
        layer.weight.mul_(norm_weight)  # in float32, rounded once; in place: no copy of the weight at load

    def adds_residual(self, layer, num_rows):
        return num_rows == 1

    @staticmethod
    def gemv_config(layer, x) -> dict[str, int] | None:
        """The GEMV's launch config where apply runs it for ``x`` (rms_norm_linear's, or dense_linear's at
        x's rows), else None (cuBLAS)."""
        shape = (layer.out_features, layer.in_features)
        if isinstance(x, NormedInput):
            return layer.ops.config("rms_norm_linear")["shapes"][shape_key(*shape)]
        return gemv_config(layer.ops.config("dense_linear").get("shapes"), shape, x.shape[0]) if isinstance(
            x, torch.Tensor) else None

    def folds_silu_mul(self, layer, x):
        return self.gemv_config(layer, x) is not None

    def apply_silu_mul(self, layer, x):
        return self.apply(layer, x, silu_mul=True)

    def folds_kv_write(self, layer, x, write):
        config = self.gemv_config(layer, x)
        return config is not None and kv_write_fits(config["BLOCK_N"], write)

    def apply_kv_write(self, layer, x, write):
        return self.apply(layer, x, kv_write=write)

    def apply_add(self, layer, x, residual):
        return self.apply(layer, x, residual=residual)

    def apply(self, layer, x, **epilogue):
        """``epilogue``: dense_linear's / rms_norm_linear's options for what the folds add (residual,
        silu_mul, kv_write)."""
        if isinstance(x, NormedInput):
            return layer.ops.rms_norm_linear(x.x, x.eps, layer.weight, layer.bias, **epilogue)
        return layer.ops.dense_linear(x, layer.weight, layer.bias, **epilogue)


# BuildConfig.quantization -> method: its class, or "module:Class" for one in its own file (imported when
# first asked for, as the model registry does, since such a file imports this one).
LINEAR_METHODS: dict[str, type[LinearMethod] | str] = {
    "none": DenseLinearMethod,
    "fp8": "kiln.layers.fp8:Fp8LinearMethod",
    "int8_wo": "kiln.layers.weight_only:Int8WeightOnlyMethod",
    "int4_wo": "kiln.layers.weight_only:Int4WeightOnlyMethod",
    "int4_awq": "kiln.layers.weight_only:Int4AwqMethod",
    "int4_gptq": "kiln.layers.weight_only:Int4GptqMethod",
    "int8_gptq": "kiln.layers.weight_only:Int8GptqMethod",
}


def linear_method(name: str, build: BuildConfig | None = None) -> LinearMethod:
    """The method ``name``, with its options from ``build`` (None: its defaults)."""
    method = _method_class(name)
    return method() if build is None else method.from_build(build)


def _method_class(name: str) -> type[LinearMethod]:
    if name not in LINEAR_METHODS:
        raise ConfigError(f"unknown quantization {name!r}; this kiln knows {', '.join(LINEAR_METHODS)}")
    method = LINEAR_METHODS[name]
    if isinstance(method, str):
        module, _, cls = method.partition(":")
        method = getattr(importlib.import_module(module), cls)
    return method


class Linear(Layer):
    """y = x W^T (+ b) for W [out_features, in_features], stored and multiplied by the context's method.

    ``shard_dim`` is the weight dim tensor parallelism splits: 0 column-parallel (each rank computes a
    slice of the outputs: ``shard_ranges`` of them, by default an equal share), 1 row-parallel (each rank
    a slice of the inputs; the outputs are summed over the ranks, the bias added once: rank 0 stores it,
    the others zeros). ``in_features`` and ``out_features`` are the rank's; at one rank nothing is split.
    """

    def __init__(self, in_features: int, out_features: int, ctx, bias: bool = False, shard_dim: int | None = None,
                 shard_ranges: tuple[tuple[int, int], ...] | None = None):
        super().__init__()
        self.shard_dim, self.tp = shard_dim, ctx.tp
        self.method, self.dtype, self.ops = ctx.linear, ctx.dtype, ctx.ops
        self.checkpoint_tensors["weight"] = CheckpointTensor((out_features, in_features), in_features ** -0.5)
        if ctx.tp.size > 1 and shard_dim is not None:
            full = (out_features, in_features)[shard_dim]
            self.shards["weight"] = Shard(shard_dim, shard_ranges or (ctx.tp.share(full),))
            if shard_dim == 0:
                out_features = self.shards["weight"].size
            else:
                in_features = self.shards["weight"].size
        self.in_features, self.out_features = in_features, out_features
        self.is_row_parallel = ctx.tp.size > 1 and shard_dim == 1
        self.norm_after: tuple = ()  # the RMSNorm its output goes to with the residual (then), not a submodule
        for name, (shape, dtype) in self.method.tensors(out_features, in_features, ctx.dtype).items():
            self.register_parameter(name, empty_parameter(shape, dtype))
        if bias:
            self.declare("bias", (self.checkpoint_tensors["weight"].shape[0],), SMALL_STD, ctx.dtype,
                         shard=Shard(0, self.shards["weight"].ranges) if "weight" in self.shards and shard_dim == 0
                         else None)
        else:
            self.register_parameter("bias", None)

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors["weight"]
        if "weight" in self.shards:
            weight = self.method.shard(weight, self.shards["weight"])
        stored = self.method.convert(weight, self.dtype)
        if self.bias is not None:
            bias = self.shard("bias", tensors["bias"]).to(self.dtype)
            stored["bias"] = torch.zeros_like(bias) if self.is_row_parallel and self.tp.rank else bias
        return stored

    @property
    def kernel_ops(self) -> tuple[str, ...]:
        """The kernel ops its method's matmul calls (so the build tunes them)."""
        return self.method.kernel_ops

    @property
    def matmul_shape(self) -> tuple[int, int] | None:
        """[out, in] of the weight its method's kernel op multiplies (this rank's), where it calls one."""
        return (self.out_features, self.in_features) if self.kernel_ops else None

    def wants_fp8_input(self, rows: torch.Tensor) -> bool:
        """Whether the method wants this Linear's input of as many rows as ``rows`` has (on its device) as
        an Fp8Activation: asked by the block that makes the input, before it makes it."""
        return self.method.wants_fp8_input(self, rows.shape[0], rows.device)

    def then(self, norm) -> None:
        """Declares that this Linear's output goes to ``norm`` (an RMSNorm) alone, with the residual: where
        the norm folds into the Linear after it (RMSNorm.folds), forward returns a PendingOutput for the norm."""
        self.norm_after = (norm,)

    def forward(self, x: torch.Tensor | Fp8Activation | NormedInput) -> torch.Tensor | PendingOutput:
        if (self.norm_after and isinstance(x, torch.Tensor) and not self.is_row_parallel
                and self.norm_after[0].folds(x.shape[0]) and self.method.adds_residual(self, x.shape[0])):
            return PendingOutput(self, x)
        y = self.method.apply(self, x)
        return self.tp.all_reduce(y) if self.is_row_parallel else y
