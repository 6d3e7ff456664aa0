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
    """A persistent request (mpi4py's ``Prequest``): inactive until started, inactive again
    once complete, null once freed. ``Prequest()`` is null, ``Prequest(request)`` shares the
    handle of ``request``."""

    @classmethod
    def _of(cls, post: Callable[[], Request]) -> Prequest:
        request = cls()
        request._null, request._persistent = False, True
        request._post_one = post
        return request

    def Start(self) -> None:  # noqa: N802 - mpi4py's name
        """Post the operation again; ERR_REQUEST if it is still active, freed, or not persistent."""
        if self._null or self._active or not self._persistent:
            raise MPIException(ERR_REQUEST, "Start of a persistent request that is active or freed")
        posted = self._post_one()
        # Take the posted request's operation, so that every Request method (and Waitall, ...) serves it.
        self._transport, self._op, self._also, self._what = posted._transport, posted._op, posted._also, posted._what
        self._ranks, self._posted, self._limit = posted._ranks, posted._posted, posted._limit
        self.on_complete, self._active = posted.on_complete, True

    start = Start

    @classmethod
    def Startall(cls, requests: Sequence[Prequest]) -> None:  # noqa: N802 - mpi4py's name
        for request in requests:
            request.Start()

    startall = Startall


class PersistentAPI:
    """The persistent point-to-point calls of mpi4py's ``Comm`` (see the module docstring)."""

    def _send_init(self, buf: Any, dest: int, tag: int, sync: bool) -> Prequest:
        dest, tag = c_int(dest), c_int(tag)
        msg = self._send_args(buf, dest, tag)

        def post() -> Request:
            request = self._start_send(msg, dest, tag, sync=sync)
            return self._proc_null_request() if request is None else request

        return Prequest._of(post)

    def Send_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:  # noqa: N802 - mpi4py's names
        return self._send_init(buf, dest, tag, sync=False)

    def Ssend_init(self, buf: Any, dest: int, tag: int = 0) -> Prequest:  # noqa: N802
        return self._send_init(buf, dest, tag, sync=True)

    Bsend_init = Send_init  # as Bsend and Rsend: a standard send is buffered already
    Rsend_init = Send_init

    def Recv_init(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Prequest:  # noqa: N802
        source, tag = c_int(source), c_int(tag)
        msg = self._recv_args(buf, source, tag)
        return Prequest._of(lambda: self._start_recv(msg, source, tag))
