"""AWQ at build (``int4_awq``): a calibration text, the float model's inputs to every Linear on it, and
the per-input-channel scales searched on them (``kiln.quantization.weight_only.awq_scales``).

The text is the user's file (``BuildConfig.calibration_data``: .txt, or .jsonl with a "text" per line)
or, by default, a public-domain one bundled with kiln (``DEFAULT_CALIBRATION_TEXT``). Its tokens are cut
into sequences of up to ``CALIBRATION_SEQ_LEN`` (AutoAWQ's defaults: 128 sequences of 512 tokens) and run
through the unquantized model on the GPU when there is one (else the CPU), with the reference kernels;
each Linear keeps mean |x| over every token and up to ``MAX_ROWS`` of its input rows, on which the scales
are searched (one search per Linear, Q/K/V and gate/up fused, so they share their scales as AWQ's
groups do), then the clipping bound of each output channel's groups of W * s (``awq_clip``, on the
inputs divided by s). Both go to the int4_awq method through the converter, with the float weight
(``ActivationScaledWeight``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kiln.config import BuildConfig
from kiln.convert.checkpoint import CheckpointReader
from kiln.convert.converter import convert_checkpoint
from kiln.engine.tokenizer import Tokenizer
from kiln.errors import ConfigError
from kiln.kernels import AttentionMetadata, KernelOps, reference_plan
from kiln.layers import DenseLinearMethod, LayerContext, Linear, kernel_ops_of, load_parameters
from kiln.models import CausalLM, ModelSource, create_model, model_skeleton
from kiln.quantization.weight_only import awq_clip, awq_scales

# Project Gutenberg eBook #14838, Beatrix Potter's The Tale of Peter Rabbit (1902), public domain.
DEFAULT_CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration" / "peter_rabbit.txt"
CALIBRATION_SEQ_LEN = 512
MAX_CALIBRATION_SEQUENCES = 128
MAX_ROWS = 4096  # input rows per Linear for the search: 4096 x K of Llama-3-8B's layers is ~7 GB in bf16
BLOCK_SIZE = 16


def calibration_texts(path: str | Path | None) -> list[str]:
    """The texts of a calibration file: a .txt file is one text, a .jsonl file one per line ("text")."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION_TEXT
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"calibration_data {path} (--calibration-data): cannot read it ({e})") from e
    if path.suffix != ".jsonl":
        texts = [content]
    else:
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{number}: not a JSON line ({e})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"{path}:{number}: each line must be an object with a \"text\" string")
            texts.append(record["text"])
    if not any(text.strip() for text in texts):
        raise ConfigError(f"calibration_data {path} (--calibration-data) holds no text")
    return texts


def calibration_sequences(tokenizer: Tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """The texts' tokens, one stream, cut into at most MAX_CALIBRATION_SEQUENCES sequences of seq_len (the
    last may be shorter)."""
    stream = [token for text in texts for token in tokenizer.encode(text)]
    sequences = [stream[start:start + seq_len] for start in range(0, len(stream), seq_len)]
    return sequences[:MAX_CALIBRATION_SEQUENCES]


class _InputRecorder:
    """A Linear's calibration inputs: a random subset of up to MAX_ROWS rows (each token kept with the
    same probability), on the device."""

    def __init__(self, keep_probability: float, generator: torch.Generator):
        self.keep_probability, self.generator = keep_probability, generator
        self.rows: list[torch.Tensor] = []

    def __call__(self, module, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        if self.keep_probability < 1.0:
            keep = torch.rand(x.shape[0], generator=self.generator) < self.keep_probability
            x = x[keep.to(x.device)]
        self.rows.append(x.detach().clone())


def _prefill(model: CausalLM, tokens: list[int], device: torch.device) -> None:
    """One sequence through the model (its KV cache of its own), for the Linears' input hooks."""
    config = model.config
    num_blocks = -(-len(tokens) // BLOCK_SIZE)
    kv_cache = torch.zeros(config.num_layers, 2, num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim,
                           dtype=model.dtype, device=device)
    meta = AttentionMetadata(
        seq_lens=torch.tensor([len(tokens)], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, len(tokens)], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        seq_lens_host=[len(tokens)], query_lens_host=[len(tokens)], sliding_window=config.sliding_window)
    positions = torch.arange(len(tokens), device=device)
    model.forward(torch.tensor(tokens, device=device), positions, kv_cache, positions, meta,
                  torch.tensor([len(tokens) - 1], device=device))


def awq_input_scales(source: ModelSource, build: BuildConfig, dtype: torch.dtype, device: torch.device | None = None
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Linear prefix ("layers.0.attn.qkv.") -> (AWQ scales s [K], clipping bounds of W * s [N, groups]),
    float32 on the CPU, for an int4_awq engine of ``build`` (resolved: its group size and calibration
    data), from the float checkpoint's activations."""
    if source.tokenizer_dir is None:
        raise ConfigError(f"{source.checkpoint_dir}: int4_awq tokenizes its calibration text with the model's "
                          "tokenizer, and this folder has none; add the tokenizer files, or use int4_wo")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = source.config
    tokenizer = Tokenizer(source.tokenizer_dir, eos_token_ids=config.eos_token_ids, bos_token_id=config.bos_token_id)
    seq_len = min(CALIBRATION_SEQ_LEN, config.max_supported_positions)
    sequences = calibration_sequences(tokenizer, calibration_texts(build.calibration_data), seq_len)

    skeleton = model_skeleton(config, None, dtype)
    ctx = LayerContext(KernelOps(reference_plan(kernel_ops_of(skeleton))), DenseLinearMethod(), dtype, device)
    model = create_model(config, ctx, max_positions=seq_len)
    load_parameters(model, {name: tensor.to(device)
                            for name, tensor in convert_checkpoint(skeleton, CheckpointReader(source.checkpoint_dir))})
    num_tokens = sum(map(len, sequences))
    generator = torch.Generator().manual_seed(0)
    recorders = {name + ".": _InputRecorder(min(1.0, MAX_ROWS / num_tokens), generator)
                 for name, module in model.named_modules() if isinstance(module, Linear)}
    hooks = [model.get_submodule(prefix[:-1]).register_forward_pre_hook(recorder)
             for prefix, recorder in recorders.items()]
    scales = {}
    with torch.inference_mode():
        try:
            for tokens in tqdm(sequences, desc="build: AWQ calibration", unit="seq", disable=None):
                _prefill(model, tokens, device)
        finally:
            for hook in hooks:
                hook.remove()
        for prefix, recorder in tqdm(recorders.items(), desc="build: AWQ scale search", unit="layer", disable=None):
            weight = model.get_submodule(prefix[:-1]).weight.float()
            rows = torch.cat(recorder.rows).float()
            recorder.rows.clear()
            input_scales = awq_scales(weight, rows, build.group_size)
            clip = awq_clip(weight * input_scales, rows / input_scales, build.group_size)
            scales[prefix] = (input_scales.cpu(), clip.cpu())
    return scales
