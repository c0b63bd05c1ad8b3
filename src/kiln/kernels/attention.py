"""Causal attention over packed sequences whose keys and values live in the paged KV cache.

One op covers context chunks (many query tokens per sequence, attending to cached prefix blocks and
to themselves) and decode (one query token per sequence): the new tokens' K/V are written to the
cache first (rotary.py), then every key is read from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's queries sit in the packed batch and where its keys sit in the cache.

    Device tensors are what kernels read; the host lists serve the reference path and launch sizing.
    """

    seq_lens: torch.Tensor          # [B] int32: keys per sequence after this step's tokens are written
    query_start_loc: torch.Tensor   # [B + 1] int32: offsets of each sequence's queries in the batch
    block_tables: torch.Tensor      # [B, max_blocks_per_seq] int32
    seq_lens_host: list[int]
    query_lens_host: list[int]
    sliding_window: int | None = None

    @property
    def is_decode_only(self) -> bool:
        return max(self.query_lens_host, default=0) <= 1

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; returns [T, Hq, D]."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        if q_len == 0:
            continue
        num_blocks = -(-kv_len // block_size)
        blocks = meta.block_tables[i, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:kv_len].float()
        v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:kv_len].float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        qi = q[start:start + q_len].float()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        masked = k_pos > q_pos
        if meta.sliding_window is not None:
            masked |= k_pos <= q_pos - meta.sliding_window
        scores.masked_fill_(masked, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
        start += q_len
    return out
