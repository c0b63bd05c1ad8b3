"""The families kiln runs, by Hugging Face ``architectures`` name; a family's file is imported when asked for.

A family file (one per family, ~100-150 lines) holds: ``HF_CONFIG`` (ModelConfig field -> config.json key)
with ``config_from_hf`` / ``config_to_hf`` for what is more than a rename; ``HF_NAMES`` (kiln tensor ->
the checkpoint tensors it is made of, concatenated along dim 0; ``{n}`` is the layer index) and
``HF_IGNORED`` (checkpoint entries that carry nothing kiln needs); and ``Model``, its CausalLM class.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPTJForCausalLM": "gptj",
}

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def family(architecture: str) -> ModuleType:
    return importlib.import_module(f"kiln.models.{FAMILIES[architecture]}")


def hf_sources(names: dict[str, str | tuple[str, ...]], kiln_name: str) -> tuple[str, ...]:
    """The checkpoint tensors a kiln tensor is made of, from a family's HF_NAMES."""
    match = _LAYER_INDEX.search(kiln_name)
    key = kiln_name if match is None else _LAYER_INDEX.sub(".{n}.", kiln_name, count=1)
    sources = names[key]
    sources = (sources,) if isinstance(sources, str) else sources
    return tuple(s.format(n=match.group(1)) if match else s for s in sources)
