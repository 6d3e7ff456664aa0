"""mpi4py's persistent point-to-point requests: ``Send_init``, ``Ssend_init``, ``Bsend_init``,
``Rsend_init`` and ``Recv_init`` check their arguments once and return an inactive
``Prequest``; each ``Start`` (or ``Prequest.Startall``) posts a new ``Isend``/``Issend``/
``Irecv`` of the same buffer, peer and tag. A completed persistent request becomes inactive,
not null (``Wait`` on it returns at once with an empty status); ``Free`` makes it null.

``PersistentAPI`` is a mixin of ``Comm``, over ``BufferAPI``'s checks and posting helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lambda_shim.buffers import c_int
from lambda_shim.constants import ANY_SOURCE, ANY_TAG
from lambda_shim.errors import ERR_REQUEST, MPIException
from lambda_shim.request import Request


class Prequest(Request):
    """A persistent request (mpi4py's ``Prequest``): inactive until started."""

    def __init__(self, post: Callable[[], Request]) -> None:
        super().__init__(what=None)  # inactive
        self._post_one = post
        self._freed = False

    def __bool__(self) -> bool:
        return not self._freed

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return self is other or (not self and not other)

    __hash__ = object.__hash__

    def Start(self) -> None:  # noqa: N802 - mpi4py's name
        """Post the operation again; ERR_REQUEST if it is still active (or freed)."""
        if self._active or self._freed:
            raise MPIException(ERR_REQUEST, "Start of a persistent request that is active or freed")
        posted = self._post_one()
        # Become the posted request, so that every Request method (and Waitall, ...) serves it.
        self._transport, self._op, self._what = posted._transport, posted._op, posted._what
        self._ranks, self._posted, self._limit = posted._ranks, posted._posted, posted._limit
        self.on_complete, self._active = posted.on_complete, True

    start = Start

    @classmethod
    def Startall(cls, requests: Sequence[Prequest]) -> None:  # noqa: N802 - mpi4py's name
        for request in requests:
            request.Start()

    startall = Startall

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        """Null from now on; a started operation still goes on, unreported."""
        self._active, self._freed = False, True

    free = Free


class PersistentAPI:
    """The persistent point-to-point calls of mpi4py's ``Comm`` (see the module docstring)."""

    def _send_init(self, buf: Any, dest: int, tag: int, sync: bool) -> Prequest:
        dest, tag = c_int(dest), c_int(tag)
        msg = self._send_args(buf, dest, tag)

        def post() -> Request:
            request = self._start_send(msg, dest, tag, sync=sync)
            return self._proc_null_request() if request is None else request

        return Prequest(post)

    def Send_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:  # noqa: N802 - mpi4py's names
        return self._send_init(buf, dest, tag, sync=False)

    def Ssend_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:  # noqa: N802
        return self._send_init(buf, dest, tag, sync=True)

    Bsend_init = Send_init  # as Bsend and Rsend: a standard send is buffered already
    Rsend_init = Send_init

    def Recv_init(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Prequest:  # noqa: N802
        source, tag = c_int(source), c_int(tag)
        msg = self._recv_args(buf, source, tag)
        return Prequest(lambda: self._start_recv(msg, source, tag))
