from kiln.build.builder import Builder, validate
from kiln.build.engine import Engine, EngineManifest

__all__ = ["Builder", "Engine", "EngineManifest", "validate"]
