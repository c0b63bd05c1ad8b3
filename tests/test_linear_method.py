"""A Linear method that only this test registers: every Linear of stories260K is stored and multiplied
its way, with no change to the model files, the converter or the runtime."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import STORIES_DIR
from kiln import BuildConfig, Builder
from kiln.convert import AutoModelForCausalLM
from kiln.engine import EngineManifest
from kiln.errors import ConfigError
from kiln.layers import LINEAR_METHODS, LinearMethod
from kiln.runtime.loader import load_engine
from test_models_vs_hf import kiln_logits, random_prompts

BUILD = dict(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=128, dtype="float32", target="cpu")


class RowScaledFloat16(LinearMethod):
    """Each weight row scaled into [-1, 1] and stored as float16, with its float32 scale; dequantized to
    the activations' dtype on the fly."""

    def tensors(self, out_features, in_features, dtype):
        return {"weight": ((out_features, in_features), torch.float16), "weight_scale": ((out_features,), torch.float32)}

    def convert(self, weight, dtype):
        scale = weight.float().abs().amax(dim=1).clamp(min=1e-12)
        return {"weight": (weight.float() / scale[:, None]).half(), "weight_scale": scale}

    def apply(self, layer, x):
        return F.linear(x, (layer.weight.float() * layer.weight_scale[:, None]).to(x.dtype), layer.bias)


def test_a_method_registered_by_a_test_builds_and_runs_stories260k(monkeypatch, tmp_path):
    source = AutoModelForCausalLM.from_hugging_face(STORIES_DIR)
    dense_dir = Builder().build(source, BuildConfig(**BUILD)).save(tmp_path / "dense", progress=False)
    with monkeypatch.context() as patch:
        patch.setitem(LINEAR_METHODS, "row_scaled_fp16", RowScaledFloat16)
        engine = Builder().build(source, BuildConfig(**BUILD, quantization="row_scaled_fp16"))
        engine_dir = engine.save(tmp_path / "scaled", progress=False)
        manifest = EngineManifest.read(engine_dir)
        assert manifest.build_config.quantization == "row_scaled_fp16"
        tensors = manifest.tensors
        qkv, qkv_scale = tensors["layers.0.attn.qkv.weight"], tensors["layers.0.attn.qkv.weight_scale"]
        assert (qkv["dtype"], qkv_scale["dtype"], qkv_scale["shape"]) == ("F16", "F32", qkv["shape"][:1])
        assert tensors["layers.4.mlp.down.weight_scale"]["dtype"] == "F32"
        assert tensors["embed.weight"]["dtype"] == tensors["layers.0.attn_norm.weight"]["dtype"] == "F32"  # not Linears

        prompts = random_prompts(512, [20, 9])
        scaled = kiln_logits(load_engine(engine_dir, progress=False), prompts, chunk=7)
    dense = kiln_logits(load_engine(dense_dir, progress=False), prompts, chunk=7)
    for got, want in zip(scaled, dense):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # measured max 6.4e-3 at logits up to 16
        assert (got - want).abs().max() > 0  # the method did run

    # Unregistered again: the engine names its method and the error lists the known ones.
    with pytest.raises(ConfigError, match="unknown quantization 'row_scaled_fp16'; this kiln knows none"):
        load_engine(engine_dir, progress=False)
    with pytest.raises(ConfigError, match="unknown quantization 'fp3'; this kiln knows none"):
        Builder().build(source, BuildConfig(**BUILD, quantization="fp3"))



# Each fold a LinearMethod may offer: the question the blocks ask (and its arguments after the layer), then
# the work they call where the answer is yes (and its arguments after the layer). The base class answers no
# and raises if the work is called anyway.
FOLDS = [("folds_norm", (1,), "fold_norm_weight", (None,)),
         ("adds_residual", (1,), "apply_add", (None, None)),
         ("folds_silu_mul", (torch.zeros(1, 4),), "apply_silu_mul", (None,)),
         ("folds_kv_write", (torch.zeros(1, 4), None), "apply_kv_write", (None, None))]


@pytest.mark.parametrize("name", list(LINEAR_METHODS))
def test_a_method_that_may_fold_does_the_fold_and_one_that_does_not_refuses_by_name(name):
    """Every registered method overrides a fold's work wherever it overrides its question (else a yes would
    reach the base class's NotImplementedError at run time); where it keeps the base's question it answers
    no, and calling the work anyway names the method."""
    from kiln.layers.linear import _method_class

    method = _method_class(name)
    for question, question_args, work, work_args in FOLDS:
        asks = getattr(method, question) is not getattr(LinearMethod, question)
        assert asks == (getattr(method, work) is not getattr(LinearMethod, work)), (method.__name__, question, work)
        if not asks:
            assert getattr(method(), question)(None, *question_args) is False
            with pytest.raises(NotImplementedError, match=method.__name__):
                getattr(method(), work)(None, *work_args)
