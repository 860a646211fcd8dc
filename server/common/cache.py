"""A thread-safe LRU cache bounded in bytes, with statistics and single-flight computing.

Values are kept until the sum of their sizes would pass ``capacity`` bytes; then the
least recently used ones are dropped. A value larger than a quarter of the capacity
is returned but not kept, so one huge item never flushes the whole cache.
``get_or_compute`` runs the computation for a key once even when several threads ask
for it at the same time: the others wait for the first one's result.

:class:`ByteBudget` bounds the bytes of large responses in flight (built, not yet written
to the socket), so that memory does not grow with the number of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np


def size_of(value: Any) -> int:
    """Approximate size in bytes of a cached value (arrays, bytes, containers of them)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes) + 112
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) + 33
    if isinstance(value, str):
        return len(value) + 49
    if isinstance(value, dict):
        return 64 + sum(size_of(k) + size_of(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return 56 + sum(size_of(v) for v in value)
    return sys.getsizeof(value)


class _Flight:
    def __init__(self):
        self.event = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ByteLRU:
    """LRU cache bounded by the total size of its values in bytes."""

    def __init__(self, capacity: int, max_item_fraction: float = 0.25):
        self.capacity = max(int(capacity), 0)
        self.max_item = int(self.capacity * max_item_fraction)
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rejected = 0  # values too large to keep
        self._generation = 0  # bumped by clear(): results computed before are not kept

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return default
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> bool:
        """Store a value; returns False when it is too large to keep."""
        n = size_of(value) if nbytes is None else int(nbytes)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if n > self.max_item or n > self.capacity:
                self.rejected += 1
                return False
            self._data[key] = (value, n)
            self.bytes += n
            while self.bytes > self.capacity and self._data:
                _, (_, m) = self._data.popitem(last=False)
                self.bytes -= m
                self.evictions += 1
            return True

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any],
                       nbytes: Callable[[Any], int] | None = None) -> Any:
        """The cached value of ``key``, computing (once, even under concurrency) if missing."""
        with self._lock:
            item = self._data.get(key)
            if item is not None:
                self._data.move_to_end(key)
                self.hits += 1
                return item[0]
            self.misses += 1
            generation = self._generation
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.event.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            value = compute()
            flight.value = value
            if generation == self._generation:
                self.put(key, value, None if nbytes is None else nbytes(value))
            return value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.event.set()

    def clear(self) -> None:
        """Drop every value; computations in flight now are answered but not kept."""
        with self._lock:
            self._data.clear()
            self.bytes = 0
            self._generation += 1

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            total = self.hits + self.misses
            return {
                "capacity_bytes": self.capacity,
                "bytes": self.bytes,
                "items": len(self._data),
                "hits": self.hits,
                "misses": self.misses,
                "hit_ratio": round(self.hits / total, 4) if total else 0.0,
                "evictions": self.evictions,
                "rejected": self.rejected,
                "in_flight": len(self._flights),
            }


class KeyedView:
    """A :class:`ByteLRU` seen through a key prefix (the cube set version): values stored
    under another prefix are never answered. Statistics and ``clear`` are the cache's."""

    def __init__(self, cache: ByteLRU, prefix: Hashable):
        self.cache = cache
        self.prefix = prefix

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self.cache.get((self.prefix, key), default)

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> bool:
        return self.cache.put((self.prefix, key), value, nbytes)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any],
                       nbytes: Callable[[Any], int] | None = None) -> Any:
        return self.cache.get_or_compute((self.prefix, key), compute, nbytes)

    def __contains__(self, key: Hashable) -> bool:
        return (self.prefix, key) in self.cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getattr__(self, name: str) -> Any:  # stats(), clear(), capacity, bytes, ...
        return getattr(self.cache, name)


class ByteBudget:
    """Bytes of large responses in flight at once (built and not yet written to the socket).

    Used on the IO loop only (no locks). ``acquire(n)`` waits, first come first served,
    until ``n`` more bytes fit; a response larger than the whole budget runs alone, and a
    small one (at most 1/64 of the budget) does not queue behind large ones while it fits.
    Without it every connection could hold its own copy of a 13 MB tensor in tornado's
    write buffer, so the server's memory would grow with the number of connections.
    """

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 1)
        self.used = 0
        self.peak = 0
        self.waited = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (at most the capacity); returns what to :meth:`release`."""
        n = min(max(int(nbytes), 0), self.capacity)
        if self.used + n <= self.capacity and (not self._waiters or n <= self.capacity // 64):
            self._take(n)
            return n
        fut = asyncio.get_running_loop().create_future()
        item = (n, fut)
        self._waiters.append(item)
        self.waited += 1
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted, then cancelled before it was used
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(item)
                self._wake()
            raise
        return n

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + n > self.capacity and self.used > 0:
                break
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)

    def stats(self) -> dict[str, int]:
        return {"capacity_bytes": self.capacity, "bytes": self.used, "peak_bytes": self.peak,
                "waiting": len(self._waiters), "waited": self.waited}
