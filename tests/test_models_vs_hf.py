"""kiln's models against Hugging Face transformers, in float32, for every supported architecture and feature.

Each case builds a tiny random-weight HF model, saves it, builds a kiln engine from the folder, then
compares (1) the logits of every prompt position, computed by kiln's forward through the paged KV
cache in three ways (whole prompts packed together, token by token, uneven chunks), with HF's, and
(2) greedy tokens from ``LLM.generate`` (executor, scheduler, runner) with HF ``generate``.
"""

from __future__ import annotations

import pytest
import torch

from kiln import LLM, KvCacheConfig, SamplingParams
from kiln.kernels import AttentionMetadata
from kiln.runtime.kv_cache import max_live_blocks
from kiln.runtime.llm import DEFAULT_MODEL_DIR as STORIES_DIR
from kiln.runtime.loader import LoadedEngine, load_engine
from kiln.runtime.model_runner import allocate_kv_cache

LOGITS_ATOL = 5e-5  # float32; measured max |diff| 1.4e-5 at logits up to ~23 (summation order only)
NUM_GREEDY_TOKENS = 24

# name -> (architecture, HF config overrides, prompt length)
CASES = {
    "llama_mha_untied": ("LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False), 40),
    "llama_gqa_tied": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True), 40),
    "llama_mqa": ("LlamaForCausalLM", dict(num_key_value_heads=1), 40),
    "llama_explicit_head_dim": ("LlamaForCausalLM", dict(head_dim=32, num_key_value_heads=2), 40),
    "llama_attention_bias": ("LlamaForCausalLM", dict(attention_bias=True), 40),
    # Prompts run past the original context (64 and 32 positions) into the scaled range.
    "llama_rope_linear": ("LlamaForCausalLM", dict(
        max_position_embeddings=64,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), 90),
    "llama_rope_llama3": ("LlamaForCausalLM", dict(
        max_position_embeddings=128,
        rope_parameters={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32, "rope_theta": 10000.0}), 90),
    "llama_rope_theta": ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}), 40),
    "qwen2_qkv_bias": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False), 40),
    "mistral": ("MistralForCausalLM", dict(num_key_value_heads=1, head_dim=16), 40),
    # Per-head q/k RMSNorm; head_dim explicit, here unlike hidden_size / heads (16).
    "qwen3_gqa_tied": ("Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True), 40),
    "qwen3_untied_attention_bias": ("Qwen3ForCausalLM", dict(head_dim=16, attention_bias=True,
                                                             tie_word_embeddings=False), 40),
    "qwen3_mqa": ("Qwen3ForCausalLM", dict(num_key_value_heads=1, head_dim=8), 40),
    # Parallel attention + MLP, LayerNorm with bias, GELU-tanh MLP with biases, LM head with bias, interleaved
    # rotary over the first rotary_dim dims of each head (hidden 64: head_dim 16 at 4 heads).
    "gptj_partial_rotary": ("GPTJForCausalLM", dict(rotary_dim=8, n_inner=96), 40),
    "gptj_full_rotary": ("GPTJForCausalLM", dict(rotary_dim=16), 40),
    "gptj_two_heads": ("GPTJForCausalLM", dict(num_attention_heads=2, rotary_dim=16, n_inner=96), 40),
    "gptj_eight_heads_exact_gelu": ("GPTJForCausalLM", dict(num_attention_heads=8, rotary_dim=8,
                                                            activation_function="gelu"), 40),
}


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def kiln_logits(engine: LoadedEngine, prompts: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """Logits at every position of each prompt, from kiln's forward over packed batches of up to
    ``chunk`` tokens per prompt per step; KV blocks are handed out in shuffled order."""
    model, block_size = engine.model, engine.build_config.tokens_per_block
    blocks_per_seq = -(-max(map(len, prompts)) // block_size)
    kv_cache = allocate_kv_cache(model, len(prompts) * blocks_per_seq, block_size)
    generator = torch.Generator().manual_seed(0)
    tables = torch.randperm(len(prompts) * blocks_per_seq, generator=generator).view(len(prompts), -1).int()
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for start in range(0, max(map(len, prompts)), chunk):
        active = [i for i, p in enumerate(prompts) if start < len(p)]
        ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for i in active:
            end = min(start + chunk, len(prompts[i]))
            ids += prompts[i][start:end]
            positions += range(start, end)
            slots += [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(start, end)]
            query_lens.append(end - start)
            seq_lens.append(end)
        meta = AttentionMetadata(
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
            block_tables=tables[active], seq_lens_host=seq_lens, query_lens_host=query_lens,
            sliding_window=model.config.sliding_window)
        out = model.forward(torch.tensor(ids), torch.tensor(positions), kv_cache, torch.tensor(slots), meta,
                            torch.arange(len(ids)))
        for i, part in zip(active, out.split(query_lens)):
            logits[i].append(part)
    return [torch.cat(parts) for parts in logits]


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=num_tokens)
    return out[0, len(prompt):].tolist()


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_tokens_match_hf(case, tiny_hf_checkpoint, tiny_engine):
    architecture, overrides, prompt_len = CASES[case]
    checkpoint = tiny_hf_checkpoint(architecture, **overrides)
    engine_dir = tiny_engine(checkpoint.path)
    prompts = random_prompts(checkpoint.model.config.vocab_size, [prompt_len, prompt_len // 2 + 3, 5])
    expected = [hf_logits(checkpoint.model, p) for p in prompts]

    engine = load_engine(engine_dir, progress=False)
    for chunk in (max(map(len, prompts)), 1, 7):  # whole prompts, pure decode, mixed chunks
        for want, got in zip(expected, kiln_logits(engine, prompts, chunk)):
            torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0, msg=lambda m: f"chunk {chunk}: {m}")

    with LLM(engine_dir, progress=False) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NUM_GREEDY_TOKENS, temperature=0.0),
                            use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.error is None
        assert out.outputs[0].token_ids == hf_greedy(checkpoint.model, prompt, NUM_GREEDY_TOKENS)
        assert out.outputs[0].finish_reason == "length"


# name -> (architecture, HF config with a window shorter than the prompts, the same without the window)
WINDOW_CASES = {
    "mistral_window_8": ("MistralForCausalLM", dict(num_key_value_heads=1, head_dim=16, sliding_window=8),
                         dict(sliding_window=None)),
    "qwen2_window_12": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=12, max_window_layers=0),
                        dict(use_sliding_window=False)),
}
WINDOW_BLOCK, WINDOW_CHUNK, NUM_WINDOW_TOKENS = 4, 16, 32


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sliding_window_matches_hf_past_the_window(case, tiny_hf_checkpoint, tiny_engine):
    """Logits at every position (packed, token by token, uneven chunks) and greedy tokens of 2 samples each,
    in a KV pool too small for one sample without the window: blocks below it go back to the pool."""
    architecture, windowed, full_attention = WINDOW_CASES[case]
    checkpoint = tiny_hf_checkpoint(architecture, **windowed)
    window = windowed["sliding_window"]
    prompts = random_prompts(checkpoint.model.config.vocab_size, [40, 23, 5])
    expected = [hf_logits(checkpoint.model, p) for p in prompts]
    # The window changes HF's logits from its position on, and only there.
    unwindowed = tiny_hf_checkpoint(architecture, **{**windowed, **full_attention}).model
    full = hf_logits(unwindowed, prompts[0])
    torch.testing.assert_close(full[:window], expected[0][:window])
    assert (full[window:] - expected[0][window:]).abs().amax(-1).min() > 1e-3

    engine_dir = tiny_engine(checkpoint.path, tokens_per_block=WINDOW_BLOCK, max_num_tokens=WINDOW_CHUNK)
    engine = load_engine(engine_dir, progress=False)
    assert engine.model_config.sliding_window == window
    for chunk in (max(map(len, prompts)), 1, 7):
        for want, got in zip(expected, kiln_logits(engine, prompts, chunk)):
            torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0, msg=lambda m: f"chunk {chunk}: {m}")

    # The smallest pool the Executor accepts for these requests: one request (2 samples) at a time under
    # guaranteed_no_evict, fewer blocks than one sample of 72 tokens would need without the window.
    num_blocks = max_live_blocks(len(prompts[0]) + NUM_WINDOW_TOKENS, WINDOW_BLOCK, window, WINDOW_CHUNK) * 2
    assert num_blocks < -(-(len(prompts[0]) + NUM_WINDOW_TOKENS) // WINDOW_BLOCK)
    kv = KvCacheConfig(max_tokens=num_blocks * WINDOW_BLOCK)
    with LLM(engine_dir, kv_cache_config=kv, progress=False) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NUM_WINDOW_TOKENS, n=2, temperature=0.0),
                            use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.error is None
        greedy = hf_greedy(checkpoint.model, prompt, NUM_WINDOW_TOKENS)
        assert [sample.token_ids for sample in out.outputs] == [greedy, greedy]


