"""A registry: components looked up by the name a configuration gives them.

mpff keeps three, one per kind of component a user may add without editing the modules that
use it: data sets (:mod:`mpff.dataspec`), FF layer kinds (:mod:`mpff.layers`) and algorithms,
the rank states (:mod:`mpff.algorithms`). Each registers its built-in entries where it is
defined; anything else registers from its own module (a test, a notebook, a plug-in) before the
configuration that names it is built::

    from mpff import dataspec
    dataspec.register(dataspec.DataSpec(name="toy", reader=read_toy, input_dim=64, num_classes=4))

Nothing here imports torch or numpy: the configuration checks names against these registries
on a login node as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``what`` names the kind in messages: "data set")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name`` and return it. A name already taken is an error unless
        ``replace`` (two components under one name would make a configuration ambiguous)."""
        if name in self._entries and not replace:
            raise ValueError(f"a {self.what} named {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests register toys and take them away again)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry of ``name``; a KeyError naming the registered ones when there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no {self.what} named {name!r}; registered: {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in the order they were registered (built-ins first)."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def load_attr(ref: str):
    """The object a ``"module:attribute"`` reference names, imported on first use: a built-in
    registers its torch code this way, so looking up its facts imports no torch."""
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
