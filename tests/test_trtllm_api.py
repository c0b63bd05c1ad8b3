"""TensorRT-LLM's builder API, as its users write it: ``Builder().create_builder_config(...)``,
``LlamaForCausalLM.from_hugging_face(dir)``, ``builder.build(model, config)``, ``engine.save(dir)``."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from kiln import LLM, Builder, BuildConfig, SamplingParams
from kiln.errors import CheckpointError, ConfigError
from kiln.runtime.llm import DEFAULT_MODEL_DIR


def test_the_tensorrt_llm_build_script_runs_with_kiln_imports(tmp_path):
    # TensorRT-LLM's script with its import lines changed, on the bundled model: tensor_parallel=2 builds two
    # ranks' weight files, and LLM starts both ranks (gloo on the CPU).
    from kiln import Builder
    from kiln.models import LlamaForCausalLM

    builder = Builder()
    builder_config = builder.create_builder_config(
        name="stories260K", precision="float32", tensor_parallel=2, max_batch_size=8, max_input_len=128,
        max_output_len=64)
    model = LlamaForCausalLM.from_hugging_face(DEFAULT_MODEL_DIR)
    engine = builder.build(model, builder_config)
    engine.save(tmp_path / "engine")

    build = engine.manifest.build_config
    assert (build.max_batch_size, build.max_input_len, build.max_seq_len, build.dtype) == (8, 128, 192, "float32")
    assert build.tp_size == 2 and (tmp_path / "engine" / "rank1.safetensors").is_file()
    params = SamplingParams(max_tokens=16, temperature=0.0)
    with LLM(tmp_path / "engine", progress=False) as llm:
        via_trtllm_api = llm.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0].token_ids
    with LLM(DEFAULT_MODEL_DIR, progress=False) as llm:
        via_kiln = llm.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0].token_ids
    assert via_trtllm_api == via_kiln and len(via_kiln) == 16


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel=0), "tp_size (--tp-size) must be a positive integer"),
    (dict(max_batchsize=8), "unknown max_batchsize; accepted: name, precision, max_output_len"),
    (dict(precision="int8"), "precision 'int8' is not one of float16"),
    (dict(max_output_len=64), "max_output_len needs max_input_len"),
])
def test_create_builder_config_refuses_what_it_cannot_honour(options, message):
    with pytest.raises(ConfigError) as error:
        Builder().create_builder_config(**options)
    assert message in str(error.value)


def test_create_builder_config_maps_names_onto_build_config():
    config = Builder().create_builder_config(name="x", precision="bf16", max_batch_size=64, max_input_len=1024,
                                             max_output_len=1024, max_num_tokens=4096, tokens_per_block=64,
                                             tensor_parallel=4)
    assert config == BuildConfig(max_batch_size=64, max_input_len=1024, max_seq_len=2048, max_num_tokens=4096,
                                 tokens_per_block=64, dtype="bfloat16", tp_size=4)


def test_family_classes_take_only_their_architectures(tiny_hf_checkpoint):
    from kiln.models import GPTJForCausalLM, LlamaForCausalLM, MistralForCausalLM

    with pytest.raises(ConfigError, match="holds a LlamaForCausalLM, which GPTJForCausalLM does not run"):
        GPTJForCausalLM.from_hugging_face(DEFAULT_MODEL_DIR)
    mistral = tiny_hf_checkpoint("MistralForCausalLM")
    assert LlamaForCausalLM.from_hugging_face(mistral.path).config.architecture == "MistralForCausalLM"
    assert MistralForCausalLM is LlamaForCausalLM  # one family file runs both, as TensorRT-LLM's class does


def test_the_builder_checks_a_family_class_source_before_converting(tiny_hf_checkpoint, tmp_path):
    from kiln.models import LlamaForCausalLM

    checkpoint = tiny_hf_checkpoint("LlamaForCausalLM")
    weights = checkpoint.path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    source = LlamaForCausalLM.from_hugging_face(checkpoint.path)  # reads config.json only
    with pytest.raises(CheckpointError, match="missing 1 tensors .*down_proj"):
        Builder().build(source, BuildConfig(max_batch_size=2, max_seq_len=64, target="cpu"))
    assert not (tmp_path / "engine").exists()
