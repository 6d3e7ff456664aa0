"""mpi4py's generalized requests (``Grequest``): an operation the program runs itself and
finishes with ``Complete()`` (or ``complete(obj)``, whose ``obj`` the completing ``wait``/``test``
returns), waited for and tested like any request, alone or in lists with others.

As in MPI: at completion (the ``Wait``/``Test`` that finds it complete) ``query_fn(status, *args,
**kwargs)`` fills the status (else it is empty), then ``free_fn(*args, **kwargs)`` runs;
``Cancel`` calls ``cancel_fn(completed, *args, **kwargs)``. An exception in a callback is printed
with its traceback and raised as ``MPI.Exception`` (its own class if it is one, else ERR_OTHER).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from lambda_shim.constants import ANY_SOURCE, ANY_TAG, Status
from lambda_shim.errors import ERR_OTHER, ERR_REQUEST, CommError, MPIException
from lambda_shim.request import GENERALIZED, Request

_POLL_S = 0.01  # a wait that also holds transport requests sees them complete within this


class _UserOp:
    """A generalized request's operation: done once the program calls ``Complete``."""

    source, tag = ANY_SOURCE, ANY_TAG  # what a transport names if it waits on it too

    def __init__(self) -> None:
        self.done = self.cancelled = False
        self.error: CommError | None = None
        self.failure: BaseException | None = None
        self.value: Any = None


class _Completions:
    """Waits for generalized requests (and, by polling, for the transport requests in the same
    list: the transport's engine runs in the background while no thread waits on it)."""

    polls = True  # a list with transport requests is better waited for by their transport

    def __init__(self) -> None:
        self._cond = threading.Condition()

    def test(self, op: Any) -> bool:
        return op.done

    def complete(self, op: _UserOp) -> None:
        with self._cond:
            op.done = True
            self._cond.notify_all()

    def wait(self, ops: list[Any], deadline: float | None = None, need: int | None = None) -> None:
        """Until ``need`` of ``ops`` (default all) are done; CommError after CAI_HPC_OP_TIMEOUT."""
        need = len(ops) if need is None else need
        limit = os.environ.get("CAI_HPC_OP_TIMEOUT")
        if deadline is None and limit:
            deadline = time.monotonic() + float(limit)
        with self._cond:
            while sum(op.done for op in ops) < need:
                if deadline is not None and time.monotonic() > deadline:
                    raise CommError(f"a generalized request not completed within {limit} s")
                self._cond.wait(_POLL_S)


_COMPLETIONS = _Completions()


class Grequest(Request):
    """mpi4py's ``Grequest`` (see the module docstring). ``Grequest(request)`` shares the
    handle of a generalized request."""

    @classmethod
    def Start(  # noqa: N802 - mpi4py's name
        cls,
        query_fn: Callable[..., None] | None = None,
        free_fn: Callable[..., None] | None = None,
        cancel_fn: Callable[..., None] | None = None,
        args: tuple | None = None,
        kwargs: dict | None = None,
    ) -> Grequest:
        request = cls._new(_COMPLETIONS, _UserOp(), GENERALIZED)
        request._callbacks = (query_fn, free_fn, cancel_fn, tuple(args or ()), dict(kwargs or {}))
        request._free_when_complete = False
        return request

    def _call(self, fn: Callable[..., None] | None, *first: Any) -> None:
        if fn is None:
            return
        _, _, _, args, kwargs = self._callbacks
        try:
            fn(*first, *args, **kwargs)
        except MPIException:
            traceback.print_exc()
            raise
        except Exception as exc:  # noqa: BLE001 - the program's callback: reported as MPI reports it
            traceback.print_exc()
            raise MPIException(ERR_OTHER, f"a generalized request's callback raised {exc!r}") from None

    def Complete(self) -> None:  # noqa: N802 - mpi4py's name
        """The operation is done: a Wait/Test now completes the request."""
        op = self._op
        if op is None or op.done:
            raise MPIException(ERR_REQUEST, "Complete of a generalized request already complete")
        _COMPLETIONS.complete(op)
        if self._free_when_complete:  # freed before it completed: MPI frees it now
            self._call(self._callbacks[1])

    def complete(self, obj: Any = None) -> None:
        """``Complete``, with ``obj`` as what the completing ``wait``/``test`` returns."""
        if self._op is not None:
            self._op.value = obj
        self.Complete()

    def _status(self) -> tuple[int, int, int, bool]:
        status = Status()
        self._call(self._callbacks[0], status)
        return status.source, status.tag, status.count, status.cancelled

    def _deliver(self, status: Status) -> Any:
        value = self._op.value
        self._call(self._callbacks[1])
        return value

    def Cancel(self) -> None:  # noqa: N802 - mpi4py's name
        if self._null:
            raise MPIException(ERR_REQUEST, "Cancel of a null request")
        self._call(self._callbacks[2], self._op.done)

    cancel = Cancel

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        """Null from now on; ``free_fn`` runs now if it is complete, else when it completes."""
        done = self._active and self._op.done
        super().Free()
        if done:
            self._call(self._callbacks[1])
        else:
            self._free_when_complete = True

    free = Free
