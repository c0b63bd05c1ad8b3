from kiln.builder.builder import Builder, validate
from kiln.engine import Engine, EngineManifest

__all__ = ["Builder", "Engine", "EngineManifest", "validate"]
