"""Batched sampling on the device, one row per sequence, each row with its own parameters.

Random rows draw from a counter-based hash of (seed, step, token id) rather than a shared generator,
so a seeded request gives the same tokens whatever else is in the batch, on CPU and GPU alike.
Sampling is done by the exponential race in its Gumbel form, argmax(logit - log E) with E ~ Exp(1),
which picks token i with probability softmax(logit)_i (``kiln.kernels.sampling``: one fused Triton pass
on CUDA, its plain-PyTorch reference elsewhere). That form replaced argmax(softmax / E) together with
the kernel: the same distribution from the same noise, but seeded requests draw other tokens than they
did before it. Greedy rows take the argmax of their logits: torch.argmax's tokens, by a Triton kernel on CUDA
(``argmax_triton``).

Top-k, top-p and min-p apply in Hugging Face's order: top-k, then top-p over what top-k kept
(renormalized), then min-p. Ties at top-p's cut-off: tokens of equal logits are kept or dropped together
-- token j is in the nucleus iff the probability mass of the tokens with a logit strictly greater than
l_j is below top_p (the most likely tokens always are). Hugging Face's sort instead splits a tie at the
cut-off by the sort's order; without ties (float32 logits of a model, mostly) the two agree. Min-p keeps
j iff l_j >= l_max + log(min_p), i.e. p_j >= min_p * p_max. A batch without top-k draws from the nucleus
without sorting (``nucleus_race_triton`` / ``nucleus_race_ref``: the race, rejected and run again above
its winner while the winner is outside); a batch with top-k in any row masks every row through a sort
(``top_k_top_p_min_p``), then races.

The per-row parameters and index lists go to the device through the runner's pinned staging buffers
(``HostStaging``), so a sampled step queues its copies without waiting for the forward before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import SamplingParams
from kiln.kernels.sampling import (argmax_ref, argmax_triton, exponential_race_ref, exponential_race_triton,
                                   nucleus_race_ref, nucleus_race_triton, wrap_int64)
from kiln.kernels.triton_jit import triton_runs_on
from kiln.runtime.sequence import Sequence
from kiln.runtime.staging import HostStaging


@dataclass(slots=True)
class SamplingRow:
    """What the sampler reads of one row: a sequence that caught up, or another sample (n > 1) of a request
    drawing its first token from the same logits as its first sample."""

    params: SamplingParams
    seed: int
    stop_ids: tuple[int, ...]  # masked before min_tokens
    token_ids: list[int]       # prompt, then the outputs known on the host (penalties count them)
    num_prompt_tokens: int
    num_output_tokens: int     # outputs before this row's token, pending ones included: the noise's step

    @classmethod
    def of(cls, seq: Sequence) -> "SamplingRow":
        return cls(seq.params, seq.seed, seq.stop_ids, seq.token_ids, seq.num_prompt_tokens, seq.num_output_tokens)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [N] (0 for greedy rows, set to 1 to avoid division by zero)
    is_greedy: torch.Tensor    # [N] bool
    top_k: torch.Tensor        # [N] int64, vocab size when disabled
    top_p: torch.Tensor
    min_p: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    any_random: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    any_min_tokens: bool


def build_sampling_tensors(rows: list[SamplingRow], vocab_size: int, staging: HostStaging) -> SamplingTensors:
    ps = [r.params for r in rows]
    greedy = [p.is_greedy for p in ps]
    # Greedy rows race too (torch.where drops their draws): without top-p or min-p, their races end at once.
    temperature, top_p, min_p = staging.tensors(
        torch.float32, [1.0 if g else p.temperature for p, g in zip(ps, greedy)],
        [1.0 if g else p.top_p for p, g in zip(ps, greedy)], [0.0 if g else p.min_p for p, g in zip(ps, greedy)])
    top_k, seeds, steps = staging.tensors(
        torch.int64, [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in ps],
        [wrap_int64(r.seed) for r in rows], [r.num_output_tokens for r in rows])
    (is_greedy,) = staging.tensors(torch.bool, greedy)
    return SamplingTensors(
        temperature=temperature, is_greedy=is_greedy, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
        steps=steps,
        any_random=not all(greedy),
        any_greedy=any(greedy),
        any_top_k=any(not g and 0 < p.top_k < vocab_size for p, g in zip(ps, greedy)),
        any_top_p=any(not g and p.top_p < 1.0 for p, g in zip(ps, greedy)),
        any_min_p=any(not g and p.min_p > 0 for p, g in zip(ps, greedy)),
        any_penalty=any(p.has_penalties for p in ps),
        any_min_tokens=any(r.num_output_tokens < p.min_tokens for r, p in zip(rows, ps)),
    )


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], staging: HostStaging) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (HF/vLLM semantics); presence and frequency
    penalties over output tokens (OpenAI semantics)."""
    n, vocab = logits.shape
    device = logits.device
    rows_out, cols_out, rows_all, cols_all = [], [], [], []
    for i, r in enumerate(rows):
        out_ids = r.output_token_ids
        rows_out += [i] * len(out_ids)
        cols_out += out_ids
        rows_all += [i] * len(r.token_ids)
        cols_all += r.token_ids
    rows_out, cols_out, rows_all, cols_all = staging.tensors(torch.int64, rows_out, cols_out, rows_all, cols_all)
    rep, presence, frequency = (t[:, None] for t in staging.tensors(
        torch.float32, [r.params.repetition_penalty for r in rows], [r.params.presence_penalty for r in rows],
        [r.params.frequency_penalty for r in rows]))
    out_counts = torch.zeros(n, vocab, device=device)
    out_counts.index_put_((rows_out, cols_out), torch.ones(cols_out.shape[0], device=device), accumulate=True)
    seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
    seen[rows_all, cols_all] = True
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency * out_counts - presence * (out_counts > 0).float()


