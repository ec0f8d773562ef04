"""Rendezvous (highest random weight) hashing: the same ranking of backends for a key in every
router process.

``score(key, backend_id, weight)`` depends on nothing but its arguments (BLAKE2b, not
Python's salted ``hash``), so two routers, or two processes of one router, that see the same
backends rank them the same way for a key, and place a model on the same backends; a backend
joining or leaving moves only the keys it ranks first. Weighted as in Schindelhauer and
Schomaker's weighted distributed hash tables: ``weight / -ln(u)`` for a uniform ``u`` in
(0, 1), so a backend of weight 2 ranks first for twice the keys.

``Rendezvous`` caches scores per (key, backend, weight): ~1 us of hashing per candidate per
request otherwise. The cache is bounded (``MAX_CACHED``) and cleared when full.
"""

from __future__ import annotations

import hashlib
import math

MAX_CACHED = 65_536
_SCALE = float(1 << 64)


def score(key: str, backend_id: str, weight: int = 1) -> float:
    """The rank of ``backend_id`` for ``key``: higher ranks first."""
    digest = hashlib.blake2b(f"{key}\x00{backend_id}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 0.5) / _SCALE  # in (0, 1), never 0 or 1
    return weight / -math.log(uniform)


class Rendezvous:
    """``score`` with a bounded cache; each policy owns one."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, int], float] = {}

    def score(self, key: str, backend_id: str, weight: int = 1) -> float:
        entry = (key, backend_id, weight)
        value = self._cache.get(entry)
        if value is None:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            value = self._cache[entry] = score(key, backend_id, weight)
        return value

    def ranked(self, key: str, backend_ids: list[str], weights: list[int] | None = None
               ) -> list[int]:
        """Indexes of ``backend_ids``, best first, for ``key``."""
        w = weights or [1] * len(backend_ids)
        return sorted(range(len(backend_ids)),
                      key=lambda i: -self.score(key, backend_ids[i], w[i]))
