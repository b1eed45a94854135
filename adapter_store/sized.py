"""An OrderedDict that keeps the total size of its values, so that "how many bytes" is O(1).

The disk cache's index and the engine's resident versions are LRU orders of sized things that
every load asks for their total; summing them each time made a load O(n), and preloading 10,000
adapters O(n²) (docs/benchmarks.md, "Many adapters"). A value's size must not change while it is
in the mapping (replace the value instead).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_MISSING: Any = object()


class SizedOrderedDict(OrderedDict[K, V]):
    """`total` is the sum of `size_of(value)` over the values, kept up to date by every
    mutation (`[k] = v`, `del`, `pop`, `popitem`, `clear`, `update`, `setdefault`)."""

    def __init__(self, size_of: Callable[[V], int]) -> None:
        super().__init__()
        self._size_of = size_of
        self.total = 0

    def __setitem__(self, key: K, value: V) -> None:
        old = super().get(key, _MISSING)
        if old is not _MISSING:
            self.total -= self._size_of(old)
        super().__setitem__(key, value)
        self.total += self._size_of(value)

    def __delitem__(self, key: K) -> None:
        value = super().__getitem__(key)
        super().__delitem__(key)
        self.total -= self._size_of(value)

    def pop(self, key: K, default: Any = _MISSING) -> Any:
        if key not in self:
            if default is _MISSING:
                raise KeyError(key)
            return default
        value = super().pop(key)
        self.total -= self._size_of(value)
        return value

    def popitem(self, last: bool = True) -> tuple[K, V]:
        key, value = super().popitem(last)
        self.total -= self._size_of(value)
        return key, value

    def setdefault(self, key: K, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def clear(self) -> None:
        super().clear()
        self.total = 0
