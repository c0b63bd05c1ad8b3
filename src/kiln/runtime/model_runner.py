"""The model runner: turns a scheduler plan into one packed forward pass and sampled tokens.

Input: SchedulerOutput (which sequences, how many new tokens each). Output: RunnerOutput (a token per
sequence that caught up, log-probabilities where asked). It holds the KV cache tensor, allocated once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.kernels import AttentionMetadata
from kiln.models.decoder import DecoderModel
from kiln.runtime.sampler import sample, top_logprobs
from kiln.runtime.scheduler import SchedulerOutput
from kiln.runtime.sequence import Sequence


def derive_seed(seed: int, sample_index: int) -> int:
    """Seed of sample i of a request (sample 0 keeps the request's seed)."""
    return seed if sample_index == 0 else hash((seed, sample_index)) & ((1 << 62) - 1)


@dataclass
class ForkRow:
    """A sampling row for an extra sample (n > 1) drawn from its parent's first logits."""

    params: object
    seed: int
    stop_ids: tuple[int, ...]
    token_ids: list[int]
    num_prompt_tokens: int

    num_output_tokens = 0
    output_token_ids: tuple = ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # seq_id -> token
    # seq_id -> [(token, seed, logprob entry)] for the extra samples (n > 1) of a sequence's first token
    forked: dict[int, list[tuple[int, int, tuple | None]]] = field(default_factory=dict)
    logprobs: dict[int, tuple[float, dict[int, float]]] = field(default_factory=dict)  # (chosen, top-k)
    # seq_id -> (first prompt position whose successor is scored, entries for the following tokens)
    prompt_logprobs: dict[int, tuple[int, list[dict[int, float]]]] = field(default_factory=dict)


def allocate_kv_cache(model: DecoderModel, num_blocks: int, block_size: int) -> torch.Tensor:
    cfg = model.config
    return torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                       dtype=model.dtype, device=model.device)


class ModelRunner:
    def __init__(self, model: DecoderModel, kv_cache: torch.Tensor):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.shape[3]
        self.device = model.device

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        for src, dst in plan.block_copies:
            self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])
        batch = self._prepare(plan)
        logits = self.model.forward(*batch.forward_args)
        return self._sample(batch, logits)

    # ---- batch preparation -------------------------------------------------------------------
    def _prepare(self, plan: SchedulerOutput) -> "_Batch":
        bs = self.block_size
        input_ids, positions, slots, starts, seq_lens, q_lens = [], [], [], [0], [], []
        logits_rows: list[int] = []   # packed token indices whose logits are computed
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []   # for each sampling sequence, its row in the logits
        prompt_lp: list[tuple[Sequence, int, int, int]] = []  # seq, first logits row, start pos, count
        max_blocks = max(len(s.seq.block_table) for s in plan.scheduled)
        tables = []
        for s in plan.scheduled:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            offset = len(input_ids)
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            starts.append(offset + n)
            seq_lens.append(start + n)
            q_lens.append(n)
            tables.append(table + [0] * (max_blocks - len(table)))
            last_row_is_end = False
            if seq.wants_prompt_logprobs and start < seq.num_prompt_tokens:
                count = min(n, seq.num_prompt_tokens - start)
                prompt_lp.append((seq, len(logits_rows), start, count))
                logits_rows += range(offset, offset + count)
                last_row_is_end = count == n
            if s.samples:
                if not last_row_is_end:
                    logits_rows.append(offset + n - 1)
                sample_seqs.append(seq)
                sample_rows.append(len(logits_rows) - 1)
        dev = self.device
        meta = AttentionMetadata(
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens_host=seq_lens,
            query_lens_host=q_lens,
            sliding_window=self.model.config.sliding_window,
        )
        forward_args = (
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_cache,
            torch.tensor(slots, dtype=torch.int64, device=dev),
            meta,
            torch.tensor(logits_rows, dtype=torch.int64, device=dev),
        )
        return _Batch(forward_args, sample_seqs, sample_rows, prompt_lp)

    # ---- sampling ----------------------------------------------------------------------------
    def _sample(self, batch: "_Batch", logits: torch.Tensor) -> RunnerOutput:
        out = RunnerOutput()
        rows = list(batch.sample_rows)
        seqs: list = list(batch.sample_seqs)
        fork_parents: list[tuple[Sequence, int]] = []
        for seq, row in zip(batch.sample_seqs, batch.sample_rows):
            if seq.forks_pending and seq.num_output_tokens == 0:
                for i in range(1, seq.forks_pending + 1):
                    seed = derive_seed(seq.seed, i)
                    seqs.append(ForkRow(seq.params, seed, seq.stop_ids, seq.token_ids, seq.num_prompt_tokens))
                    rows.append(row)
                    fork_parents.append((seq, seed))
        if seqs:
            row_logits = logits[torch.tensor(rows, device=logits.device)]
            tokens = sample(row_logits, seqs)
            want_lp = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=None)
            lp_host = [t.tolist() for t in top_logprobs(row_logits, tokens, want_lp)] if want_lp is not None else None
            tokens_host = tokens.tolist()
            num_own = len(batch.sample_seqs)
            for i, seq in enumerate(seqs):
                entry = None
                if lp_host is not None and seq.params.logprobs is not None:
                    k = seq.params.logprobs
                    entry = (lp_host[0][i], dict(zip(lp_host[2][i][:k], lp_host[1][i][:k])))
                if i >= num_own:
                    parent, seed = fork_parents[i - num_own]
                    out.forked.setdefault(parent.seq_id, []).append((tokens_host[i], seed, entry))
                else:
                    out.sampled[seq.seq_id] = tokens_host[i]
                    if entry is not None:
                        out.logprobs[seq.seq_id] = entry
        for seq, first_row, start, count in batch.prompt_lp:
            out.prompt_logprobs[seq.seq_id] = (start, self._prompt_logprobs(seq, logits[first_row:first_row + count], start))
        return out

    @staticmethod
    def _prompt_logprobs(seq: Sequence, logits: torch.Tensor, start: int) -> list[dict[int, float]]:
        """Entries for prompt tokens start+1 .. start+count (the logits at p predict token p + 1)."""
        k = seq.params.prompt_logprobs
        count = min(logits.shape[0], seq.num_prompt_tokens - 1 - start)
        if count <= 0:
            return []
        targets = torch.tensor(seq.token_ids[start + 1:start + 1 + count], device=logits.device)
        chosen, values, ids = top_logprobs(logits[:count], targets, k)
        entries = []
        for i, target in enumerate(targets.tolist()):
            entry = dict(zip(ids[i].tolist(), values[i].tolist()))
            entry[target] = chosen[i].item()
            entries.append(entry)
        return entries


@dataclass
class _Batch:
    forward_args: tuple
    sample_seqs: list[Sequence]
    sample_rows: list[int]
    prompt_lp: list[tuple[Sequence, int, int, int]]
