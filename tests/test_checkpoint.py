"""Reading Hugging Face checkpoints: config.json in both transformers layouts, the three weight formats,
the converter's fusion and streaming, and each clear error for a checkpoint kiln cannot run."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_BUILD
from kiln import BuildConfig, Builder
from kiln.engine import EngineManifest, load_weights
from kiln.convert.checkpoint import CheckpointReader
from kiln.errors import CheckpointError, ConfigError
from kiln.convert import AutoModelForCausalLM
from kiln.models import ModelConfig, num_params
from kiln.models.config import RopeConfig

LLAMA_FIELDS = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}
LLAMA3_SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}


@pytest.mark.parametrize("scaling", [
    LLAMA3_SCALING,
    {"type": "linear", "factor": 4.0},  # early 4.x spelled rope_type as "type"
    None,
])
def test_transformers_4_and_5_config_layouts_parse_alike(scaling):
    written_by_4x = {**LLAMA_FIELDS, "rope_theta": 500000.0, "rope_scaling": scaling, "torch_dtype": "bfloat16"}
    parameters = {"rope_type": "default"} if scaling is None else {
        ("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    written_by_5x = {**LLAMA_FIELDS, "rope_parameters": {**parameters, "rope_theta": 500000.0}, "dtype": "bfloat16"}
    config = ModelConfig.from_hf_config(written_by_4x)
    assert config == ModelConfig.from_hf_config(written_by_5x)
    assert config.rope.theta == 500000.0 and config.checkpoint_dtype == "bfloat16"
    assert config.eos_token_ids == (128001, 128008, 128009)
    if scaling is LLAMA3_SCALING:
        assert config.rope == RopeConfig("llama3", 500000.0, 32.0, 1.0, 4.0, 8192)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_json_written_by_installed_transformers_parses(tiny_hf_checkpoint):
    checkpoint = tiny_hf_checkpoint("LlamaForCausalLM", head_dim=32, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    config = ModelConfig.from_hf_dir(checkpoint.path)
    hf = checkpoint.model.config
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers) == (
        hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, 32, hf.num_hidden_layers)
    assert config.rope == RopeConfig("linear", 5000.0, 2.0)
    assert config.max_supported_positions == 2 * hf.max_position_embeddings


QWEN2_FIELDS = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 128, "hidden_size": 64,
                "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                "sliding_window": 12}


@pytest.mark.parametrize("use_sliding_window, max_window_layers, window", [
    (False, 0, None),   # the window is off: sliding_window is ignored
    (True, 0, 12),      # every layer slides
    (True, 4, None),    # no layer does (Qwen2 configs' usual max_window_layers == num_hidden_layers)
    (True, 2, "refused"),  # layers 2 and 3 only
])
def test_qwen2_window_applies_as_transformers_applies_it(use_sliding_window, max_window_layers, window):
    import transformers

    written_by_4x = {**QWEN2_FIELDS, "use_sliding_window": use_sliding_window, "max_window_layers": max_window_layers}
    hf = transformers.Qwen2Config(**{k: v for k, v in written_by_4x.items() if k != "architectures"})
    slides = [kind == "sliding_attention" and hf.sliding_window is not None for kind in hf.layer_types]
    written_by_5x = {**hf.to_dict(), "architectures": ["Qwen2ForCausalLM"]}  # layer_types spelled out
    for written in (written_by_4x, written_by_5x):
        if window == "refused":
            assert 0 < sum(slides) < len(slides)
            with pytest.raises(ConfigError, match="slides its window on 2 of 4 layers only.*set max_window_layers "
                                                  "to 0 and drop layer_types.*use_sliding_window to false"):
                ModelConfig.from_hf_config(written)
        else:
            assert slides == [window is not None] * 4
            assert ModelConfig.from_hf_config(written).sliding_window == window


@pytest.mark.parametrize("architecture, overrides", [
    ("LlamaForCausalLM", dict(tie_word_embeddings=True)), ("LlamaForCausalLM", dict(attention_bias=True)),
    ("Qwen2ForCausalLM", dict(head_dim=32)), ("MistralForCausalLM", dict(num_key_value_heads=1)),
    ("Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)), ("GPTJForCausalLM", dict(rotary_dim=8)),
])
def test_parameter_count_matches_hf(architecture, overrides, tiny_hf_checkpoint):
    checkpoint = tiny_hf_checkpoint(architecture, **overrides)
    assert num_params(ModelConfig.from_hf_dir(checkpoint.path)) == sum(p.numel() for p in checkpoint.model.parameters())


def fused_reference(state_dict: dict[str, torch.Tensor], num_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """kiln's tensors written out by hand from HF's, independently of the name map."""
    out = {"embed.weight": state_dict["model.embed_tokens.weight"], "norm.weight": state_dict["model.norm.weight"]}
    if not tied:
        out["lm_head.weight"] = state_dict["lm_head.weight"]
    for n in range(num_layers):
        hf = f"model.layers.{n}."
        out[f"layers.{n}.attn_norm.weight"] = state_dict[hf + "input_layernorm.weight"]
        out[f"layers.{n}.mlp_norm.weight"] = state_dict[hf + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            qkv = [state_dict.get(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"]
            if qkv[0] is not None:
                out[f"layers.{n}.attn.qkv.{kind}"] = torch.cat(qkv)
        out[f"layers.{n}.attn.o.weight"] = state_dict[hf + "self_attn.o_proj.weight"]
        out[f"layers.{n}.mlp.gate_up.weight"] = torch.cat([state_dict[hf + "mlp.gate_proj.weight"],
                                                           state_dict[hf + "mlp.up_proj.weight"]])
        out[f"layers.{n}.mlp.down.weight"] = state_dict[hf + "mlp.down_proj.weight"]
    return out


@pytest.mark.parametrize("weights", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_tensors_equal_fused_checkpoint(weights, dtype, tiny_hf_checkpoint, tiny_engine):
    checkpoint = tiny_hf_checkpoint("Qwen2ForCausalLM", weights=weights)
    if weights == "sharded":
        assert len(list(checkpoint.path.glob("*.safetensors"))) > 1
        assert (checkpoint.path / "model.safetensors.index.json").is_file()
    engine_dir = tiny_engine(checkpoint.path, dtype=dtype)
    manifest = EngineManifest.read(engine_dir)
    loaded = load_weights(engine_dir, manifest, torch.device("cpu"), progress=False)
    expected = fused_reference(checkpoint.model.state_dict(), checkpoint.model.config.num_hidden_layers, tied=False)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor.to(getattr(torch, dtype))), name


def test_bin_checkpoint_with_code_in_its_pickle_is_refused(tiny_hf_checkpoint, tmp_path):
    checkpoint = tiny_hf_checkpoint(weights="bin")
    marker = tmp_path / "executed"
    state = checkpoint.model.state_dict()
    state["model.norm.weight"] = _RunsCode(str(marker))
    torch.save(state, checkpoint.path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as error:
        AutoModelForCausalLM.from_hugging_face(checkpoint.path)
    assert "\n" not in str(error.value)
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rewrite_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_named(tiny_hf_checkpoint):
    checkpoint = tiny_hf_checkpoint()
    _rewrite_weights(checkpoint.path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(model\.layers\.1\.self_attn\.k_proj\.weight\)"):
        AutoModelForCausalLM.from_hugging_face(checkpoint.path)

    checkpoint = tiny_hf_checkpoint()
    _rewrite_weights(checkpoint.path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors \(model\.layers\.0\.mlp\.extra\.weight\)"):
        AutoModelForCausalLM.from_hugging_face(checkpoint.path)


def test_rotary_buffers_and_tied_lm_head_copies_are_accepted(tiny_hf_checkpoint):
    checkpoint = tiny_hf_checkpoint(tie_word_embeddings=True)

    def add_extras(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    _rewrite_weights(checkpoint.path, add_extras)
    assert AutoModelForCausalLM.from_hugging_face(checkpoint.path).config.tie_word_embeddings


def test_gptj_checkpoint_names_come_from_its_family_file(tiny_hf_checkpoint):
    """GPT-J's own names: the mask buffers older checkpoints saved are accepted, a missing LM head bias named."""
    checkpoint = tiny_hf_checkpoint("GPTJForCausalLM", rotary_dim=8)

    def add_mask_buffers(tensors):
        tensors["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        tensors["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)

    _rewrite_weights(checkpoint.path, add_mask_buffers)
    assert AutoModelForCausalLM.from_hugging_face(checkpoint.path).config.rotary_dim == 8
    _rewrite_weights(checkpoint.path, lambda t: t.pop("lm_head.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(lm_head\.bias\)"):
        AutoModelForCausalLM.from_hugging_face(checkpoint.path)


def test_config_that_does_not_describe_the_weights_fails_before_conversion(tiny_hf_checkpoint, tmp_path):
    checkpoint = tiny_hf_checkpoint()
    config = json.loads((checkpoint.path / "config.json").read_text())
    (checkpoint.path / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight \[96, 64\].*layers\.0\.mlp\.gate_up\.weight \[160, 64\]"):
        AutoModelForCausalLM.from_hugging_face(checkpoint.path)


@pytest.mark.parametrize("field, value, message", [
    ("architectures", ["GPT2LMHeadModel"], "unsupported architecture.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
     "unsupported rope scaling type 'yarn'; kiln supports default, linear, llama3"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0},
     "rope scaling type 'llama3' needs original_max_position_embeddings"),
    ("hidden_act", "gelu", "unsupported hidden_act 'gelu'; kiln supports 'silu'"),
    ("mlp_bias", True, "unsupported mlp_bias"),
])
def test_unsupported_config_values_fail_naming_what_is_supported(field, value, message, tiny_hf_checkpoint):
    checkpoint = tiny_hf_checkpoint()
    config = json.loads((checkpoint.path / "config.json").read_text())
    (checkpoint.path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ConfigError, match=message):
        AutoModelForCausalLM.from_hugging_face(checkpoint.path)


def test_folder_without_config_or_weights_is_named(tmp_path, tiny_hf_checkpoint):
    with pytest.raises(ConfigError, match="no config.json"):
        AutoModelForCausalLM.from_hugging_face(tmp_path)
    checkpoint = tiny_hf_checkpoint()
    (checkpoint.path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        AutoModelForCausalLM.from_hugging_face(checkpoint.path)


def test_family_class_refuses_another_architecture(tiny_hf_checkpoint):
    checkpoint = tiny_hf_checkpoint("Qwen2ForCausalLM")
    with pytest.raises(ConfigError, match="holds a Qwen2ForCausalLM, not a MistralForCausalLM"):
        AutoModelForCausalLM.from_hugging_face(checkpoint.path, architecture="MistralForCausalLM")


@pytest.mark.parametrize("tp_size", [1, 2])
def test_conversion_streams_one_tensor_at_a_time(tiny_hf_checkpoint, tmp_path, monkeypatch, tp_size):
    """Peak host memory stays near one tensor group: the converter reads a checkpoint tensor only when
    the writer asks for the next kiln tensor, and the writer lets each tensor go once it is written; with
    tensor parallelism, one rank's file after the other, each pass reading the checkpoint again."""
    checkpoint = tiny_hf_checkpoint("LlamaForCausalLM", num_hidden_layers=3)
    engine = Builder().build(AutoModelForCausalLM.from_hugging_face(checkpoint.path),
                             BuildConfig(**TINY_BUILD, tp_size=tp_size))
    reads: list[str] = []
    real_get = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: reads.append(name) or real_get(self, name))
    produce = engine.produce_weights
    reads_at_yield, alive_at_yield = [], []

    def tracked(rank):
        written = []
        for name, tensor in produce(rank):
            reads_at_yield.append(len(reads))
            alive_at_yield.append(sum(ref() is not None for ref in written))
            written.append(weakref.ref(tensor))
            yield name, tensor

    engine.produce_weights = tracked
    engine.save(tmp_path / "engine", progress=False)
    num_sources = [1] + [1, 3, 1, 1, 2, 1] * 3 + [1, 1]  # embed; per layer: norm, qkv, o, norm, gate_up, down; norm, lm_head
    per_rank = [sum(num_sources[:i + 1]) for i in range(len(num_sources))]
    assert reads_at_yield == [rank * sum(num_sources) + n for rank in range(tp_size) for n in per_rank]
    assert max(alive_at_yield) <= 1  # only the tensor being written when the next one is produced


def test_failed_conversion_leaves_no_partial_files(tiny_hf_checkpoint, tmp_path):
    checkpoint = tiny_hf_checkpoint()
    engine = Builder().build(AutoModelForCausalLM.from_hugging_face(checkpoint.path), BuildConfig(**TINY_BUILD))
    produce = engine.produce_weights

    def fails_half_way(rank):
        for i, item in enumerate(produce(rank)):
            if i == 5:
                raise CheckpointError("disk went away")
            yield item

    engine.produce_weights = fails_half_way
    with pytest.raises(CheckpointError, match="disk went away"):
        engine.save(tmp_path / "engine", progress=False)
    assert list((tmp_path / "engine").iterdir()) == []

