"""The exponential race that draws a sampled token, fused: noise, keys and argmax in one pass over the
logits.

Token i of a row wins with probability p_i = softmax(l)_i when the row takes argmax_i p_i / E_i with
E_i ~ Exp(1) independent. In the Gumbel form, argmax_i (l_i - log E_i), that needs no softmax (p_i =
exp(l_i - log Z), and log Z is the same for every token) and a masked logit (-inf) never wins. E_i =
-log u_i, u_i from splitmix64 of (seed, step, token): a counter-based hash, so a seeded row draws the
same noise whatever else is in the batch, on any device.

``exponential_race_ref`` is the plain-PyTorch path (the CPU's, and the oracle); ``exponential_race_triton``
computes the same u bit for bit inside the kernel (nothing [rows, vocab] but the logits is read or
written) and the same keys up to the rounding of its logarithms, so the two agree but at near-ties. On
equal keys both take the lowest token id, as torch.argmax does.

``nucleus_race_triton`` / ``nucleus_race_ref`` draw from a top-p nucleus and min-p floor without sorting:
with the same keys, a winner outside is rejected and the race run again over the tokens more likely than it,
until a winner is inside -- the largest key inside, the draw of masking then racing. Their acceptance sums
(the row's mass, the mass not above the winner) round differently on the two sides, so they agree but for a
winner whose mass lies within rounding of the cut-off.

``argmax_triton`` is greedy decoding's argmax, torch.argmax's answer (the lowest index of the maximum, a NaN
above everything) in a few microseconds for one row of Llama-3's logits, where torch's reduction takes ~30;
``argmax_ref`` is torch's, the CPU's path.
"""

from __future__ import annotations

import torch

from kiln.kernels.triton_jit import count_sms, jit, next_power_of_2, pdl_launch, tl, wait_for_producer

# splitmix64 (Steele, Lea, Flood 2014): the increments that spread seed, step and token over 64 bits, then
# the finalizer's multipliers and shifts.
SPLITMIX64_SEED, SPLITMIX64_STEP, SPLITMIX64_TOKEN = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
SPLITMIX64_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
SPLITMIX64_SHIFTS = (30, 27, 31)
# u = (the top 23 bits + 0.5) / 2**23: k + 0.5 is exact in float32 and u < 1. With 24 bits the largest
# value rounded to 1.0, whose exponential (0) made that token win the race whatever its probability.
NOISE_BITS = 23


def wrap_int64(x: int) -> int:
    """x modulo 2**64 as the int64 of those bits: a seed of any size, an unsigned constant (torch has no
    uint64 arithmetic)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _xor_shift_right_(x: torch.Tensor, shift: int) -> None:
    """x ^= x >>> shift in place, the shift logical (torch's >> of int64 is arithmetic: the sign bits masked off)."""
    shifted = x >> shift
    shifted &= (1 << (64 - shift)) - 1
    x ^= shifted


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] float32 u in (0, 1) of splitmix64(seed * SEED + step * STEP + token * TOKEN) for seeds and steps
    [N] int64 (the bits of their uint64 values); int64 arithmetic wraps as uint64's does. In place after
    the first product: on the CPU the passes over [N, V] int64 are the sampler's largest cost."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = (seeds[:, None] * wrap_int64(SPLITMIX64_SEED) + steps[:, None] * wrap_int64(SPLITMIX64_STEP)) \
        + token[None, :] * wrap_int64(SPLITMIX64_TOKEN)
    first, second, last = SPLITMIX64_SHIFTS
    _xor_shift_right_(x, first)
    x *= wrap_int64(SPLITMIX64_MULTIPLIERS[0])
    _xor_shift_right_(x, second)
    x *= wrap_int64(SPLITMIX64_MULTIPLIERS[1])
    _xor_shift_right_(x, last)
    x >>= 64 - NOISE_BITS
    x &= (1 << NOISE_BITS) - 1
    u = x.float()
    u += 0.5
    u *= 1.0 / (1 << NOISE_BITS)
    return u


