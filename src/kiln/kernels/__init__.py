"""Kernel dispatch: the model calls ops through one ``KernelOps`` chosen by the engine's kernel plan.

Every op has a plain-PyTorch reference (``*_ref``), which is the CPU path and the test oracle, and may
have Triton implementations registered beside it. The plan maps op name -> {"impl": name, "config": {...}}.
The ``*_fp8`` ops are their plain op with its output quantized per token to e4m3 (an Fp8Activation), for
the FP8 Linear it feeds: blocks call them only where that Linear's method wants its input so.
``dense_linear`` is the matmul of an unquantized weight (the engine dtype's): cuBLAS, or the GEMV for the shapes and row
counts the build timed it faster at (its config lists them), adding the product to a residual, taking SiLU·up or
rotating q and k and writing the KV cache (a fused QKV projection's) in the GEMV's epilogue where asked;
``rms_norm_linear`` the one-row GEMV of a weight that holds an RMSNorm's weight, normalizing its input row
itself, at the shapes the build timed that faster than the norm's kernel and ``dense_linear`` apart (its config
lists them); ``weight_only_linear`` an INT8 / INT4 one, with the launch configs the build timed per shape;
``fp8_linear`` an FP8 one (e4m3 weights, activations per token): the W8A16 GEMV up to 16 rows (at 2-16 rows
with the launch config the build timed per shape), row-wise ``_scaled_mm`` above.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Collection
from typing import Any

from kiln.errors import EngineError
from kiln.kernels.activation import gelu_ref, silu_mul_fp8_ref, silu_mul_ref
from kiln.kernels.attention import AttentionMetadata, paged_attention_ref
from kiln.kernels.fp8 import fp8_linear_op_ref
from kiln.kernels.gemv import dense_linear_ref
from kiln.kernels.norm import (add_layer_norm_ref, add_rms_norm_fp8_ref, add_rms_norm_ref, layer_norm_ref,
                               rms_norm_fp8_ref, rms_norm_linear_ref, rms_norm_ref)
from kiln.kernels.rotary import rotary_kv_write_ref
from kiln.kernels.weight_only import weight_only_linear_ref

OPS = ("rms_norm", "add_rms_norm", "rms_norm_fp8", "add_rms_norm_fp8", "layer_norm", "add_layer_norm", "silu_mul",
       "silu_mul_fp8", "gelu", "rotary_kv_write", "attention", "dense_linear", "rms_norm_linear", "weight_only_linear",
       "fp8_linear")

# The ops that multiply a weight: the build times them at each weight shape the model multiplies through them.
MATMUL_OPS = ("dense_linear", "rms_norm_linear", "weight_only_linear", "fp8_linear")

# The ops of the Llama-family decoder (Llama, Mistral, Qwen2): what a plan covers unless told the ops
# its model calls (GPT-J: layer_norm, add_layer_norm, gelu, rotary_kv_write, attention, dense_linear).
LLAMA_OPS = ("rms_norm", "add_rms_norm", "silu_mul", "rotary_kv_write", "attention", "dense_linear", "rms_norm_linear")

_REFERENCE: dict[str, Callable] = {
    "rms_norm": rms_norm_ref,
    "add_rms_norm": add_rms_norm_ref,
    "rms_norm_fp8": rms_norm_fp8_ref,
    "add_rms_norm_fp8": add_rms_norm_fp8_ref,
    "layer_norm": layer_norm_ref,
    "add_layer_norm": add_layer_norm_ref,
    "silu_mul": silu_mul_ref,
    "silu_mul_fp8": silu_mul_fp8_ref,
    "gelu": gelu_ref,
    "rotary_kv_write": rotary_kv_write_ref,
    "attention": paged_attention_ref,
    "dense_linear": dense_linear_ref,
    "rms_norm_linear": rms_norm_linear_ref,
    "weight_only_linear": weight_only_linear_ref,
    "fp8_linear": fp8_linear_op_ref,
}


def _triton_impls() -> dict[str, Callable]:
    if importlib.util.find_spec("triton") is None:
        raise EngineError("this engine's kernel plan uses Triton kernels, but triton is not installed; "
                          "pip install triton (or kiln[gpu])")
    from kiln.kernels import triton_ops

    return triton_ops.IMPLS


IMPL_PROVIDERS: dict[str, Callable[[], dict[str, Callable]]] = {
    "reference": lambda: _REFERENCE,
    "triton": _triton_impls,
}


def check_ops(ops: Collection[str]) -> None:
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise EngineError(f"kernel plan for unknown ops {', '.join(unknown)}; known: {', '.join(OPS)}")


def reference_plan(ops: Collection[str] = OPS) -> dict[str, dict[str, Any]]:
    """The reference implementation of each of ``ops`` (the ops the model calls)."""
    check_ops(ops)
    return {op: {"impl": "reference", "config": {}} for op in OPS if op in ops}


# Ops that a Triton plan made before they existed binds to their Triton implementation at its default config
# (what such engines ran then: the weight-only Triton kernels' default tiles, fp8_linear's GEMV defaults), not
# to the reference.
TRITON_WHEN_UNPLANNED = ("weight_only_linear", "fp8_linear")


class KernelOps:
    """The ops a model calls, bound once at load from the kernel plan (no per-call dispatch logic). An op the
    plan does not name is bound to its reference (TRITON_WHEN_UNPLANNED's to Triton in a Triton plan)."""

    def __init__(self, plan: dict[str, dict[str, Any]]):
        self.plan = plan
        unplanned_triton = "triton" if self.uses_triton else "reference"
        for op in OPS:
            entry = plan.get(op, {"impl": unplanned_triton if op in TRITON_WHEN_UNPLANNED else "reference",
                                  "config": {}})
            impl = entry["impl"]
            if impl not in IMPL_PROVIDERS:
                raise EngineError(f"kernel plan names unknown implementation {impl!r} for {op}; "
                                  f"known: {', '.join(IMPL_PROVIDERS)}")
            fn = IMPL_PROVIDERS[impl]()[op]
            config = entry.get("config") or {}
            setattr(self, op, functools.partial(fn, **config) if config else fn)

    def planned(self, op: str) -> bool:
        """Whether the plan names ``op``: an engine built before an op existed binds it to the reference (or,
        TRITON_WHEN_UNPLANNED, to Triton's defaults), so a block with a choice (the ``*_fp8`` ops) keeps to
        the ops the plan names instead."""
        return op in self.plan

    def config(self, op: str) -> dict[str, Any]:
        """The launch config the plan gives ``op`` (empty where it gives none)."""
        return self.plan.get(op, {}).get("config") or {}

    @property
    def uses_triton(self) -> bool:
        return any(self.plan.get(op, {}).get("impl") == "triton" for op in OPS)


__all__ = ["AttentionMetadata", "KernelOps", "LLAMA_OPS", "MATMUL_OPS", "OPS", "check_ops", "reference_plan"]
