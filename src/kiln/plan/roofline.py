"""The cost model behind ``kiln plan``: a roofline per iteration, and the scheduler that forms iterations.

One iteration of the engine reads every weight once (plus the KV cache of the sequences in the batch)
and does two FLOPs per weight per token (plus attention). Its time is the larger of the two over the
GPU's rates, each scaled by an efficiency fitted on kiln's own measurements (``calibration.json``; a
quantization kiln has measured scales bf16's by factors of its own, since its kernels stream weights and
run large matmuls at rates of their own), plus a fixed cost: decode-only iterations replay a CUDA graph.
A weight-only engine's iteration of ``dequantize_min_rows`` rows or more runs two kernels per matmul in
turn: one reads the packed weight and writes it as bf16, then cuBLAS reads that (the roofline above, with
2-byte weights); the first pass adds its time.
The host works beside the GPU (the executor plans and launches step N+1 while step N runs), so an
iteration lasts the longer of the GPU's time and the host's: launching an eager iteration with prompt
tokens, and handling each sequence. A workload (ISL/OSL, request count) is played through kiln's
``guaranteed_no_evict`` rules: decodes first, then prompt chunks within ``max_num_tokens``, new requests
admitted while the batch and the KV pool (each request's worst case) have room.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

GIB = 1 << 30
BF16_BYTES = 2


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_gib: float
    bandwidth_tbps: float
    bf16_tflops: float
    fp8_tflops: float
    int8_tops: float
    sm: int
    link_gbps: float


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a model: sizes, not weights."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_params: int
    tie_word_embeddings: bool
    widest_activation: int  # widest intermediate of one token (fused QKV, gate/up), for the activation plan

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size


@dataclass(frozen=True)
class Precision:
    """How a quantization stores the linear layers' weights and which tensor-core rate they run at."""

    name: str
    weight_bytes: float      # bytes per weight, scales included
    compute: str             # "bf16" or "fp8": the peak the matmuls of large batches run at
    min_sm: int
    compute_factor: float    # large-batch matmul rate relative to that peak (dequantization costs)
    dequantize_min_rows: int | None = None  # weight-only: from this many rows, each weight dequantized to a scratch


@dataclass(frozen=True)
class PrecisionFactors:
    """A quantization's efficiencies relative to bf16's, fitted on kiln's measurements of that quantization."""

    name: str
    bandwidth: float = 1.0   # its linear layers' weight streaming (its GEMV kernels) against bf16's (cuBLAS)
    compute: float = 1.0     # its large-batch matmul rate against Precision.compute_factor's assumption


@dataclass(frozen=True)
class Calibration:
    """Efficiencies against the datasheet (fractions of peak) and fixed costs, fitted by ``calibrate``."""

    bandwidth_efficiency: float   # weights + KV streamed by an iteration
    compute_efficiency: float     # matmuls and attention of compute-bound iterations
    decode_step_ms: float         # GPU time a decode iteration adds to its roofline (graph gaps, sampling)
    context_step_ms: float        # host time to launch an iteration with prompt tokens (eager, not a graph)
    host_us_per_sequence: float   # host time per sequence per iteration (planning, stop checks, detokenizing)
    kv_memory_fraction: float = 0.9      # the runtime's default free_gpu_memory_fraction
    runtime_overhead_gib: float = 0.5    # CUDA context, cuBLAS workspace, graph pools
    collective_latency_us: float = 8.0   # fixed cost of one all-reduce (tp > 1); a lead, not measured by kiln
    # The quantizations kiln has measured, by name; any other runs at bf16's efficiencies (factors of 1.0).
    precisions: tuple[PrecisionFactors, ...] = ()

    def factors(self, precision: str) -> PrecisionFactors:
        return next((f for f in self.precisions if f.name == precision), PrecisionFactors(precision))