def race_keys(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[N, V] the race's keys l_i - log(-log u_i) (``_race_key`` in the kernels)."""
    log_e = uniform_noise(seeds, steps, logits.shape[-1])
    log_e.log_().neg_().log_()  # log E = log(-log u), in place
    return logits - log_e


def exponential_race_ref(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """logits [N, V] float32 (temperature applied, masked tokens -inf), seeds and steps [N] int64 -> [N]
    int64: argmax_i (l_i - log(-log u_i)), a draw from softmax(l) per row."""
    return race_keys(logits, seeds, steps).argmax(dim=-1)


# The constants as Triton sees them: plain ints inside a kernel must be constexpr globals. Literals of
# 2**63 and above are uint64 there, so the products wrap as splitmix64's do.
if tl is not None:
    _SEED, _STEP, _TOKEN = (tl.constexpr(c) for c in (SPLITMIX64_SEED, SPLITMIX64_STEP, SPLITMIX64_TOKEN))
    _MULTIPLIER_1, _MULTIPLIER_2 = (tl.constexpr(c) for c in SPLITMIX64_MULTIPLIERS)
    _SHIFT_1, _SHIFT_2, _SHIFT_3 = (tl.constexpr(s) for s in SPLITMIX64_SHIFTS)
    _NOISE_SHIFT, _NOISE_SCALE = tl.constexpr(64 - NOISE_BITS), tl.constexpr(1.0 / (1 << NOISE_BITS))


@jit
def _uniform_noise(seed, step, token):
    """uniform_noise's u for scalars seed, step (int64) and a block of token ids, in uint64 (whose >> is
    logical and whose products wrap)."""
    x = seed.to(tl.uint64, bitcast=True) * _SEED + step.to(tl.uint64, bitcast=True) * _STEP \
        + token.to(tl.uint64) * _TOKEN
    x = x ^ (x >> _SHIFT_1)
    x = x * _MULTIPLIER_1
    x = x ^ (x >> _SHIFT_2)
    x = x * _MULTIPLIER_2
    x = x ^ (x >> _SHIFT_3)
    return ((x >> _NOISE_SHIFT).to(tl.float32) + 0.5) * _NOISE_SCALE


@jit
def _race_key(logit, seed, step, token):
    """race_keys' key of a block of tokens: l - log(-log u)."""
    return logit - tl.log(-tl.log(_uniform_noise(seed, step, token)))


@jit
def _row_block(row_ptr, block_start, lanes, end):
    """A block of the row's tokens from block_start, one per lane, and their logits (-inf from end on)."""
    token = block_start + lanes
    return token, tl.load(row_ptr + token, mask=token < end, other=float("-inf"))


@jit
def _keep_better(is_better, value, token, best, best_token):
    """Each lane's best so far: (value, token) where ``is_better``, else what it kept."""
    return tl.where(is_better, value, best), tl.where(is_better, token, best_token)


@jit
def _race_pass(row_ptr, seed, step, start, end, threshold, floor, BLOCK: tl.constexpr):
    """The largest key over the row's tokens [start, end) with a logit above ``threshold`` and at least
    ``floor`` (-inf and -inf: every token), and its token (the lowest of equal keys; ``start`` where every
    key is -inf). Each lane keeps its own best through the loop (a later token only replaces an earlier
    one with a larger key); one reduction at the end."""
    lanes = tl.arange(0, BLOCK)
    best_key = tl.full([BLOCK], float("-inf"), tl.float32)
    best_token = start + lanes
    for block_start in range(start, end, BLOCK):
        token, logit = _row_block(row_ptr, block_start, lanes, end)
        key = tl.where((logit > threshold) & (logit >= floor), _race_key(logit, seed, step, token), float("-inf"))
        best_key, best_token = _keep_better(key > best_key, key, token, best_key, best_token)
    top = tl.max(best_key, axis=0)
    return top, tl.min(tl.where(best_key == top, best_token, end), axis=0)


# The per-row parameters are views into the runtime's staging buffer at any offset: not specialized on
# alignment, or the first sampled step of another batch size would compile the kernel again (~0.85 s of
# one 128/128 run on the H200, 2026-12-03).
@jit(do_not_specialize_on_alignment=["seeds_ptr", "steps_ptr"])
def _exponential_race_kernel(logits_ptr, logits_row_stride, seeds_ptr, steps_ptr, keys_ptr, tokens_ptr, vocab_size,
                             tokens_per_split, BLOCK: tl.constexpr):
    """Program (row, split): the largest key l_i - log(-log u_i) over the split's tokens [split *
    tokens_per_split, + tokens_per_split) and its token (the lowest of equal keys), into keys / tokens
    [rows, splits]."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    start = split * tokens_per_split
    top, token = _race_pass(logits_ptr + row * logits_row_stride, tl.load(seeds_ptr + row), tl.load(steps_ptr + row),
                            start, tl.minimum(start + tokens_per_split, vocab_size), float("-inf"), float("-inf"),
                            BLOCK)
    tl.store(keys_ptr + row * num_splits + split, top)
    tl.store(tokens_ptr + row * num_splits + split, token)


# Tokens per loop step and warps, before any tuning: 2048 float32 logits over 8 warps is 8 per thread
# (two 16-byte loads); with the 64-bit hash it compiles for sm90 in 58 registers per thread without
# spills (ptxas -v, Triton 3.9), so 4 programs fit an SM. Splits: as many as fill two waves of the
# SMs. A decode batch of 512 rows is 512 programs already: one split each. One row of Llama-3's 128256
# logits in one program would be 63 blocks of 8 KB read one after another (an estimated 20-40 us); split,
# it is 63 programs of one block, then a torch argmax over 63 keys. Chosen by that arithmetic, not
# timed: a GPU run should sweep BLOCK, num_warps and the splits at batch 1 and 512.
DEFAULT_RACE_CONFIG = {"BLOCK": 2048, "num_warps": 8}


def race_splits(num_rows: int, vocab_size: int, block: int, num_sms: int) -> int:
    """Splits per row: until the programs fill two waves of the SMs, at most one per BLOCK of tokens."""
    wanted = -(-2 * num_sms // num_rows)
    return max(1, min(wanted, -(-vocab_size // block)))


def split_rows(logits: torch.Tensor, BLOCK: int, num_splits: int | None) -> tuple[int, int, int]:
    """How a kernel that splits each row of ``logits`` [N, V] into runs of whole blocks launches: (block,
    splits, tokens per split). The block is BLOCK or the vocabulary's next power of two if smaller; the
    splits ``num_splits`` (default: ``race_splits``), fewer where some would be empty."""
    num_rows, vocab_size = logits.shape
    block = min(BLOCK, next_power_of_2(vocab_size))
    if num_splits is None:
        num_splits = race_splits(num_rows, vocab_size, block, count_sms(logits.device))
    num_blocks = -(-vocab_size // block)
    blocks_per_split = -(-num_blocks // num_splits)
    return block, -(-num_blocks // blocks_per_split), blocks_per_split * block


def exponential_race_triton(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                            BLOCK: int = DEFAULT_RACE_CONFIG["BLOCK"],
                            num_warps: int = DEFAULT_RACE_CONFIG["num_warps"],
                            num_splits: int | None = None) -> torch.Tensor:
    """As exponential_race_ref. ``num_splits`` (default: ``race_splits``) programs per row, each over a
    contiguous run of tokens; above one, a torch argmax over the splits' best keys picks the row's (the first
    of equal keys: the lowest token)."""
    num_rows, vocab_size = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    assert seeds.dtype == steps.dtype == torch.int64
    block, num_splits, tokens_per_split = split_rows(logits, BLOCK, num_splits)
    keys = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)
    tokens = torch.empty(num_rows, num_splits, dtype=torch.int64, device=logits.device)
    _exponential_race_kernel[(num_rows, num_splits)](
        logits, logits.stride(0), seeds, steps, keys, tokens, vocab_size, tokens_per_split, BLOCK=block,
        num_warps=num_warps)
    if num_splits == 1:
        return tokens[:, 0]
    return tokens.gather(1, keys.argmax(dim=1, keepdim=True))[:, 0]


# ---- top-p and min-p by rejection, without a sort ---------------------------------------------------
# Races a row may run before it gives up and takes its most likely token (in the nucleus, but not the
# exact draw). Each winner has a larger key than every token more likely than it (they all ran in its
# race), so the winners are among the prefix maxima of the keys scanned from the most likely token
# down. For a flat row (the slowest: falling logits make later maxima rarer) those number H_V on average,
# 12.3 at Llama-3's 128256 tokens, and 64 or more has a probability under 1e-23 (Chernoff): the cap
# bounds the loop, it is not meant to be reached. The first winner is outside the nucleus with about the
# mass outside (1 - top_p): most rows take one race.
NUCLEUS_MAX_RACES = 64


def nucleus_accepts(winner_logit, top_logit, floor, tail_mass, total_mass, top_p):
    """Whether a race's winner lies in the row's nucleus: its logit at least min-p's floor (l_max +
    log min_p), and, for top_p < 1, the mass of the tokens not more likely than it (logit <= the winner's)
    above 1 - top_p of the row's, i.e. the mass strictly more likely below top_p. A most likely token always
    is (whatever the sums' rounding: so a later race, over the tokens above a rejected winner, is never
    empty). Torch tensors, or a kernel's scalars as ``_nucleus_accepts``."""
    return (winner_logit >= floor) & ((top_p >= 1.0) | (winner_logit == top_logit)
                                      | (tail_mass > (1.0 - top_p) * total_mass))


def nucleus_race_ref(logits: torch.Tensor, top_p: torch.Tensor, log_min_p: torch.Tensor, seeds: torch.Tensor,
                     steps: torch.Tensor, max_races: int = NUCLEUS_MAX_RACES) -> tuple[torch.Tensor, torch.Tensor]:
    """The race restricted to each row's top-p nucleus and min-p floor, by rejection: the winner over all
    tokens is the answer if it is inside; if not, the race runs again, with the same keys, over the tokens
    more likely than the winner, and so on. The keys being fixed per token, the last winner is the largest
    key inside, the token that masking the row and then racing it would draw. logits [N, V] float32
    (temperature applied), top_p and log_min_p [N] float32, seeds and steps [N] int64 -> tokens [N] int64
    and races run per row [N] int32 (a row still outside after ``max_races`` takes its most likely token).
    The CPU's path and the oracle of ``nucleus_race_triton``."""
    keys = race_keys(logits, seeds, steps)
    # max(dim) for argmax: the first of tied maxima too (as documented, and as the kernel takes), and on the
    # CPU a third of argmax's time.
    top_logit, top_token = logits.max(dim=-1)
    floor = top_logit + log_min_p
    token = keys.max(dim=-1).indices
    if not bool((top_p < 1.0).any()):
        # Min-p alone: the floor is the nucleus, so a first winner below it is followed by the race over
        # the tokens at or above it (all above the winner), the last.
        below_floor = logits.gather(-1, token[:, None])[:, 0] < floor
        return keys.masked_fill_(logits < floor[:, None], float("-inf")).max(dim=-1).indices, 1 + below_floor.int()
    weights = (logits - top_logit[:, None]).exp_()
    total_mass = weights.sum(dim=-1)
    races = torch.ones(logits.shape[0], dtype=torch.int32, device=logits.device)
    done = top_logit == float("-inf")  # nothing but -inf: token 0, as the plain race
    # Each race after the first runs over the rows still outside only (gathered: few, mostly).
    rows = (~done).nonzero()[:, 0]
    row_logits, row_weights, row_token = logits, weights, token.clone()
    if len(rows) < len(logits):
        row_logits, row_weights, row_token = logits[rows], weights[rows], token[rows]
    for race in range(max_races):
        winner_logit = row_logits.gather(-1, row_token[:, None])
        tail_mass = row_weights.masked_fill(row_logits > winner_logit, 0.0).sum(dim=-1)
        accepted = nucleus_accepts(winner_logit[:, 0], top_logit[rows], floor[rows], tail_mass, total_mass[rows],
                                   top_p[rows])
        token[rows], done[rows] = row_token, accepted
        outside = ~accepted
        rows, row_token, winner_logit = rows[outside], row_token[outside], winner_logit[outside]
        if not len(rows) or race == max_races - 1:
            break
        row_logits, row_weights = row_logits[outside], row_weights[outside]
        below = (row_logits <= winner_logit) | (row_logits < floor[rows, None])
        row_token = keys[rows].masked_fill_(below, float("-inf")).max(dim=-1).indices
        races[rows] += 1
    return torch.where(done, token, top_token), races


# The same function for the kernel (Triton calls only jit functions): one expression, on tensors or scalars.
_nucleus_accepts = jit(nucleus_accepts)


@jit
def _tail_mass(row_ptr, vocab_size, winner_logit, top_logit, BLOCK: tl.constexpr):
    """Sum of exp(l - top_logit) over the row's tokens with l <= winner_logit."""
    lanes = tl.arange(0, BLOCK)
    mass = tl.zeros([BLOCK], tl.float32)
    for block_start in range(0, vocab_size, BLOCK):
        token = block_start + lanes
        logit = tl.load(row_ptr + token, mask=token < vocab_size, other=float("-inf"))
        mass += tl.where(logit <= winner_logit, tl.exp(logit - top_logit), 0.0)
    return tl.sum(mass, axis=0)


@jit(do_not_specialize_on_alignment=["seeds_ptr", "steps_ptr", "top_p_ptr", "log_min_p_ptr"])  # as the race's
def _nucleus_race_kernel(logits_ptr, logits_row_stride, seeds_ptr, steps_ptr, top_p_ptr, log_min_p_ptr, tokens_ptr,
                         races_ptr, vocab_size, MAX_RACES: tl.constexpr, BLOCK: tl.constexpr):
    """Program row: nucleus_race_ref's loop, on the GPU without a host round trip. The first pass races over
    every token and takes the row's max and sum of exp (online, per lane) with it; each rejected winner costs
    a pass for its tail mass (skipped when top_p is 1) and a race above it."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    seed = tl.load(seeds_ptr + row)
    step = tl.load(steps_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    lanes = tl.arange(0, BLOCK)
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_argmax = lanes
    lane_mass = tl.zeros([BLOCK], tl.float32)
    best_key = tl.full([BLOCK], float("-inf"), tl.float32)
    best_token = lanes
    for block_start in range(0, vocab_size, BLOCK):
        token = block_start + lanes
        logit = tl.load(row_ptr + token, mask=token < vocab_size, other=float("-inf"))
        new_max = tl.maximum(lane_max, logit)
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)  # a lane of -inf alone: exp(-inf) = 0, no NaN
        lane_mass = lane_mass * tl.exp(lane_max - shift) + tl.exp(logit - shift)
        lane_argmax = tl.where(logit > lane_max, token, lane_argmax)
        lane_max = new_max
        key = _race_key(logit, seed, step, token)
        is_better = key > best_key
        best_key = tl.where(is_better, key, best_key)
        best_token = tl.where(is_better, token, best_token)
    top_logit = tl.max(lane_max, axis=0)
    top_token = tl.min(tl.where(lane_max == top_logit, lane_argmax, vocab_size), axis=0)
    total_mass = tl.sum(lane_mass * tl.exp(lane_max - tl.where(top_logit > float("-inf"), top_logit, 0.0)), axis=0)
    floor = top_logit + tl.load(log_min_p_ptr + row)
    top_key = tl.max(best_key, axis=0)
    token = tl.min(tl.where(best_key == top_key, best_token, vocab_size), axis=0)
    races = 1
    done = top_logit == float("-inf")
    winner_logit = tl.load(row_ptr + token)
    tail_mass = total_mass
    if (top_p < 1.0) and (not done):
        tail_mass = _tail_mass(row_ptr, vocab_size, winner_logit, top_logit, BLOCK)
    done = done | _nucleus_accepts(winner_logit, top_logit, floor, tail_mass, total_mass, top_p)
    while (not done) and races < MAX_RACES:
        _, token = _race_pass(row_ptr, seed, step, 0, vocab_size, winner_logit, floor, BLOCK)
        races += 1
        winner_logit = tl.load(row_ptr + token)
        if top_p < 1.0:
            tail_mass = _tail_mass(row_ptr, vocab_size, winner_logit, top_logit, BLOCK)
        done = _nucleus_accepts(winner_logit, top_logit, floor, tail_mass, total_mass, top_p)
    tl.store(tokens_ptr + row, tl.where(done, token, top_token).to(tl.int64))
    tl.store(races_ptr + row, races)


def nucleus_race_triton(logits: torch.Tensor, top_p: torch.Tensor, log_min_p: torch.Tensor, seeds: torch.Tensor,
                        steps: torch.Tensor, max_races: int = NUCLEUS_MAX_RACES,
                        BLOCK: int = DEFAULT_RACE_CONFIG["BLOCK"],
                        num_warps: int = DEFAULT_RACE_CONFIG["num_warps"]) -> tuple[torch.Tensor, torch.Tensor]:
    """As nucleus_race_ref, one program per row. At batch 1 that is one SM walking Llama-3's 128256 logits
    twice (63 blocks of 8 KB one after another per pass, an estimated 20-40 us each, as the unsplit race) and
    twice more per rejected winner; a decode batch of hundreds of rows fills the GPU."""
    num_rows, vocab_size = logits.shape
    assert logits.dtype == top_p.dtype == log_min_p.dtype == torch.float32 and logits.stride(-1) == 1
    assert seeds.dtype == steps.dtype == torch.int64
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    races = torch.empty(num_rows, dtype=torch.int32, device=logits.device)
    _nucleus_race_kernel[(num_rows,)](
        logits, logits.stride(0), seeds, steps, top_p, log_min_p, tokens, races, vocab_size, MAX_RACES=max_races,
        BLOCK=min(BLOCK, next_power_of_2(vocab_size)), num_warps=num_warps)
    return tokens, races


# ---- greedy: argmax ----------------------------------------------------------------------------------
def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [N] int64: torch.argmax over each row (the CPU's path and the oracle)."""
    return logits.argmax(dim=-1)


if tl is not None:
    # The low 32 bits of an argmax key, and a key below every value's (for the merge's padding lanes).
    _KEY_LOW, _NO_KEY = tl.constexpr((1 << 32) - 1), tl.constexpr(-(1 << 63))


@jit
def _argmax_key(value, token):
    """An int64 per (float32 value, int32 token) whose largest is torch.argmax's pick: ordered by value, every
    NaN equal and above +inf, -0.0 equal to 0.0; then by the lower token. The value's bits as a signed int
    in float order (a negative's magnitude bits flipped) above, 2**32 - 1 - token below (token ^ that mask,
    the tensor on the left: in Triton's interpreter a constexpr minus a tensor stays a constexpr): one integer
    max reduces a block where (max, then the lowest index of it) would take a reduction for each."""
    bits = value.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = tl.where(value == 0.0, 0, ordered)
    ordered = tl.where(value != value, 0x7FFFFFFF, ordered)
    return (ordered.to(tl.int64) << 32) | (token.to(tl.int64) ^ _KEY_LOW)


@jit
def _argmax_token(key):
    """The token of an ``_argmax_key``."""
    return (key & _KEY_LOW) ^ _KEY_LOW


# tokens_per_split is specialized: a multiple of BLOCK, it is divisible by 16 at every batch size (one compile),
# and known so, the masks' runs of 4 let the loads be 16 bytes wide.
@jit
def _argmax_kernel(logits_ptr, logits_row_stride, out_ptr, vocab_size, tokens_per_split, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    """Program (row, split): the argmax of the row's tokens [split * tokens_per_split, + tokens_per_split).
    Alone in its row (one split), its token, into out [rows] int64; else its ``_argmax_key``, into out [rows,
    splits] for ``_argmax_merge_kernel``. Each lane keeps its own best through the loop (a later token only
    replaces an earlier one with a larger value, or the lane's first NaN: float compares, cheaper than keys
    per element); one key reduction at the end."""
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, vocab_size)
    row_ptr = logits_ptr + row * logits_row_stride
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_token = start + lanes
    for block_start in range(start, end, BLOCK):
        token, logit = _row_block(row_ptr, block_start, lanes, end)
        # Larger, or the lane's first NaN (torch.argmax takes NaN as the maximum)
        is_better = (logit > best) | ((logit != logit) & (best == best))
        best, best_token = _keep_better(is_better, logit, token, best, best_token)
    # A lane that met no token below end holds -inf at a token above every real one: it never wins.
    key = tl.max(_argmax_key(best, best_token), axis=0)
    tl.store(out_ptr + row * num_splits + split, tl.where(num_splits == 1, _argmax_token(key), key))


@jit(do_not_specialize=["num_splits"])
def _argmax_merge_kernel(keys_ptr, tokens_ptr, num_splits, BLOCK_SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Program row: the token of the largest of the row's splits' keys [rows, splits] (splits in token order,
    so the first of equal values wins across them too), into tokens [rows] int64."""
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.arange(0, BLOCK_SPLITS)
    keys = tl.load(keys_ptr + row * num_splits + split, mask=split < num_splits, other=_NO_KEY)
    tl.store(tokens_ptr + row, _argmax_token(tl.max(keys, axis=0)))


# Tokens per loop step and warps, and the splits, by arithmetic (nothing timed yet: a GPU run should sweep
# BLOCK and num_warps at batch 1 and 512). One row of Llama-3's 128256 float32 logits is 513 KB, just written
# by the LM head and so mostly in L2: read by one program it would be 32 loads of 16 KB one after another
# (~5 us and more on one SM; torch's reduce_kernel<512,1> took 28-35 us on the H200). Split as ``race_splits``
# splits the race (until the programs fill two waves of the SMs, at most one per BLOCK), it is 32 programs of
# one BLOCK each: 4096 floats over 8 warps are 16 per thread, four 16-byte loads issued together, then one
# reduction, ~1-2 us after launch; a one-warp merge over the 32 keys follows (a second launch, overlapping the
# first's tail with PDL): a few us in all. 512 rows (263 MB, from HBM) are 512 programs of one split, resident
# at once (256 threads each, no hash: few registers), each with 16 KB of loads in flight: 8 MB in all, above
# the ~4-5 MB that Little's law asks of ~4.8 TB/s at ~1 us, so the pass runs near bandwidth (~55-65 us; torch
# ~89 us). The per-element work (three compares, two selects) stays under the loads' time.
DEFAULT_ARGMAX_CONFIG = {"BLOCK": 4096, "num_warps": 8}


def argmax_triton(logits: torch.Tensor, BLOCK: int = DEFAULT_ARGMAX_CONFIG["BLOCK"],
                  num_warps: int = DEFAULT_ARGMAX_CONFIG["num_warps"], num_splits: int | None = None) -> torch.Tensor:
    """As argmax_ref for float32 logits [N, V] (rows of unit stride): [N] int64, the first index of each
    row's maximum, the first NaN's where a row has one (torch.argmax takes NaN as the maximum), token 0 in a
    row of -inf alone. ``num_splits`` (default: ``race_splits``) programs per row, each over a contiguous
    run of tokens; above one, a second kernel merges their keys. Nothing read back to the host, the launch
    shapes from the logits' shape alone: it may be captured in a CUDA graph."""
    num_rows, vocab_size = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return tokens
    block, num_splits, tokens_per_split = split_rows(logits, BLOCK, num_splits)
    keys = tokens if num_splits == 1 else torch.empty(num_rows, num_splits, dtype=torch.int64, device=logits.device)
    pdl = pdl_launch(logits.device)
    _argmax_kernel[(num_rows, num_splits)](logits, logits.stride(0), keys, vocab_size, tokens_per_split,
                                           BLOCK=block, num_warps=num_warps, **pdl)
    if num_splits > 1:
        # BLOCK_SPLITS from the vocabulary alone (its blocks bound the splits): one compile for every batch size.
        max_splits = -(-vocab_size // block)
        _argmax_merge_kernel[(num_rows,)](keys, tokens, num_splits, BLOCK_SPLITS=next_power_of_2(max_splits),
                                          num_warps=1, **pdl)
    return tokens
