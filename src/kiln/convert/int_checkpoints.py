"""Pre-quantized checkpoints users download, AutoAWQ and GPTQ: detection, unpacking, and repacking into
kiln's INT4 / INT8 layouts (``kiln.quantization.weight_only``).

Both store, per linear layer ``<name>``, ``<name>.qweight``, ``<name>.qzeros``, ``<name>.scales`` (and
GPTQ ``<name>.g_idx``) in place of ``<name>.weight``, for W [N, K] (out x in features), y = x @ W.T; the
weight is (q - z) * s with q, z unsigned integers and s per (group of g input rows, output channel).

AutoAWQ, ``quantization_config.quant_method: "awq"``, ``version: "gemm"`` (``WQLinear_GEMM``), 4 bits::

    qweight  int32 [K, N / 8]    packed along N: nibble i (bits 4i..4i+3) of qweight[k, c] is
                                 q[k, 8c + AWQ_ORDER[i]], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros   int32 [K / g, N / 8] the zero points, packed the same way
    scales   fp16  [K / g, N]

GPTQ (AutoGPTQ, GPTQModel, optimum), ``quant_method: "gptq"`` (older checkpoints: no quant_method, the
settings in ``quantize_config.json``), 4 or 8 bits, p = 32 / bits values per word::

    qweight  int32 [K / p, N]    packed along K: value j (bits j*bits..) of qweight[r, n] is q[p*r + j, n]
    qzeros   int32 [G, N / p]    packed along N in plain order; G = ceil(K / g), g = K for group_size -1
    scales   fp16  [G, N]
    g_idx    int32 [K]           the group of each input row; with desc_act (act-order) not k // g

    The zero points' off-by-one: ``checkpoint_format: "gptq"`` (v1, every AutoGPTQ checkpoint and
    GPTQModel's default) stores z - 1, so z = stored + 1; "gptq_v2" stores z. A v1 zero point of 0 was
    written as -1, whose low bits read back as 2**bits - 1: the sum is taken modulo 2**bits, as
    AutoGPTQ's dequantization does (``zeros = (zeros + 1) & maxq``), giving 0 back. (AutoGPTQ's packer
    OR-ed that -1 into the whole word, overwriting the word's later zero points with ones as well: those
    read back as 0 too, which is what the checkpoint holds; nothing can recover the originals.)
    ``sym: true`` (zero points all 2**(bits-1)) needs nothing special: the zero points are stored.

Building: ``kiln build DIR`` (and ``LLM(DIR)``) detects these settings from the folder and builds the
engine in the linear method that stores the weights as they are (``engine_quantization``); the
converter reads each linear as an ``UnpackedWeight`` (Q/K/V and gate/up fused along N) and the method
repacks it (``UnpackedWeight.to_int4`` / ``to_int8``): INT4 with K padded with q = z; INT8 as int8 q - 128
with int8 zero points z - 128, or per-channel scales and no zero points for a symmetric checkpoint with
one group per channel. Act-order (desc_act): the input rows are reordered so each group's rows are
contiguous (a stable sort by g_idx), and the permutation is kept as ``input_order`` for the kernels to
gather x through: permuting the previous layer's outputs instead is not possible for every layer, and a
per-row group index would cost the kernels a scale load per weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.config import GROUP_SIZES
from kiln.convert.checkpoint import CheckpointReader
from kiln.errors import CheckpointError
from kiln.quantization.weight_only import UnpackedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output channel (within 8) that nibble i of an AutoAWQ word holds
SUPPORTED_AWQ_VERSIONS = ("gemm",)
SUPPORTED_GPTQ_FORMATS = ("gptq", "gptq_v2")
SUPPORTED_GPTQ_BITS = (4, 8)


@dataclass(frozen=True)
class CheckpointQuantization:
    """How a pre-quantized checkpoint's linear weights are stored."""

    method: str  # "awq" | "gptq"
    bits: int
    group_size: int | None  # None: one group spanning all inputs (GPTQ group_size -1)
    checkpoint_format: str  # AWQ: "gemm"; GPTQ: "gptq" (zero points stored minus 1) | "gptq_v2"
    is_symmetric: bool = False
    desc_act: bool = False
    modules_to_not_convert: tuple[str, ...] = ()  # AutoAWQ's list of modules left in float

    def __str__(self) -> str:
        groups = f"groups of {self.group_size}" if self.group_size else "one group per channel"
        return f"{self.method.upper()} {self.bits}-bit ({groups}{', act-order' if self.desc_act else ''})"

    @property
    def zero_point_offset(self) -> int:
        """What to add to a stored zero point: GPTQ v1's historical off-by-one."""
        return 1 if self.method == "gptq" and self.checkpoint_format == "gptq" else 0


def _group_size(value: Any) -> int | None:
    group_size = int(value)
    return None if group_size == -1 else group_size


