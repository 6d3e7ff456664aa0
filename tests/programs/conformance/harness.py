"""What the conformance suite's cases share: a record per call per rank, errors caught and
recorded (so one unsupported call never ends the run), and values written in one canonical
form that compares exactly across implementations.

The record of rank R goes to OUT/rankR.txt, one ``key<TAB>repr(value)`` line per call, written
and flushed as each call ends: a run that dies or hangs still leaves everything before it."""

from __future__ import annotations

import array
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

POLL_S = 30.0  # how long a test()/iprobe() loop waits for a message that was already sent


def canonical(value: Any) -> Any:
    """``value`` with its type kept but in plain Python: arrays, buffers and numpy scalars become
    tagged tuples, so ``repr`` tells a float64 array from a list and a tuple from a list."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, canonical(value.tolist()))
    if isinstance(value, np.generic):
        return (type(value).__name__, value.item())
    if isinstance(value, (bytes, bytearray)):
        return (type(value).__name__, bytes(value))
    if isinstance(value, memoryview):
        return ("memoryview", value.format, value.tolist())
    if isinstance(value, array.array):
        return ("array", value.typecode, value.tolist())
    if isinstance(value, dict):
        return {"dict": sorted((repr(canonical(k)), canonical(v)) for k, v in value.items())}
    if isinstance(value, (list, tuple)):
        return type(value)(canonical(v) for v in value)
    if isinstance(value, (bool, int, float, complex, str)) or value is None:
        return value
    return ("object", type(value).__name__)


class Suite:
    """The run: the MPI namespace under test, the world, and the record of this rank."""

    def __init__(self, mpi: Any, out: Path) -> None:
        self.MPI = mpi
        self.world = mpi.COMM_WORLD
        self.comm = self.world
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.last = self.size - 1
        self.left, self.right = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        out.mkdir(parents=True, exist_ok=True)
        self._out = (out / f"rank{self.rank}.txt").open("w", encoding="utf-8")
        self._keys: set[str] = set()
        self._section = ""

    def record(self, key: str, value: Any) -> None:
        key = f"{self._section}.{key}" if self._section else key
        if key in self._keys:
            raise ValueError(f"conformance key {key} recorded twice")
        self._keys.add(key)
        self._out.write(f"{key}\t{canonical(value)!r}\n")
        self._out.flush()

    def raised(self, error: BaseException) -> tuple:
        """What mpi4py users can observe of an exception: its class name, whether it is an
        ``MPI.Exception`` and, if so, its error class."""
        is_mpi = isinstance(error, getattr(self.MPI, "Exception", ()))  # even a namespace without it
        return ("raised", type(error).__name__, is_mpi, error.Get_error_class() if is_mpi else None)

    def attempt(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, or what it raised (as ``raised`` gives it): every call of the suite is made
        through here, so one unsupported call is recorded and the run goes on."""
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - recorded, so every difference shows in one run
            return self.raised(error)

    def case(self, key: str) -> Callable[[Callable[[], Any]], None]:
        """Decorator: run the function now, on every rank, record what it returned or raised,
        then meet the other ranks at a barrier (each case starts with the last one's messages
        delivered everywhere)."""

        def run(fn: Callable[[], Any]) -> None:
            self.record(key, self.attempt(fn))
            if (failed := self.attempt(self.comm.Barrier)) is not None:
                self.record(f"{key}.barrier", failed)

        return run

    def status(self, status: Any, datatype: Any = None) -> tuple:
        """A Status's fields as mpi4py reports them (the count in ``datatype`` if given)."""
        fields = (status.Get_source(), status.Get_tag(), status.Get_error(), status.Is_cancelled())
        if datatype is None:
            return fields
        return (*fields, status.Get_count(datatype), status.Get_elements(datatype))

    def until(self, poll: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
        """Call ``poll`` until ``done(result)``: for test()/iprobe() loops on a message already on
        its way; raises TimeoutError (recorded) if it never comes."""
        deadline = time.monotonic() + POLL_S
        while not done(result := poll()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done after {POLL_S:g} s: {canonical(result)!r}")
            time.sleep(0.001)
        return result

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Run a group of cases on a communicator of its own (a Dup of the world), so messages a
        failed case leaves behind cannot reach the next group; resynchronise at the end."""
        self._section = name
        comm = self.attempt(self.world.Dup)
        if isinstance(comm, tuple):  # Dup raised: go on with the world, recorded
            self.record("section_dup", comm)
            comm = self.world
        else:
            self.record("section_dup", None)
        self.comm = comm
        try:
            yield
        finally:
            self.record("section_barrier", self.attempt(comm.Barrier))
            if comm is not self.world:
                self.record("section_free", self.attempt(comm.Free))
            self.comm, self._section = self.world, ""

    def close(self) -> None:
        self._out.write("END\n")
        self._out.close()
