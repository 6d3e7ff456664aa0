"""Streaming a rank's pieces as fixed-size batches, read ahead on a background thread.

Batches cross shard boundaries, so every batch but the last is full whatever the shard
sizes; memory holds at most ``depth`` batches in flight, whatever the dataset size.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from cai_hpc.plan import Piece
from cai_hpc.shards import ShardInfo, ShardReader

T = TypeVar("T")


@dataclass
class Batch:
    """Model inputs plus where each run of rows goes: (piece index, offset in piece, rows)."""

    images: np.ndarray
    magnitudes: np.ndarray
    segments: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def iter_batches(shards: list[ShardInfo], pieces: list[Piece], batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows (the last may be short) over ``pieces`` in order."""
    images: list[np.ndarray] = []
    mags: list[np.ndarray] = []
    segments: list[tuple[int, int, int]] = []
    filled = 0
    for k, piece in enumerate(pieces):
        with ShardReader(shards[piece.shard]) as reader:
            row = piece.start
            while row < piece.stop:
                take = min(batch_size - filled, piece.stop - row)
                cols = reader.read(row, row + take)
                images.append(cols.images)
                mags.append(cols.magnitudes)
                segments.append((k, row - piece.start, take))
                filled += take
                row += take
                if filled == batch_size:
                    yield Batch(_join(images), _join(mags), segments)
                    images, mags, segments, filled = [], [], [], 0
    if filled:
        yield Batch(_join(images), _join(mags), segments)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class Prefetcher(Iterator[T]):
    """Runs an iterator on a thread, ``depth`` items ahead; re-raises its errors in order.

    ``wait_s`` accumulates the time the consumer spent blocked on the producer: the part of
    reading that compute did not hide.
    """

    def __init__(self, source: Iterable[T], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(source,), daemon=True)
        self.wait_s = 0.0
        self._done = False
        self._thread.start()

    def _produce(self, source: Iterable[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failed(exc))

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        raise RuntimeError("batch reader thread ended without a result") from None
        finally:
            self.wait_s += time.perf_counter() - t0
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the producer (it exits at its next put) and wait for it."""
        self._stop.set()
        self._thread.join(timeout=10)
