"""Command-line flags generated from a dataclass's fields.

Why: ``unioncam run`` used to restate :class:`pipeline.config.RunConfig`'s defaults by
hand, and its flags drifted from the fields' names (``--method`` set ``methods``). Here a
field declared with :func:`flag` carries its own help text, and :func:`add_flags` turns it
into ``--<field-name>`` with the field's default; :func:`flag_values` reads the parsed
values back as the dataclass's keyword arguments. So a flag and its field share a name and a
default lives in one place. No project imports: the configuration imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["add_flags", "comma_list", "flag", "flag_fields", "flag_values"]

_KEY = "flag"  # the field-metadata key of a flag's settings


def comma_list(text: str) -> tuple[str, ...]:
    """``"gradcam, unioncam"`` -> ``("gradcam", "unioncam")``; ``""`` -> ``()``."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


#: Postponed annotations (as written in the class) -> how a flag parses its text.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int, "int | None": int, "float": float, "float | None": float, "str": str,
    "str | None": str, "tuple[str, ...]": comma_list,
}  # fmt: skip


def flag(default: Any = dataclasses.MISSING, *, help: str, group: str | None = None,
         aliases: tuple[str, ...] = (), default_factory: Any = dataclasses.MISSING,
         **argparse_kw: Any) -> Any:  # fmt: skip
    """A dataclass field that is also the flag ``--<name>`` (underscores as dashes).

    A field without a default is a positional argument. ``help`` may use argparse's
    ``%(default)s``, so the text never restates the value. ``group``: the ``--help``
    section; ``aliases``: older spellings that still work; ``argparse_kw`` (``metavar``,
    ``choices``, ``type``) go to ``add_argument`` as they are. A ``bool`` field defaulting
    to False is a switch; one defaulting to True gets ``--no-<name>`` as well.
    """
    spec = {"help": help, "group": group, "aliases": aliases, **argparse_kw}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_KEY: spec})  # fmt: skip


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`flag`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if _KEY in f.metadata]


def add_flags(parser: argparse.ArgumentParser, cls: type) -> dict[str, Any]:
    """Add a flag for every :func:`flag` field of ``cls``; returns the groups by title.

    A field with a ``default_factory`` gets the flag default ``None`` (= "the factory's
    value", which :func:`flag_values` then leaves to the class), so building the parser
    never runs a factory (they may import torch; ``--help`` must stay instant).
    """
    groups: dict[str, Any] = {}
    for f in flag_fields(cls):
        spec = dict(f.metadata[_KEY])
        title, aliases = spec.pop("group"), spec.pop("aliases")
        if title is None:
            where: Any = parser
        elif (where := groups.get(title)) is None:
            where = groups[title] = parser.add_argument_group(title)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where.add_argument(f.name, **spec)
            continue
        names = (f"--{f.name.replace('_', '-')}", *aliases)
        default = None if f.default is dataclasses.MISSING else f.default
        if f.type == "bool":
            action = argparse.BooleanOptionalAction if default else "store_true"
            where.add_argument(*names, dest=f.name, action=action, default=default, **spec)
            continue
        if "type" not in spec and f.type not in _PARSERS:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag parser for {f.type!r}; "
                            "give flag(..., type=...)")  # fmt: skip
        spec.setdefault("type", _PARSERS.get(f.type))
        if isinstance(default, tuple):  # argparse parses a str default with `type`, and
            default = ",".join(default)  # --help shows it as the user would type it
        where.add_argument(*names, dest=f.name, default=default, **spec)
    return groups


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``cls`` from parsed flags (a factory field left unset is left
    out, so the class builds its default)."""
    out: dict[str, Any] = {}
    for f in flag_fields(cls):
        value = getattr(args, f.name)
        if value is None and f.default_factory is not dataclasses.MISSING:
            continue
        out[f.name] = value
    return out
