"""Benchmark datasets: synthetic token ids or real prompts, one JSON object per line.

A line is ``{"task_id": 0, "input_ids": [...], "output_tokens": 128}`` (TensorRT-LLM's format), or has
``"prompt"`` instead of ``input_ids``. Synthetic ids are drawn from the vocabulary without its special
tokens, so no id ends a request early or carries a meaning to the model; one seed gives one dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from kiln.engine.manifest import TOKENIZER_DIR, EngineManifest
from kiln.config import BuildConfig
from kiln.errors import ConfigError, KilnError
from kiln.engine.tokenizer import Tokenizer

PROMPT_FIELDS = ("prompt", "text")  # where a .jsonl prompt file keeps each prompt
LINE_FORMAT = '{"task_id", "input_ids" | "prompt", "output_tokens"}'  # one request a line


@dataclass(frozen=True)
class BenchRequest:
    task_id: int
    input_ids: tuple[int, ...]
    output_tokens: int
    prompt: str | None = None

    def to_json(self) -> str:
        line = {"task_id": self.task_id, "input_ids": list(self.input_ids), "output_tokens": self.output_tokens}
        if self.prompt is not None:
            line["prompt"] = self.prompt
        return json.dumps(line)


@dataclass(frozen=True)
class TokenSpace:
    """The ids synthetic prompts are drawn from, and the tokenizer for text prompts (None if there is none)."""

    vocab_size: int
    special_token_ids: frozenset[int]
    tokenizer: Tokenizer | None

    @classmethod
    def from_engine(cls, engine_dir: str | Path) -> "TokenSpace":
        manifest = EngineManifest.read(engine_dir)
        mc = manifest.model_config
        tokenizer = (Tokenizer(Path(engine_dir) / TOKENIZER_DIR, eos_token_ids=mc.eos_token_ids,
                               bos_token_id=mc.bos_token_id) if manifest.has_tokenizer else None)
        special = {*mc.eos_token_ids, *(i for i in (mc.bos_token_id, mc.pad_token_id) if i is not None)}
        vocab = mc.vocab_size
        if tokenizer is not None:
            special |= tokenizer.special_token_ids
            vocab = min(vocab, tokenizer.vocab_size)  # the model's table may be padded past the tokenizer's
        return cls(vocab, frozenset(special), tokenizer)

    @classmethod
    def from_tokenizer_dir(cls, path: str | Path) -> "TokenSpace":
        path = Path(path)
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            raise ConfigError(f"{path}: no tokenizer.json or tokenizer.model; give a Hugging Face model folder "
                              "or an engine (--engine)")
        tokenizer = Tokenizer(path)
        return cls(tokenizer.vocab_size, frozenset(tokenizer.special_token_ids), tokenizer)

    def usable_token_ids(self) -> np.ndarray:
        ids = np.setdiff1d(np.arange(self.vocab_size), np.fromiter(self.special_token_ids, dtype=np.int64))
        if ids.size == 0:
            raise ConfigError("the vocabulary has no ids besides special tokens to draw prompts from")
        return ids


def token_norm_dist(space: TokenSpace, num_requests: int, input_mean: int, input_stdev: float, output_mean: int,
                    output_stdev: float, seed: int = 0) -> list[BenchRequest]:
    """Lengths from normal distributions (rounded, at least 1); stdev 0 gives fixed lengths."""
    _check_positive(num_requests=num_requests, input_mean=input_mean, output_mean=output_mean)
    if input_stdev < 0 or output_stdev < 0:
        raise ConfigError("--input-stdev and --output-stdev must be >= 0")
    rng = np.random.default_rng(seed)
    input_lens = np.maximum(np.rint(rng.normal(input_mean, input_stdev, num_requests)), 1).astype(np.int64)
    output_lens = np.maximum(np.rint(rng.normal(output_mean, output_stdev, num_requests)), 1).astype(np.int64)
    return _synthetic(space, input_lens, output_lens, rng)


def token_unif_dist(space: TokenSpace, num_requests: int, input_min: int, input_max: int, output_min: int,
                    output_max: int, seed: int = 0) -> list[BenchRequest]:
    """Lengths uniform over [min, max], both ends included."""
    _check_positive(num_requests=num_requests, input_min=input_min, output_min=output_min)
    for name, low, high in (("input", input_min, input_max), ("output", output_min, output_max)):
        if high < low:
            raise ConfigError(f"--{name}-max ({high}) must be >= --{name}-min ({low})")
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(input_min, input_max, num_requests, endpoint=True)
    output_lens = rng.integers(output_min, output_max, num_requests, endpoint=True)
    return _synthetic(space, input_lens, output_lens, rng)


def text_dataset(space: TokenSpace, path: str | Path, num_requests: int, output_tokens: int) -> list[BenchRequest]:
    """The first ``num_requests`` prompts of a .txt (one prompt a line) or .jsonl file, tokenized."""
    _check_positive(num_requests=num_requests, output_tokens=output_tokens)
    if space.tokenizer is None:
        raise ConfigError("text prompts need a tokenizer and this engine has none; use --tokenizer DIR")
    prompts = read_prompts(path)
    if len(prompts) < num_requests:
        raise ConfigError(f"{path} holds {len(prompts)} prompts, fewer than --num-requests {num_requests}; "
                          "lower --num-requests or add prompts")
    return [BenchRequest(i, tuple(space.tokenizer.encode(p)), output_tokens, p)
            for i, p in enumerate(prompts[:num_requests])]


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"{path}: prompt files are .txt (one prompt a line) or .jsonl "
                          f"(objects with a {' or '.join(PROMPT_FIELDS)} field)")
    lines = [(n, line) for n, line in enumerate(_read_text(path, "give a prompt file").splitlines(), 1)
             if line.strip()]
    if path.suffix == ".txt":
        return [line.strip() for _, line in lines]
    prompts = []
    for n, line in lines:
        obj = _parse_line(path, n, line)
        prompt = next((obj[k] for k in PROMPT_FIELDS if isinstance(obj.get(k), str)), None)
        if not prompt:
            raise ConfigError(f"{path} line {n}: no non-empty {' or '.join(PROMPT_FIELDS)} string field")
        prompts.append(prompt)
    return prompts


def _synthetic(space: TokenSpace, input_lens: np.ndarray, output_lens: np.ndarray,
               rng: np.random.Generator) -> list[BenchRequest]:
    ids = rng.choice(space.usable_token_ids(), size=int(input_lens.sum()))
    prompts = np.split(ids, np.cumsum(input_lens)[:-1])
    return [BenchRequest(i, tuple(p.tolist()), int(n)) for i, (p, n) in enumerate(zip(prompts, output_lens))]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def write_dataset(requests: Iterable[BenchRequest], out: TextIO) -> None:
    for r in requests:
        out.write(r.to_json() + "\n")


def read_dataset(path: str | Path, tokenizer: Tokenizer | None = None) -> list[BenchRequest]:
    """Reads dataset lines; prompts are tokenized with ``tokenizer`` (the engine's)."""
    path = Path(path)
    text = _read_text(path, "make one with kiln bench prepare-dataset")
    _check_json_lines(path, text)
    requests = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        obj = _parse_line(path, n, line)
        if "output_tokens" not in obj:
            raise ConfigError(f"{path} line {n}: no output_tokens (its keys: {', '.join(sorted(obj)) or 'none'}); "
                              f"kiln bench reads JSON lines of {LINE_FORMAT}")
        output_tokens = obj.get("output_tokens")
        if not isinstance(output_tokens, int) or isinstance(output_tokens, bool) or output_tokens < 1:
            raise ConfigError(f"{path} line {n}: output_tokens must be a positive integer, got {output_tokens!r}")
        ids, prompt = obj.get("input_ids"), obj.get("prompt")
        if ids is None:
            if not isinstance(prompt, str) or not prompt:
                raise ConfigError(f"{path} line {n}: needs input_ids (a list of token ids) or prompt (text)")
            if tokenizer is None:
                raise ConfigError(f"{path} line {n}: has a prompt but the engine has no tokenizer; prepare the "
                                  "dataset with input_ids (kiln bench prepare-dataset --tokenizer DIR text ...)")
            ids = tokenizer.encode(prompt)
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ConfigError(f"{path} line {n}: input_ids must be a non-empty list of non-negative integers")
        requests.append(BenchRequest(obj.get("task_id", len(requests)), tuple(ids), output_tokens,
                                     prompt if isinstance(prompt, str) else None))
    if not requests:
        raise ConfigError(f"{path}: the dataset is empty; make one with kiln bench prepare-dataset")
    return requests


def _check_json_lines(path: Path, text: str) -> None:
    """A file that is one JSON document (TensorRT-LLM's workload JSON: metadata and samples; an array; an
    object over several lines) is named as such, with the lines format expected instead."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return  # JSON lines (or not JSON at all, which the lines report)
    expected = f"kiln bench reads one request a line: {LINE_FORMAT}; write it with kiln bench prepare-dataset"
    if isinstance(document, dict) and {"metadata", "samples"} & set(document):
        raise ConfigError(f"{path}: a TensorRT-LLM workload JSON (metadata, samples), not JSON lines; {expected}")
    if isinstance(document, list) or len(text.strip().splitlines()) > 1:
        raise ConfigError(f"{path}: one JSON document, not JSON lines; {expected}")


def check_fits_engine(requests: list[BenchRequest], build: BuildConfig, vocab_size: int) -> None:
    """Every request within the engine's limits, else one error naming the first misfit and the fix."""
    checks = (
        (lambda r: max(r.input_ids) >= vocab_size, f"has token ids outside the vocabulary [0, {vocab_size})",
         "prepare the dataset with this engine's tokenizer (--engine)"),
        (lambda r: len(r.input_ids) > build.max_input_len, f"exceeds the engine's max_input_len {build.max_input_len}",
         "rebuild with a larger --max-input-len or prepare shorter inputs"),
        (lambda r: len(r.input_ids) + r.output_tokens > build.max_seq_len,
         f"input + output tokens exceed the engine's max_seq_len {build.max_seq_len}",
         "rebuild with a larger --max-seq-len or prepare shorter requests"),
    )
    for misfits, problem, fix in checks:
        bad = [r for r in requests if misfits(r)]
        if bad:
            first = bad[0]
            raise ConfigError(f"{len(bad)} of {len(requests)} requests {problem} (first: task {first.task_id}, "
                              f"{len(first.input_ids)} input + {first.output_tokens} output tokens); {fix}")


def _read_text(path: Path, fix: str) -> str:
    if not path.is_file():
        raise KilnError(f"{path}: no such file; {fix}")
    return path.read_text()


def _parse_line(path: Path, n: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} line {n}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} line {n}: expected a JSON object")
    return obj
