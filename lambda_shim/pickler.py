"""mpi4py's ``MPI.pickle``: the one ``Pickle`` object through which the object API (``send``,
``recv``, ``bcast``, ...) turns objects into bytes and back, so a program can swap the
serializer as it does on mpi4py::

    MPI.pickle.__init__(dill.dumps, dill.loads)   # or cloudpickle's, or json's with a wrapper
    MPI.pickle.PROTOCOL = 4

As mpi4py's: ``dumps(obj)`` calls ``dumps(obj, PROTOCOL)``, or ``dumps(obj)`` when ``PROTOCOL``
is None (the default for a ``dumps`` other than the standard library's); ``loads(data)`` gets
the received bytes. ``THRESHOLD`` is the size from which ``dumps_oob`` moves buffers out of
band. The environment variables ``MPI4PY_PICKLE_PROTOCOL`` and ``MPI4PY_PICKLE_THRESHOLD`` set
the defaults, as for mpi4py.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable
from typing import Any

DEFAULT_PROTOCOL = int(os.environ.get("MPI4PY_PICKLE_PROTOCOL", pickle.HIGHEST_PROTOCOL))
DEFAULT_THRESHOLD = int(os.environ.get("MPI4PY_PICKLE_THRESHOLD", 256 * 1024))


class Pickle:
    """Pickle/unpickle Python objects (mpi4py's ``MPI.Pickle``)."""

    def __init__(
        self,
        dumps: Callable[..., bytes] | None = None,
        loads: Callable[[Any], Any] | None = None,
        protocol: int | None = None,
        threshold: int | None = None,
    ) -> None:
        dumps = pickle.dumps if dumps is None else dumps
        self._dumps = dumps
        self._loads = pickle.loads if loads is None else loads
        self._protocol = DEFAULT_PROTOCOL if protocol is None and dumps is pickle.dumps else protocol
        self._threshold = DEFAULT_THRESHOLD if threshold is None else threshold

    def dumps(self, obj: Any) -> bytes:
        """Serialize ``obj`` to a pickle data stream."""
        if self._protocol is None:
            return self._dumps(obj)
        return self._dumps(obj, self._protocol)

    def loads(self, data: Any) -> Any:
        """Deserialize an object from a pickle data stream."""
        return self._loads(data)

    def is_standard(self, protocol: int) -> bool:
        """Whether this is the standard library's pickle at ``protocol``: what a message that
        skips pickling (``objects``) must stand for."""
        return self._dumps is pickle.dumps and self._loads is pickle.loads and self._protocol == protocol

    def dumps_oob(self, obj: Any) -> tuple[bytes, list[memoryview]]:
        """Serialize ``obj`` with protocol 5, its buffers of ``THRESHOLD`` bytes or more out of band."""
        protocol = DEFAULT_PROTOCOL if self._protocol is None else self._protocol
        buffers: list[memoryview] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            view = buffer.raw()
            if view.nbytes >= self._threshold:
                buffers.append(view)
                return False
            return True

        return self._dumps(obj, max(protocol, 5), buffer_callback=out_of_band), buffers

    def loads_oob(self, data: Any, buffers: Iterable[Any]) -> Any:
        """Deserialize an object from a pickle data stream and its out-of-band buffers."""
        return self._loads(data, buffers=buffers)

    @property
    def PROTOCOL(self) -> int | None:  # noqa: N802 - mpi4py's name
        return self._protocol

    @PROTOCOL.setter
    def PROTOCOL(self, protocol: int | None) -> None:  # noqa: N802
        if protocol is None and self._dumps is pickle.dumps:
            protocol = DEFAULT_PROTOCOL
        self._protocol = protocol

    @property
    def THRESHOLD(self) -> int:  # noqa: N802 - mpi4py's name
        return self._threshold

    @THRESHOLD.setter
    def THRESHOLD(self, threshold: int | None) -> None:  # noqa: N802
        self._threshold = DEFAULT_THRESHOLD if threshold is None else threshold


PICKLE = Pickle()  # MPI.pickle: what the object API uses
