"""The engine format, shared by the builder (which writes engines) and the runtime (which loads them):
the manifest and file names (``manifest``), the weight file with per-tensor checksums (``weights``), the
target GPU (``target``), and an engine saved to / loaded from a folder (``engine``)."""

from kiln.engine.engine import Engine, engine_device, load_weights
from kiln.engine.manifest import EngineManifest

__all__ = ["Engine", "EngineManifest", "engine_device", "load_weights"]