@dataclass(frozen=True)
class EngineShape:
    """One candidate engine on one GPU type, with its runtime limits."""

    model: ModelShape
    gpu: GPU
    precision: Precision
    kv_bytes: int            # bytes per cached K or V element
    tp_size: int
    max_batch_size: int
    max_num_tokens: int
    tokens_per_block: int = 32

    @property
    def linear_params(self) -> int:
        m = self.model
        return m.num_params - m.embedding_params * (1 if m.tie_word_embeddings else 2)

    @property
    def weight_bytes_per_gpu(self) -> float:
        """Stored: linear layers quantized; embedding and LM head kept in 16 bits; all sharded over tp."""
        tables = self.model.embedding_params * (1 if self.model.tie_word_embeddings else 2)
        return (self.linear_params * self.precision.weight_bytes + 2 * tables) / self.tp_size

    @property
    def linear_bytes_read(self) -> float:
        """The linear layers' weights, in the precision's kernels' format (scales included)."""
        return self.linear_params * self.precision.weight_bytes / self.tp_size

    @property
    def weight_bytes_read(self) -> float:
        """Read by every iteration: the linear layers and the LM head (the embedding table only by row)."""
        return self.linear_bytes_read + 2 * self.model.embedding_params / self.tp_size

    @property
    def kv_bytes_per_token(self) -> float:
        m = self.model
        kv_heads_per_gpu = max(1, m.num_kv_heads // self.tp_size)  # fewer KV heads than ranks: replicated
        return 2 * m.num_layers * kv_heads_per_gpu * m.head_dim * self.kv_bytes

    @property
    def activation_bytes(self) -> float:
        """As the builder's memory plan reserves them: one full iteration's widest activations and logits,
        and a weight-only engine's largest dequantized weight (the widest layer, gate_up or fused QKV)."""
        m = self.model
        min_rows = self.precision.dequantize_min_rows
        scratch = m.widest_activation * m.hidden_size * 2 / self.tp_size
        return (self.max_num_tokens * (m.widest_activation + 3 * m.hidden_size) * 2
                + self.max_batch_size * m.vocab_size * 4
                + (scratch if min_rows is not None and self.max_num_tokens >= min_rows else 0))

    def dequantize_bytes(self, num_rows: int) -> float:
        """The dequantize round trip of a weight-only iteration of ``num_rows`` rows: from
        ``dequantize_min_rows`` rows each linear weight is dequantized into a bf16 scratch (2 bytes written)
        that cuBLAS then reads (2 bytes), once per layer per iteration whatever the rows, since one
        dequantized weight serves them all; nothing below that, nor for other precisions. The packed read
        that feeds it is ``linear_bytes_read``, which every iteration counts."""
        min_rows = self.precision.dequantize_min_rows
        if min_rows is None or num_rows < min_rows:
            return 0.0
        return 2 * BF16_BYTES * self.linear_params / self.tp_size

    def kv_tokens(self, cal: Calibration) -> int:
        """KV pool size as the runtime sizes it: a fraction of what weights and activations leave free."""
        free = (self.gpu.memory_gib * GIB - self.weight_bytes_per_gpu - self.activation_bytes
                - cal.runtime_overhead_gib * GIB)
        blocks = int(max(0.0, free) * cal.kv_memory_fraction // (self.kv_bytes_per_token * self.tokens_per_block))
        return blocks * self.tokens_per_block

    def iteration_ms(self, cal: Calibration, num_tokens: int, num_sequences: int, num_sampled: int,
                     kv_tokens_read: float, attended_pairs: float, is_context: bool) -> float:
        """One iteration: ``num_tokens`` tokens of ``num_sequences`` sequences through the layers,
        ``num_sampled`` rows through the LM head, ``kv_tokens_read`` cached tokens read (each sequence's
        keys once), ``attended_pairs`` (query, key) pairs for attention's FLOPs."""
        m, tp = self.model, self.tp_size
        matmul_flops = 2 * self.linear_params / tp * num_tokens
        other_flops = (2 * m.embedding_params / tp * num_sampled
                       + 4 * m.num_layers * m.num_heads / tp * m.head_dim * attended_pairs)
        factors = cal.factors(self.precision.name)
        peak = self.gpu.fp8_tflops if self.precision.compute == "fp8" else self.gpu.bf16_tflops
        matmul_rate = peak * self.precision.compute_factor * factors.compute
        compute_s = (matmul_flops / matmul_rate + other_flops / self.gpu.bf16_tflops) / (cal.compute_efficiency * 1e12)
        # Bytes at bf16's streaming rate; the linear layers' packed weights slowed by the precision's factor
        # (its kernels unpack them); the LM head and the KV cache are read as in a bf16 engine.
        rate = self.gpu.bandwidth_tbps * 1e12 * cal.bandwidth_efficiency
        packed_s = self.linear_bytes_read / factors.bandwidth / rate
        other_bytes = self.weight_bytes_read - self.linear_bytes_read + kv_tokens_read * self.kv_bytes_per_token
        scratch_bytes = self.dequantize_bytes(num_tokens) / 2
        if scratch_bytes:
            # Two kernels in turn: the dequantization (packed read, bf16 write), then cuBLAS over the scratch.
            dequantize_s, memory_s = packed_s + scratch_bytes / rate, (scratch_bytes + other_bytes) / rate
        else:
            dequantize_s, memory_s = 0.0, packed_s + other_bytes / rate
        gpu_ms = 1e3 * (dequantize_s + max(compute_s, memory_s)) + self.all_reduce_ms(cal, num_tokens)
        if not is_context:
            gpu_ms += cal.decode_step_ms
        host_ms = (cal.context_step_ms if is_context else 0.0) + cal.host_us_per_sequence * num_sequences / 1e3
        return max(gpu_ms, host_ms)

    def all_reduce_ms(self, cal: Calibration, num_tokens: int) -> float:
        """Two all-reduces per layer (after the row-parallel attention output and MLP down projections)."""
        tp = self.tp_size
        if tp == 1:
            return 0.0
        payload = num_tokens * self.model.hidden_size * 2
        ring_s = 2 * (tp - 1) / tp * payload / (self.gpu.link_gbps * 1e9)
        return 2 * self.model.num_layers * (cal.collective_latency_us * 1e-3 + 1e3 * ring_s)

    # ---- workloads ------------------------------------------------------------------------------------
    def decode_tok_s(self, cal: Calibration, batch: int, context_len: int) -> float:
        """Steady decode of ``batch`` sequences of ``context_len`` cached tokens each."""
        ms = self.iteration_ms(cal, batch, batch, batch, batch * context_len, batch * context_len, is_context=False)
        return batch / ms * 1e3

    def ttft_ms(self, cal: Calibration, isl: int) -> float:
        """One prompt alone: its chunks of at most max_num_tokens, the last one sampling the first token."""
        total, done = 0.0, 0
        while done < isl:
            n = min(self.max_num_tokens, isl - done)
            total += self.iteration_ms(cal, n, 1, int(done + n == isl), done + n, n * done + n * (n + 1) / 2, True)
            done += n
        return total

    def max_concurrency(self, cal: Calibration, isl: int, osl: int) -> int:
        """Requests the KV pool holds at once when each reserves its worst case (guaranteed_no_evict)."""
        blocks = self.kv_tokens(cal) // self.tokens_per_block
        return min(self.max_batch_size, blocks // math.ceil((isl + osl) / self.tokens_per_block))

    def offline_ms(self, cal: Calibration, isl: int, osl: int, num_requests: int) -> float | None:
        """Time to serve ``num_requests`` fixed-length requests enqueued at once (None: one does not fit)."""
        concurrency = self.max_concurrency(cal, isl, osl)
        if concurrency < 1:
            return None
        waiting, in_system, finished = num_requests, 0, 0
        prefilling: deque[int] = deque()  # prompt tokens left, per admitted request still in its prompt
        decoding, context_sum = 0, 0      # sequences decoding and their cached tokens
        finishing: dict[int, int] = {}    # iteration -> sequences producing their last token then
        iteration, total_ms = 0, 0.0
        while finished < num_requests:
            while waiting and in_system < concurrency:
                prefilling.append(isl)
                waiting, in_system = waiting - 1, in_system + 1
            if not prefilling:
                # Identical decode iterations until the next sequence finishes: time them at their midpoint.
                next_end = min(finishing)
                steps = next_end - iteration + 1
                mid = context_sum + decoding * (steps + 1) / 2
                total_ms += steps * self.iteration_ms(cal, decoding, decoding, decoding, mid, mid, is_context=False)
                context_sum += decoding * steps
                iteration = next_end
            else:
                budget, chunk_tokens, kv_read, pairs, completed = self.max_num_tokens - decoding, 0, 0.0, 0.0, 0
                chunks = 0
                for i in range(len(prefilling)):
                    if budget <= 0:
                        break
                    chunks += 1
                    take, offset = min(budget, prefilling[i]), isl - prefilling[i]
                    chunk_tokens, budget, prefilling[i] = chunk_tokens + take, budget - take, prefilling[i] - take
                    kv_read += offset + take
                    pairs += take * offset + take * (take + 1) / 2
                while prefilling and prefilling[0] == 0:
                    prefilling.popleft()
                    completed += 1
                reads = context_sum + decoding
                total_ms += self.iteration_ms(cal, decoding + chunk_tokens, decoding + chunks, decoding + completed,
                                              reads + kv_read, reads + pairs, is_context=chunk_tokens > 0)
                context_sum += decoding
                if osl > 1 and completed:
                    decoding, context_sum = decoding + completed, context_sum + completed * isl
                    finishing[iteration + osl - 1] = finishing.get(iteration + osl - 1, 0) + completed
                elif completed:
                    finished, in_system = finished + completed, in_system - completed
            ended = finishing.pop(iteration, 0)
            decoding, context_sum = decoding - ended, context_sum - ended * (isl + osl - 1)
            finished, in_system = finished + ended, in_system - ended
            iteration += 1
        return total_ms
