"""Streaming a rank's pieces as fixed-size batches, read ahead on a background thread.

Batches cross shard boundaries, so every batch but the last is full whatever the shard
sizes; memory holds at most ``depth`` batches in flight, whatever the dataset size. Each row
is read once, checked as it arrives (ShardReader refuses NaN/inf), and carries its label and
object id along, so nothing needs to read the input again.
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
from cai_hpc.shards import Columns, ShardInfo, ShardReader

T = TypeVar("T")


@dataclass
class Batch:
    """Model inputs plus where each run of rows goes: (piece index, offset in piece, rows).

    ``redshift``/``object_id`` hold the rows' values where their shard has them (zeros in the
    rows of a shard without), None when no shard of the batch has them."""

    images: np.ndarray
    magnitudes: np.ndarray
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    redshift: np.ndarray | None = None
    object_id: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


def iter_batches(shards: list[ShardInfo], pieces: list[Piece], batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows (the last may be short) over ``pieces`` in order."""
    parts: list[Columns] = []
    segments: list[tuple[int, int, int]] = []
    filled = 0
    for k, piece in enumerate(pieces):
        with ShardReader(shards[piece.shard], part=piece.rows < shards[piece.shard].rows) as reader:
            row = piece.start
            while row < piece.stop:
                take = min(batch_size - filled, piece.stop - row)
                parts.append(reader.read(row, row + take))
                segments.append((k, row - piece.start, take))
                filled += take
                row += take
                if filled == batch_size:
                    yield _batch(parts, segments)
                    parts, segments, filled = [], [], 0
        shards[piece.shard].path.release()  # an S3 shard's bytes: read once, dropped when done
    if filled:
        yield _batch(parts, segments)


def _batch(parts: list[Columns], segments: list[tuple[int, int, int]]) -> Batch:
    def join(name: str, dtype: type) -> np.ndarray | None:
        arrays = [getattr(c, name) for c in parts]
        if all(a is None for a in arrays):
            return None
        return _join([np.zeros(len(c.images), dtype) if a is None else a for a, c in zip(arrays, parts, strict=True)])

    return Batch(
        _join([c.images for c in parts]),
        _join([c.magnitudes for c in parts]),
        segments,
        join("redshift", np.float32),
        join("object_id", np.int64),
    )


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
