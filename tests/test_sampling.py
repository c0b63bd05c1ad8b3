"""Sampling: every SamplingParams field against a plain reference.

The first half tests the batched sampler directly (kiln.runtime.sampler): the counter-based noise
against a pure-Python splitmix64, the exponential race against the softmax distribution, masks against
Hugging Face's logits warpers, penalties against a loop, seeded rows against the same rows in other
batches. The second half runs requests through the Executor on the bundled stories260K model: stop
strings (also spanning tokens, also streamed), stop token ids, ignore_eos, min_tokens, n > 1, logprobs
and prompt logprobs against log_softmax of Hugging Face's logits.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from conftest import STORIES_DIR
from kiln import Executor, Request, RuntimeConfig
from kiln.config import SamplingParams
from kiln.errors import RequestError
from kiln.runtime.model_runner import derive_seed
from kiln.kernels.sampling import exponential_race_ref, nucleus_race_ref, uniform_noise
from kiln.runtime.sampler import SamplingRow, apply_penalties, build_sampling_tensors, top_k_top_p_min_p, top_logprobs
from kiln.runtime.sampler import sample as sample_staged
from kiln.runtime.sequence import Sequence
from kiln.runtime.staging import HostStaging
from test_executor import collect, joined, run_requests

MASK64 = (1 << 64) - 1
# Upper quantiles of the chi-square distribution (1 - 1e-4), by degrees of freedom.
CHI2_QUANTILE_9999 = {2: 18.42, 7: 29.88}


def make_row(params: SamplingParams, token_ids=(1, 2, 3), num_prompt_tokens: int | None = None, seed: int = 0,
             stop_ids: tuple[int, ...] = ()) -> SamplingRow:
    """The sampling row of a sequence whose tokens are all known."""
    num_prompt = len(token_ids) if num_prompt_tokens is None else num_prompt_tokens
    return SamplingRow.of(Sequence(0, 0, list(token_ids), num_prompt, params, seed, stop_ids=stop_ids))


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The runner's sampling, its parameters staged through buffers as small as they start (they grow)."""
    return sample_staged(logits, rows, HostStaging(logits.device, capacity=4))


# ---- the noise ------------------------------------------------------------------------------------

