"""mpi4py's ``Request`` over the transport's pending operations: ``wait``/``test`` and the
class methods ``waitall``, ``waitany``, ``waitsome``, ``testall``, ``testany``, ``testsome``
(and their capitalised forms), with mpi4py's return conventions.

A Request object holds a handle, as mpi4py's does: ``Request(other)`` (and ``fromhandle``)
gives a second object with the same handle, equal to it; two objects are equal when their
handles are (all null ones are equal to ``REQUEST_NULL``), and, as in mpi4py, requests are not
hashable. A completed or freed request becomes null (false, equal to ``REQUEST_NULL``); a
persistent one (``Prequest``) only becomes inactive when it completes, and null when freed.
Objects sharing a handle share its state here (``__dict__``), so completing one completes the
other (in MPI the other would be left holding a dangling handle)."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from lambda_shim.constants import ANY_SOURCE, ANY_TAG, PROC_NULL, UNDEFINED, Status, fill_status
from lambda_shim.errors import ERR_IN_STATUS, ERR_PENDING, ERR_REQUEST, ERR_TRUNCATE, CommError, MPIException
from lambda_shim.objects import as_sent_by_mpi4py, received

# What a request delivers when it completes. GENERALIZED: an op a thread completes (a
# nonblocking collective): its ``failure``, if not None, is raised by the completing call.
SEND, RECV_OBJECT, RECV_BYTES, GENERALIZED = "send", "object", "bytes", "generalized"

NULL_HANDLE = 0x2C000000  # MPICH's MPI_REQUEST_NULL (what mpi4py's REQUEST_NULL.handle reads)
_handles = itertools.count(0xAC000000)  # numbered as MPICH numbers request handles
_by_handle: weakref.WeakValueDictionary[int, Request] = weakref.WeakValueDictionary()


class Request:
    """A pending send or receive (mpi4py's ``Request``). ``Request()`` is a null request and
    ``Request(request)`` a new object with ``request``'s handle; the communicators make theirs
    with ``Request._new``.

    For a receive of raw bytes (``Comm._irecv_bytes``) completion sets ``payload`` and
    ``envelope`` (source as a rank of the communicator) and then calls ``on_complete(request,
    status)``, if set, once, in the thread that completes it."""

    # A null request's state; a request sets in its own __dict__ only what differs (shared
    # with the copies of its handle), so making one per message stays cheap.
    _transport: Any = None
    _op: Any = None  # None: complete already (PROC_NULL)
    _also: Any = None  # a send op that must complete too (Isendrecv)
    _what: str | None = None
    _ranks: dict[int, int] | None = None  # world rank -> rank in the communicator
    _posted = (ANY_SOURCE, ANY_TAG)  # (source, tag) a receive was posted with, in the comm's ranks
    _limit: int | None = None  # bytes the receive buffer holds, if one was given
    _active = False  # an operation is pending
    _null = True  # the handle is null
    _persistent = False  # completion leaves it inactive, not null (Prequest)
    _handle: int | None = None
    on_complete: Callable[[Request, Status], None] | None = None
    payload: bytearray | None = None
    envelope: Any = None

    def __init__(self, request: Request | None = None) -> None:
        if request is not None and not isinstance(request, Request):
            raise TypeError(f"Argument 'request' has incorrect type (expected Request, got {type(request).__name__})")
        if request is not None and not request._null:
            if not isinstance(request, type(self)):  # a Prequest is made only of a Prequest
                raise TypeError(f"Cannot convert {type(request).__name__} to {type(self).__name__}")
            self.__dict__ = request.__dict__  # the same handle

    @classmethod
    def _new(
        cls,
        transport: Any,
        op: Any,
        what: str,
        ranks: dict[int, int] | None = None,
        posted: tuple[int, int] = (ANY_SOURCE, ANY_TAG),
        limit: int | None = None,
    ) -> Request:
        """An active request of ``op`` (None: complete already) delivering ``what``."""
        request = cls.__new__(cls)
        request._transport, request._op, request._what = transport, op, what
        request._ranks, request._posted, request._limit = ranks, posted, limit
        request._active, request._null = True, False
        return request

    # ---------------------------------------------------------------- identity
    def __bool__(self) -> bool:
        return not self._null

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return self.__dict__ is other.__dict__ or (self._null and other._null)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # as mpi4py's: a handle changes when the request completes

    def __reduce__(self) -> str | tuple[Any, ...]:
        """REQUEST_NULL unpickles as itself, another null request as a new one; a live request
        cannot be pickled (ValueError, as mpi4py's)."""
        if self is REQUEST_NULL:
            return "REQUEST_NULL"
        if self._null:
            return type(self), ()
        raise ValueError(f"cannot serialize '{type(self).__name__}' instance")

    @property
    def handle(self) -> int:
        """The handle as an int (MPICH's MPI_REQUEST_NULL when null), for ``fromhandle``."""
        if self._null:
            return NULL_HANDLE
        if self._handle is None:
            self._handle = next(_handles)
            _by_handle[self._handle] = self
        return self._handle

    def toint(self) -> int:
        return self.handle

    def py2f(self) -> int:
        return self.handle

    @classmethod
    def fromhandle(cls, handle: int) -> Request:
        """A new object with that handle (ERR_REQUEST if no live request has it)."""
        if handle == NULL_HANDLE:
            return cls()
        holder = _by_handle.get(handle)
        if holder is None:
            raise MPIException(ERR_REQUEST, f"no request has handle {handle:#x}")
        return cls(holder)

    fromint = f2py = fromhandle

    # ---------------------------------------------------------------- completion
    def _ops(self) -> list[Any]:
        """The transport ops it waits for (none for PROC_NULL)."""
        return [op for op in (self._op, self._also) if op is not None]

    def _done(self) -> bool:
        """Complete now (raises if it never can be: a peer gone, a deadline passed)."""
        return all(self._transport.test(op) for op in self._ops())

    def _status(self) -> tuple[int, int, int, bool]:
        """(source, tag, bytes, cancelled) of a complete request."""
        op = self._op
        if self._what in (SEND, GENERALIZED):
            return ANY_SOURCE, ANY_TAG, 0, False
        if op is None:
            return PROC_NULL, ANY_TAG, 0, False
        if op.cancelled:
            return *self._posted, 0, True
        envelope = op.envelope
        return self._ranks[envelope.source], envelope.tag, envelope.nbytes, False

    def _complete(self, status: Any) -> Any:
        """Finish a complete request once: fill ``status``, deliver the value, become null.
        An error (a message larger than the buffer) is also recorded in ``status``."""
        self._active, self._null = False, not self._persistent
        source, tag, nbytes, cancelled = self._status()
        mine = Status()
        mine._fill(source, tag, nbytes, cancelled)
        fill_status(status, source, tag, nbytes, cancelled)
        try:
            return self._deliver(mine)
        except MPIException as exc:
            if status is not None:
                status.Set_error(exc.Get_error_class())
            raise
        finally:
            self._op = None  # the payload is delivered: do not keep it alive with the request

    def _deliver(self, status: Status) -> Any:
        op, what = self._op, self._what
        if what == GENERALIZED and op.failure is not None:
            raise op.failure
        if what in (SEND, GENERALIZED) or op is None or status.cancelled:
            return None
        if self._limit is not None and status.count > self._limit:
            raise MPIException(
                ERR_TRUNCATE, f"a message of {status.count} bytes from rank {status.source}, room for {self._limit}"
            )
        if what == RECV_BYTES:
            self.payload, self.envelope = as_sent_by_mpi4py(op.envelope.kind, op.payload), op.envelope
            self.envelope.source = status.source
            if self.on_complete is not None:
                self.on_complete(self, status)
            return None
        return received(op.envelope.kind, op.payload)

    # ---------------------------------------------------------------- one request
    def wait(self, status: Any = None) -> Any:
        """Wait for completion; the received object (None for a send)."""
        if not self._active:
            fill_status(status, ANY_SOURCE, ANY_TAG, 0)
            return None
        if ops := self._ops():
            self._transport.wait(ops)
        return self._complete(status)

    def Wait(self, status: Any = None) -> bool:  # noqa: N802 - mpi4py's name
        self.wait(status)
        return True

    def test(self, status: Any = None) -> tuple[bool, Any]:
        """(True, object) if complete (then null), else (False, None)."""
        if not self._active:
            fill_status(status, ANY_SOURCE, ANY_TAG, 0)
            return True, None
        if not self._done():
            return False, None
        return True, self._complete(status)

    def Test(self, status: Any = None) -> bool:  # noqa: N802 - mpi4py's name
        return self.test(status)[0]

    def Get_status(self, status: Any = None) -> bool:  # noqa: N802 - mpi4py's name
        """Whether it is complete, filling ``status`` if so, without completing it."""
        if not self._active:
            fill_status(status, ANY_SOURCE, ANY_TAG, 0)
            return True
        if not self._done():
            return False
        fill_status(status, *self._status())
        return True

    get_status = Get_status

    def Cancel(self) -> None:  # noqa: N802 - mpi4py's name
        """Cancel a receive no message has matched yet; a send or a matched receive goes on.
        A null request (REQUEST_NULL, or one already completed) is ERR_REQUEST, as in MPI."""
        if self._null:
            raise MPIException(ERR_REQUEST, "Cancel of a null request")
        if self._active and self._op is not None and self._what != SEND:
            self._transport.cancel(self._op)

    cancel = Cancel

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        """Forget it: it goes on (a receive still takes its message) but nothing reports it.
        A null request is ERR_REQUEST, as in MPI."""
        if self._null:
            raise MPIException(ERR_REQUEST, "Free of a null request")
        self._active, self._null = False, True

    free = Free

    # ---------------------------------------------------------------- many requests
    @staticmethod
    def _wait_some(requests: Sequence[Request]) -> list[int]:
        """Block until at least one active request is complete; the indices of every complete one."""
        active = [i for i, r in enumerate(requests) if r._active]
        while True:
            done = [i for i in active if requests[i]._done()]
            if done or not active:
                return done
            ops = [op for i in active for op in requests[i]._ops() if not op.done]
            if ops:  # else the last one completed just now, in another thread: look again
                _waiter([requests[i] for i in active]).wait(ops, need=1)

    @staticmethod
    def _status_at(statuses: Sequence | None, k: int) -> Any:
        """The k-th status to fill: a list grows to hold it, as mpi4py's does; another
        sequence (a tuple) has its own statuses filled, as far as it reaches."""
        if statuses is None:
            return None
        if isinstance(statuses, list):
            while len(statuses) <= k:
                statuses.append(Status())
        return statuses[k] if k < len(statuses) else None

    @staticmethod
    def _complete_each(pairs: list[tuple[Request, Any]]) -> list[Any]:
        """Complete the (request, status) pairs in order. A failure ends it as MPICH does: the
        call raises ERR_IN_STATUS, the failed request's status holds its error, and the
        requests after it stay active with ERR_PENDING in their statuses."""
        values: list[Any] = []
        for k, (request, status) in enumerate(pairs):
            try:
                values.append(request.wait(status))
            except CommError:
                raise
            except MPIException:
                for _, later in pairs[k + 1 :]:
                    if later is not None:
                        later.Set_error(ERR_PENDING)
                raise MPIException(ERR_IN_STATUS, "a request failed: its status holds the error") from None
        return values

    @classmethod
    def waitall(cls, requests: Sequence[Request], statuses: list | None = None) -> list[Any]:
        pending = [r for r in requests if r._active and r._ops()]
        if pending:
            _waiter(pending).wait([op for r in pending for op in r._ops()])
        return cls._complete_each([(r, cls._status_at(statuses, k)) for k, r in enumerate(requests)])

    @classmethod
    def Waitall(cls, requests: Sequence[Request], statuses: list | None = None) -> bool:  # noqa: N802
        cls.waitall(requests, statuses)
        return True

    @classmethod
    def waitany(cls, requests: Sequence[Request], status: Any = None) -> tuple[int, Any]:
        done = cls._wait_some(requests)
        if not done:
            fill_status(status, ANY_SOURCE, ANY_TAG, 0)
            return UNDEFINED, None
        return done[0], requests[done[0]]._complete(status)

    @classmethod
    def Waitany(cls, requests: Sequence[Request], status: Any = None) -> int:  # noqa: N802
        return cls.waitany(requests, status)[0]

    @classmethod
    def waitsome(cls, requests: Sequence[Request], statuses: list | None = None) -> tuple[Any, Any]:
        if not any(r._active for r in requests):
            return None, None
        done = cls._wait_some(requests)
        return done, cls._complete_each([(requests[i], cls._status_at(statuses, k)) for k, i in enumerate(done)])

    @classmethod
    def Waitsome(cls, requests: Sequence[Request], statuses: list | None = None) -> list[int] | None:  # noqa: N802
        return cls.waitsome(requests, statuses)[0]

    @classmethod
    def testall(cls, requests: Sequence[Request], statuses: list | None = None) -> tuple[bool, list | None]:
        """(True, objects) when every request is complete (all are then null); else (False, None)."""
        if not all(r._done() for r in requests if r._active):
            return False, None
        return True, cls._complete_each([(r, cls._status_at(statuses, k)) for k, r in enumerate(requests)])

    @classmethod
    def Testall(cls, requests: Sequence[Request], statuses: list | None = None) -> bool:  # noqa: N802
        return cls.testall(requests, statuses)[0]

    @classmethod
    def testany(cls, requests: Sequence[Request], status: Any = None) -> tuple[int, bool, Any]:
        active = [i for i, r in enumerate(requests) if r._active]
        for i in active:
            if requests[i]._done():
                return i, True, requests[i]._complete(status)
        if not active:
            fill_status(status, ANY_SOURCE, ANY_TAG, 0)
        return UNDEFINED, not active, None

    @classmethod
    def Testany(cls, requests: Sequence[Request], status: Any = None) -> tuple[int, bool]:  # noqa: N802
        index, flag, _ = cls.testany(requests, status)
        return index, flag

    @classmethod
    def Get_status_all(cls, requests: Sequence[Request], statuses: Sequence | None = None) -> bool:  # noqa: N802
        """Whether every request is complete, filling the statuses if so, completing none."""
        if not all(r.Get_status() for r in requests):
            return False
        for k, request in enumerate(requests):
            request.Get_status(cls._status_at(statuses, k))
        return True

    @classmethod
    def Get_status_any(cls, requests: Sequence[Request], status: Any = None) -> tuple[int, bool]:  # noqa: N802
        """(index, True) of a complete active request, without completing it; (UNDEFINED, True)
        when none is active; (UNDEFINED, False) when none is complete yet."""
        active = [i for i, r in enumerate(requests) if r._active]
        for i in active:
            if requests[i].Get_status(status):
                return i, True
        if not active:
            fill_status(status, ANY_SOURCE, ANY_TAG, 0)
        return UNDEFINED, not active

    @classmethod
    def Get_status_some(cls, requests: Sequence[Request], statuses: Sequence | None = None) -> list[int] | None:  # noqa: N802
        """Indices of the complete active requests (their statuses filled, none completed);
        None when no request is active."""
        active = [i for i, r in enumerate(requests) if r._active]
        if not active:
            return None
        done = [i for i in active if requests[i].Get_status()]
        for k, i in enumerate(done):
            requests[i].Get_status(cls._status_at(statuses, k))
        return done

    get_status_all = Get_status_all
    get_status_any = Get_status_any
    get_status_some = Get_status_some

    @classmethod
    def testsome(cls, requests: Sequence[Request], statuses: list | None = None) -> tuple[Any, Any]:
        active = [i for i, r in enumerate(requests) if r._active]
        if not active:
            return None, None
        done = [i for i in active if requests[i]._done()]
        return done, cls._complete_each([(requests[i], cls._status_at(statuses, k)) for k, i in enumerate(done)])

    @classmethod
    def Testsome(cls, requests: Sequence[Request], statuses: list | None = None) -> list[int] | None:  # noqa: N802
        return cls.testsome(requests, statuses)[0]


def _waiter(requests: Sequence[Request]) -> Any:
    """What waits for these requests' ops: a transport if one of them has one (it also notices
    a peer's failure; generalized requests' ops it polls), else the first one's."""
    return next((r._transport for r in requests if not getattr(r._transport, "polls", False)), requests[0]._transport)


REQUEST_NULL = Request()
