"""Runs concurrent requests through the network together: the latents of exported GANs (``Batcher``), the draws
of torch families that share a condition (``DrawBatcher``).

No request waits for company: the worker takes whatever is queued when the network becomes free, up to
``max_batch`` images, so a lone request runs at once and a busy server fills its batches.
"""

from __future__ import annotations

import asyncio
import json
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


class DrawBatcher:
    """The torch families' counterpart: concurrent draws ``(n, seed)`` with the same condition and precision go
    through the network together (``run(draws, condition, precision)``), up to ``max_batch`` images; a draw is
    never split (its images depend on its seed and their index), so one larger than ``max_batch`` runs alone.
    Draws with other conditions or precisions wait for a later call, in the order they came."""

    def __init__(self, run: Callable[[list, dict, str], tuple[np.ndarray, list | None]], max_batch: int):
        self._run, self.max_batch = run, max_batch
        self._queue: list = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def run(self, n: int, seed: int, condition: dict, precision: str) -> tuple[np.ndarray, list | None]:
        if self._worker is None:
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        key = json.dumps([condition, precision], sort_keys=True, default=str)
        self._queue.append((key, n, seed, (condition, precision), future))
        self._wake.set()
        return await future

    def _take(self) -> list:
        """The first queued draw and those after it with its condition that fit beside it."""
        key, size, batch, kept = self._queue[0][0], 0, [], []
        for item in self._queue:
            if item[0] == key and (not batch or size + item[1] <= self.max_batch):
                batch.append(item)
                size += item[1]
            else:
                kept.append(item)
        self._queue[:] = kept
        return batch

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take()
            try:
                images, boxes = await asyncio.to_thread(self._run, [(n, seed) for _, n, seed, _, _ in batch],
                                                        *batch[0][3])
            except Exception as err:  # every waiting request learns what failed
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            start = 0
            for _, n, _, _, future in batch:
                if not future.done():  # a client that went away cancelled its future
                    future.set_result((images[start:start + n], None if boxes is None else boxes[start:start + n]))
                start += n

    def close(self) -> None:
        if self._worker is not None:
            self._worker.get_loop().call_soon_threadsafe(self._worker.cancel)
