"""How long an int4_awq build takes for Llama-3-8B shapes on one GPU (issue 12 part 2: "minutes, not hours,
for 8B on one GPU"), from a Hugging Face folder as a user's would be:

    PYTHONPATH=src python3 scripts/gpu_awq_time.py --out $OUT [--layers 32]

The folder is written first: the llama-3-8b preset's config.json (``--layers`` decoder layers; 32 is the
real model), random bf16 weights in safetensors shards, and the bundled stories260K tokenizer (its ids are
valid in Llama-3's vocabulary; the text is the default calibration set, tokenized with it). Then
``Builder().build`` with ``quantization="int4_awq"`` runs as ``kiln build`` would: calibration forward,
scale and clip search per Linear, quantization, engine written. Times: the checkpoint write (not part of
a build), the calibration (``awq_input_scales``, whole), the build, the save. Random weights give AWQ no
outliers to find, so the search's work is the same as for trained weights; its result is not checked here
(tests/test_weight_only_methods.py checks it on stories260K).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import RESULTS, log, write_results  # noqa: E402

import kiln.builder.builder as builder_module  # noqa: E402
from kiln import Builder, BuildConfig  # noqa: E402
from kiln.convert import AutoModelForCausalLM  # noqa: E402
from kiln.models import preset_hf_config  # noqa: E402
from kiln.runtime.llm import DEFAULT_MODEL_DIR  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def write_checkpoint(folder: Path, layers: int) -> None:
    """An HF Llama folder of the llama-3-8b preset's shapes with ``layers`` layers, random bf16 weights
    (std 0.02, norms 1), one shard per layer."""
    config = {**preset_hf_config("llama-3-8b"), "num_hidden_layers": layers, "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL_DIR / name, folder / name)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def rand(*shape: int) -> torch.Tensor:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return (torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    def ones() -> torch.Tensor:
        return torch.ones(h, dtype=torch.bfloat16)

    save_file({"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
               "model.norm.weight": ones()}, str(folder / "model-head.safetensors"), metadata={"format": "pt"})
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                   p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                   p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                   p + "mlp.down_proj.weight": rand(h, inter), p + "input_layernorm.weight": ones(),
                   p + "post_attention_layernorm.weight": ones()}
        save_file(tensors, str(folder / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3-8B)")
    ap.add_argument("--tmp", default="/tmp/kiln_awq")
    args = ap.parse_args()
    out, tmp = Path(args.out), Path(args.tmp)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   torch=torch.__version__, awq_layers=args.layers)

    t0 = time.perf_counter()
    write_checkpoint(tmp / "hf", args.layers)
    RESULTS["awq_checkpoint_write_s"] = time.perf_counter() - t0
    log(f"checkpoint written in {RESULTS['awq_checkpoint_write_s']:.1f} s")

    calibrate = builder_module.awq_input_scales

    def timed_calibration(*a, **kw):
        t = time.perf_counter()
        scales = calibrate(*a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        RESULTS["awq_calibration_s"] = time.perf_counter() - t
        return scales

    builder_module.awq_input_scales = timed_calibration
    t0 = time.perf_counter()
    source = AutoModelForCausalLM.from_hugging_face(tmp / "hf")
    engine = Builder().build(source, BuildConfig(quantization="int4_awq", dtype="bfloat16", max_batch_size=8,
                                                 max_seq_len=2048))
    RESULTS["awq_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.save(tmp / "engine", progress=False)
    RESULTS["awq_save_s"] = time.perf_counter() - t0
    RESULTS["awq_calibration_s_per_layer"] = RESULTS["awq_calibration_s"] / args.layers
    if torch.cuda.is_available():
        RESULTS["awq_peak_gpu_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    write_results(out / "gpu_awq_time.json", "int4_awq build time, Llama-3-8B shapes")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
