"""Pre-quantized FP8 checkpoints, read into kiln's FP8 convention (kiln.quantization.fp8: float32 scales
that multiply, 0-d per tensor or [N, 1] per output channel).

Two layouts are published; both store e4m3 weights as ``<linear>.weight`` (float8_e4m3fn, [N, K]) beside
``<linear>.weight_scale``, and a static activation scale as ``<linear>.input_scale``; a scale is
amax / 448 and multiplies (w ≈ weight * weight_scale). Layers left in 16-bit (lm_head, as a rule) have
no scales.

- **ModelOpt** (NVIDIA TensorRT Model Optimizer; e.g. nvidia/Llama-3.1-8B-Instruct-FP8):
  ``hf_quant_config.json`` = {"producer": {"name": "modelopt", ...}, "quantization": {"quant_algo": "FP8",
  "kv_cache_quant_algo": "FP8" | null, "exclude_modules": ["lm_head", ...]}}; newer exports also put
  {"quant_method": "modelopt", "quant_algo": ..., "ignore": [...], "kv_cache_scheme": ...} in config.json.
  quant_algo "FP8": float32 0-d weight_scale and input_scale per linear (q, k and v each with their own
  weight scale); "FP8_PER_CHANNEL_PER_TOKEN": weight_scale per output channel, activations per token.
  KV-cache scales: ``<attn>.k_proj.k_scale`` / ``<attn>.v_proj.v_scale`` (amax / 448).
- **compressed-tensors** (llm-compressor; e.g. the *-FP8-dynamic checkpoints): config.json
  ``quantization_config`` = {"quant_method": "compressed-tensors", "format": "float-quantized" (older:
  "naive-quantized"), "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8,
  "type": "float", "strategy": "channel" | "tensor", "symmetric": true, ...}, "input_activations": {"num_bits":
  8, "type": "float", "dynamic": true | false, "strategy": "token" | "tensor"} | null}}, "ignore":
  ["lm_head", "re:..."], "kv_cache_scheme": {...} | null}. weight_scale is [N, 1] (channel) or [1] (tensor)
  in the model's dtype (bfloat16 as a rule), input_scale [1] for static activations; KV-cache scales are
  ``<attn>.k_scale`` / ``<attn>.v_scale``.

Checked against ModelOpt's exporter (modelopt/torch/export: quant_utils.py, convert_hf_config.py) and
compressed-tensors' (quantization/lifecycle/initialize.py, forward.py); tests/test_fp8_checkpoints.py
writes both layouts from those specs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.convert.checkpoint import CheckpointReader
from kiln.errors import CheckpointError
from kiln.quantization.fp8 import FP8_DTYPE, Fp8Linear

# ModelOpt quant_algo -> (weight scaling, activation scaling)
MODELOPT_FP8_ALGOS = {"FP8": ("tensor", "static"), "FP8_PER_CHANNEL_PER_TOKEN": ("channel", "dynamic")}
COMPRESSED_TENSORS_FP8_FORMATS = ("float-quantized", "naive-quantized")
# Tensor name suffixes that carry FP8 metadata, not weights of their own.
SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".weight_zero_point", ".input_zero_point", ".k_scale",
                  ".v_scale", ".kv_scale", ".output_scale")
# KV-cache scale names under an attention module, in the order tried: compressed-tensors, ModelOpt,
# older exports (output scales of the k / v projections, one shared kv_scale).
KV_SCALE_NAMES = ((".k_scale", ".v_scale"), (".k_proj.k_scale", ".v_proj.v_scale"),
                  (".k_proj.output_scale", ".v_proj.output_scale"), (".kv_scale", ".kv_scale"))


@dataclass(frozen=True)
class Fp8CheckpointFormat:
    """What an FP8 checkpoint holds. weight_scaling: "tensor" | "channel"; activation_scaling: "static"
    (an input_scale per linear), "dynamic" (computed at run time: kiln quantizes per token, also where a
    checkpoint asks for dynamic per-tensor scales, finer and never coarser) or "none" (weight-only FP8,
    run as "dynamic"); ignored: the modules the config leaves unquantized, as it writes them; kv_cache:
    "fp8" when the checkpoint has FP8 KV-cache scales."""
    producer: str
    weight_scaling: str
    activation_scaling: str
    ignored: tuple[str, ...] = ()
    kv_cache: str | None = None

    def __str__(self) -> str:
        activations = {"static": "static per-tensor activation scales", "dynamic": "activations per token",
                       "none": "weight-only"}[self.activation_scaling]
        kv = ", FP8 KV-cache scales" if self.kv_cache else ""
        ignored = f"; unquantized: {', '.join(self.ignored)}" if self.ignored else ""
        return f"{self.producer} FP8 (per-{self.weight_scaling} weight scales, {activations}{kv}){ignored}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e


def _modelopt_format(quant_algo: str | None, ignored: list[str] | None, kv_cache) -> Fp8CheckpointFormat | None:
    if quant_algo is None or not (quant_algo.startswith("FP8") or quant_algo == "MXFP8"):
        return None  # not FP8 weights (NVFP4, W4A8_*_FP8, INT4 AWQ, or KV-cache-only quantization)
    if quant_algo not in MODELOPT_FP8_ALGOS:
        raise CheckpointError(f"ModelOpt quant_algo {quant_algo!r} is not supported; kiln reads "
                              f"{', '.join(MODELOPT_FP8_ALGOS)}")
    weight_scaling, activation_scaling = MODELOPT_FP8_ALGOS[quant_algo]
    # kv_cache: hf_quant_config.json's kv_cache_quant_algo ("FP8"), or config.json's kv_cache_scheme.
    is_fp8_kv = kv_cache == "FP8" or (isinstance(kv_cache, dict) and _is_fp8_args(kv_cache))
    return Fp8CheckpointFormat("ModelOpt", weight_scaling, activation_scaling, tuple(ignored or ()),
                               "fp8" if is_fp8_kv else None)


def _is_fp8_args(args: dict | None) -> bool:
    return bool(args) and args.get("num_bits") == 8 and args.get("type") == "float"


def _compressed_tensors_format(config: dict) -> Fp8CheckpointFormat | None:
    groups = list((config.get("config_groups") or {}).values())
    if not groups or not all(_is_fp8_args(g.get("weights")) for g in groups):
        return None  # integer or 4-bit weights: not an FP8 checkpoint
    formats = {g.get("format") or config.get("format") for g in groups}
    if not formats <= set(COMPRESSED_TENSORS_FP8_FORMATS):
        raise CheckpointError(f"compressed-tensors format {', '.join(map(str, formats))} is not supported for FP8; "
                              f"kiln reads {', '.join(COMPRESSED_TENSORS_FP8_FORMATS)}")
    weight_strategies = {g["weights"].get("strategy") or "tensor" for g in groups}
    if not weight_strategies <= {"channel", "tensor"} or len(weight_strategies) > 1:
        raise CheckpointError(f"compressed-tensors FP8 weight strategy {', '.join(sorted(weight_strategies))} is "
                              "not supported; kiln reads one of: channel, tensor (not block or group scales)")
    if any(not g["weights"].get("symmetric", True) for g in groups):
        raise CheckpointError("compressed-tensors FP8 weights with zero points (symmetric: false) are not supported")
    activations = [g.get("input_activations") for g in groups]
    schemes = {"none" if a is None else "dynamic" if a.get("dynamic") else "static" for a in activations}
    if len(schemes) > 1 or any(a is not None and not _is_fp8_args(a) for a in activations):
        raise CheckpointError("compressed-tensors config groups with different or non-FP8 activation schemes "
                              "are not supported")
    static = [a for a in activations if a is not None and not a.get("dynamic")]
    if any((a.get("strategy") or "tensor") != "tensor" for a in static):
        raise CheckpointError("static FP8 activation scales must be per tensor")
    return Fp8CheckpointFormat("compressed-tensors", weight_strategies.pop(), schemes.pop(),
                               tuple(config.get("ignore") or ()),
                               "fp8" if _is_fp8_args(config.get("kv_cache_scheme")) else None)


def detect_fp8_format(folder: str | Path) -> Fp8CheckpointFormat | None:
    """The FP8 layout of a Hugging Face folder, from its configs alone; None when it holds no FP8 weights
    (a float checkpoint, or another quantization). Raises CheckpointError for an FP8 variant kiln cannot
    read (block scales, zero points, e5m2), naming what it reads."""
    folder = Path(folder)
    if (folder / "hf_quant_config.json").is_file():
        quantization = _read_json(folder / "hf_quant_config.json").get("quantization") or {}
        return _modelopt_format(quantization.get("quant_algo"), quantization.get("exclude_modules"),
                                quantization.get("kv_cache_quant_algo"))
    if not (folder / "config.json").is_file():
        return None
    config = _read_json(folder / "config.json").get("quantization_config") or {}
    method = config.get("quant_method")
    if method == "modelopt":
        return _modelopt_format(config.get("quant_algo"), config.get("ignore"), config.get("kv_cache_scheme"))
    if method == "compressed-tensors":
        return _compressed_tensors_format(config)
    return None


class Fp8CheckpointReader:
    """The FP8 tensors of a pre-quantized checkpoint, by Hugging Face module name
    ("model.layers.0.self_attn.q_proj"), in kiln's convention."""

    def __init__(self, folder: str | Path, checkpoint: CheckpointReader | None = None):
        self.path = Path(folder)
        detected = detect_fp8_format(self.path)
        if detected is None:
            raise CheckpointError(f"{self.path}: not an FP8 checkpoint (no ModelOpt hf_quant_config.json or "
                                  "compressed-tensors FP8 quantization_config)")
        self.format = detected
        self.checkpoint = checkpoint or CheckpointReader(self.path)
        self._names = self.checkpoint.names()

    def is_quantized(self, linear: str) -> bool:
        """Whether the checkpoint stores this linear layer in FP8 (ignored layers keep 16-bit weights)."""
        return f"{linear}.weight_scale" in self._names

    def linear(self, linear: str) -> Fp8Linear:
        if not self.is_quantized(linear):
            raise CheckpointError(f"{self.path}: {linear} is not stored in FP8 (no {linear}.weight_scale)")
        weight = self.checkpoint.get(f"{linear}.weight")
        if weight.dtype != FP8_DTYPE:
            raise CheckpointError(f"{self.path}: {linear}.weight is {str(weight.dtype).removeprefix('torch.')}; "
                                  "kiln reads FP8 weights in float8_e4m3fn only")
        if weight.dim() != 2:
            raise CheckpointError(f"{self.path}: {linear}.weight has shape {tuple(weight.shape)}, not [out, in]")
        weight_scale = self._scale(f"{linear}.weight_scale", weight.shape[0])
        for name in (f"{linear}.weight_zero_point", f"{linear}.input_zero_point"):
            if name in self._names and self.checkpoint.get(name).float().abs().max() != 0:
                raise CheckpointError(f"{self.path}: {name} is not zero; asymmetric FP8 is not supported")
        input_scale = None
        if self.format.activation_scaling == "static":
            if f"{linear}.input_scale" not in self._names:
                raise CheckpointError(f"{self.path}: {linear}.input_scale is missing, and this checkpoint's "
                                      "activations have static scales")
            input_scale = self._scale(f"{linear}.input_scale", 1)
        return Fp8Linear(weight, weight_scale, input_scale)

    def dequantize(self, linear: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight, weight_scale, _ = self.linear(linear)
        return (weight.float() * weight_scale).to(dtype)

    def kv_cache_scales(self, attention: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k_scale, v_scale), 0-d float32, of an attention module ("model.layers.0.self_attn"): the KV
        cache holds k / k_scale in e4m3. None where the checkpoint has none."""
        for k_suffix, v_suffix in KV_SCALE_NAMES:
            k_name, v_name = attention + k_suffix, attention + v_suffix
            if k_name in self._names and v_name in self._names:
                return self._scale(k_name, 1), self._scale(v_name, 1)
        return None

    def _scale(self, name: str, num_rows: int) -> torch.Tensor:
        """A scale tensor as kiln keeps it: float32, 0-d (one value) or [num_rows, 1]; positive and finite."""
        scale = self.checkpoint.get(name).float()
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() == num_rows and scale.shape in ((num_rows,), (num_rows, 1)):
            scale = scale.reshape(num_rows, 1).contiguous()
        else:
            raise CheckpointError(f"{self.path}: {name} has shape {tuple(scale.shape)}; kiln reads one scale per "
                                  f"tensor or per output channel ({num_rows}), not block or group scales")
        if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise CheckpointError(f"{self.path}: {name} holds scales that are not positive and finite")
        return scale


def is_fp8_metadata(name: str) -> bool:
    """Whether a checkpoint tensor is an FP8 scale or zero point rather than a weight of the model."""
    return name.endswith(SCALE_SUFFIXES)
