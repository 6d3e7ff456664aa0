"""mpi4py's nonblocking collectives (``Ibarrier``, ``Ibcast``, ``Iallreduce``, ...) with MPI's
semantics: the call returns at once with a ``Request`` that completes when the collective has.

``NonblockingAPI`` is a mixin of ``Comm`` (before ``BufferAPI``). Each call takes its
collective tag on the calling thread, so every rank's k-th collective on a communicator
matches whatever threads run them, then runs the blocking buffer form (``BufferAPI``'s) for
that tag in a worker thread. The call returns once the worker has checked its arguments (it
posts its first message) and raises what the blocking form raises if they are bad; a failure
after that (a peer gone, a message that does not fit) is raised by the ``Wait``/``Test`` that
completes the request. The request wraps a transport op the worker completes, so it mixes with
point-to-point requests in ``Waitall``/``Testany``/...
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from lambda_shim.buffers import BufferAPI
from lambda_shim.constants import SUM
from lambda_shim.request import GENERALIZED, Request
from lambda_shim.transport import Op

_worker = threading.local()  # in a collective's worker thread: .tag (its call's) and .op


def worker_tag() -> int | None:
    """The tag the nonblocking call being run by this thread took (None on other threads)."""
    return getattr(_worker, "tag", None)


class _CollectiveOp(Op):
    """The transport op of one nonblocking collective: done when its worker thread is."""

    def __init__(self, rank: int, tag: int) -> None:
        super().__init__()
        self.source, self.tag = rank, tag  # what a wait that reaches its deadline names
        self.checked = threading.Event()  # the arguments passed (or the worker ended)
        self.refused: BaseException | None = None  # raised by the call itself
        self.failure: BaseException | None = None  # raised by the completing Wait/Test


def _arguments_checked() -> None:
    op = getattr(_worker, "op", None)
    if op is not None:
        op.checked.set()


class NonblockingAPI:
    """The nonblocking collectives of mpi4py's ``Intracomm`` (see the module docstring)."""

    # ------------------------------------------------------------ the worker
    def _post(self, *args: Any, **kwargs: Any) -> Any:
        _arguments_checked()  # a message moves: the blocking form has checked its arguments
        return super()._post(*args, **kwargs)

    def _take(self, *args: Any, **kwargs: Any) -> Any:
        _arguments_checked()
        return super()._take(*args, **kwargs)

    def _start(self, name: str, blocking: Callable[..., None], *args: Any) -> Request:
        """Run ``blocking(*args)`` (a BufferAPI collective) for the next collective tag in a
        worker thread; a request that completes when it returns."""
        tag = self._coll_tag()
        op = _CollectiveOp(self._transport.rank, tag)

        def work() -> None:
            _worker.tag, _worker.op = tag, op
            try:
                blocking(self, *args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller or its Wait
                if op.checked.is_set():
                    op.failure = exc
                else:
                    op.refused = exc
            finally:
                op.checked.set()
                if op.refused is None:
                    self._transport._complete(op)

        threading.Thread(target=work, name=f"lambda_shim {name} (tag {tag})", daemon=True).start()
        op.checked.wait()
        if op.refused is not None:
            raise op.refused
        return Request._new(self._transport, op, GENERALIZED, self._world_rank)

    # ------------------------------------------------------------ the collectives
    def Ibarrier(self) -> Request:  # noqa: N802 - mpi4py's names
        return self._start("Ibarrier", BufferAPI.Barrier)

    def Ibcast(self, buf: Any, root: int = 0) -> Request:  # noqa: N802
        return self._start("Ibcast", BufferAPI.Bcast, buf, root)

    def Igather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:  # noqa: N802
        return self._start("Igather", BufferAPI.Gather, sendbuf, recvbuf, root)

    def Igatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:  # noqa: N802
        return self._start("Igatherv", BufferAPI.Gatherv, sendbuf, recvbuf, root)

    def Iscatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:  # noqa: N802
        return self._start("Iscatter", BufferAPI.Scatter, sendbuf, recvbuf, root)

    def Iscatterv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:  # noqa: N802
        return self._start("Iscatterv", BufferAPI.Scatterv, sendbuf, recvbuf, root)

    def Iallgather(self, sendbuf: Any, recvbuf: Any) -> Request:  # noqa: N802
        return self._start("Iallgather", BufferAPI.Allgather, sendbuf, recvbuf)

    def Iallgatherv(self, sendbuf: Any, recvbuf: Any) -> Request:  # noqa: N802
        return self._start("Iallgatherv", BufferAPI.Allgatherv, sendbuf, recvbuf)

    def Ialltoall(self, sendbuf: Any, recvbuf: Any) -> Request:  # noqa: N802
        return self._start("Ialltoall", BufferAPI.Alltoall, sendbuf, recvbuf)

    def Ialltoallv(self, sendbuf: Any, recvbuf: Any) -> Request:  # noqa: N802
        return self._start("Ialltoallv", BufferAPI.Alltoallv, sendbuf, recvbuf)

    def Ireduce(self, sendbuf: Any, recvbuf: Any, op: Any = SUM, root: int = 0) -> Request:  # noqa: N802
        return self._start("Ireduce", BufferAPI.Reduce, sendbuf, recvbuf, op, root)

    def Iallreduce(self, sendbuf: Any, recvbuf: Any, op: Any = SUM) -> Request:  # noqa: N802
        return self._start("Iallreduce", BufferAPI.Allreduce, sendbuf, recvbuf, op)

    def Ireduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: Any = SUM) -> Request:  # noqa: N802
        return self._start("Ireduce_scatter_block", BufferAPI.Reduce_scatter_block, sendbuf, recvbuf, op)

    def Ireduce_scatter(  # noqa: N802
        self, sendbuf: Any, recvbuf: Any, recvcounts: Sequence[int] | None = None, op: Any = SUM
    ) -> Request:
        return self._start("Ireduce_scatter", BufferAPI.Reduce_scatter, sendbuf, recvbuf, recvcounts, op)

    def Iscan(self, sendbuf: Any, recvbuf: Any, op: Any = SUM) -> Request:  # noqa: N802
        return self._start("Iscan", BufferAPI.Scan, sendbuf, recvbuf, op)

    def Iexscan(self, sendbuf: Any, recvbuf: Any, op: Any = SUM) -> Request:  # noqa: N802
        return self._start("Iexscan", BufferAPI.Exscan, sendbuf, recvbuf, op)
