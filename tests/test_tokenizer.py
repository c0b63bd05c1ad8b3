"""The tokenizer: encoding and BOS like Hugging Face, incremental detokenization equal to a full decode
(multi-byte characters through byte-fallback tokens included), and the checkpoint's EOS ids respected."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.llm import DEFAULT_MODEL_DIR as STORIES_DIR
from kiln.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Once upon a time, there was a little dog named Max.",
    "Lily said: café, naïve, 日本語 🙂 — ok!",
    "日本語のテキスト🙂🙂x",
    "  two leading spaces and a trailing one ",
]


@pytest.fixture(scope="module", params=["tokenizer.json", "tokenizer.model"])
def tokenizer(request, tmp_path_factory):
    """stories260K's tokenizer from its tokenizer.json (HF tokenizers) or, alone, its sentencepiece model."""
    folder = tmp_path_factory.mktemp("tokenizer")
    for name in (request.param, "tokenizer_config.json"):
        shutil.copy(STORIES_DIR / name, folder / name)
    return Tokenizer(folder, eos_token_ids=(2,), bos_token_id=1)


@pytest.fixture(scope="module")
def reference(tokenizer):
    """(encode with BOS, decode) of the library each kiln tokenizer path must agree with: HF transformers
    for tokenizer.json, sentencepiece for tokenizer.model. (The two differ on runs of leading spaces:
    the HF conversion of this tokenizer drops one.)"""
    if (tokenizer.path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(STORIES_DIR)
        return (lambda text: hf(text).input_ids), (lambda ids: hf.decode(ids, skip_special_tokens=True))
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES_DIR / "tokenizer.model"))
    special = {sp.unk_id(), sp.bos_id(), sp.eos_id()}
    return (lambda text: [sp.bos_id()] + sp.encode(text)), (lambda ids: sp.decode([i for i in ids if i not in special]))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_the_reference_with_one_bos(text, tokenizer, reference):
    encode, decode = reference
    ids = tokenizer.encode(text)
    assert ids == encode(text)
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids + [2]) == decode(ids)


def test_multi_byte_characters_go_through_byte_fallback_tokens(tokenizer):
    pieces = [tokenizer.token_str(i) for i in tokenizer.encode("日本語 🙂")]
    assert "<0xF0>" in pieces and "<0xE6>" in pieces  # so the tests below cut characters between tokens


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_equals_full_decode_from_any_split(text, tokenizer):
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    for split in range(1, len(ids)):
        detok = IncrementalDetokenizer(tokenizer, ids[:split])
        deltas = [detok.add(token) for token in ids[split:]]
        streamed = "".join(deltas)
        assert "\ufffd" not in streamed, (split, deltas)
        assert streamed == detok.text
        # A prompt of ids may end inside a character (up to 3 dangling bytes): the stream then carries
        # that whole character, so it continues the prompt text without those bytes.
        assert any(tokenizer.decode(ids[:end]) + streamed == full for end in range(max(1, split - 3), split + 1)), (
            split, tokenizer.decode(ids[:split]), streamed)
        if "\ufffd" not in tokenizer.decode(ids[:split]):
            assert tokenizer.decode(ids[:split]) + streamed == full


def test_streamed_text_of_the_bundled_model_equals_its_final_text(stories_engine):
    prompt = "Lily saw a 🙂 and"
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=7)

    async def stream(llm):
        return [out async for out in llm.generate_async(prompt, params, streaming=True)]

    with LLM(stories_engine, progress=False) as llm:
        final = llm.generate([prompt], params, use_tqdm=False)[0]
        outs = asyncio.run(stream(llm))
    completion = final.outputs[0]
    assert "".join(o.outputs[0].text_diff for o in outs) == completion.text == outs[-1].outputs[0].text
    assert outs[-1].outputs[0].token_ids == completion.token_ids
    assert prompt + completion.text == llm.tokenizer.decode(final.prompt_token_ids + completion.token_ids)


def test_generation_config_eos_ids_are_respected(tiny_hf_checkpoint, tiny_engine):
    """EOS ids from generation_config.json (a list, as Llama 3 has) win over config.json's, and each stops."""
    checkpoint = tiny_hf_checkpoint()
    prompt = [5, 17, 3, 99, 42]
    with LLM(tiny_engine(checkpoint.path), progress=False) as llm:
        free = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)[0]
    tokens = free.outputs[0].token_ids
    assert free.outputs[0].finish_reason == "length" and len(tokens) == 20
    first_eos, second_eos = tokens[6], tokens[3]  # the first of these to appear in the output must stop it

    config = json.loads((checkpoint.path / "config.json").read_text())
    (checkpoint.path / "config.json").write_text(json.dumps({**config, "eos_token_id": tokens[1]}))
    (checkpoint.path / "generation_config.json").write_text(json.dumps({"eos_token_id": [first_eos, second_eos]}))
    with LLM(tiny_engine(checkpoint.path), progress=False) as llm:
        assert llm.executor.engine.model_config.eos_token_ids == (first_eos, second_eos)
        stopped = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)[0]
        ignored = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)[0]
    stop_at = min(tokens.index(first_eos), tokens.index(second_eos))
    assert stopped.outputs[0].token_ids == tokens[:stop_at + 1]
    assert stopped.outputs[0].finish_reason == "stop"
    assert ignored.outputs[0].token_ids == tokens
