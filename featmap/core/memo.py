"""Arrays kept in memory per process, bounded by bytes: what was made or read last, handed out read-only."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np


class ArrayMemo:
    """The arrays put last, under their keys, at most ``limit`` bytes (given at each ``put``, so a module's limit can
    change); the oldest are let go first, the newest always stays. Arrays are made read-only: every later caller
    gets the same one."""

    def __init__(self):
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> np.ndarray | None:
        """Returns the array under ``key`` (now the most recently used), or None."""
        arr = self._items.get(key)
        if arr is not None:
            self._items.move_to_end(key)
        return arr

    def put(self, key: Hashable, arr: np.ndarray, limit: int) -> np.ndarray:
        """Keeps ``arr`` (read-only from now on) under ``key`` and returns it; lets the oldest go past ``limit``."""
        arr.setflags(write=False)
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._items[key] = arr
        self.nbytes += arr.nbytes
        while self.nbytes > limit and len(self._items) > 1:
            self.nbytes -= self._items.popitem(last=False)[1].nbytes
        return arr
