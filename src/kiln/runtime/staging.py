"""Pinned host staging for the small tensors a step builds from host lists (sampling parameters, rows).

``torch.tensor(values, device="cuda")`` copies from pageable memory: the host waits for the copy, which
runs behind the forward already queued, so the host stops running ahead of the device. Values written
into pinned memory are copied without waiting. Two sets of buffers take turns, one per step: a step
writes into the set whose copies were queued two steps back, which have run by then in the executor's
loop (that step's tokens were collected); an event per set makes the host wait in any other order
rather than overwrite a copy still queued. On the CPU the same buffers are the tensors themselves.
"""

from __future__ import annotations

import torch


class HostStaging:
    def __init__(self, device: torch.device, capacity: int = 1024):
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]  # per set: one flat buffer per dtype
        # Per set, recorded after each of its copies (waiting on one never recorded returns at once).
        self._copied = [torch.cuda.Event(), torch.cuda.Event()] if self.pinned else None
        self._capacity = capacity
        self._set = 0
        self._used: dict[torch.dtype, int] = {}

    def next_step(self) -> None:
        """Stages the coming step's tensors in the other set, once that set's copies have run."""
        self._set ^= 1
        if self._copied is not None:
            self._copied[self._set].synchronize()
        self._used = {}

    def tensors(self, dtype: torch.dtype, *values: list) -> list[torch.Tensor]:
        """One device tensor per list of values, all copied in one go."""
        sizes = [len(v) for v in values]
        start = self._used.get(dtype, 0)
        buffer = self._buffers[self._set].get(dtype)
        if buffer is None or start + sum(sizes) > buffer.shape[0]:
            # A larger set (many forked samples, penalties over long sequences): the old buffer goes back to
            # torch's pinned allocator, which keeps it until its queued copies have run.
            buffer = torch.empty(max(self._capacity, 2 * sum(sizes)), dtype=dtype, pin_memory=self.pinned)
            self._buffers[self._set][dtype] = buffer
            start = 0
        host = buffer.numpy()
        end = start
        for v, n in zip(values, sizes):
            host[end:end + n] = v
            end += n
        self._used[dtype] = end
        staged = buffer[start:end].to(self.device, non_blocking=True)
        if self._copied is not None:
            self._copied[self._set].record()
        return list(staged.split(sizes))
