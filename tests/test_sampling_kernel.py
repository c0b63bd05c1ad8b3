"""The fused exponential race, the nucleus race and greedy's argmax (kiln.kernels.sampling) against their
plain-PyTorch references.

On a CPU-only machine the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1) at
awkward sizes, and are compiled for Hopper without running; the ``gpu`` cases run them on CUDA at
Llama-3's vocabulary against the reference on the same device. The noise must match bit for bit; the
tokens must be the reference's: the logarithms may round otherwise (numpy's in the interpreter,
libdevice's on the GPU), which could flip only a near-tie within an ulp, and none of these seeded rows
has one; the nucleus race's races per row must be the reference's too (its sums could round a winner
across the cut-off only from within rounding of it, and none is there). The argmax must be torch.argmax's,
exactly: ties, infinities and NaN included.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import DEVICE, ON_GPU, gpu
from kiln.config import SamplingParams
from kiln.kernels.sampling import (_argmax_kernel, _argmax_merge_kernel, _exponential_race_kernel, _nucleus_race_kernel,
                                   _uniform_noise, argmax_ref, argmax_triton, exponential_race_ref,
                                   exponential_race_triton, nucleus_race_ref, nucleus_race_triton, race_splits,
                                   uniform_noise, wrap_int64)
from kiln.kernels.triton_jit import jit, tl
from kiln.runtime import sampler
from kiln.runtime.staging import HostStaging
from test_fp8 import compile_for, compiled_apart
from test_sampling import make_row

pytest.importorskip("triton")


# Seeds at the ends of int64 and either side of 0; steps up to past 32 bits.
SEEDS = [0, 1, -1, 2**63 - 1, -(2**63), 2**62 + 12345, -987654321987, 31337]
STEPS = [0, 1, 17, 2**40 + 3, 5, 0, 1000, 2**31]


@jit
def _noise_probe_kernel(seeds_ptr, steps_ptr, out_ptr, vocab_size, BLOCK: tl.constexpr):
    """The race kernel's u, written out: row r's (seed, step) over every token."""
    row = tl.program_id(0)
    seed = tl.load(seeds_ptr + row)
    step = tl.load(steps_ptr + row)
    for start in range(0, vocab_size, BLOCK):
        token = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + row * vocab_size + token, _uniform_noise(seed, step, token), mask=token < vocab_size)


def race_case(num_rows: int, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled logits as the sampler passes them (bfloat16 values, so equal logits abound; about a third
    masked to -inf, as top-k / top-p / min-p leave them), seeds and steps."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab_size, generator=gen) * 3).bfloat16().float()
    logits[torch.rand(num_rows, vocab_size, generator=gen) < 0.3] = float("-inf")
    seeds = torch.tensor([wrap_int64(SEEDS[i % len(SEEDS)] + i // len(SEEDS)) for i in range(num_rows)])
    steps = torch.tensor([STEPS[i % len(STEPS)] for i in range(num_rows)])
    return logits.to(DEVICE), seeds.to(DEVICE), steps.to(DEVICE)


def test_kernel_noise_is_bit_identical_to_uniform_noise():
    vocab = 1031
    seeds, steps = torch.tensor(SEEDS, device=DEVICE), torch.tensor(STEPS, device=DEVICE)
    out = torch.full((len(SEEDS), vocab), float("nan"), device=DEVICE)
    _noise_probe_kernel[(len(SEEDS),)](seeds, steps, out, vocab, BLOCK=256)
    assert torch.equal(out.view(torch.int32), uniform_noise(seeds, steps, vocab).view(torch.int32))


# (BLOCK, num_splits): the default; one program per row looping over several blocks; splits over a
# vocabulary they do not divide; as many splits as race_splits picks for this machine; one block each.
RACE_CONFIGS = [{}, {"BLOCK": 128, "num_splits": 1}, {"BLOCK": 128, "num_splits": 3}, {"BLOCK": 64},
                {"BLOCK": 64, "num_splits": 17}]


@pytest.mark.parametrize("config", RACE_CONFIGS, ids=["default", "one_split", "three_splits", "block64", "block_per_split"])
@pytest.mark.parametrize("num_rows,vocab_size", [(1, 1000), (3, 1031), (5, 1000), (5, 1031)])
def test_exponential_race_matches_the_reference(num_rows, vocab_size, config):
    logits, seeds, steps = race_case(num_rows, vocab_size)
    assert torch.equal(exponential_race_triton(logits, seeds, steps, **config),
                       exponential_race_ref(logits, seeds, steps))


def test_masked_tokens_never_win_and_equal_keys_take_the_lowest_token():
    """Rows with a single finite logit, anywhere in any split, take it; rows of nothing but -inf (every
    key equal) take token 0, as torch.argmax does, through the splits' reduction too."""
    vocab = 1031
    logits, seeds, steps = race_case(6, vocab)
    logits[:4] = float("-inf")
    for row, token in enumerate((0, 129, 500, 1030)):
        logits[row, token] = -50.0
    for config in RACE_CONFIGS:
        tokens = exponential_race_triton(logits, seeds, steps, **config)
        assert tokens[:4].tolist() == [0, 129, 500, 1030]
    logits[4:] = float("-inf")
    for config in RACE_CONFIGS:
        assert exponential_race_triton(logits, seeds, steps, **config)[4:].tolist() == [0, 0]
    assert exponential_race_ref(logits, seeds, steps)[4:].tolist() == [0, 0]