def parse_quantization_config(config: dict[str, Any], source: str = "quantization_config"
                              ) -> CheckpointQuantization | None:
    """A checkpoint's quantization settings (config.json's ``quantization_config``, or the contents of
    ``quantize_config.json`` / ``quant_config.json``); None for methods other than AWQ and GPTQ. Settings
    kiln cannot read fail here, before any tensor is read, naming the supported ones."""
    method = str(config.get("quant_method", "")).lower()
    if not method:  # legacy files: AutoAWQ's quant_config.json says w_bit, AutoGPTQ's quantize_config.json bits
        method = "awq" if "w_bit" in config or "q_group_size" in config else "gptq"
    if method == "awq":
        bits = int(config.get("bits", config.get("w_bit", 4)))
        version = str(config.get("version", "gemm")).lower()
        if version not in SUPPORTED_AWQ_VERSIONS or bits != 4:
            raise CheckpointError(f"{source}: AWQ version {version!r} with {bits} bits is not supported; kiln reads "
                                  f"{', '.join(SUPPORTED_AWQ_VERSIONS)} (AutoAWQ's WQLinear_GEMM) with 4 bits")
        if not config.get("zero_point", True):
            raise CheckpointError(f"{source}: AWQ without zero points is not supported (AutoAWQ's GEMM packing "
                                  "always stores them)")
        return CheckpointQuantization(
            "awq", bits, _group_size(config.get("group_size", config.get("q_group_size", 128))), version,
            modules_to_not_convert=tuple(config.get("modules_to_not_convert") or ()))
    if method == "gptq":
        bits = int(config["bits"])
        checkpoint_format = str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()
        if config.get("is_marlin_format"):
            checkpoint_format = "marlin"
        if bits not in SUPPORTED_GPTQ_BITS or checkpoint_format not in SUPPORTED_GPTQ_FORMATS:
            raise CheckpointError(
                f"{source}: GPTQ {checkpoint_format!r} with {bits} bits is not supported; kiln reads checkpoint "
                f"formats {', '.join(SUPPORTED_GPTQ_FORMATS)} with {' or '.join(map(str, SUPPORTED_GPTQ_BITS))} bits")
        if str(config.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
            raise CheckpointError(f"{source}: GPTQ pack_dtype {config['pack_dtype']!r} is not supported; "
                                  "kiln reads int32")
        return CheckpointQuantization(
            "gptq", bits, _group_size(config.get("group_size", -1)), checkpoint_format,
            is_symmetric=bool(config.get("sym", True)), desc_act=bool(config.get("desc_act", False)))
    return None


def detect_checkpoint_quantization(model_dir: str | Path) -> CheckpointQuantization | None:
    """AWQ / GPTQ settings of a Hugging Face folder: config.json's ``quantization_config``, else an
    older GPTQ's ``quantize_config.json`` or AutoAWQ's ``quant_config.json``; None when it has none of
    these (or another method, such as FP8, which other readers handle)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if config_path.is_file():
        quantization_config = json.loads(config_path.read_text()).get("quantization_config")
        if quantization_config:
            return parse_quantization_config(quantization_config, f"{config_path} quantization_config")
    for name in ("quantize_config.json", "quant_config.json"):
        path = model_dir / name
        if path.is_file():
            return parse_quantization_config(json.loads(path.read_text()), str(path))
    return None


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] -> int16 [..., W, 32 / bits], value j from bits j*bits.. of each word."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.int16)


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
        raise CheckpointError(f"{name} is {tensor.dtype} {list(tensor.shape)}, expected "
                              f"{dtype or 'float'} {list(shape)}")


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int | None
               ) -> UnpackedWeight:
    """AutoAWQ GEMM tensors -> integers (AWQ's interleaved nibble order undone) in W's orientation."""
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    group_size = group_size or in_features
    if in_features % group_size:
        raise CheckpointError(f"AWQ qweight has {in_features} input rows, not whole groups of {group_size}")
    num_groups = in_features // group_size
    _check_shape("AWQ qweight", qweight, (in_features, out_features // 8), torch.int32)
    _check_shape("AWQ qzeros", qzeros, (num_groups, out_features // 8), torch.int32)
    _check_shape("AWQ scales", scales, (num_groups, out_features))

    def unpack(words: torch.Tensor) -> torch.Tensor:
        nibbles = _unpack_words(words, 4)  # [rows, N / 8, nibble i]
        ordered = torch.empty_like(nibbles)
        ordered[..., list(AWQ_ORDER)] = nibbles  # nibble i holds channel AWQ_ORDER[i] of its 8
        return ordered.flatten(-2)

    rows = torch.arange(in_features, device=qweight.device) // group_size
    return UnpackedWeight(4, unpack(qweight).T.contiguous(), unpack(qzeros).T.contiguous(), scales.T.contiguous(),
                          rows)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                quantization: CheckpointQuantization) -> UnpackedWeight:
    """GPTQ tensors -> integers in W's orientation, the zero points' v1 offset applied."""
    bits = quantization.bits
    per_word = 32 // bits
    in_features, out_features = qweight.shape[0] * per_word, qweight.shape[1]
    group_size = quantization.group_size or in_features
    num_groups = -(-in_features // group_size)
    _check_shape("GPTQ qweight", qweight, (in_features // per_word, out_features), torch.int32)
    _check_shape("GPTQ qzeros", qzeros, (num_groups, out_features // per_word), torch.int32)
    _check_shape("GPTQ scales", scales, (num_groups, out_features))
    values = _unpack_words(qweight.T, bits).flatten(-2)  # [N, K / p, j] -> [N, K]: row p*r + j
    zeros = (_unpack_words(qzeros, bits).flatten(-2) + quantization.zero_point_offset) & ((1 << bits) - 1)
    if g_idx is None:
        rows = torch.arange(in_features, device=qweight.device) // group_size
    else:
        _check_shape("GPTQ g_idx", g_idx, (in_features,), g_idx.dtype)
        rows = g_idx.long()
        if rows.min() < 0 or rows.max() >= num_groups:
            raise CheckpointError(f"GPTQ g_idx names groups outside 0..{num_groups - 1}")
    return UnpackedWeight(bits, values, zeros.T.contiguous(), scales.T.contiguous(), rows)


def read_quantized_linear(quantization: CheckpointQuantization, tensors: dict[str, torch.Tensor]) -> UnpackedWeight:
    """One linear layer's checkpoint tensors (``qweight``, ``qzeros``, ``scales``, GPTQ ``g_idx``: the
    names after the layer's prefix) -> its integers, scales and zero points (repacked by the linear
    method: ``UnpackedWeight.to_int4`` / ``to_int8``)."""
    missing = [name for name in ("qweight", "qzeros", "scales") if name not in tensors]
    if missing:
        raise CheckpointError(f"{quantization.method.upper()} layer lacks {', '.join(missing)}")
    if quantization.method == "awq":
        return unpack_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], quantization.group_size)
    return unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"), quantization)


def engine_quantization(quantization: CheckpointQuantization) -> tuple[str, int | None]:
    """The linear method (``BuildConfig.quantization``) and group size that store this checkpoint's weights
    as they are: 4-bit as int4_wo (int4_gptq with GPTQ act-order, for its input permutation), 8-bit GPTQ
    as int8_wo where it is symmetric with one group per channel and no act-order, else as int8_gptq.
    Groups of 32, 64 or 128 are kept; a larger multiple of 128, or one group per channel, is stored as
    groups of 128 with the scale repeated (the same weights)."""
    group_size = quantization.group_size
    if quantization.bits == 8 and quantization.is_symmetric and group_size is None and not quantization.desc_act:
        return "int8_wo", None
    if group_size not in GROUP_SIZES:
        if group_size is not None and group_size % max(GROUP_SIZES):
            raise CheckpointError(f"{quantization.method.upper()} group size {group_size} is not supported; kiln "
                                  f"stores groups of {', '.join(map(str, GROUP_SIZES))} (or a multiple of "
                                  f"{max(GROUP_SIZES)}, or one group per channel, as groups of "
                                  f"{max(GROUP_SIZES)})")
        group_size = max(GROUP_SIZES)
    if quantization.bits == 8:
        return "int8_gptq", group_size
    return ("int4_gptq" if quantization.desc_act else "int4_wo"), group_size


class IntCheckpointReader:
    """The quantized linear weights of an AutoAWQ / GPTQ checkpoint, by Hugging Face module name
    ("model.layers.0.self_attn.q_proj"); layers the checkpoint keeps in float have a plain ``.weight``."""

    def __init__(self, quantization: CheckpointQuantization, checkpoint: CheckpointReader):
        self.quantization, self.checkpoint = quantization, checkpoint
        self._names = checkpoint.names()

    def is_quantized(self, linear: str) -> bool:
        return f"{linear}.qweight" in self._names

    def shape(self, linear: str) -> tuple[int, int]:
        """The float weight's [out_features, in_features], from the qweight's file metadata."""
        rows, cols = self.checkpoint.shape(f"{linear}.qweight")
        if self.quantization.method == "awq":
            return cols * 8, rows  # [K, N / 8]
        return cols, rows * 32 // self.quantization.bits  # [K / p, N]

    def linear(self, linear: str) -> UnpackedWeight:
        names = ("qweight", "qzeros", "scales", "g_idx")
        tensors = {n: self.checkpoint.get(f"{linear}.{n}") for n in names if f"{linear}.{n}" in self._names}
        try:
            return read_quantized_linear(self.quantization, tensors)
        except CheckpointError as e:
            raise CheckpointError(f"{self.checkpoint.path}: {linear}: {e}") from e


def is_int_metadata(name: str) -> bool:
    """Whether a checkpoint tensor is an AWQ / GPTQ zero point, scale or group index, not a weight."""
    return name.endswith((".qzeros", ".scales", ".g_idx"))
