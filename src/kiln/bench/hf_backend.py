"""The Hugging Face transformers baseline: the same dataset through ``generate`` in static batches.

The model is the engine's own: the Hugging Face checkpoint it was built from (``--hf-model``) or the
engine's weights mapped back to Hugging Face names (the family's name map, which the converter reads,
run backwards: fused Q/K/V and gate/up split again) in a transformers model of the same config, which is what a dummy-weight
engine needs. Batches are left-padded; each generates its longest output for every row
(min_new_tokens = max_new_tokens, so EOS never ends a row early), and each request counts only its own
output_tokens. A request starts when its batch starts and ends when ``generate`` returns; its first
token comes at the batch's first decoding step.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from kiln.bench.dataset import BenchRequest
from kiln.bench.report import BenchRun, RequestRecord, engine_details
from kiln.engine import EngineManifest, engine_device, load_weights
from kiln.errors import ConfigError, KilnError
from kiln.models import family
from kiln.models.config import ModelConfig
from kiln.models.registry import hf_sources


def hf_config_class(architecture: str) -> type[transformers.PretrainedConfig]:
    return getattr(transformers, architecture.replace("ForCausalLM", "Config"))


def hf_state_dict(weights: dict[str, torch.Tensor], mc: ModelConfig,
                  hf_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """kiln tensors -> Hugging Face tensors through the family's HF_NAMES: each fused tensor split along
    dim 0 in name-map order (views); a tied LM head is the embedding."""
    names = family(mc.architecture).HF_NAMES
    state: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        sources = hf_sources(names, name)
        state.update(zip(sources, tensor.split([hf_shapes[s][0] for s in sources], dim=0)))
    if mc.tie_word_embeddings:
        (head,), (embed,) = hf_sources(names, "lm_head.weight"), hf_sources(names, "embed.weight")
        state[head] = state[embed]
    return state


def model_from_engine(engine_dir: str | Path, manifest: EngineManifest, device: torch.device,
                      progress: bool = True) -> transformers.PreTrainedModel:
    mc = manifest.model_config
    if manifest.build_config.quantization != "none":
        raise ConfigError(f"the engine stores its weights by the {manifest.build_config.quantization!r} linear "
                          "method, which transformers cannot load; give the Hugging Face checkpoint with --hf-model")
    config = hf_config_class(mc.architecture)(**mc.to_hf_config())
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=manifest.dtype)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    names = family(mc.architecture).HF_NAMES
    mapped = {src for name in manifest.tensors for src in hf_sources(names, name)}
    mapped |= set(hf_sources(names, "lm_head.weight"))
    if mapped ^ shapes.keys():
        raise ConfigError(f"transformers' {mc.architecture} does not take this engine's weights (differing: "
                          f"{', '.join(sorted(mapped ^ shapes.keys())[:4])}); give the Hugging Face checkpoint "
                          "with --hf-model")
    state = hf_state_dict(load_weights(engine_dir, manifest, device, progress=progress), mc, shapes)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def model_from_checkpoint(path: str | Path, manifest: EngineManifest,
                          device: torch.device) -> transformers.PreTrainedModel:
    same_dtype = manifest.model_config.checkpoint_dtype
    if dataclasses.replace(ModelConfig.from_hf_dir(path), checkpoint_dtype=same_dtype) != manifest.model_config:
        raise ConfigError(f"{path} is not the model this engine was built from (its config.json differs); "
                          "give that checkpoint, or leave --hf-model out to use the engine's weights")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=manifest.dtype)
    return model.to(device).eval()


class _StepClock(transformers.StoppingCriteria):
    """Stops nothing; notes when the first token of a ``generate`` call exists."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_token_time: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.first_token_time is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first_token_time = time.time()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFBackend:
    name = "hf"

    def __init__(self, engine_dir: str | Path, hf_model: str | Path | None = None,
                 max_batch_size: int | None = None, progress: bool = True):
        self.engine_dir = Path(engine_dir)
        self.hf_model = None if hf_model is None else Path(hf_model)
        self.manifest = EngineManifest.read(engine_dir)
        self.device = engine_device(self.manifest)
        self.max_batch_size = max_batch_size or self.manifest.build_config.max_batch_size
        self.model = (model_from_engine(engine_dir, self.manifest, self.device, progress) if hf_model is None
                      else model_from_checkpoint(hf_model, self.manifest, self.device))
        mc = self.manifest.model_config
        self.eos_token_ids = list(mc.eos_token_ids) or None
        self.pad_token_id = next((i for i in (mc.pad_token_id, *mc.eos_token_ids) if i is not None), 0)

    def describe(self, concurrency: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
        dtype = str(self.model.dtype).removeprefix("torch.")
        engine = engine_details(self.engine_dir, self.manifest, self.name, transformers.__version__, dtype)
        engine["model_path"] = str(self.hf_model or self.engine_dir)
        engine["attention_implementation"] = self.model.config._attn_implementation
        world = {"tp_size": 1, "pp_size": 1, "world_size": 1, "max_batch_size": concurrency or self.max_batch_size,
                 "max_num_tokens": None, "scheduling_policy": "static batches", "kv_cache_percentage": None,
                 "sampling": "greedy"}
        return engine, world

    def run(self, requests: list[BenchRequest], concurrency: int | None, streaming: bool,
            progress: bool) -> BenchRun:
        batch_size = concurrency or self.max_batch_size
        records: list[RequestRecord] = []
        with tqdm(total=len(requests), desc=f"{self.name} requests", unit="req", disable=not progress) as bar:
            for start in range(0, len(requests), batch_size):
                batch = requests[start:start + batch_size]
                records += self._generate(batch)
                bar.update(len(batch))
        return BenchRun(records)

    def _generate(self, batch: list[BenchRequest]) -> list[RequestRecord]:
        width = max(len(r.input_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, r in enumerate(batch):
            input_ids[row, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            attention_mask[row, width - len(r.input_ids):] = 1
        new_tokens = max(r.output_tokens for r in batch)
        generation = transformers.GenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        clock = _StepClock(self.device)
        start = time.time()
        try:
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention_mask.to(self.device),
                                          generation_config=generation,
                                          stopping_criteria=transformers.StoppingCriteriaList([clock]))
                generated = out[:, width:].cpu()
        except torch.cuda.OutOfMemoryError as e:
            raise KilnError(f"the hf backend ran out of GPU memory at batch size {len(batch)}; "
                            "lower --concurrency") from e
        end = time.time()
        if generated.shape[1] != new_tokens:
            raise KilnError(f"transformers generated {generated.shape[1]} tokens, not {new_tokens}")
        return [RequestRecord(r.task_id, len(r.input_ids), r.output_tokens, start, clock.first_token_time, end)
                for r in batch]

    def close(self) -> None:
        del self.model
