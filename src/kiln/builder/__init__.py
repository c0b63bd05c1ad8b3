from kiln.builder.builder import Builder, resolve_build_config
from kiln.engine import Engine, EngineManifest

__all__ = ["Builder", "Engine", "EngineManifest", "resolve_build_config"]
