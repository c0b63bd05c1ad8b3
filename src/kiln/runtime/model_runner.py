"""The model runner: turns a scheduler plan into one packed forward pass and sampled tokens.

Input: SchedulerOutput (which sequences, how many new tokens each). Output: RunnerOutput (a token per
sequence that caught up, log-probabilities where asked). It holds the KV cache tensor, allocated once.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from kiln.kernels import AttentionMetadata
from kiln.models import CausalLM
from kiln.runtime.sampler import SamplingRow, compile_race, sample, top_logprobs
from kiln.runtime.scheduler import SchedulerOutput
from kiln.runtime.sequence import Sequence
from kiln.runtime.staging import HostStaging


def derive_seed(seed: int, sample_index: int) -> int:
    """Seed of sample i of a request (sample 0 keeps the request's seed)."""
    return seed if sample_index == 0 else hash((seed, sample_index)) & ((1 << 62) - 1)


@dataclass
class RunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # seq_id -> token
    # seq_id -> [(token, seed, logprob entry)] for the extra samples (n > 1) of a sequence's first token
    forked: dict[int, list[tuple[int, int, tuple | None]]] = field(default_factory=dict)
    logprobs: dict[int, tuple[float, dict[int, float]]] = field(default_factory=dict)  # (chosen, top-k)
    # seq_id -> (first prompt position whose successor is scored, entries for the following tokens)
    prompt_logprobs: dict[int, tuple[int, list[dict[int, float]]]] = field(default_factory=dict)


def allocate_kv_cache(model: CausalLM, num_blocks: int, block_size: int) -> torch.Tensor:
    cfg = model.config
    return torch.zeros(cfg.num_layers, 2, num_blocks, block_size, model.num_local_kv_heads, cfg.head_dim,
                       dtype=model.kv_cache_dtype, device=model.device)


def uses_cuda_graphs(engine, enabled: bool) -> bool:
    """Whether steps replay CUDA graphs: asked for, on a GPU, with device-side attention (the reference
    attention sizes its loops from host lists, which a captured graph would freeze)."""
    attention_impl = engine.manifest.kernel_plan.get("attention", {}).get("impl", "reference")
    return enabled and engine.device.type == "cuda" and attention_impl != "reference"


def make_runner(engine, num_blocks: int, max_batch_size: int, max_num_tokens: int,
                enable_cuda_graphs: bool) -> "ModelRunner":
    """The KV cache allocated, the runner made and, where graphs apply, its graphs captured: every rank of an
    engine makes its runner here, so their graphs (and their collectives) match."""
    build, model = engine.build_config, engine.model
    runner = ModelRunner(model, allocate_kv_cache(model, num_blocks, build.tokens_per_block), max_batch_size,
                         max_num_tokens, build.max_seq_len)
    if uses_cuda_graphs(engine, enable_cuda_graphs):
        runner.capture_graphs(graph_batch_sizes(max_batch_size), graph_context_sizes(max_num_tokens))
    return runner


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Padded decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then steps of 8 up to 32 and
    of 16 beyond, and max_batch_size itself (padding waste stays under ~1/3 at any batch size)."""
    sizes = {b for b in (1, 2, 4) if b <= max_batch_size}
    sizes.update(range(8, min(32, max_batch_size) + 1, 8))
    sizes.update(range(48, max_batch_size + 1, 16))
    sizes.add(max_batch_size)
    return sorted(sizes)


# Context steps (prompt chunks, alone or with a few decodes) that get a CUDA graph: up to this many
# sequences, padded to 1, 2, 4 or 8, and tokens padded to a power of two from 32 up to 2048. Eager, a
# context step is bound by the host: ~160 Triton launches at ~40 us each plus the matmuls' dispatch make
# a 128-token prefill of a 32-layer model take 13.7 ms of host time while the GPU needs 4-5 (H200,
# Triton 3.6, scripts/gpu_profile_prefill.py); beyond 2048 tokens the GPU's work hides the host's.
CONTEXT_GRAPH_SEQS = (1, 2, 4, 8)
MAX_CONTEXT_GRAPH_TOKENS = 2048


def graph_context_sizes(max_num_tokens: int) -> list[int]:
    """Padded token counts of context steps that get CUDA graphs (see CONTEXT_GRAPH_SEQS)."""
    return [1 << p for p in range(5, 12) if 1 << p <= min(max_num_tokens, MAX_CONTEXT_GRAPH_TOKENS)]


def _views(host: torch.Tensor, dev: torch.Tensor,
           shapes: list[tuple[int, ...]]) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Consecutive (host numpy, device tensor) views of the given shapes over two flat buffers."""
    views, offset = [], 0
    host_np = host.numpy()
    for shape in shapes:
        size = int(np.prod(shape))
        views.append((host_np[offset:offset + size].reshape(shape), dev[offset:offset + size].view(shape)))
        offset += size
    return views


class InputBuffers:
    """Static input tensors, allocated once: every step writes into them (pinned host staging, one copy
    per dtype), so CUDA graphs captured on them see the new inputs and nothing is reallocated. Each has a
    host (numpy, ``np_`` prefix) and a device view."""

    def __init__(self, max_num_tokens: int, max_batch_size: int, max_blocks_per_seq: int, device: torch.device):
        pin = self.pinned = device.type == "cuda"
        self.uploaded: torch.cuda.Event | None = None
        t, b = max_num_tokens, max_batch_size
        # int64: per packed token input ids, positions, KV slots, logits rows; per sequence, the packed rows
        # whose input token the previous step sampled (still on the device) and that step's sample row of each.
        self.host64 = torch.zeros(4 * t + 2 * b, dtype=torch.int64, pin_memory=pin)
        # int32: seq_lens [B], query_start_loc [B + 1], block_tables [B, max_blocks]
        self.host32 = torch.zeros(2 * b + 1 + b * max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self.dev64 = torch.zeros_like(self.host64, device=device)
        self.dev32 = torch.zeros_like(self.host32, device=device)
        ((self.np_input_ids, self.input_ids), (self.np_positions, self.positions),
         (self.np_slot_mapping, self.slot_mapping), (self.np_logits_indices, self.logits_indices),
         (self.np_pending_index, self.pending_index), (self.np_pending_source, self.pending_source),
         ) = _views(self.host64, self.dev64, [(t,), (t,), (t,), (t,), (b,), (b,)])
        ((self.np_seq_lens, self.seq_lens), (self.np_query_start_loc, self.query_start_loc),
         (self.np_block_tables, self.block_tables),
         ) = _views(self.host32, self.dev32, [(b,), (b + 1,), (b, max_blocks_per_seq)])

    def wait_uploaded(self) -> None:
        """Before the host writes the staging buffers again: the previous step's copies must have run (a
        step that samples nothing never synchronizes, and its copy may still be queued behind a forward)."""
        if self.uploaded is not None:
            self.uploaded.synchronize()

    def upload(self) -> None:
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32.copy_(self.host32, non_blocking=True)
        if self.pinned:
            self.uploaded = torch.cuda.Event()
            self.uploaded.record()


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, max_batch_size: int, max_num_tokens: int,
                 max_seq_len: int):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.shape[3]
        self.device = model.device
        self.buffers = InputBuffers(max(max_num_tokens, max_batch_size), max_batch_size,
                                    -(-max_seq_len // self.block_size), self.device)
        # Captured forwards: a decode batch size -> its graph; a context step's (tokens, sequences) -> its.
        self.graphs: dict[int | tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = []
        self.context_graph_keys: list[tuple[int, int]] = []
        self._row_keys: list[tuple | None] = [None] * max_batch_size  # whose block table each row holds
        # The last launched step's sampled tokens (its own rows, no forks) and each sequence's row among them:
        # the inputs a plan marks pending (is_input_pending) are taken from there on the device.
        self.last_tokens = torch.zeros(max_batch_size, dtype=torch.int64, device=self.device)
        self._last_sample_rows: dict[int, int] = {}
        # Sampling parameters and row lists: copied from pinned memory without waiting (kiln.runtime.staging).
        self.staging = HostStaging(self.device, 16 * max_batch_size)
        pin = self.buffers.pinned
        # Room for the sampled tokens of a full batch with forked samples; a larger step copies synchronously.
        self._token_host = [torch.zeros(4 * max_batch_size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._token_flip = 0
        self.graph_capture_seconds = 0.0
        # Rank 0 of a tensor-parallel engine: the other ranks (kiln.runtime.distributed.Ranks), sent each step's
        # packed inputs before its forward and its sampled tokens after; None at one rank.
        self.peers = None

    def release(self) -> None:
        """Frees the KV cache and graphs (the executor has stopped)."""
        self.graphs.clear()
        self.graph_sizes, self.context_graph_keys = [], []
        self.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()  # no autograd bookkeeping: on the CPU path it is a tenth of each op's cost
    def launch(self, plan: SchedulerOutput) -> "LaunchedStep":
        """Queues the step's work on the device (forward, sampling, the copy of the tokens to the host)
        without waiting for it; ``collect`` waits. Input tokens the plan marks pending are taken on the
        device from the previous step's sampled tokens."""
        for src, dst in plan.block_copies:
            self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])
        batch = self._prepare(plan)
        if self.peers is not None:
            self.peers.send_step(self._step_message(plan, batch))
        if batch.num_pending_inputs:
            self._feed_pending(batch.num_pending_inputs)
        if batch.graph_key is not None:
            graph, logits = self.graphs[batch.graph_key]
            graph.replay()
        else:
            logits = self.model.forward(*batch.forward_args)
        step = self._sample(batch, logits)
        if self.peers is not None and batch.sample_seqs:
            self.peers.share_tokens(self.last_tokens)
        return step

    def _feed_pending(self, num_pending: int) -> None:
        """Inputs the previous step sampled, still on the device: its token row ``pending_source[i]``
        becomes packed input row ``pending_index[i]``."""
        buf = self.buffers
        buf.input_ids.index_copy_(0, buf.pending_index[:num_pending],
                                  self.last_tokens[buf.pending_source[:num_pending]])

    # ---- tensor parallelism: the other ranks run rank 0's step -------------------------------
    def _step_message(self, plan: SchedulerOutput, batch: "_Batch") -> dict:
        """What another rank needs to run the same forward: the packed inputs as rank 0 wrote them (plain
        numbers and arrays) and how to run them (a captured graph's key, or the eager forward's sizes)."""
        buf, n, k = self.buffers, batch.num_rows, batch.num_pending_inputs
        eager = {}
        if batch.graph_key is None:
            meta = batch.forward_args[4]
            eager = dict(num_seqs=len(meta.seq_lens_host), num_logits=batch.forward_args[5].shape[0],
                         seq_lens=list(meta.seq_lens_host), query_lens=list(meta.query_lens_host))
        # Logits rows never outnumber the step's (or its graph's) input rows.
        return dict(block_copies=[list(c) for c in plan.block_copies], graph_key=batch.graph_key, eager=eager,
                    has_samples=bool(batch.sample_seqs), input_ids=buf.np_input_ids[:n],
                    positions=buf.np_positions[:n], slot_mapping=buf.np_slot_mapping[:n],
                    logits_indices=buf.np_logits_indices[:n], pending_index=buf.np_pending_index[:k],
                    pending_source=buf.np_pending_source[:k], host32=buf.host32.numpy())

    @torch.inference_mode()
    def replay(self, block_copies, graph_key, eager, has_samples, input_ids, positions, slot_mapping, logits_indices,
               pending_index, pending_source, host32, receive_tokens) -> None:
        """Another rank's side of ``launch``: rank 0's step message in, the same forward (its collectives
        with rank 0's), and rank 0's sampled tokens received (``receive_tokens``) for the next step."""
        for src, dst in block_copies:
            self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])
        buf = self.buffers
        buf.wait_uploaded()
        num_rows, num_pending = len(input_ids), len(pending_index)
        buf.np_input_ids[:num_rows], buf.np_positions[:num_rows] = input_ids, positions
        buf.np_slot_mapping[:num_rows], buf.np_logits_indices[:num_rows] = slot_mapping, logits_indices
        buf.np_pending_index[:num_pending], buf.np_pending_source[:num_pending] = pending_index, pending_source
        buf.host32.numpy()[:] = host32
        buf.upload()
        if num_pending:
            self._feed_pending(num_pending)
        if graph_key is not None:  # a context graph's (tokens, sequences) key arrives as a list
            self.graphs[graph_key if isinstance(graph_key, int) else tuple(graph_key)][0].replay()
        else:
            self.model.forward(*self._forward_args(num_rows, **eager))
        if has_samples:
            receive_tokens(self.last_tokens)

    @torch.inference_mode()
    def collect(self, step: "LaunchedStep") -> RunnerOutput:
        """Waits for a launched step's tokens and turns them into a RunnerOutput."""
        out = RunnerOutput()
        if step.tokens is not None:
            if step.ready is not None:
                step.ready.synchronize()
            tokens = step.tokens.tolist()
            lp_host = [t.tolist() for t in step.logprobs] if step.logprobs is not None else None
            num_own = len(step.batch.sample_seqs)
            for i, row in enumerate(step.rows):
                entry = None
                if lp_host is not None and row.params.logprobs is not None:
                    k = row.params.logprobs
                    entry = (lp_host[0][i], dict(zip(lp_host[2][i][:k], lp_host[1][i][:k])))
                if i >= num_own:
                    fork = step.forks[i - num_own]
                    out.forked.setdefault(fork.parent_seq_id, []).append((tokens[i], fork.seed, entry))
                else:
                    seq_id = step.batch.sample_seqs[i].seq_id
                    out.sampled[seq_id] = tokens[i]
                    if entry is not None:
                        out.logprobs[seq_id] = entry
        for seq, logits, start in step.prompt_logits:
            out.prompt_logprobs[seq.seq_id] = (start, self._prompt_logprobs(seq, logits, start))
        return out

    # ---- CUDA graphs -------------------------------------------------------------------------
    def graph_keys(self, batch_sizes: list[int], context_sizes: list[int]) -> list[int | tuple[int, int]]:
        """The graphs to capture, largest first (they share one memory pool): one decode forward per padded
        batch size, one context forward per padded (tokens, sequences) pair."""
        max_seqs = len(self._row_keys)
        keys: list[int | tuple[int, int]] = list(batch_sizes)
        keys += [(t, s) for t in context_sizes for s in CONTEXT_GRAPH_SEQS if s <= min(t, max_seqs)]
        return sorted(keys, key=lambda k: k if isinstance(k, int) else k[0], reverse=True)

    @functools.cached_property
    def graph_logits(self) -> torch.Tensor:
        """The buffer every graph writes its logits into, from its first row: a graph's output outlives its
        capture, and one per graph would add up (~70 decode graphs at max batch 1024: 17 GB of float32
        logits for Llama-3's vocabulary). Safe to share: the graphs replay one at a time on one stream,
        and each step's sampling reads its logits before the next step's graph is launched after it."""
        return torch.empty(len(self._row_keys), self.model.config.vocab_size, dtype=torch.float32,
                           device=self.device)

    def stage_graph_inputs(self, key: int | tuple[int, int]) -> tuple:
        """Writes and uploads the padded inputs of graph ``key`` (every row padding) and returns the forward
        arguments to capture: the launch sizes they freeze are the graph's; the logits go to graph_logits."""
        if isinstance(key, int):  # decode: one token per sequence
            self._fill_padding(0, key)
            self.buffers.np_logits_indices[:key] = range(key)
            args = self._forward_args(key, key, key, [0] * key, [1] * key)
        else:  # context: the attention grid is sized for one sequence of all the tokens
            num_tokens, num_seqs = key
            self._pad_context(0, 0, num_tokens, num_seqs)
            args = self._forward_args(num_tokens, num_seqs, num_seqs, [0] * num_seqs,
                                      [num_tokens] + [0] * (num_seqs - 1))
        self.buffers.upload()
        return (*args, self.graph_logits[:args[5].shape[0]])

    def add_graph(self, key: int | tuple[int, int], graph, logits: torch.Tensor) -> None:
        """Makes ``graph`` (anything with ``replay()`` that writes ``logits``) run the plans ``key`` holds."""
        self.graphs[key] = (graph, logits)
        self.graph_sizes = sorted(k for k in self.graphs if isinstance(k, int))
        self.context_graph_keys = sorted(k for k in self.graphs if not isinstance(k, int))

    def capture_graphs(self, batch_sizes: list[int], context_sizes: list[int]) -> None:
        """Captures the CUDA graphs of ``graph_keys``. Only for device-side kernels: the reference
        attention reads host lists that a graph would freeze."""
        import time

        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for key in self.graph_keys(batch_sizes, context_sizes):
            args = self.stage_graph_inputs(key)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile and autotune outside the capture
                    self.model.forward(*args)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self.model.forward(*args)
            self.add_graph(key, graph, logits)
        compile_race(logits)  # the sampler's kernels, also before the first step that needs it
        torch.cuda.synchronize(self.device)
        self.graph_capture_seconds = time.perf_counter() - t0

    def _graph_key(self, plan: SchedulerOutput, num_tokens: int, has_prompt_logprobs: bool
                   ) -> int | tuple[int, int] | None:
        """The smallest captured graph that holds the plan, else None (run eagerly). Every sequence must
        sample, from logits row i for sequence i: a decode-only plan takes a decode graph, any other a
        context graph of at least its tokens and sequences."""
        if has_prompt_logprobs or not all(s.samples for s in plan.scheduled):
            return None
        num_seqs = len(plan.scheduled)
        if num_tokens == num_seqs:
            index = bisect.bisect_left(self.graph_sizes, num_tokens)
            return self.graph_sizes[index] if index < len(self.graph_sizes) else None
        return next(((t, s) for t, s in self.context_graph_keys if t >= num_tokens and s >= num_seqs), None)

    def _fill_padding(self, start: int, end: int) -> None:
        """Rows start..end of a padded decode batch: no KV write (slot -1), no keys (seq_len 0)."""
        buf = self.buffers
        buf.np_input_ids[start:end] = 0
        buf.np_positions[start:end] = 0
        buf.np_slot_mapping[start:end] = -1
        buf.np_seq_lens[start:end] = 0
        buf.np_query_start_loc[start + 1:end + 1] = range(start + 1, end + 1)
        buf.np_block_tables[start:end] = 0
        self._row_keys[start:end] = [None] * (end - start)

    def _pad_context(self, num_tokens: int, num_seqs: int, padded_tokens: int, padded_seqs: int) -> None:
        """Pads a context step to a graph's size: token rows past num_tokens write no KV (slot -1) and
        belong to no sequence; sequences past num_seqs have no queries and no keys, and logits row 0."""
        buf = self.buffers
        buf.np_input_ids[num_tokens:padded_tokens] = 0
        buf.np_positions[num_tokens:padded_tokens] = 0
        buf.np_slot_mapping[num_tokens:padded_tokens] = -1
        buf.np_logits_indices[num_seqs:padded_seqs] = 0
        buf.np_seq_lens[num_seqs:padded_seqs] = 0
        buf.np_query_start_loc[num_seqs + 1:padded_seqs + 1] = num_tokens
        buf.np_block_tables[num_seqs:padded_seqs] = 0
        self._row_keys[num_seqs:padded_seqs] = [None] * (padded_seqs - num_seqs)

    def _forward_args(self, num_tokens: int, num_seqs: int, num_logits: int, seq_lens: list[int],
                      query_lens: list[int]) -> tuple:
        buf = self.buffers
        meta = AttentionMetadata(
            seq_lens=buf.seq_lens[:num_seqs],
            query_start_loc=buf.query_start_loc[:num_seqs + 1],
            block_tables=buf.block_tables[:num_seqs],
            seq_lens_host=seq_lens,
            query_lens_host=query_lens,
            sliding_window=self.model.config.sliding_window,
        )
        return (buf.input_ids[:num_tokens], buf.positions[:num_tokens], self.kv_cache, buf.slot_mapping[:num_tokens],
                meta, buf.logits_indices[:num_logits])

    # ---- batch preparation -------------------------------------------------------------------
    def _prepare(self, plan: SchedulerOutput) -> "_Batch":
        bs = self.block_size
        buf = self.buffers
        buf.wait_uploaded()
        ids_np, pos_np, slot_np = buf.np_input_ids, buf.np_positions, buf.np_slot_mapping
        seq_lens, q_lens = [], []
        logits_rows: list[int] = []   # packed token indices whose logits are computed
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []   # for each sampling sequence, its row in the logits
        prompt_lp: list[tuple[Sequence, int, int, int]] = []  # seq, first logits row, start pos, count
        offset = 0
        num_pending = 0
        buf.np_query_start_loc[0] = 0
        for i, s in enumerate(plan.scheduled):
            seq, start, n = s.seq, s.start, s.num_new_tokens
            end = start + n
            table = seq.block_table
            if s.is_input_pending:  # its last input is the previous step's sample, still on the device
                buf.np_pending_index[num_pending] = offset + n - 1
                buf.np_pending_source[num_pending] = self._last_sample_rows[seq.seq_id]
                num_pending += 1
            if n == 1:  # decode: scalar writes, the common case at large batch sizes
                if not s.is_input_pending:
                    ids_np[offset] = seq.token_ids[start]
                pos_np[offset] = start
                slot_np[offset] = table[start // bs] * bs + start % bs
            else:
                known = seq.token_ids[start:end]  # all but a pending last one
                ids_np[offset:offset + len(known)] = known
                pos_np[offset:offset + n] = range(start, end)
                slot_np[offset:offset + n] = [table[p // bs] * bs + p % bs for p in range(start, end)]
            # A row holding the same table as last step keeps it (tables only grow, or restart on preemption).
            row_key = (seq.seq_id, len(table), seq.num_preemptions)
            if self._row_keys[i] != row_key:
                buf.np_block_tables[i, :len(table)] = table
                self._row_keys[i] = row_key
            buf.np_seq_lens[i] = end
            buf.np_query_start_loc[i + 1] = offset + n
            seq_lens.append(end)
            q_lens.append(n)
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
            offset += n
        num_seqs = len(plan.scheduled)
        key = self._graph_key(plan, offset, bool(prompt_lp))
        if isinstance(key, int):
            self._fill_padding(num_seqs, key)
            buf.np_logits_indices[:key] = range(key)  # the graph computes logits for every row
            buf.upload()
            return _Batch(None, sample_seqs, sample_rows, prompt_lp, key, key, num_pending)
        # One logits row per sequence, in order, when a context graph runs.
        buf.np_logits_indices[:len(logits_rows)] = logits_rows
        if key is not None:
            self._pad_context(offset, num_seqs, *key)
            buf.upload()
            return _Batch(None, sample_seqs, sample_rows, prompt_lp, key, key[0], num_pending)
        buf.upload()
        args = self._forward_args(offset, num_seqs, len(logits_rows), seq_lens, q_lens)
        return _Batch(args, sample_seqs, sample_rows, prompt_lp, None, offset, num_pending)

    # ---- sampling ----------------------------------------------------------------------------
    def _sample(self, batch: "_Batch", logits: torch.Tensor) -> "LaunchedStep":
        step = LaunchedStep(batch)
        rows = [SamplingRow.of(seq) for seq in batch.sample_seqs]
        logits_rows = list(batch.sample_rows)
        for seq, row, logits_row in zip(batch.sample_seqs, list(rows), batch.sample_rows):
            if seq.forks_pending and seq.num_output_tokens == 0:
                for i in range(1, seq.forks_pending + 1):
                    fork = ForkedSample(seq.seq_id, derive_seed(seq.seed, i))
                    step.forks.append(fork)
                    rows.append(dataclasses.replace(row, seed=fork.seed))
                    logits_rows.append(logits_row)
        if rows:
            self.staging.next_step()
            # Decode steps sample rows 0..n-1 in order: a view, no index copy to the device.
            in_order = logits_rows == list(range(len(logits_rows)))
            row_logits = (logits[:len(rows)] if in_order
                          else logits[self.staging.tensors(torch.int64, logits_rows)[0]])
            tokens = sample(row_logits, rows, self.staging)
            want_lp = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
            if want_lp is not None:
                step.logprobs = top_logprobs(row_logits, tokens, want_lp)
            num_own = len(batch.sample_seqs)
            self.last_tokens[:num_own].copy_(tokens[:num_own])  # where the next step's pending inputs are
            self._last_sample_rows = {seq.seq_id: row for row, seq in enumerate(batch.sample_seqs)}
            step.rows = rows
            step.tokens, step.ready = self._to_host(tokens)
        # Prompt logprobs read logits the next step may overwrite (a graph's output): cloned.
        step.prompt_logits = [(seq, logits[first:first + count].clone(), start)
                              for seq, first, start, count in batch.prompt_lp]
        return step

    def _to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Starts the copy of sampled tokens into one of two pinned buffers (the other may still be read
        by the host for the previous step); the event marks when it has landed."""
        if not self.buffers.pinned or tokens.shape[0] > self._token_host[0].shape[0]:
            return tokens.cpu(), None
        self._token_flip ^= 1
        host = self._token_host[self._token_flip][:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

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
    forward_args: tuple | None  # None when a captured graph runs the step
    sample_seqs: list[Sequence]
    sample_rows: list[int]
    prompt_lp: list[tuple[Sequence, int, int, int]]
    graph_key: int | tuple[int, int] | None  # ModelRunner.graphs' key of the graph that runs the step
    num_rows: int  # input rows the forward reads: the step's tokens, or its graph's padded count
    num_pending_inputs: int  # entries of the pending rows of InputBuffers this step fills on the device


@dataclass(frozen=True)
class ForkedSample:
    """Another sample (n > 1) of a sequence's request, its first token drawn from the sequence's logits."""

    parent_seq_id: int
    seed: int


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device; ``ModelRunner.collect`` turns it into a RunnerOutput."""

    batch: _Batch
    rows: list[SamplingRow] = field(default_factory=list)      # the sampling sequences', then the forks'
    forks: list[ForkedSample] = field(default_factory=list)
    tokens: torch.Tensor | None = None                          # host tensor, valid once ``ready`` fired
    ready: torch.cuda.Event | None = None
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # on the device
    prompt_logits: list[tuple[Sequence, torch.Tensor, int]] = field(default_factory=list)
    # Set by the executor: the plan, and when it was scheduled.
    plan: SchedulerOutput | None = None
    scheduled_at: float = 0.0  # wall clock
    started: float = 0.0       # perf_counter when its planning began
