"""Build-time and run-time configs. Frozen, validated on construction, one field per CLI flag; and the
rotary position encoding's parameters, which the kernels and layers take as they are."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from kiln.errors import ConfigError, RequestError

DTYPES = ("auto", "float32", "float16", "bfloat16")
TARGETS = ("auto", "cpu", "sm80", "sm86", "sm89", "sm90")
# "auto": the checkpoint's own (fp8 where a pre-quantized checkpoint has an FP8 KV cache), else the engine
# dtype; a dtype name must be the engine's (what "auto" resolves to, as a manifest holds it).
KV_CACHE_DTYPES = ("auto", "fp8", "float32", "float16", "bfloat16")
FP8_SCALINGS = ("channel", "tensor")  # fp8 weights: a scale per output channel, or one per tensor
GROUP_SIZES = (32, 64, 128)  # weight-only quantization groups: the ones AutoAWQ and GPTQ checkpoints use
CALIBRATION_FORMATS = (".txt", ".jsonl")
GREEDY_TEMPERATURE = 1e-5


class CapacityPolicy(enum.StrEnum):
    """How the scheduler admits sequences into the KV block pool (kiln.runtime.scheduler tells how)."""

    GUARANTEED_NO_EVICT = "guaranteed_no_evict"
    MAX_UTILIZATION = "max_utilization"

    @classmethod
    def parse(cls, value: "CapacityPolicy | str") -> "CapacityPolicy":
        """The policy of that name; any other name fails, listing the policies."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"capacity_scheduler_policy {value!r} is not supported; choose one of "
                              f"{', '.join(cls)} (--scheduler-policy)") from None


# What an unset BuildConfig field becomes; kiln.builder.resolve_build_config also fits the lengths to the model.
BUILD_DEFAULTS = dict(max_batch_size=8, max_input_len=1024, max_seq_len=2048, max_num_tokens=2048, tokens_per_block=32)


