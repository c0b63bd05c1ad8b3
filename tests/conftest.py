"""Shared fixtures: the ``gpu`` marker, an isolated engine cache, tiny random-weight Hugging Face
checkpoints, kiln engines built from them, the bundled stories260K engine, float32 -> e4m3 casts in
Triton's interpreter rounded as the GPU rounds them, and ``kiln serve`` processes on ports the OS picks."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import torch

# Where tests' tensors live: CUDA on a GPU machine (the ``gpu``-marked tests run there only), else the CPU.
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
gpu = pytest.mark.gpu

# Triton fixes when it is imported whether kernels compile or run in its interpreter; without a GPU
# only the interpreter can run them (tests/test_kernels.py), so choose it before kiln imports triton.
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln import BuildConfig, Builder
from kiln.convert import AutoModelForCausalLM
from kiln.runtime.llm import DEFAULT_MODEL_DIR

STORIES_DIR = DEFAULT_MODEL_DIR

# Small enough to build and run in well under a second, large enough for GQA (4 heads over 2 KV heads).
# No EOS: random weights would stop at it by chance; tests of EOS handling set their own.
TINY_HF_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=None, pad_token_id=0)

# Limits for engines of tiny models; tests override what they exercise.
TINY_BUILD = dict(max_batch_size=4, max_input_len=96, max_seq_len=128, max_num_tokens=256, tokens_per_block=8,
                  dtype="float32", target="cpu")


def pytest_configure(config):
    # Test models are tiny, so intra-op threads gain nothing, and where the 2 CI cores are shared (executor
    # threads, server subprocesses, other jobs) OpenMP threads spin and crawl. Measured here under load 3 on
    # 2 cores, test_models_vs_hf.py: 92 s with torch's 2 threads, 10 s with 1.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def isolated_engine_cache(tmp_path_factory):
    """``LLM(hf_dir)`` and ``kiln generate`` cache engines under XDG_CACHE_HOME (KILN_CACHE_DIR unset):
    keep the tests' apart."""
    previous = {name: os.environ.pop(name, None) for name in ("XDG_CACHE_HOME", "KILN_CACHE_DIR")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield Path(os.environ["XDG_CACHE_HOME"])
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class TinyCheckpoint(NamedTuple):
    path: Path
    model: torch.nn.Module  # the Hugging Face model whose weights were saved, float32, eval mode


def make_hf_model(architecture: str = "LlamaForCausalLM", seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A float32 HF model with every parameter random, biases and norm weights included (HF would
    initialise those to 0 and 1, which hides a swapped or dropped tensor), scaled so that logits are
    well separated and greedy choices are not near-ties."""
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    model_class = getattr(transformers, architecture)
    config = config_class(**{**TINY_HF_CONFIG, **config_overrides})
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "ln_1.weight", "ln_f.weight")):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.2)
            elif "embed_tokens" in name or ".wte." in name or name.startswith("lm_head"):
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    return model


def save_hf_checkpoint(model: torch.nn.Module, path: Path, weights: str = "safetensors") -> Path:
    """Writes ``model`` as a Hugging Face folder: ``safetensors`` (one file), ``sharded`` (safetensors
    shards + index) or ``bin`` (pytorch_model.bin, as older checkpoints have)."""
    if weights == "bin":
        model.config.architectures = [type(model).__name__]  # model.save_pretrained would set it
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    elif weights in ("safetensors", "sharded"):
        model.save_pretrained(path, max_shard_size="40KB" if weights == "sharded" else "10GB")
    else:
        raise ValueError(f"unknown weights format {weights!r}")
    return path


@pytest.fixture
def tiny_hf_checkpoint(tmp_path):
    """Factory: ``tiny_hf_checkpoint(architecture, weights=..., seed=..., **config)`` -> TinyCheckpoint."""
    counter = iter(range(1_000_000))

    def make(architecture: str = "LlamaForCausalLM", weights: str = "safetensors", seed: int = 0,
             **config_overrides) -> TinyCheckpoint:
        model = make_hf_model(architecture, seed, **config_overrides)
        path = save_hf_checkpoint(model, tmp_path / f"hf{next(counter)}", weights)
        return TinyCheckpoint(path, model)

    return make


def build_engine(hf_dir: Path, engine_dir: Path, **build_overrides) -> Path:
    """Builds and saves a kiln engine from a HF folder (TINY_BUILD limits unless overridden)."""
    source = AutoModelForCausalLM.from_hugging_face(hf_dir)
    engine = Builder().build(source, BuildConfig(**{**TINY_BUILD, **build_overrides}))
    return engine.save(engine_dir, progress=False)


@pytest.fixture
def tiny_engine(tmp_path):
    """Factory: ``tiny_engine(hf_dir, **build_overrides)`` -> engine folder under tmp_path."""
    counter = iter(range(1_000_000))

    def make(hf_dir: Path, **build_overrides) -> Path:
        return build_engine(hf_dir, tmp_path / f"engine{next(counter)}", **build_overrides)

    return make


@pytest.fixture(scope="session")
def stories_engine(tmp_path_factory) -> Path:
    """The bundled stories260K model as a float32 CPU engine, built once per session."""
    return build_engine(STORIES_DIR, tmp_path_factory.mktemp("stories260K_engine"), max_batch_size=8,
                        max_input_len=128, max_seq_len=512, max_num_tokens=512, tokens_per_block=16)


def _route_float32_casts_through_torch(monkeypatch, triton_dtype_name: str, torch_dtype: torch.dtype,
                                       bits_dtype) -> None:
    """Under the interpreter (no GPU), float32 -> ``triton_dtype_name`` casts go through torch's cast, which
    rounds to nearest even as the GPU does; the result is handed back as raw bits of ``bits_dtype``."""
    if ON_GPU:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert_float = interpreter._convert_float
    triton_dtype = getattr(tl, triton_dtype_name)

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype == triton_dtype and input_dtype == tl.float32:
            values = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)).to(torch_dtype)
            return values.view(bits_dtype).numpy().view(f"u{bits_dtype.itemsize}").reshape(np.shape(input))
        return convert_float(input, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


@pytest.fixture
def rounding_fp8_casts(monkeypatch):
    """Triton 3.9's interpreter rounds float32 -> float8e4nv wrongly: a mantissa that rounds up past
    1.111b loses the carry into the exponent when the exponent is odd (126.0 becomes 64.0, not 128.0),
    and ties round away from zero. On the CPU, those casts go through torch's instead, which rounds to
    nearest even as the GPU's cvt.rn.satfinite does; every value the kernels cast is clamped to ±448."""
    _route_float32_casts_through_torch(monkeypatch, "float8e4nv", torch.float8_e4m3fn, torch.uint8)


@pytest.fixture
def rounding_bf16_casts(monkeypatch):
    """Triton 3.9's interpreter truncates float32 -> bfloat16 (``x.to(tl.bfloat16)`` casts with no
    rounding mode), where the GPU rounds to nearest even, as torch does. On the CPU, those casts go
    through torch's, so kernels that round to bfloat16 can be held to exact equality there too."""
    _route_float32_casts_through_torch(monkeypatch, "bfloat16", torch.bfloat16, torch.int16)


# ---- servers and ports ----------------------------------------------------------------------------------

STARTUP_SECONDS = 120


class ServerProcess:
    """``python -m kiln.cli serve ... --port 0`` in a subprocess: the server binds a port the OS picks and
    prints its URL on its first line, so no port is fixed and none is picked here and bound later (another
    process could take it in between). Every test that starts a server starts it this way."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "kiln.cli", "serve", "--port", "0", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **(env or {})})
        with httpx.Client(timeout=60) as http:  # made first: nothing delays the request after the URL appears
            line = self._first_line()
            match = re.search(r"on (http://\S+)", line)
            if not match:
                raise RuntimeError(f"kiln serve did not start: {line!r}\n{self.logs()}")
            self.url = match.group(1)
            # The URL is announced once the server can answer: the first request succeeds, with no retries.
            assert http.get(f"{self.url}/health").status_code == 200, self.logs()

    def _first_line(self) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(STARTUP_SECONDS)
        return lines[0] if lines else ""

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


@contextlib.contextmanager
def port_in_use(port: int = 0, host: str = "127.0.0.1") -> Iterator[int]:
    """Listens on host:port for the block and yields the port; 0 takes a free one from the OS. A port that
    another process already holds is in use too, so the block runs either way."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as kiln serve does: TIME_WAIT is no excuse
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            if port == 0:
                raise
        yield sock.getsockname()[1] if port == 0 else port
