"""Triton for the kernel files, which kiln imports whether Triton is installed or not.

Without Triton (CPU-only installs run the references) ``jit`` leaves a kernel a plain function that
nothing launches: KernelOps refuses a Triton plan there. Triton decides when it is imported whether
kernels compile or run in its interpreter (TRITON_INTERPRET=1, set by the tests on CPU-only machines).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def jit(fn: Callable | None = None, **options: Any):
    """``triton.jit``: ``@jit`` or ``@jit(do_not_specialize=[...])``."""
    if triton is None:
        return fn if fn is not None else (lambda f: f)
    return triton.jit(fn, **options) if fn is not None else triton.jit(**options)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