def test_splits_fill_two_waves_of_sms_within_the_blocks_of_a_row():
    assert race_splits(512, 128256, 2048, 132) == 1
    assert race_splits(64, 128256, 2048, 132) == 5
    assert race_splits(1, 128256, 2048, 132) == 63   # one per block of the row
    assert race_splits(1, 1000, 1024, 132) == 1


def sampled_rows(num_rows: int) -> list[sampler.SamplingRow]:
    """A mixed batch: greedy rows (one with a min_tokens mask), temperature alone, top-k / top-p / min-p,
    a penalty."""
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.95),
              SamplingParams(temperature=1.3, top_k=50, min_p=0.05), SamplingParams(temperature=0.0, min_tokens=9),
              SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=7, top_p=0.6),
              SamplingParams(temperature=0.9, repetition_penalty=1.2)]
    return [make_row(params[i % len(params)], token_ids=(1, 2, 3, 4 + i), num_prompt_tokens=3, seed=SEEDS[i % 8] + i,
                     stop_ids=(2,)) for i in range(num_rows)]


def sample_both_ways(logits: torch.Tensor, rows: list[sampler.SamplingRow], monkeypatch
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """sample() with the kernels, then with the references, for the races and the argmax on the logits'
    device."""
    with monkeypatch.context() as patch:
        patch.setattr(sampler, "exponential_race_ref", exponential_race_triton)
        patch.setattr(sampler, "nucleus_race_ref", nucleus_race_triton)
        patch.setattr(sampler, "argmax_ref", argmax_triton)
        with_kernel = sampler.sample(logits, rows, HostStaging(logits.device))
    with monkeypatch.context() as patch:
        patch.setattr(sampler, "exponential_race_triton", exponential_race_ref)
        patch.setattr(sampler, "nucleus_race_triton", nucleus_race_ref)
        patch.setattr(sampler, "argmax_triton", argmax_ref)
        with_reference = sampler.sample(logits, rows, HostStaging(logits.device))
    return with_kernel, with_reference


def nucleus_rows(num_rows: int) -> list[sampler.SamplingRow]:
    """A batch without top-k, so the nucleus race draws it: greedy, temperature alone, top-p, min-p."""
    return [row for row in sampled_rows(num_rows) if row.params.top_k == 0]


@pytest.mark.parametrize("rows", [sampled_rows, nucleus_rows], ids=["with_top_k", "without_top_k"])
@pytest.mark.parametrize("num_rows,vocab_size", [(3, 1031), (7, 1000)])
def test_sample_with_the_kernel_matches_the_reference_greedy_rows_mixed_in(num_rows, vocab_size, rows, monkeypatch):
    rows = rows(num_rows)
    logits, _, _ = race_case(len(rows), vocab_size)
    logits = logits.nan_to_num(neginf=-30.0)  # model logits are finite
    with_kernel, with_reference = sample_both_ways(logits, rows, monkeypatch)
    assert torch.equal(with_kernel, with_reference)
    greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
    assert with_kernel[greedy[0]] == logits[greedy[0]].argmax()


def nucleus_case(num_rows: int, vocab_size: int, seed: int = 0):
    """race_case's logits (bfloat16 values, a third -inf), alternately flat (a wide nucleus: first winners
    outside it often, several races) and peaked, with each row's top-p and log min-p."""
    logits, seeds, steps = race_case(num_rows, vocab_size, seed)
    logits = logits * torch.where(torch.arange(num_rows, device=DEVICE) % 2 == 0, 0.1, 1.5)[:, None]
    return logits.bfloat16().float(), seeds, steps


def nucleus_params(num_rows: int, top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's top-p and log min-p, as the sampler passes them."""
    return torch.full((num_rows,), top_p, device=DEVICE), torch.full((num_rows,), min_p, device=DEVICE).log()


@pytest.mark.parametrize("block", [2048, 128], ids=["one_block", "blocks"])
@pytest.mark.parametrize("min_p", [0.0, 0.05])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("num_rows,vocab_size", [(1, 1000), (3, 1031), (5, 1000)])
def test_nucleus_race_matches_the_reference(num_rows, vocab_size, top_p, min_p, block):
    logits, seeds, steps = nucleus_case(num_rows, vocab_size, seed=num_rows)
    top_p, log_min_p = nucleus_params(num_rows, top_p, min_p)
    tokens, races = nucleus_race_triton(logits, top_p, log_min_p, seeds, steps, BLOCK=block)
    ref_tokens, ref_races = nucleus_race_ref(logits, top_p, log_min_p, seeds, steps)
    assert torch.equal(tokens, ref_tokens) and torch.equal(races, ref_races)


def test_nucleus_race_loops_and_falls_back_at_its_cap_as_the_reference():
    """Rows whose first winners are outside (top-p 0.2 over flat rows) run several races, as many as the
    reference's; capped at 2, the rows still outside take their most likely token, in both; rows of -inf
    alone take token 0."""
    logits, seeds, steps = nucleus_case(5, 1031, seed=7)
    logits[4] = float("-inf")
    top_p, log_min_p = torch.full((5,), 0.2, device=DEVICE), torch.full((5,), 0.01, device=DEVICE).log()
    for max_races in (64, 2):
        tokens, races = nucleus_race_triton(logits, top_p, log_min_p, seeds, steps, max_races=max_races, BLOCK=256)
        ref_tokens, ref_races = nucleus_race_ref(logits, top_p, log_min_p, seeds, steps, max_races=max_races)
        assert torch.equal(tokens, ref_tokens) and torch.equal(races, ref_races)
        assert tokens[4] == 0 and races[4] == 1
    uncapped, uncapped_races = nucleus_race_ref(logits, top_p, log_min_p, seeds, steps)
    assert uncapped_races.max() > 2
    assert torch.equal(tokens, torch.where(uncapped_races <= 2, uncapped, logits.argmax(-1)))


def test_a_top_p_below_rounding_keeps_the_tokens_tied_for_most_likely():
    """1 - 1e-9 is 1 in float32: no mass is above it, yet the most likely tokens (here two, tied) stay, and
    only they: both are drawn, by the first race or by the second, over the tokens above its winner."""
    logits = torch.full((64, 1000), -2.0, device=DEVICE)
    logits[:, 10] = logits[:, 700] = 3.0
    seeds, steps = torch.arange(64, device=DEVICE), torch.zeros(64, dtype=torch.int64, device=DEVICE)
    top_p, log_min_p = nucleus_params(64, 1e-9, 0.0)
    tokens, races = nucleus_race_triton(logits, top_p, log_min_p, seeds, steps)
    assert set(tokens.tolist()) == {10, 700} and races.max() == 2
    ref_tokens, ref_races = nucleus_race_ref(logits, top_p, log_min_p, seeds, steps)
    assert torch.equal(tokens, ref_tokens) and torch.equal(races, ref_races)


# ---- greedy's argmax ------------------------------------------------------------------------------
ARGMAX_CONFIG_IDS = ["default", "one_split", "three_splits", "block64", "block_per_split"]  # RACE_CONFIGS'


@pytest.mark.parametrize("config", RACE_CONFIGS, ids=ARGMAX_CONFIG_IDS)
@pytest.mark.parametrize("num_rows,vocab_size", [(1, 1000), (5, 1000), (1, 1031), (5, 1031)])
def test_argmax_matches_torch(num_rows, vocab_size, config):
    """race_case's logits: bfloat16 values (equal ones abound), a third -inf."""
    logits, _, _ = race_case(num_rows, vocab_size, seed=vocab_size + num_rows)
    assert torch.equal(argmax_triton(logits, **config), argmax_ref(logits))


@pytest.mark.parametrize("num_rows", [1, 2])
def test_argmax_matches_torch_at_llama3_vocabulary(num_rows):
    """128256 tokens: 32 splits of 4096 in a row (31 and a part), the maximum repeated across a split's boundary
    and within one split, in row 0."""
    logits, _, _ = race_case(num_rows, 128256, seed=num_rows)
    logits[0, [4096 * 20 - 1, 4096 * 20, 4096 * 20 + 7, 128255]] = 100.0
    tokens = argmax_triton(logits)
    assert torch.equal(tokens, argmax_ref(logits)) and tokens[0] == 4096 * 20 - 1


def placed(values: dict[int, float], vocab_size: int = 1031, fill: float = 0.0) -> list[float]:
    """A row of ``fill`` with ``values`` at their tokens."""
    row = [fill] * vocab_size
    for token, value in values.items():
        row[token] = value
    return row


def assert_argmax(rows: list[list[float]], expected: list[int]) -> None:
    """Every config's argmax and torch's are ``expected``."""
    logits = torch.tensor(rows, device=DEVICE)
    assert argmax_ref(logits).tolist() == expected
    for config in RACE_CONFIGS:
        assert argmax_triton(logits, **config).tolist() == expected, config


def test_argmax_takes_the_first_of_equal_maxima_across_lanes_blocks_and_splits():
    """Ties at the maximum: either side of a block (and, at BLOCK 64 a split each, of a split) boundary; in one
    lane across blocks (one program looping); in the last, partial block; first token against the last; and
    below the maximum only (a tie there is not the answer)."""
    low = {t: -1.0 - t / 2048 for t in range(1031)}  # distinct, below the maxima
    assert_argmax([placed({**low, 64: 7.0, 63: 7.0, 200: 7.0, 1030: 7.0}),
                   placed({**low, 5 + 128: 3.0, 5: 3.0, 5 + 64: 3.0}),
                   placed({**low, 1030: 2.0, 1000: 2.0}),
                   placed({**low, 0: 1.0, 1030: 1.0, 512: 1.0}),
                   placed({**low, 300: 5.0, 10: 4.0, 20: 4.0})], [63, 5, 1000, 0, 300])


def test_argmax_of_infinities_and_signed_zeros_is_torchs():
    """Rows of -inf alone take token 0; a single finite logit among -inf anywhere wins; +inf ties take the first;
    -0.0 and 0.0 are equal (the first wins, whichever sign it has)."""
    inf = float("inf")
    assert_argmax([placed({}, fill=-inf), placed({1030: -1e30}, fill=-inf), placed({65: -5.0}, fill=-inf),
                   placed({700: inf, 90: inf, 1000: inf}), placed({3: -0.0, 4: 0.0}, fill=-1.0),
                   placed({3: 0.0, 4: -0.0}, fill=-1.0), placed({640: -0.0, 70: 0.0}, fill=-inf)],
                  [0, 1030, 65, 90, 3, 3, 70])


def test_argmax_takes_nan_as_the_maximum_as_torch_does():
    """A NaN beats +inf, and the first NaN wins, whatever its sign and wherever the others are: the same lane
    in a later block, another split, before or after it."""
    inf, nan = float("inf"), float("nan")
    assert_argmax([placed({5: inf, 900: nan}), placed({700: -nan, 60: nan, 61: -nan}),
                   placed({5 + 64: nan, 5: -nan, 1030: nan}), placed({1030: nan}, fill=-inf),
                   placed({0: nan, 1: inf}), placed({1000: -nan, 200: inf, 300: -inf})],
                  [900, 60, 5, 1030, 0, 1000])


def test_greedy_rows_take_the_argmax_kernel(monkeypatch):
    """sample() runs argmax_triton for plain greedy batches, for greedy rows with a min_tokens mask, and beside
    the races for greedy rows mixed in (torch.argmax's tokens); not in a batch with no greedy row."""
    logits, _, _ = race_case(6, 1031)
    logits[:, [10, 900]] = 50.0  # a tie at the maximum in every row
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return argmax_triton(x)

    monkeypatch.setattr(sampler, "argmax_ref", counted)
    plain = [make_row(SamplingParams(temperature=0.0)) for _ in range(6)]
    assert sampler.sample(logits, plain, HostStaging(DEVICE)).tolist() == [10] * 6
    masked = [make_row(SamplingParams(temperature=0.0, min_tokens=5), stop_ids=(10,)) for _ in range(6)]
    assert sampler.sample(logits, masked, HostStaging(DEVICE)).tolist() == [900] * 6
    mixed = [make_row(SamplingParams(temperature=0.0 if i % 2 else 0.9, top_p=0.5), seed=i) for i in range(6)]
    assert sampler.sample(logits, mixed, HostStaging(DEVICE))[1::2].tolist() == [10] * 3
    assert calls == [6, 6, 6]
    sampler.sample(logits, [make_row(SamplingParams(temperature=0.9), seed=i) for i in range(6)], HostStaging(DEVICE))
    assert calls == [6, 6, 6]


# ---- compiled for the GPU, without one -----------------------------------------------------------
def compile_race_kernels_for_hopper() -> list[str]:
    """The PTX of the plain and the nucleus race kernels for sm90 at their default launch config."""
    return [
        compile_for(_exponential_race_kernel, 90, {
            "logits_ptr": "*fp32", "logits_row_stride": "i32", "seeds_ptr": "*i64", "steps_ptr": "*i64",
            "keys_ptr": "*fp32", "tokens_ptr": "*i64", "vocab_size": "i32", "tokens_per_split": "i32"},
            {"BLOCK": 2048}, num_warps=8, num_stages=1),
        compile_for(_nucleus_race_kernel, 90, {
            "logits_ptr": "*fp32", "logits_row_stride": "i32", "seeds_ptr": "*i64", "steps_ptr": "*i64",
            "top_p_ptr": "*fp32", "log_min_p_ptr": "*fp32", "tokens_ptr": "*i64", "races_ptr": "*i32",
            "vocab_size": "i32"}, {"BLOCK": 2048, "MAX_RACES": 64}, num_warps=8, num_stages=1)]


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the kernel itself")
def test_race_kernel_compiles_for_hopper_with_wide_loads_and_libdevice_logarithms(tmp_path):
    """What the interpreter cannot show: the uint64 hash passes Triton's and ptxas's pipeline for sm90,
    the logits are read 16 bytes per load, and tl.log is libdevice's logf (torch's CUDA log calls logf),
    not the hardware's lg2.approx. In a process of its own, without the interpreter."""
    kernels = compiled_apart(tmp_path, "test_sampling_kernel", "compile_race_kernels_for_hopper()")
    for ptx in kernels:  # the nucleus race's loop on the GPU compiles too
        assert "ld.global.v4" in ptx and "__nv_logf" in ptx and "lg2.approx" not in ptx and ".local" not in ptx


def compile_argmax_kernels_for_ada_and_hopper() -> dict[str, dict[str, str]]:
    """The PTX of the argmax's two kernels at their default launch config, for sm89 and sm90 (PDL on)."""
    return {str(capability): {
        "argmax": compile_for(_argmax_kernel, capability, {
            "logits_ptr": "*fp32", "logits_row_stride": "i32", "out_ptr": "*i64", "vocab_size": "i32",
            "tokens_per_split": "i32"}, {"BLOCK": 4096}, num_warps=8, num_stages=1),
        "merge": compile_for(_argmax_merge_kernel, capability, {
            "keys_ptr": "*i64", "tokens_ptr": "*i64", "num_splits": "i32"}, {"BLOCK_SPLITS": 32}, num_warps=1,
            num_stages=1)} for capability in (89, 90)}


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the kernels themselves")
def test_argmax_kernels_compile_wait_for_their_producer_and_read_16_bytes_per_load(tmp_path):
    """As tests/test_pdl.py checks the decode step's kernels: for sm90 each waits (griddepcontrol.wait) before
    it reads or writes global memory and before it lets the next kernel launch; for sm89 neither instruction
    is there. The logits are read 16 bytes per load, nothing spills."""
    ptx = compiled_apart(tmp_path, "test_sampling_kernel", "compile_argmax_kernels_for_ada_and_hopper()")
    for name, code in ptx["89"].items():
        assert "griddepcontrol" not in code and ".local" not in code, name
    for name, code in ptx["90"].items():
        wait, launch = code.find("griddepcontrol.wait"), code.find("griddepcontrol.launch_dependents")
        assert 0 <= wait < launch, name
        assert not re.search(r"ld\.global|st\.global|cp\.async|atom\.|red\.", code[:wait]), name
        assert ".local" not in code, name
    assert "ld.global.v4.b32" in ptx["90"]["argmax"] and "ld.global.v4.b32" in ptx["89"]["argmax"]


# ---- GPU, at Llama-3's vocabulary ----------------------------------------------------------------
@gpu
@pytest.mark.parametrize("num_rows", [1, 7, 64, 512])
def test_gpu_exponential_race_matches_the_reference_on_the_device(num_rows):
    logits, seeds, steps = race_case(num_rows, 128256)
    assert torch.equal(exponential_race_triton(logits, seeds, steps), exponential_race_ref(logits, seeds, steps))


@gpu
@pytest.mark.parametrize("rows", [sampled_rows, nucleus_rows], ids=["with_top_k", "without_top_k"])
def test_gpu_sample_with_the_kernel_matches_the_reference_greedy_rows_mixed_in(rows, monkeypatch):
    rows = rows(64)
    logits, _, _ = race_case(len(rows), 128256)
    with_kernel, with_reference = sample_both_ways(logits.nan_to_num(neginf=-30.0), rows, monkeypatch)
    assert torch.equal(with_kernel, with_reference)


@gpu
@pytest.mark.parametrize("top_p,min_p", [(0.95, 0.0), (0.5, 0.05), (1.0, 0.05)])
@pytest.mark.parametrize("num_rows", [1, 7, 512])
def test_gpu_nucleus_race_matches_the_reference_on_the_device(num_rows, top_p, min_p):
    logits, seeds, steps = nucleus_case(num_rows, 128256)
    top_p, log_min_p = nucleus_params(num_rows, top_p, min_p)
    tokens, races = nucleus_race_triton(logits, top_p, log_min_p, seeds, steps)
    ref_tokens, ref_races = nucleus_race_ref(logits, top_p, log_min_p, seeds, steps)
    assert torch.equal(tokens, ref_tokens) and torch.equal(races, ref_races)


@gpu
def test_gpu_race_kernels_compiled_at_load_serve_staged_rows_of_any_batch_without_compiling():
    """compile_race at load covers the sampled steps after it: the per-row parameters come from the staging
    buffer at offsets of any alignment, and batch sizes change the grid and the splits, none of which the
    kernels are specialized on (a first sampled step used to compile both again: ~0.85 s of a 128/128 run);
    nor is greedy's argmax, split at one row and not at 511."""
    logits = torch.randn(512, 128256, device=DEVICE)
    sampler.compile_race(logits)

    def compiled() -> int:
        device = torch.cuda.current_device()
        return sum(len(kernel.device_caches[device][0]) for kernel in (
            _exponential_race_kernel, _nucleus_race_kernel, _argmax_kernel, _argmax_merge_kernel))

    before = compiled()
    staging = HostStaging(DEVICE, capacity=1 << 16)
    for num_rows in (1, 3, 64, 511):
        staging.next_step()
        _, seeds, steps = staging.tensors(torch.int64, [0], list(range(num_rows)), [5] * num_rows)  # odd offsets
        _, top_p, log_min_p = staging.tensors(torch.float32, [0.0], [0.9] * num_rows, [-5.0] * num_rows)
        exponential_race_triton(logits[:num_rows], seeds, steps)
        nucleus_race_triton(logits[:num_rows], top_p, log_min_p, seeds, steps)
        argmax_triton(logits[:num_rows])
    assert compiled() == before


@gpu
@pytest.mark.parametrize("num_rows", [1, 512])
def test_gpu_argmax_matches_torch_on_the_device(num_rows):
    """Llama-3's vocabulary, race_case's logits (bfloat16 values, a third -inf), and in some rows the maximum
    repeated across splits, a NaN, or -inf alone."""
    logits, _, _ = race_case(num_rows, 128256)
    logits[0, [128255, 4096 * 7, 4096 * 7 - 1, 50000]] = 100.0
    if num_rows > 1:
        logits[1, [90000, 70000]] = float("nan")
        logits[2] = float("-inf")
        logits[3, 4096 * 31:] = float("inf")
    tokens = argmax_triton(logits)
    assert torch.equal(tokens, logits.argmax(dim=-1)) and tokens.dtype == torch.int64
    assert tokens[0] == 4096 * 7 - 1


@gpu
@pytest.mark.parametrize("num_rows", [1, 512])
def test_gpu_argmax_in_a_cuda_graph_follows_its_input(num_rows):
    """Captured once, replayed over new logits: no host sync or data-dependent launch inside."""
    logits = torch.randn(num_rows, 128256, device=DEVICE)
    argmax_triton(logits)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = argmax_triton(logits)
    for i in range(5):
        logits.copy_(race_case(num_rows, 128256, seed=i)[0])
        graph.replay()
        assert torch.equal(tokens, logits.argmax(dim=-1)), i
