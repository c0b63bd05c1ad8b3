"""The runtime options of ``kiln serve``, ``generate`` and ``bench`` as flags, made from one definition:
the fields of RuntimeConfig, KvCacheConfig and SchedulerConfig (help, flag name and choices are in each
field's metadata). A new field is a flag of every command at once.

Flags left out are absent from the parsed arguments, so the dataclass defaults apply and a command can
tell which options the user gave (``given_runtime_flags``).
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

from kiln.config import RuntimeConfig


@dataclass(frozen=True)
class RuntimeFlag:
    path: tuple[str, ...]  # field names from RuntimeConfig down, e.g. ("kv_cache_config", "enable_block_reuse")
    flag: str  # --enable-block-reuse
    type: type  # bool, int, float or str
    default: Any
    help: str
    choices: tuple[str, ...] | None

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


def runtime_flags(config_class: type = RuntimeConfig, path: tuple[str, ...] = ()) -> list[RuntimeFlag]:
    """One flag per field, nested config dataclasses walked."""
    hints = typing.get_type_hints(config_class)
    flags = []
    for f in fields(config_class):
        kind = hints[f.name]
        if is_dataclass(kind):
            flags += runtime_flags(kind, path + (f.name,))
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{config_class.__name__}.{f.name}: no help in its field metadata (config._flag), "
                            "so it cannot be a command-line flag")
        flags.append(RuntimeFlag(path + (f.name,), f.metadata["flag"] or "--" + f.name.replace("_", "-"),
                                 _scalar(kind), None if f.default is MISSING else f.default, f.metadata["help"],
                                 f.metadata["choices"]))
    return flags


def _scalar(kind) -> type:
    """int for ``int | None``; str for a string enum (its config parses the name, argparse checks the
    choices and lists them on a bad one); the type itself otherwise."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    return str if issubclass(kind, enum.StrEnum) else kind


_METAVARS = {int: "N", float: "X"}


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime options", "how the engine is loaded and scheduled; limits may be "
                                                         "lowered below the engine's, never raised")
    for rf in runtime_flags():
        help = rf.help if rf.default is None else f"{rf.help} (default: {_shown(rf.default)})"
        if rf.type is bool:
            group.add_argument(rf.flag, dest=rf.dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help)
        else:
            group.add_argument(rf.flag, dest=rf.dest, type=rf.type, choices=rf.choices, default=argparse.SUPPRESS,
                               metavar=_METAVARS.get(rf.type) if rf.choices is None else None, help=help)


def _shown(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def given_runtime_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime flags given on the command line, in the order given: dest -> value."""
    dests = {rf.dest for rf in runtime_flags()}
    return {dest: value for dest, value in vars(args).items() if dest in dests}


def runtime_config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """The RuntimeConfig of the flags given; validation errors (ConfigError) name the field."""
    values: dict[tuple[str, ...], dict[str, Any]] = {}
    given = given_runtime_flags(args)
    for rf in runtime_flags():
        if rf.dest in given:
            values.setdefault(rf.path[:-1], {})[rf.path[-1]] = given[rf.dest]

    def make(config_class: type, path: tuple[str, ...]):
        hints = typing.get_type_hints(config_class)
        nested = {f.name: make(hints[f.name], path + (f.name,)) for f in fields(config_class)
                  if is_dataclass(hints[f.name])}
        return config_class(**values.get(path, {}), **nested)

    return make(RuntimeConfig, ())
