"""One way to name a method: a small registry used for every kind of name.

Gradient weightings, region methods, selection rules and the CAM classes themselves are
all looked up by name (from a config, the CLI, a stored run). Each kind gets one
:class:`Registry`; registering is a decorator next to the definition, and an unknown name
is one line that lists the valid ones, so a typo in a day-long job fails in the first second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "METHODS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → objects of one kind, with optional per-name facts (e.g. a rule's cost)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (with ``info``)."""
        def deco(obj: T) -> T:
            self.add(name, obj, **info)
            return obj

        return deco

    def add(self, name: str, obj: T, **info: Any) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        self._info[name] = info

    def check(self, name: str) -> str:
        """``name`` if registered, else ``ValueError`` listing the choices."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._items)}")
        return name

    def __getitem__(self, name: str) -> T:
        return self._items[self.check(name)]

    def info(self, name: str) -> dict[str, Any]:
        return self._info[self.check(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)


#: Every CAM class a user can ask for by name (``gradcam``, ``scorecam``, ``unioncam``, …):
#: what ``unioncam.make_cam`` and the pipeline's ``--method`` look up. Each carries its
#: ``label`` (how a report or a figure titles it), so a method's title is written once, next
#: to its class; :mod:`unioncam.names` adds the presets' spellings.
METHODS: Registry[type] = Registry("method")
