__version__ = "0.1.0"

# Bumped whenever the engine folder layout or manifest schema changes incompatibly.
ENGINE_FORMAT_VERSION = 2  # 2: tensors named by the layers' declarations; the build config's quantization
