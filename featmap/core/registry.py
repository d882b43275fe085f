"""Name -> factory registries for everything a user names in a parameter."""
from __future__ import annotations

import re
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names (exact, or patterns with parameters such as ``noise_<sigma>``) to factories."""

    def __init__(self, kind: str):
        self.kind = kind
        self._exact: dict[str, Callable[[], T]] = {}
        self._patterns: list[tuple[re.Pattern, str, Callable[..., T]]] = []

    def add(self, name: str, factory: Callable[[], T]) -> None:
        if name in self._exact:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._exact[name] = factory

    def add_pattern(self, pattern: str, shown_as: str, factory: Callable[..., T]) -> None:
        """Register names matching ``pattern``; its groups are passed to ``factory`` as strings."""
        self._patterns.append((re.compile(pattern + r"\Z"), shown_as, factory))

    def names(self) -> list[str]:
        """Returns the exact names, then the parameterised forms (e.g. ``noise_<sigma>``)."""
        return sorted(self._exact) + [shown for _, shown, _ in self._patterns]

    def has(self, name: str) -> bool:
        """Returns whether ``name`` is registered, exactly or by a pattern."""
        return isinstance(name, str) and (name in self._exact or any(p.match(name) for p, _, _ in self._patterns))

    def get(self, name: str) -> T:
        """Returns a new object for ``name``; an unknown name raises with the known names listed."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__} {name!r}")
        if name in self._exact:
            return self._exact[name]()
        for pattern, _, factory in self._patterns:
            m = pattern.match(name)
            if m:
                return factory(*m.groups())
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
        )
