"""Weight conversion: a Hugging Face checkpoint (or random dummy weights) -> the engine's tensors, one
block at a time.

The model skeleton (parameters declared, none allocated) lists the blocks and the checkpoint tensors
each is made of; the family's ``HF_NAMES`` says which checkpoint entries make each one (several are
concatenated along dim 0: Q/K/V, gate/up); each block then converts its tensors (a Linear through its
method). Nothing here names a family; the one block named is ``KvCacheScales`` (an FP8 KV cache's
scales), whose checkpoint tensors are optional: a pre-quantized checkpoint's KV-cache scales where it
has them (its family's HF_NAMES name them as compressed-tensors does; Fp8CheckpointReader also reads
ModelOpt's names), else 1.0.

Why 1.0 and no calibration at build: calibrating means running the model over sample text at build
time with every weight resident, which a build for another GPU (or of an 8B model on a small build
machine) cannot do, and which the streaming, block-by-block conversion avoids; and it buys little. With
scale 1.0 the cache holds k and v themselves in e4m3: in range up to ±448 (rotated keys of Llama-class
models stay far below; stories260K's largest is 30) with a relative step of 2^-4 from 2^-6 up, as vLLM's
FP8 cache without scales. On stories260K (tests/test_fp8_kv_cache.py) scale 1.0 keeps 1040 of 1091
teacher-forced top-1 tokens and per-layer scales calibrated to amax / 448 over the same text 1039: the
loss is the 3-bit mantissa, which no scale changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.fp8_checkpoints import Fp8CheckpointReader, detect_fp8_format, is_fp8_metadata
from kiln.convert.int_checkpoints import IntCheckpointReader, detect_checkpoint_quantization, is_int_metadata
from kiln.errors import CheckpointError
from kiln.layers import KvCacheScales, Layer, checkpoint_layers
from kiln.layers.base import ONES
from kiln.models import CausalLM, family
from kiln.models.registry import hf_sources
from kiln.quantization.fp8 import fuse_fp8_linears
from kiln.quantization.weight_only import ActivationScaledWeight, fuse_unpacked


def int_checkpoint_reader(reader: CheckpointReader) -> IntCheckpointReader | None:
    """The AWQ / GPTQ weights of the checkpoint, or None for a checkpoint without them."""
    quantization = detect_checkpoint_quantization(reader.path)
    return IntCheckpointReader(quantization, reader) if quantization is not None else None


def check_checkpoint(model: CausalLM, reader: CheckpointReader) -> None:
    """Fails before any conversion, naming missing and unexpected checkpoint tensors, then tensors whose
    shapes (read from file metadata) do not fit config.json."""
    config, fam = model.config, family(model.config.architecture)
    declared = {prefix + name: tensor for prefix, layer in checkpoint_layers(model)
                if not isinstance(layer, KvCacheScales) for name, tensor in layer.checkpoint_tensors.items()}
    sources = {name: hf_sources(fam.HF_NAMES, name) for name in declared}
    ignored = re.compile("|".join(fam.HF_IGNORED))
    is_fp8 = detect_fp8_format(reader.path) is not None
    int_reader = int_checkpoint_reader(reader)
    present = {n for n in reader.names() if not ignored.match(n) and not (is_fp8 and is_fp8_metadata(n))}
    if int_reader is not None:  # <linear>.qweight stands for <linear>.weight
        present = {n.removesuffix(".qweight") + ".weight" if n.endswith(".qweight") else n
                   for n in present if not is_int_metadata(n)}

    def shape(src: str) -> tuple[int, ...]:
        linear = src.removesuffix(".weight")
        if int_reader is not None and src.endswith(".weight") and int_reader.is_quantized(linear):
            return int_reader.shape(linear)
        return reader.shape(src)

    if config.tie_word_embeddings:  # some tied checkpoints store a copy; the embedding is used
        present -= set(hf_sources(fam.HF_NAMES, "lm_head.weight"))
    needed = {src for srcs in sources.values() for src in srcs}
    missing = sorted(needed - present)
    unexpected = sorted(present - needed)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:4])})")
        raise CheckpointError(f"{reader.path}: checkpoint does not match config.json ({config.architecture}): "
                              f"{'; '.join(parts)}")
    for name, tensor in declared.items():
        shapes = [shape(src) for src in sources[name]]
        if any(s[1:] != tensor.shape[1:] for s in shapes) or sum(s[0] for s in shapes) != tensor.shape[0]:
            found = ", ".join(f"{src} {list(s)}" for src, s in zip(sources[name], shapes))
            raise CheckpointError(f"{reader.path}: {found} do not fit config.json, which implies {name} "
                                  f"{list(tensor.shape)}; the config does not describe these weights")


def convert_checkpoint(model: CausalLM, reader: CheckpointReader,
                       input_scales: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (kiln name, tensor) in the model's parameter order: fused, converted, contiguous, on the
    host. Names and shapes were checked by check_checkpoint.

    A pre-quantized FP8 checkpoint's weights go to a block as one ``Fp8Linear`` (parts fused with a scale
    per row, nothing requantized) where the block's method takes them (``takes_fp8_weights``), else
    dequantized to float32. An AWQ / GPTQ checkpoint's go as one ``UnpackedWeight`` (parts fused along N),
    which only a method that ``takes_int_weights`` stores (the build resolves the quantization to one).
    ``input_scales``: AWQ's scales by Linear prefix (int4_awq), handed over with the float weight."""
    names = family(model.config.architecture).HF_NAMES
    fp8 = Fp8CheckpointReader(reader.path, reader) if detect_fp8_format(reader.path) is not None else None
    int_reader = int_checkpoint_reader(reader)
    for prefix, layer in checkpoint_layers(model):
        if isinstance(layer, KvCacheScales):
            yield from _stored(prefix, layer, {"scale": _kv_cache_scales(fp8, hf_sources(names, prefix + "scale"))})
            continue
        method = getattr(layer, "method", None)
        tensors = {}
        for name in layer.checkpoint_tensors:
            sources = hf_sources(names, prefix + name)
            modules = [src.removesuffix(".weight") for src in sources]
            is_weight = all(src.endswith(".weight") for src in sources)
            if fp8 is not None and is_weight and all(fp8.is_quantized(m) for m in modules):
                fused = fuse_fp8_linears([fp8.linear(m) for m in modules])
                tensors[name] = fused if method.takes_fp8_weights else fused.weight.float() * fused.weight_scale
                continue
            if int_reader is not None and is_weight and any(int_reader.is_quantized(m) for m in modules):
                if not method.takes_int_weights or not all(int_reader.is_quantized(m) for m in modules):
                    raise CheckpointError(f"{reader.path}: {', '.join(modules)}: kiln's {type(method).__name__} "
                                          "cannot store these AWQ / GPTQ weights (fused parts must all be "
                                          "quantized, with a method that takes them)")
                tensors[name] = fuse_unpacked([int_reader.linear(m) for m in modules])
                continue
            parts = [reader.get(src) for src in sources]
            tensors[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if input_scales is not None and prefix in input_scales:
            tensors["weight"] = ActivationScaledWeight(tensors["weight"], *input_scales[prefix])
        yield from _stored(prefix, layer, tensors)


def _kv_cache_scales(fp8: Fp8CheckpointReader | None, sources: tuple[str, ...]) -> torch.Tensor:
    """(k_scale, v_scale) of the attention module whose k_scale / v_scale ``sources`` name: the checkpoint's,
    else 1.0."""
    scales = fp8.kv_cache_scales(sources[0].rpartition(".")[0]) if fp8 is not None else None
    return torch.ones(2) if scales is None else torch.stack(scales)


def dummy_weights(model: CausalLM, device: torch.device, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random checkpoint tensors of the right shapes, made on ``device`` in the engine dtype and converted
    as a checkpoint's would be (no checkpoint needed)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for prefix, layer in checkpoint_layers(model):
        tensors = {}
        for name, declared in layer.checkpoint_tensors.items():
            if declared.init == ONES:
                tensors[name] = torch.ones(declared.shape, dtype=model.dtype, device=device)
            else:
                tensors[name] = torch.empty(declared.shape, dtype=model.dtype, device=device)
                tensors[name].normal_(0.0, declared.init, generator=gen)
        yield from _stored(prefix, layer, tensors)


def _stored(prefix: str, layer: Layer, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    stored = layer.convert(tensors)
    for name, _ in layer.named_parameters(recurse=False):
        yield prefix + name, stored[name].contiguous()