def mask_stop_tokens(logits: torch.Tensor, rows: list[SamplingRow], staging: HostStaging) -> torch.Tensor:
    """min_tokens: EOS and stop token ids cannot be sampled before a sequence has that many tokens."""
    row_ids, cols = [], []
    for i, r in enumerate(rows):
        if r.num_output_tokens < r.params.min_tokens:
            row_ids += [i] * len(r.stop_ids)
            cols += list(r.stop_ids)
    if row_ids:
        logits = logits.clone()
        logits[tuple(staging.tensors(torch.int64, row_ids, cols))] = float("-inf")
    return logits


def top_k_top_p_min_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top-k, then nucleus top-p of what top-k kept, then
    min-p of what is left: Hugging Face's order, and the module docstring's tie rule at top-p's cut-off.
    Through a full sort: sample() takes this path only for batches with top-k in a row."""
    vocab = logits.shape[-1]
    if t.any_top_k or t.any_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= t.top_k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Mass of each token and all less likely ones, summed from the tail so that top_p = 1 drops
        # nothing by rounding. It falls along the sort, so the kept positions are a prefix (the most likely
        # token always in it); the tokens tied with its last one are kept with it: at the first of a run
        # of equal logits that mass is the mass of the tokens not more likely than them all.
        mass_from_here = probs.flip(-1).cumsum(dim=-1).flip(-1)
        num_kept = (mass_from_here > 1.0 - t.top_p[:, None]).sum(dim=-1, keepdim=True).clamp_(min=1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < sorted_logits.gather(-1, num_kept - 1),
                                                  float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if t.any_min_p:
        floor = logits.max(dim=-1, keepdim=True).values + t.min_p.log()[:, None]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def is_plain_greedy(rows: list[SamplingRow]) -> bool:
    """Every row is an argmax of the raw logits (no penalty, no min_tokens mask): checked on the host so
    the common greedy step copies no parameter tensors to the device."""
    return all(r.params.is_greedy and not r.params.has_penalties and r.num_output_tokens >= r.params.min_tokens
               for r in rows)


def sample(logits: torch.Tensor, rows: list[SamplingRow], staging: HostStaging) -> torch.Tensor:
    """logits: [N, V] float32, one row per sampling row. Returns [N] int64 token ids on the device."""
    # The kernels where kiln's Triton runs (CUDA, sm80+; torch's one-block argmax took ~30 us of a batch-1
    # step on the H200), their references elsewhere: greedy rows get the same tokens either way.
    is_triton = triton_runs_on(logits.device)
    argmax = argmax_triton if is_triton else argmax_ref
    if is_plain_greedy(rows):
        return argmax(logits)
    t = build_sampling_tensors(rows, logits.shape[-1], staging)
    if t.any_penalty:
        logits = apply_penalties(logits, rows, staging)
    if t.any_min_tokens:
        logits = mask_stop_tokens(logits, rows, staging)
    if not t.any_random:
        return argmax(logits)
    scaled = logits / t.temperature[:, None]
    if not t.any_top_k and (t.any_top_p or t.any_min_p):
        nucleus_race = nucleus_race_triton if is_triton else nucleus_race_ref
        tokens, _ = nucleus_race(scaled, t.top_p, t.min_p.log(), t.seeds, t.steps)
    else:
        race = exponential_race_triton if is_triton else exponential_race_ref
        tokens = race(top_k_top_p_min_p(scaled, t) if t.any_top_k else scaled, t.seeds, t.steps)
    # A batch without greedy rows skips their argmax (a pass over the logits that torch.where would drop).
    return torch.where(t.is_greedy, argmax(logits), tokens) if t.any_greedy else tokens


def compile_race(logits: torch.Tensor) -> None:
    """Runs the race kernels (plain and nucleus) and greedy's argmax (both its kernels where a row is split:
    vocabularies above one block) on a row of ``logits`` (a CUDA graph's output): they compile for their
    vocabulary at load, not at the first sampled step (batch sizes, splits and where the per-row parameters
    sit in the staging buffer change nothing they are specialized on)."""
    argmax_triton(logits[:1])
    zeros = torch.zeros(1, dtype=torch.int64, device=logits.device)
    exponential_race_triton(logits[:1], zeros, zeros)
    ones = torch.ones(1, dtype=torch.float32, device=logits.device)
    nucleus_race_triton(logits[:1], ones, ones.log(), zeros, zeros)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's distribution (before sampling adjustments): of each chosen
    token [N], and the top k per row ([N, k] values and ids)."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    values, ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, values, ids
