"""Errors that reach users. Each message names the problem and the way out in one line."""

import errno


class KilnError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero (traceback only with --debug)."""


class ConfigError(KilnError, ValueError):
    """A model, build or runtime setting that kiln cannot honour."""


class CheckpointError(KilnError):
    """A Hugging Face checkpoint that cannot be read or converted."""


class EngineError(KilnError):
    """An engine folder that is missing, damaged, from a newer kiln or for another GPU."""


class RankFailure(KilnError):
    """A tensor-parallel rank stopped or failed; the engine's ranks are all shut down."""


class RequestError(KilnError, ValueError):
    """One request that breaks the engine's limits or has invalid parameters; other requests go on."""


_OUTPUT_PROBLEMS = {  # errno -> what is wrong with an output path, and what to do
    errno.EEXIST: "a file is in the way; remove it or choose another path",
    errno.ENOTDIR: "part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EROFS: "read-only file system; choose a path on a writable one",
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
}


def cannot_write(path, error: OSError) -> KilnError:
    """'cannot write PATH: <reason>; <fix>' for an OSError met writing an output (engine, report, dataset);
    the file the system names follows PATH when it is another (a parent that is a file, say)."""
    reason = error.strerror or str(error)
    problem = _OUTPUT_PROBLEMS.get(error.errno, f"{reason[:1].lower()}{reason[1:]}; choose another path")
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
    return KilnError(f"cannot write {path}{where}: {problem}")
