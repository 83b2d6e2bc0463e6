"""Runs the latents of concurrent requests through the network together.

No request waits for company: the worker takes whatever is queued when the network becomes free, up to
``max_batch`` images, so a lone request runs at once and a busy server fills its batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int):
        self._run, self.max_batch = run, max_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def run(self, latents: np.ndarray) -> np.ndarray:
        """Images for ``latents`` (at most ``max_batch`` rows)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((latents, future))
        return await future

    async def _work(self) -> None:
        carried = None
        while True:
            batch = [carried or await self._queue.get()]
            carried, size = None, len(batch[0][0])
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if size + len(item[0]) > self.max_batch:
                    carried = item
                    break
                batch.append(item)
                size += len(item[0])
            try:
                images = await asyncio.to_thread(self._run, np.concatenate([latents for latents, _ in batch]))
            except Exception as err:  # every waiting request learns what failed
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            offsets = np.cumsum([len(latents) for latents, _ in batch])[:-1]
            for (_, future), part in zip(batch, np.split(images, offsets)):
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(part)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.get_loop().call_soon_threadsafe(self._worker.cancel)
