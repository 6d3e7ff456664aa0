"""mpi4py's ``Request`` over the transport's pending operations: ``wait``/``test`` and the
class methods ``waitall``, ``waitany``, ``waitsome``, ``testall``, ``testany``, ``testsome``
(and their capitalised forms), with mpi4py's return conventions. A completed request
becomes null (false, equal to ``REQUEST_NULL``), as mpi4py's does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lambda_shim.constants import ANY_SOURCE, ANY_TAG, PROC_NULL, UNDEFINED, Status, fill_status
from lambda_shim.errors import ERR_IN_STATUS, ERR_PENDING, ERR_REQUEST, ERR_TRUNCATE, CommError, MPIException
from lambda_shim.objects import OBJECT_KINDS, as_sent_by_mpi4py
from lambda_shim.objects import decode as decode_object

# What a request delivers when it completes. GENERALIZED: an op a thread completes (a
# nonblocking collective): its ``failure``, if not None, is raised by the completing call.
SEND, RECV_OBJECT, RECV_BYTES, GENERALIZED = "send", "object", "bytes", "generalized"


class Request:
    """A pending send or receive (mpi4py's ``Request``).

    For a receive of raw bytes (``Comm._irecv_bytes``) completion sets ``payload`` and
    ``envelope`` (source as a rank of the communicator) and then calls ``on_complete(request,
    status)``, if set, once, in the thread that completes it."""

    def __init__(
        self,
        transport: Any = None,
        op: Any = None,
        what: str | None = None,  # None: a null request, as mpi4py's MPI.Request()
        ranks: dict[int, int] | None = None,
        posted: tuple[int, int] = (ANY_SOURCE, ANY_TAG),
        limit: int | None = None,
    ) -> None:
        self._transport = transport
        self._op = op  # None: complete already (PROC_NULL)
        self._what = what
        self._ranks = ranks  # world rank -> rank in the communicator
        self._posted = posted  # (source, tag) the receive was posted with, in the comm's ranks
        self._limit = limit  # bytes the receive buffer holds, if one was given
        self._active = what is not None
        self.on_complete: Callable[[Request, Status], None] | None = None
        self.payload: bytearray | None = None
        self.envelope: Any = None

    # ---------------------------------------------------------------- identity
    def __bool__(self) -> bool:
        return self._active

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return self is other or (not self._active and not other._active)

    __hash__ = object.__hash__

    # ---------------------------------------------------------------- completion
    def _done(self) -> bool:
        """Complete now (raises if it never can be: a peer gone, a deadline passed)."""
        return self._op is None or self._transport.test(self._op)

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
        self._active = False
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
        if op.envelope.kind in OBJECT_KINDS:
            return decode_object(op.envelope.kind, op.payload)
        return bytes(op.payload) if op.payload else None  # an empty message: mpi4py's None

    # ---------------------------------------------------------------- one request
    def wait(self, status: Any = None) -> Any:
        """Wait for completion; the received object (None for a send)."""
        if not self._active:
            fill_status(status, ANY_SOURCE, ANY_TAG, 0)
            return None
        if self._op is not None:
            self._transport.wait([self._op])
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
        if not self._active:
            raise MPIException(ERR_REQUEST, "Cancel of a null request")
        if self._active and self._op is not None and self._what != SEND:
            self._transport.cancel(self._op)

    cancel = Cancel

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        """Forget it: it goes on (a receive still takes its message) but nothing reports it.
        A null request is ERR_REQUEST, as in MPI."""
        if not self._active:
            raise MPIException(ERR_REQUEST, "Free of a null request")
        self._active = False

    free = Free

    # ---------------------------------------------------------------- many requests
    @staticmethod
    def _wait_some(requests: Sequence[Request]) -> list[int]:
        """Block until at least one active request is complete; the indices of every complete one."""
        active = [i for i, r in enumerate(requests) if r._active]
        done = [i for i in active if requests[i]._done()]
        if done or not active:
            return done
        ops = [requests[i]._op for i in active]
        requests[active[0]]._transport.wait(ops, need=1)
        return [i for i in active if requests[i]._done()]

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
        ops = [r._op for r in requests if r._active and r._op is not None]
        if ops:
            ops_transport = next(r._transport for r in requests if r._active and r._op is not None)
            ops_transport.wait(ops)
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


REQUEST_NULL = Request(what=None)