def splitmix64_uniform(seed: int, step: int, token: int) -> float:
    """The sampler's noise for one (seed, step, token) in plain Python integers."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xC2B2AE3D27D4EB4F + token * 0x165667B19E3779F9) & MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return ((x >> 41) + 0.5) / (1 << 23)


def test_uniform_noise_wraps_like_splitmix64_in_python_integers():
    rng = random.Random(0)
    seeds = [0, 1, 2**62 - 1, 2**63 - 1, -1, -(2**63), rng.getrandbits(63), -rng.getrandbits(62)]
    steps = [0, 1, 17, 2**40 + 3]
    vocab = 300
    rows = [(seed, step) for seed in seeds for step in steps]
    noise = uniform_noise(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), vocab)
    expected = torch.tensor([[splitmix64_uniform(seed, step, t) for t in range(vocab)] for seed, step in rows],
                            dtype=torch.float64)
    assert torch.equal(noise.double(), expected)


def test_uniform_noise_stays_inside_the_open_interval():
    # With 24 bits the largest value rounded to 1.0 in float32 (about 2% of rows of a 128K vocabulary),
    # and -log(1.0) = 0 let that token win the race whatever its probability.
    noise = uniform_noise(torch.arange(128), torch.zeros(128, dtype=torch.int64), 128256)
    assert noise.min() > 0 and noise.max() < 1


# ---- distributions ----------------------------------------------------------------------------------

def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a masked token was sampled"
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())


@pytest.mark.parametrize("params, allowed_probs", [
    (SamplingParams(temperature=1.0), None),
    (SamplingParams(temperature=0.6), None),
    # top_k=5 keeps 5 tokens; top_p=0.85 of those keeps 3; min_p=0.2 of the max keeps the same 3.
    (SamplingParams(temperature=1.0, top_k=5, top_p=0.85, min_p=0.2), [0, 1, 2]),
], ids=["t1", "t0.6", "top_k_p_min_p"])
def test_exponential_race_draws_from_the_softmax(params, allowed_probs):
    logits = torch.tensor([2.0, 1.6, 1.0, 0.2, 0.0, -0.5, -1.0, -3.0])
    probs = (logits / params.temperature).softmax(-1)
    if allowed_probs is not None:
        keep = torch.zeros(8, dtype=torch.bool)
        keep[allowed_probs] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    n = 40_000
    seqs = [make_row(params, seed=seed) for seed in range(n)]  # distinct seeds: independent draws
    counts = torch.bincount(sample(logits.repeat(n, 1), seqs), minlength=8).double()
    degrees = int((probs > 0).sum()) - 1
    assert chi_square(counts, probs.double()) < CHI2_QUANTILE_9999[degrees]


def test_greedy_rows_take_the_argmax_and_ignore_noise_settings():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    seqs = [make_row(SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=i), seed=i) for i in range(6)]
    assert torch.equal(sample(logits, seqs), logits.argmax(-1))


def test_staged_tensors_keep_their_values_until_their_set_of_buffers_comes_round_again():
    staging = HostStaging(torch.device("cpu"), capacity=4)
    staging.next_step()
    ids, more = staging.tensors(torch.int64, [1, 2], [3])
    staging.next_step()  # the other set: on the CPU the staged tensors are views of the buffers
    (grown,) = staging.tensors(torch.int64, [7, 8, 9, 10, 11])  # past the capacity: a larger buffer
    flags, weights = staging.tensors(torch.bool, [True, False]), staging.tensors(torch.float32, [0.5, 2.0])
    assert (ids.tolist(), more.tolist(), grown.tolist()) == ([1, 2], [3], [7, 8, 9, 10, 11])
    assert flags[0].tolist() == [True, False] and weights[0].dtype == torch.float32
    staging.next_step()  # the first set again: its buffer is rewritten
    staging.tensors(torch.int64, [4, 5, 6])
    assert ids.tolist() == [4, 5]


# ---- masks against Hugging Face's warpers -----------------------------------------------------------------

def hf_mask(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scores = TemperatureLogitsWarper(p.temperature)(None, logits[None].clone())
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    return torch.isinf(scores[0])


def test_top_k_top_p_min_p_masks_match_hugging_face_row_by_row():
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    vocab = 97
    params = [SamplingParams(temperature=rng.choice([0.5, 1.0, 1.7]), top_k=rng.choice([0, 1, 5, 40, 97, 200]),
                             top_p=rng.choice([1.0, 0.95, 0.6, 0.1]), min_p=rng.choice([0.0, 0.05, 0.3]))
              for _ in range(64)]
    logits = torch.randn(64, vocab, generator=gen) * 3
    seqs = [make_row(p) for p in params]
    tensors = build_sampling_tensors(seqs, vocab, HostStaging(logits.device))
    masked = top_k_top_p_min_p(logits / tensors.temperature[:, None], tensors)
    for i, p in enumerate(params):
        assert torch.equal(torch.isinf(masked[i]), hf_mask(logits[i], p)), p


def test_sampled_tokens_stay_inside_the_masks():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 64, generator=gen) * 2
    p = SamplingParams(temperature=1.3, top_k=10, top_p=0.7, min_p=0.1)
    allowed = ~hf_mask(logits[0], p)
    tokens = sample(logits.repeat(2000, 1), [make_row(p, seed=s) for s in range(2000)])
    assert allowed[tokens].all()
    assert len(set(tokens.tolist())) == int(allowed.sum())  # and every kept token is reachable


def test_sampled_tokens_stay_inside_the_masks_without_a_sort():
    """Top-p and min-p without top-k: the nucleus race, not the sort, draws them."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 64, generator=gen) * 2
    for p in (SamplingParams(temperature=1.3, top_p=0.7, min_p=0.1), SamplingParams(temperature=0.8, top_p=0.3),
              SamplingParams(temperature=1.0, min_p=0.2)):
        allowed = ~hf_mask(logits[0], p)
        tokens = sample(logits.repeat(2000, 1), [make_row(p, seed=s) for s in range(2000)])
        assert allowed[tokens].all()
        assert len(set(tokens.tolist())) == int(allowed.sum())


