"""Build defaults: fields left unset are fitted to the model in one place (resolve_build_config), for
Builder.build, ``kiln build`` and LLM on a Hugging Face folder alike; a value given is kept or refused
naming its Python field and its flag."""

from __future__ import annotations

import pytest

from conftest import STORIES_DIR
from kiln import LLM, BuildConfig, Builder
from kiln.builder import resolve_build_config
from kiln.cli import main
from kiln.engine.manifest import EngineManifest
from kiln.errors import ConfigError, KilnError
from kiln.convert import AutoModelForCausalLM

CPU = dict(target="cpu", dtype="float32")


@pytest.fixture(scope="module")
def stories():
    return AutoModelForCausalLM.from_hugging_face(STORIES_DIR)  # max_position_embeddings 512


def limits(config: BuildConfig) -> tuple[int, int, int, int, int]:
    return (config.max_batch_size, config.max_input_len, config.max_seq_len, config.max_num_tokens,
            config.tokens_per_block)


def test_unset_fields_never_conflict_with_the_values_given(stories):
    # These raised "max_input_len (1024) must be <= max_seq_len (256)" and "max_seq_len=2048 exceeds ... 512".
    short = Builder().build(stories, BuildConfig(max_seq_len=256, target="cpu")).manifest.build_config
    assert limits(short) == (8, 256, 256, 2048, 32)
    wide = Builder().build(stories, BuildConfig(dtype="float16", max_batch_size=128)).manifest.build_config
    assert limits(wide) == (128, 512, 512, 2048, 32) and wide.dtype == "float16" and wide.is_resolved
    long_model = AutoModelForCausalLM.from_preset("llama-3-8b").config  # 8192 positions
    assert limits(resolve_build_config(long_model, BuildConfig(**CPU))) == (8, 1024, 2048, 2048, 32)
    longer_prompts = resolve_build_config(long_model, BuildConfig(max_input_len=3000, **CPU))
    assert (longer_prompts.max_input_len, longer_prompts.max_seq_len) == (3000, 3000)


def test_defaults_reach_past_a_sliding_window(tiny_hf_checkpoint):
    # Sequences may outgrow the window (its blocks go back to the pool): only the positions bound them.
    mistral = AutoModelForCausalLM.from_hugging_face(tiny_hf_checkpoint("MistralForCausalLM", sliding_window=64).path)
    positions = mistral.config.max_position_embeddings
    assert positions > 64
    assert limits(resolve_build_config(mistral.config, BuildConfig(**CPU)))[1:3] == (positions, positions)


@pytest.mark.parametrize("given, message", [
    (dict(max_seq_len=4096), "max_seq_len=4096 exceeds the model's 512 positions (max_position_embeddings); "
                             "lower max_seq_len (--max-seq-len) to 512 or less"),
    (dict(max_input_len=1000), "max_input_len=1000 exceeds the model's 512 positions (max_position_embeddings); "
                               "lower max_input_len (--max-input-len) to 512 or less"),
    (dict(max_input_len=300, max_seq_len=256), "max_input_len (300) must be <= max_seq_len (256); raise max_seq_len "
                                               "(--max-seq-len) or lower max_input_len (--max-input-len)"),
    (dict(max_seq_len=0), "max_seq_len must be a positive integer"),
])
def test_a_value_given_that_cannot_be_honoured_names_the_field_and_the_flag(stories, given, message):
    with pytest.raises(ConfigError) as error:
        Builder().build(stories, BuildConfig.of({**given, **CPU}))
    assert message in str(error.value)


def test_builder_takes_none_a_dict_or_a_path(stories):
    default = Builder().build(stories, None).manifest.build_config
    assert default == Builder().build(stories, BuildConfig()).manifest.build_config and default.is_resolved
    from_dict = Builder().build(stories, {"max_seq_len": 256, "target": "cpu"}).manifest.build_config
    assert from_dict == Builder().build(stories, BuildConfig(max_seq_len=256, target="cpu")).manifest.build_config
    from_path = Builder().build(str(STORIES_DIR), BuildConfig(max_seq_len=256, target="cpu")).manifest
    assert from_path.build_config == from_dict and from_path.model_config == stories.config


@pytest.mark.parametrize("model, config, message", [
    ("stories", {"max_seq_len": 256, "max_seqlen": 3},
     "unknown BuildConfig field max_seqlen; accepted: max_batch_size, max_input_len, max_seq_len, max_num_tokens, "
     "max_beam_width, tokens_per_block, dtype, tp_size, target, quantization, fp8_scaling, kv_cache_dtype, "
     "use_fp8_context_fmha, group_size, calibration_data"),
    ("stories", "max_seq_len=256", "expected a BuildConfig, a dict of its fields or None, got str"),
    (42, None, "Builder.build takes a model from AutoModelForCausalLM.from_hugging_face(path) or from_preset(name), "
               "or a Hugging Face folder's path; got int"),
])
def test_builder_says_what_it_expects(stories, model, config, message):
    with pytest.raises(KilnError) as error:
        Builder().build(stories if model == "stories" else model, config)
    assert str(error.value) == message


def test_cli_build_and_llm_resolve_defaults_like_the_builder(stories, tmp_path, capsys):
    assert main(["build", str(STORIES_DIR), "-o", str(tmp_path / "e"), "--max-seq-len", "256", "--target", "cpu"]) == 0
    expected = Builder().build(stories, BuildConfig(max_seq_len=256, target="cpu")).manifest.build_config
    assert EngineManifest.read(tmp_path / "e").build_config == expected
    with LLM(STORIES_DIR, build_config={"max_seq_len": 256, "target": "cpu"}, progress=False) as llm:
        assert llm.executor.engine.build_config == expected
    assert main(["build", str(STORIES_DIR), "-o", str(tmp_path / "f"), "--max-input-len", "1000"]) == 1
    assert "max_input_len=1000 exceeds the model's 512 positions" in capsys.readouterr().err
