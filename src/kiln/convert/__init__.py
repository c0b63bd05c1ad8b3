"""Checkpoint -> engine tensors: reading checkpoints (``checkpoint``), what a build starts from
(``source``), and the conversion itself (``converter``)."""

from kiln.convert.source import AutoModelForCausalLM, check_source
from kiln.models import ModelSource

__all__ = ["AutoModelForCausalLM", "ModelSource", "check_source"]
