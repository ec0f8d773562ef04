"""Waiting for a backend to have left the data plane (drained: nothing in flight on it).

A replica being stopped deregisters first and is stopped only once its backend has left, so
the requests in flight on it finish. One task follows the directory's watch and resolves
the futures waiting for each ``left`` event; a watch that ends (it fell too far behind) is
watched again, and a wait that misses its event ends at the caller's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from router.control.directory import BackendDirectory

log = logging.getLogger(__name__)

REWATCH_S = 0.1


class Departures:
    def __init__(self, directory: BackendDirectory) -> None:
        self._directory = directory
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="instance-departures")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for futures in self._waiting.values():
            for future in futures:
                future.cancel()
        self._waiting.clear()

    def expect(self, backend_id: str) -> asyncio.Future[None]:
        """A future resolved when ``backend_id`` next leaves; ask before deregistering."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(backend_id, []).append(future)
        future.add_done_callback(lambda f: self._forget(backend_id, f))
        return future

    def _forget(self, backend_id: str, future: asyncio.Future[None]) -> None:
        futures = self._waiting.get(backend_id, [])
        with contextlib.suppress(ValueError):
            futures.remove(future)
        if not futures:
            self._waiting.pop(backend_id, None)

    async def _follow(self) -> None:
        while True:
            async for event in self._directory.watch():
                if event.kind == "left":
                    for future in list(self._waiting.get(event.backend.id, ())):
                        if not future.done():
                            future.set_result(None)
            # The watch ended (it fell too far behind, or the directory is closing): watch
            # again after a pause, so a closed directory is not asked in a tight loop.
            await asyncio.sleep(REWATCH_S)

    def __repr__(self) -> str:
        return f"Departures(waiting={sum(map(len, self._waiting.values()))})"