def _flag(help: str, flag: str | None = None, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Field metadata of a runtime option: its command-line help, its flag where that is not --field-name,
    and its choices (kiln.flags makes the flags of kiln serve / generate / bench from it)."""
    return {"help": help, "flag": flag, "choices": choices}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies: the base ``theta`` and the scaling type (default, linear, llama3)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class BuildConfig:
    """The limits fixed into an engine. The runtime may lower batch size / tokens, never raise them.

    A field left None (dtype and target: "auto") is unset: the builder fits it to the model and the
    machine (``resolve_build_config``), so a default never conflicts with a value given or with the
    model. An engine's manifest holds the resolved values.
    """

    max_batch_size: int | None = None
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    max_beam_width: int = 1
    tokens_per_block: int | None = None
    dtype: str = "auto"
    tp_size: int = 1  # tensor-parallel ranks (GPUs) the weights are split over; one weight file per rank
    target: str = "auto"
    # The LinearMethod every Linear stores its weight and multiplies by (kiln.layers.linear); "auto": the
    # checkpoint's own ("fp8" for a pre-quantized FP8 folder), else "none".
    quantization: str = "auto"
    # fp8 weights: one scale per output channel or one per tensor (None: "channel" for fp8, unused otherwise).
    fp8_scaling: str | None = None
    # What the paged KV cache stores: the engine dtype, or "fp8" (e4m3 with a scale per layer and K / V).
    kv_cache_dtype: str = "auto"
    # Context attention's Q @ K^T and P @ V as FP8 dots (TensorRT-LLM's name); needs the fp8 KV cache.
    use_fp8_context_fmha: bool = False
    # Inputs per scale and zero point of a grouped quantization (int4_wo, int4_awq; a GPTQ checkpoint's own);
    # None: the method's default (128), or none for methods without groups.
    group_size: int | None = None
    # int4_awq: the text whose activations choose the AWQ scales (.txt, or .jsonl of {"text": ...} lines);
    # None: the bundled public-domain text.
    calibration_data: str | None = None

    def __post_init__(self):
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer (or None for a default fitted to the "
                                  f"model), got {value!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.target not in TARGETS:
            raise ConfigError(f"target {self.target!r} is not supported; choose one of {', '.join(TARGETS)}")
        if not isinstance(self.tp_size, int) or isinstance(self.tp_size, bool) or self.tp_size < 1:
            raise ConfigError(f"tp_size (--tp-size) must be a positive integer (ranks the weights are split over), "
                              f"got {self.tp_size!r}")
        if self.max_beam_width != 1:
            raise ConfigError(f"max_beam_width={self.max_beam_width}: beam search is not supported yet; use 1")
        if self.fp8_scaling is not None and self.fp8_scaling not in FP8_SCALINGS:
            raise ConfigError(f"fp8_scaling {self.fp8_scaling!r} is not supported; choose one of "
                              f"{', '.join(FP8_SCALINGS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; choose one of "
                              f"{', '.join(KV_CACHE_DTYPES)}")
        if not isinstance(self.use_fp8_context_fmha, bool):
            raise ConfigError(f"use_fp8_context_fmha must be True or False, got {self.use_fp8_context_fmha!r}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size={self.group_size!r} (--group-size) is not supported; choose one of "
                              f"{', '.join(map(str, GROUP_SIZES))}")
        if self.calibration_data is not None and not str(self.calibration_data).endswith(CALIBRATION_FORMATS):
            raise ConfigError(f"calibration_data {self.calibration_data!r} (--calibration-data): give a "
                              f"{' or '.join(CALIBRATION_FORMATS)} file (.jsonl: one {{\"text\": ...}} per line)")
        if self.max_input_len is not None and self.max_seq_len is not None and self.max_input_len > self.max_seq_len:
            raise ConfigError(f"max_input_len ({self.max_input_len}) must be <= max_seq_len ({self.max_seq_len}); "
                              "raise max_seq_len (--max-seq-len) or lower max_input_len (--max-input-len)")
        block = self.tokens_per_block
        if block is not None and (block & (block - 1) or block < 4):
            raise ConfigError(f"tokens_per_block must be a power of two >= 4, got {block}")

    @property
    def is_resolved(self) -> bool:
        """Every field has its value (as in an engine's manifest), none is left to the builder."""
        return None not in (self.max_batch_size, self.max_input_len, self.max_seq_len, self.max_num_tokens,
                            self.tokens_per_block) and "auto" not in (self.dtype, self.target, self.quantization,
                                                                      self.kv_cache_dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown BuildConfig field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                              f"accepted: {', '.join(f.name for f in fields(cls))}")
        return cls(**d)

    @classmethod
    def of(cls, config: "BuildConfig | dict[str, Any] | None") -> "BuildConfig":
        """A BuildConfig from what the Python API accepts: one, a dict of its fields, or None (all unset)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        raise ConfigError(f"expected a BuildConfig, a dict of its fields or None, got {type(config).__name__}")

    def replace(self, **kw) -> "BuildConfig":
        return replace(self, **kw)


@dataclass(frozen=True)
class KvCacheConfig:
    """How much memory the KV block pool takes, sized once at load."""

    free_gpu_memory_fraction: float = field(default=0.9, metadata=_flag(
        "share of the GPU memory free after loading that the KV cache takes (GPU engines only)",
        flag="--kv-cache-free-gpu-mem-fraction"))
    max_tokens: int | None = field(default=None, metadata=_flag(
        "most tokens the KV cache holds (default: as many as the memory fraction allows; on the CPU, a full "
        "batch at max_seq_len)", flag="--kv-cache-max-tokens"))
    enable_block_reuse: bool = field(default=True, metadata=_flag(
        "reuse the KV blocks of a prompt prefix that an earlier request computed"))

    def __post_init__(self):
        if not 0.0 < self.free_gpu_memory_fraction <= 1.0:
            raise ConfigError(f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError(f"kv cache max_tokens must be positive, got {self.max_tokens}")


@dataclass(frozen=True)
class SchedulerConfig:
    capacity_scheduler_policy: CapacityPolicy = field(default=CapacityPolicy.GUARANTEED_NO_EVICT, metadata=_flag(
        "guaranteed_no_evict admits only what can finish; max_utilization packs and preempts",
        flag="--scheduler-policy", choices=tuple(CapacityPolicy)))
    enable_chunked_context: bool = field(default=True, metadata=_flag(
        "split prompts longer than max_num_tokens over several iterations"))

    def __post_init__(self):
        # A name is accepted where the policy is meant (the command line and the Python API give one).
        object.__setattr__(self, "capacity_scheduler_policy", CapacityPolicy.parse(self.capacity_scheduler_policy))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    # Turn the output tokens into text (Result.text); False leaves the text empty and spares the tokenizer's
    # work on every token (TensorRT-LLM's and vLLM's name; a benchmark reads the token ids alone).
    detokenize: bool = True

    def __post_init__(self):
        # Accept lists and a bare string where a tuple is meant, as users write them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "min_tokens must be between 0 and max_tokens"),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (isinstance(self.n, int) and self.n >= 1, "n must be an integer >= 1"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "logprobs must be an integer in [0, 20]"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
             "prompt_logprobs must be an integer in [0, 20]"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (self.detokenize or not self.stop, "stop strings are found in the text: they need detokenize=True"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(f"invalid sampling parameter: {message}")

    @property
    def has_penalties(self) -> bool:
        """Repetition, presence or frequency penalties: the sampler counts the sequence's token ids."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def is_greedy(self) -> bool:
        # Below this, logits / temperature overflows float32 (as vLLM, such temperatures mean greedy).
        return self.temperature < GREEDY_TEMPERATURE

    def replace(self, **kw) -> "SamplingParams":
        return replace(self, **kw)


@dataclass(frozen=True)
class RuntimeConfig:
    """Options given when an engine is loaded (LLM / Executor / serve / bench)."""

    max_batch_size: int | None = field(default=None, metadata=_flag(
        "most requests in one iteration, at most the engine's (default: the engine's)"))
    max_num_tokens: int | None = field(default=None, metadata=_flag(
        "most tokens in one iteration, at most the engine's (default: the engine's)"))
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    enable_cuda_graphs: bool = field(default=True, metadata=_flag(
        "replay decode steps as CUDA graphs (GPU engines with Triton attention)"))
    enable_overlap: bool = field(default=True, metadata=_flag(
        "plan and launch each step before the previous step's tokens reach the host, so the host's work "
        "overlaps the device's (off: each step waits for the one before)"))
    device: str | None = field(default=None, metadata=_flag(
        "torch device to load the engine on, e.g. cuda:1 (default: cuda for a GPU engine, cpu for a CPU one)"))

    def __post_init__(self):
        for name in ("max_batch_size", "max_num_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer (or left unset for the engine's), got {value!r}")

    def resolve(self, build: BuildConfig) -> tuple[int, int]:
        """Effective (max_batch_size, max_num_tokens): lower than the engine's or equal, never higher."""
        batch = self.max_batch_size or build.max_batch_size
        tokens = self.max_num_tokens or build.max_num_tokens
        if batch > build.max_batch_size:
            raise ConfigError(f"max_batch_size={batch} exceeds the engine's {build.max_batch_size}; "
                              "rebuild the engine with a larger --max-batch-size")
        if tokens > build.max_num_tokens:
            raise ConfigError(f"max_num_tokens={tokens} exceeds the engine's {build.max_num_tokens}; "
                              "rebuild the engine with a larger --max-num-tokens")
        if tokens < build.max_input_len and not self.scheduler_config.enable_chunked_context:
            raise ConfigError(f"max_num_tokens={tokens} is below max_input_len={build.max_input_len}, so long "
                              "prompts need chunked context; enable it or raise max_num_tokens")
        return batch, tokens
