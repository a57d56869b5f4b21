"""Name -> object registries with decorator registration and helpful lookup errors."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def closest(name: str, choices: list[str], n: int = 3) -> str:
    """Format the nearest valid names for an error message."""
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    near = near or sorted(choices)[:n]
    return ", ".join(repr(c) for c in near)


class Registry(Generic[T]):
    """A named collection filled by ``@registry.register("name")``; lookups are case-insensitive."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def add(obj: T) -> T:
            old = self._items.get(key)
            reloaded = getattr(old, "__module__", None) == getattr(obj, "__module__", "") and \
                getattr(old, "__qualname__", None) == getattr(obj, "__qualname__", "")  # a plugin module run again
            if old is not None and old is not obj and not reloaded:
                raise ValueError(f"{self.kind} {name!r} is registered twice (by {getattr(old, '__module__', '?')} and "
                                 f"{getattr(obj, '__module__', '?')})")
            self._items[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name.lower()]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; did you mean {closest(name.lower(), list(self._items))}? "
                f"(all: {', '.join(sorted(self._items))})"
            ) from None

    def unregister(self, name: str) -> None:
        """Remove a name (tests that register a throw-away method remove it again)."""
        del self._items[name.lower()]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