def test_prompt_logprobs_match_hf_log_softmax(tiny_hf_checkpoint, tiny_engine):
    checkpoint = tiny_hf_checkpoint("Qwen2ForCausalLM")
    prompt = random_prompts(checkpoint.model.config.vocab_size, [30])[0]
    expected = torch.log_softmax(hf_logits(checkpoint.model, prompt), dim=-1)
    with LLM(tiny_engine(checkpoint.path, max_num_tokens=16), progress=False) as llm:  # chunked prompt
        out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5),
                           use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(out.prompt_logprobs[1:]):
        row = expected[position]
        want_ids = set(row.topk(5).indices.tolist()) | {prompt[position + 1]}
        assert set(entry) == want_ids
        for token, logprob in entry.items():
            assert logprob == pytest.approx(row[token].item(), abs=1e-4)


STORIES_PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom and his mom went"]
NUM_STORY_TOKENS = 64


def test_stories260k_greedy_tokens_and_text_match_hf_generate(stories_engine):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(STORIES_DIR)
    hf_model = AutoModelForCausalLM.from_pretrained(STORIES_DIR, dtype=torch.float32).eval()
    with LLM(stories_engine, progress=False) as llm:
        outs = llm.generate(STORIES_PROMPTS, SamplingParams(max_tokens=NUM_STORY_TOKENS, temperature=0.0),
                            use_tqdm=False)
    for prompt, out in zip(STORIES_PROMPTS, outs):
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            full = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=NUM_STORY_TOKENS)[0].tolist()
        completion = out.outputs[0]
        assert len(completion.token_ids) >= 50
        assert completion.token_ids == full[ids.shape[1]:]
        assert prompt + completion.text == hf_tokenizer.decode(full, skip_special_tokens=True)
