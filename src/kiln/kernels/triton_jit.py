"""Triton for the kernel files, which kiln imports whether Triton is installed or not, and the place
of its compile cache.

Without Triton (CPU-only installs run the references) ``jit`` leaves a kernel a plain function that
nothing launches: KernelOps refuses a Triton plan there. Triton decides when it is imported whether
kernels compile or run in its interpreter (TRITON_INTERPRET=1, set by the tests on CPU-only machines).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

logger = logging.getLogger(__name__)

# kiln's Triton kernels use bf16 tensor-core dots and cp.async pipelining: Ampere (sm80) and newer.
MIN_TRITON_CAPABILITY = 80


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA device's (major, minor), None off CUDA. Asked per layer per step (the FP8 linear's choice of
    kernel) and per sampled step, so cached: uncached it is a device-properties query each time (~10 us of
    host time, 2.5 ms per eager forward of a 32-layer model, scripts/gpu_profile_prefill.py)."""
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def triton_runs_on(device: torch.device) -> bool:
    """Whether kiln's Triton kernels run on ``device``: a CUDA GPU of sm80+, with Triton installed (the
    runtime's kernels outside the plan, the sampler's, take their references elsewhere)."""
    capability = device_capability(device)
    return triton is not None and capability is not None and 10 * capability[0] + capability[1] >= MIN_TRITON_CAPABILITY


def jit(fn: Callable | None = None, **options: Any):
    """``triton.jit``: ``@jit`` or ``@jit(do_not_specialize=[...], ...)``. An option this Triton lacks
    (do_not_specialize_on_alignment before 3.2) is dropped: it only saves compiles."""
    if triton is None:
        return fn if fn is not None else (lambda f: f)
    known = inspect.signature(triton.jit).parameters
    options = {name: value for name, value in options.items() if name in known}
    return triton.jit(fn, **options) if fn is not None else triton.jit(**options)


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """The arguments that launch a kernel taking ``PDL: tl.constexpr`` (and calling ``wait_for_producer``)
    with programmatic dependent launch where the device has it: ``PDL`` and Triton's ``launch_pdl``, so
    that the kernel's programs may start while the kernel before it on the stream ends (its tail, the
    gap between the two) and stop at ``wait_for_producer`` until it has. Inside a CUDA graph the edge
    keeps that property. Off in the interpreter, below sm90, with a Triton that lacks it, and with
    KILN_PDL=0 (read at the first launch; ``pdl_disabled`` sets it and reads it again)."""
    return {"PDL": True, "launch_pdl": True} if device.type == "cuda" and _has_pdl(device.index) else {"PDL": False}


@functools.cache
def _has_pdl(index: int | None) -> bool:
    if triton is None or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("KILN_PDL", "1") == "0":
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return (torch.cuda.get_device_capability(index)[0] >= 9 and "launch_pdl" in CUDAOptions.__dataclass_fields__
            and hasattr(tl.extra.cuda, "gdc_wait"))


@contextlib.contextmanager
def pdl_disabled() -> Iterator[None]:
    """Kernels launched (and CUDA graphs captured) inside run without PDL, as with KILN_PDL=0: what a
    timing compares PDL against, and the eager reference a graph test replays against."""
    previous = os.environ.get("KILN_PDL")
    os.environ["KILN_PDL"] = "0"
    _has_pdl.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("KILN_PDL")
        else:
            os.environ["KILN_PDL"] = previous
        _has_pdl.cache_clear()


@jit
def wait_for_producer(PDL: tl.constexpr):
    """With PDL: waits until the kernel before this one on the stream has ended and its writes are visible
    (every kernel before it has then ended too: each waited for its own predecessor), then lets the
    kernel after this one start its programs. A kernel may read before this call only what no kernel
    writes while the model runs (its weights), and may write nothing before it. Without PDL, nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def count_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): what split counts fill."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def use_compile_cache(directory: Path) -> None:
    """Points Triton's compile cache (process-wide) at ``directory``: kept in an engine's folder, the
    kernels compiled on its first load make every later load compile nothing. A folder that cannot be
    written leaves Triton's default cache in use."""
    try:
        directory.mkdir(exist_ok=True)
    except OSError as e:
        logger.warning("cannot keep compiled kernels in %s (%s); using Triton's default cache", directory, e)
        return
    if not os.access(directory, os.W_OK):
        logger.warning("cannot write to %s; compiled kernels go to Triton's default cache", directory)
        return
    os.environ["TRITON_CACHE_DIR"] = str(directory)


@contextlib.contextmanager
def compile_cache(directory: str | None) -> Iterator[None]:
    """Triton's compile cache in ``directory`` for the duration (the build's tuning, whose kernels are
    then saved in the engine folder); None leaves it where it is."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    if directory is not None:
        os.environ["TRITON_CACHE_DIR"] = directory
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous
