"""kiln: build an inference engine from a Hugging Face checkpoint, then serve it with in-flight batching."""

from kiln.builder import Builder, Engine
from kiln.convert import AutoModelForCausalLM
from kiln.config import BuildConfig, KvCacheConfig, RuntimeConfig, SamplingParams, SchedulerConfig
from kiln.errors import KilnError
from kiln.runtime.executor import Executor
from kiln.runtime.llm import LLM, CompletionOutput, RequestOutput
from kiln.runtime.request import Request, Response, Result
from kiln.version import __version__

__all__ = [
    "AutoModelForCausalLM", "Builder", "BuildConfig", "CompletionOutput", "Engine", "Executor", "KilnError", "KvCacheConfig", "LLM",
    "Request", "RequestOutput", "Response", "Result", "RuntimeConfig", "SamplingParams", "SchedulerConfig",
    "__version__",
]
