"""Errors that reach users. Each message names the problem and the way out in one line."""


class KilnError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero (traceback only with --debug)."""


class ConfigError(KilnError, ValueError):
    """A model, build or runtime setting that kiln cannot honour."""


class CheckpointError(KilnError):
    """A Hugging Face checkpoint that cannot be read or converted."""


class EngineError(KilnError):
    """An engine folder that is missing, damaged, from a newer kiln or for another GPU."""


class RequestError(KilnError, ValueError):
    """One request that breaks the engine's limits or has invalid parameters; other requests go on."""