def tie_rule_mask(logits: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """The module docstring's rule written out, token by token: j is dropped unless the mass of the tokens
    with a logit strictly greater than l_j is below top_p, and l_j >= l_max + log(min_p)."""
    probs = logits.double().softmax(-1)
    above = torch.stack([probs[logits > l].sum() for l in logits])
    keep = (above < top_p) | (top_p >= 1.0)
    keep &= logits >= logits.max() + torch.tensor(min_p).log()
    return ~keep | (logits == float("-inf"))


def tied_logits(num_rows: int, vocab: int, seed: int) -> torch.Tensor:
    """bfloat16 values, so equal logits abound; half the rows flat (a wide nucleus, several races), half
    peaked."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.where(torch.arange(num_rows) % 2 == 0, 0.5, 4.0)[:, None]
    return (torch.randn(num_rows, vocab, generator=gen) * scale).bfloat16().float()


def test_top_p_keeps_tokens_tied_at_the_cut_off_together():
    # Four tokens of 0.229 each: the first two make 0.458 < 0.5, so all four are in (Hugging Face's sort
    # keeps three of them, whichever it puts first); the last, 0.084, is out.
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    p = SamplingParams(temperature=1.0, top_p=0.5)
    tensors = build_sampling_tensors([make_row(p)], 5, HostStaging(logits.device))
    assert torch.isinf(top_k_top_p_min_p(logits[None], tensors))[0].tolist() == [False] * 4 + [True]
    tokens = sample(logits.repeat(400, 1), [make_row(p, seed=s) for s in range(400)])
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    assert int(hf_mask(logits, p).sum()) == 2  # the warper splits the tie


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("min_p", [0.0, 0.05])
def test_the_sort_and_the_nucleus_race_follow_the_tie_rule(top_p, min_p):
    """top_k_top_p_min_p (the sort path) masks by the rule on tied logits, and the nucleus race draws what
    racing that mask draws, token for token."""
    vocab = 300
    logits = tied_logits(16, vocab, seed=int(top_p * 100 + min_p * 1000))
    logits[3, ::3] = float("-inf")
    rows = [make_row(SamplingParams(temperature=1.0, top_p=top_p, min_p=min_p), seed=i) for i in range(16)]
    tensors = build_sampling_tensors(rows, vocab, HostStaging(logits.device))
    masked = top_k_top_p_min_p(logits, tensors)
    for i in range(16):
        assert torch.equal(torch.isinf(masked[i]), tie_rule_mask(logits[i], top_p, min_p)), i
    tokens, races = nucleus_race_ref(logits, tensors.top_p, tensors.min_p.log(), tensors.seeds, tensors.steps)
    assert torch.equal(tokens, exponential_race_ref(masked, tensors.seeds, tensors.steps))
    if top_p < 0.5:
        assert races.max() > 1  # the loop ran (a first winner is outside with about the mass outside, 1 - top_p)


def test_a_row_still_outside_after_the_last_race_takes_its_most_likely_token():
    logits = tied_logits(4, 1000, seed=5)
    top_p, log_min_p = torch.full((4,), 0.01), torch.full((4,), float("-inf"))
    seeds, steps = torch.arange(4), torch.zeros(4, dtype=torch.int64)
    tokens, races = nucleus_race_ref(logits, top_p, log_min_p, seeds, steps)
    capped, capped_races = nucleus_race_ref(logits, top_p, log_min_p, seeds, steps, max_races=1)
    assert (races > 1).any() and (capped_races == 1).all()
    assert torch.equal(capped, torch.where(races == 1, tokens, logits.argmax(-1)))


# ---- penalties and min_tokens -----------------------------------------------------------------------------

def reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    out = logits.clone()
    for t in set(prompt + output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    return out


def test_penalties_match_a_plain_loop_and_hugging_face_repetition_penalty():
    gen = torch.Generator().manual_seed(3)
    vocab = 40
    cases = [
        (SamplingParams(repetition_penalty=1.3), [1, 2, 3, 3], [3, 4, 4]),
        (SamplingParams(presence_penalty=0.7), [5, 6], [6, 7, 7, 7]),
        (SamplingParams(frequency_penalty=-0.4), [8], [9, 9, 10]),
        (SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=1.5), [11, 12], [12, 13, 13]),
        (SamplingParams(), [1, 2], [3]),
    ]
    logits = torch.randn(len(cases), vocab, generator=gen) * 2
    seqs = [make_row(p, prompt + output, len(prompt)) for p, prompt, output in cases]
    penalized = apply_penalties(logits, seqs, HostStaging(logits.device))
    for i, (p, prompt, output) in enumerate(cases):
        torch.testing.assert_close(penalized[i], reference_penalties(logits[i], prompt, output, p))
        if p.repetition_penalty != 1.0:
            rep = p.repetition_penalty
            hf = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([prompt + output]), logits[i:i + 1])
            torch.testing.assert_close(hf[0], reference_penalties(logits[i], prompt, output,
                                                                  SamplingParams(repetition_penalty=rep)))


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(4, 10)
    logits[:, 2] = 5.0   # EOS is the most likely token
    logits[:, 7] = 4.0   # a stop token id is the next
    p = SamplingParams(temperature=0.0, min_tokens=2, max_tokens=8)
    seqs = [make_row(p, [1] + [4] * k, 1, stop_ids=(2, 7)) for k in range(4)]  # 0..3 outputs so far
    assert sample(logits, seqs).tolist() == [0, 0, 2, 2]


# ---- seeds ----------------------------------------------------------------------------------------------

def test_a_seeded_row_samples_the_same_token_in_any_batch():
    gen = torch.Generator().manual_seed(4)
    vocab = 64
    target_logits = torch.randn(vocab, generator=gen)
    target = make_row(SamplingParams(temperature=0.9, top_k=20, seed=123), token_ids=[1, 2, 3, 9, 9], seed=123,
                      num_prompt_tokens=3)
    alone = sample(target_logits[None], [target]).item()
    rng = random.Random(4)
    for trial in range(20):
        others = [make_row(SamplingParams(temperature=rng.choice([0.0, 0.5, 1.5]), top_p=rng.choice([1.0, 0.5]),
                                          min_p=rng.choice([0.0, 0.2]), repetition_penalty=rng.choice([1.0, 1.2])),
                           seed=rng.getrandbits(62)) for _ in range(rng.randint(0, 7))]
        position = rng.randint(0, len(others))
        batch = others[:position] + [target] + others[position:]
        logits = torch.randn(len(batch), vocab, generator=gen)
        logits[position] = target_logits
        assert sample(logits, batch)[position].item() == alone
    # Another seed or another step draws other noise (the same token only by chance: check many).
    steps = [make_row(target.params, [1, 2, 3] + [9] * k, 3, seed=123) for k in range(16)]
    assert len(set(sample(target_logits.repeat(16, 1), steps).tolist())) > 1


def test_seeds_of_any_size_wrap_to_64_bits():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    p = SamplingParams(temperature=1.0)
    small = sample(logits, [make_row(p, seed=s) for s in (7, 8, 9)])
    wrapped = sample(logits, [make_row(p, seed=s + 2**64) for s in (7, 8, 9)])
    assert torch.equal(small, wrapped)
    sample(logits, [make_row(p, seed=s) for s in (2**70, -(2**65), 2**63)])  # no int64 overflow


# ---- logprobs ----------------------------------------------------------------------------------------------

def test_top_logprobs_are_the_log_softmax():
    logits = torch.randn(5, 33, generator=torch.Generator().manual_seed(6)) * 4
    tokens = torch.tensor([0, 5, 32, 7, 7])
    chosen, values, ids = top_logprobs(logits, tokens, 4)
    reference = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(chosen.double(), reference.gather(-1, tokens[:, None])[:, 0])
    ref_values, ref_ids = reference.topk(4, dim=-1)
    torch.testing.assert_close(values.double(), ref_values)
    assert torch.equal(ids, ref_ids)
    chosen0, values0, ids0 = top_logprobs(logits, tokens, 0)
    assert values0.shape == (5, 0) and ids0.shape == (5, 0)
    torch.testing.assert_close(chosen0, chosen)


# ---- through the Executor ---------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def executor(stories_engine):
    with Executor(stories_engine, RuntimeConfig()) as ex:
        yield ex


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def baseline(executor):
    """Greedy tokens of PROMPT and the text each one added (one streamed response per token)."""
    prompt_ids = executor.tokenizer.encode(PROMPT)
    request_id = executor.enqueue_request(Request(prompt_ids, sampling_params=GREEDY, streaming=True))
    responses = collect(executor, [request_id])[request_id]
    assert [len(r.result.output_token_ids[0]) for r in responses] == [1] * GREEDY.max_tokens
    return prompt_ids, [r.result.output_token_ids[0][0] for r in responses], [r.result.text[0] for r in responses]


def spanning_stop_string(pieces: list[str]) -> tuple[str, int]:
    """Two characters either side of a token boundary, first occurring there, and the number of tokens
    after which the text first contains it."""
    text = "".join(pieces)
    for k in range(5, len(pieces)):
        boundary = len("".join(pieces[:k]))
        stop = text[boundary - 2:boundary + 2]
        if len(pieces[k - 1]) >= 2 and len(pieces[k]) >= 2 and text.find(stop) == boundary - 2:
            return stop, k + 1
    raise AssertionError("no token boundary with two characters either side")


@pytest.mark.parametrize("include", [False, True], ids=["trimmed", "included"])
@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_stop_string_spanning_tokens_ends_the_text_where_it_completes(executor, baseline, include, streaming):
    prompt_ids, tokens, pieces = baseline
    stop, num_tokens = spanning_stop_string(pieces)
    text = "".join(pieces)
    expected = text[:text.find(stop) + (len(stop) if include else 0)]
    params = GREEDY.replace(stop=("never in a story #", stop), include_stop_str_in_output=include)
    request_id = executor.enqueue_request(Request(prompt_ids, sampling_params=params, streaming=streaming))
    responses = collect(executor, [request_id])[request_id]
    got_tokens, got_texts = joined(responses)
    assert responses[-1].result.finish_reasons == ["stop"]
    assert got_tokens == [tokens[:num_tokens]] and got_texts == [expected]
    streamed = ""
    for r in responses:  # text is held back until it cannot be the start of a stop string
        streamed += r.result.text[0]
        assert expected.startswith(streamed)


def test_a_stop_string_before_min_tokens_does_not_count(executor, baseline):
    prompt_ids, tokens, pieces = baseline
    text = "".join(pieces)
    early = len("".join(pieces[:3]))
    stop = next(text[i:i + 3] for i in range(early - 3) if text.count(text[i:i + 3]) == 1)
    result = run_requests(executor, [Request(prompt_ids, sampling_params=GREEDY.replace(stop=(stop,), min_tokens=6))])
    assert result[0].result.finish_reasons == ["length"] and result[0].result.text == [text]


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_detokenize_false_gives_the_same_tokens_and_no_text(executor, baseline, streaming):
    prompt_ids, tokens, _ = baseline
    params = GREEDY.replace(detokenize=False)
    request_id = executor.enqueue_request(Request(prompt_ids, sampling_params=params, streaming=streaming))
    assert joined(collect(executor, [request_id])[request_id]) == ([tokens], [""])
    with pytest.raises(RequestError, match="stop strings .* need detokenize=True"):
        GREEDY.replace(stop=("the",), detokenize=False)


def test_stop_token_ids_end_id_and_ignore_eos(executor, baseline):
    prompt_ids, tokens, pieces = baseline
    j = next(j for j in range(3, len(tokens)) if tokens[j] not in tokens[:j])
    stop_token = tokens[j]
    stopped = [
        Request(prompt_ids, sampling_params=GREEDY.replace(stop_token_ids=(stop_token,))),
        Request(prompt_ids, sampling_params=GREEDY.replace(ignore_eos=False), end_id=stop_token),
        # ignore_eos ignores the end id only: stop_token_ids still stop.
        Request(prompt_ids, sampling_params=GREEDY.replace(stop_token_ids=(stop_token,)), end_id=stop_token),
    ]
    for result in (r.result for r in run_requests(executor, stopped)):
        assert result.output_token_ids == [tokens[:j + 1]] and result.finish_reasons == ["stop"]
        assert result.text == ["".join(pieces[:j])]  # the stop token's text is not part of the output
    ignoring = run_requests(executor, [Request(prompt_ids, sampling_params=GREEDY, end_id=stop_token)])[0].result
    assert ignoring.output_token_ids == [tokens] and ignoring.finish_reasons == ["length"]


def test_min_tokens_holds_stop_tokens_back(executor, baseline):
    prompt_ids, tokens, _ = baseline
    j = next(j for j in range(3, len(tokens)) if tokens[j] not in tokens[:j])
    params = GREEDY.replace(stop_token_ids=(tokens[j],), min_tokens=j + 4)
    result = run_requests(executor, [Request(prompt_ids, sampling_params=params)])[0].result
    out = result.output_token_ids[0]
    assert out[:j] == tokens[:j] and tokens[j] not in out[:j + 4]
    if result.finish_reasons == ["stop"]:
        assert out[-1] == tokens[j] and len(out) > j + 4
    else:
        assert result.finish_reasons == ["length"] and len(out) == GREEDY.max_tokens


def test_n_samples_share_the_prompt_blocks_and_equal_single_requests_with_derived_seeds(executor, monkeypatch):
    block_size = executor.pool.block_size
    prompt = [1] + list(range(40, 40 + 2 * block_size + 5))  # 2 full blocks and a partial one
    params = SamplingParams(temperature=0.9, seed=77, n=3, max_tokens=24, ignore_eos=True)
    tables = []
    launch = executor.runner.launch

    def record_tables(plan):  # runs on the loop thread, so the pool is consistent here
        samples = [s.seq for s in plan.scheduled if s.seq.token_ids[:len(prompt)] == prompt]
        if len(samples) == 3 and all(len(seq.block_table) == 3 for seq in samples):  # decoding in the third block
            tables.append([(list(seq.block_table), [executor.pool.ref_counts[b] for b in seq.block_table])
                           for seq in samples])
        return launch(plan)

    monkeypatch.setattr(executor.runner, "launch", record_tables)
    together = run_requests(executor, [Request(prompt, sampling_params=params)])[0].result
    monkeypatch.undo()
    assert tables
    for samples in tables:
        assert len({tuple(table[:2]) for table, _ in samples}) == 1       # the full prompt blocks, shared
        assert len({table[2] for table, _ in samples}) == 3               # each its own copy of the partial one
        assert all(counts == [3, 3, 1] for _, counts in samples)
    alone = [run_requests(executor, [Request(prompt, sampling_params=params.replace(n=1, seed=derive_seed(77, i)))])[0]
             .result.output_token_ids[0] for i in range(3)]
    assert together.output_token_ids == alone
    assert len({tuple(t) for t in alone}) == 3


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_crowd(executor):
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=2024, max_tokens=32, ignore_eos=True)
    target = Request([1, 200, 201, 202, 203], sampling_params=params)
    alone = run_requests(executor, [target])[0].result.output_token_ids
    assert run_requests(executor, [target])[0].result.output_token_ids == alone
    rng = random.Random(9)
    crowd = [Request([1] + [rng.randrange(3, 512) for _ in range(rng.randint(1, 60))],
                     sampling_params=SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]),
                                                    max_tokens=rng.randint(1, 40),
                                                    repetition_penalty=rng.choice([1.0, 1.3])))
             for _ in range(7)]
    results = run_requests(executor, crowd[:3] + [target] + crowd[3:])
    assert results[3].result.output_token_ids == alone


def test_penalties_match_greedy_decoding_with_a_plain_loop_over_hugging_face_logits(executor, hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                            presence_penalty=0.4, frequency_penalty=0.3)
    prompt = executor.tokenizer.encode("The cat sat on the mat. The cat")
    got = run_requests(executor, [Request(prompt, sampling_params=params)])[0].result.output_token_ids[0]
    output: list[int] = []
    with torch.no_grad():
        for _ in range(params.max_tokens):
            logits = hf_model(torch.tensor([prompt + output])).logits[0, -1]
            output.append(int(reference_penalties(logits, prompt, output, params).argmax()))
    assert got == output


def test_logprobs_and_prompt_logprobs_are_the_log_softmax_of_reference_logits(executor, hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    prompt = executor.tokenizer.encode(PROMPT)
    result = run_requests(executor, [Request(prompt, sampling_params=params)])[0].result
    output = result.output_token_ids[0]
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([prompt + output])).logits[0].double(), -1)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry, row = result.prompt_logprobs[position], reference[position - 1]
        top = row.topk(2)
        assert set(entry) == set(top.indices.tolist()) | {prompt[position]}
        assert all(abs(entry[t] - row[t].item()) < 1e-4 for t in entry)
    for j, token in enumerate(output):
        row = reference[len(prompt) - 1 + j]
        assert abs(result.log_probs[0][j] - row[token].item()) < 1e-4
        top = row.topk(3)
        assert list(result.top_logprobs[0][j]) == top.indices.tolist()
        assert all(abs(result.top_logprobs[0][j][t] - row[t].item()) < 1e-4 for t in top.indices.tolist())
