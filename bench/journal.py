"""The simplest durable store on this stack: an append-only file, group-committed.

Requests hand their record to one writer thread; it takes whatever has queued up, writes it in
one go, `fdatasync`s once for the whole batch, and then settles the batch's futures with one
event-loop wake-up. A record is acknowledged only once it is on disk."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from pathlib import Path


class Journal:
    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._queue: queue.SimpleQueue[tuple[bytes, asyncio.Future] | None] = queue.SimpleQueue()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._write_batches, name="journal", daemon=True)
        self._thread.start()

    async def append(self, record: bytes) -> None:
        future = self._loop.create_future()
        self._queue.put((record, future))
        await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        os.close(self._fd)

    def _write_batches(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while not self._queue.empty() and (item := self._queue.get()) is not None:
                batch.append(item)
            error = None
            try:
                data = memoryview(b"".join(record + b"\n" for record, _ in batch))
                while data:
                    data = data[os.write(self._fd, data):]
                os.fdatasync(self._fd)
            except OSError as exc:  # the whole batch fails, as a failed group commit does
                error = exc
            self._loop.call_soon_threadsafe(_settle, [future for _, future in batch], error)
            if item is None:
                return


def _settle(futures: list[asyncio.Future], error: OSError | None) -> None:
    for future in futures:
        if future.done():  # its request was cancelled meanwhile
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
