"""One tiny name -> factory registry, shared by every pluggable component."""

from collections.abc import Callable
from typing import Generic, TypeVar

from lingua_sweep.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; `register` is a decorator so users can add their own.

    >>> ACTIVATIONS = Registry[Callable]("activation")
    >>> @ACTIVATIONS.register("swish")
    ... def swish(x): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise UserError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
