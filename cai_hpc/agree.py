"""How ranks reach one outcome: a decision broadcast by rank 0, or every rank's share gathered,
with an InputError anywhere raised on every rank (``agreed``), so that one line is printed and
every rank exits cleanly instead of one rank waiting in a collective the others left."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from cai_hpc.errors import InputError

T = TypeVar("T")


def decided_by_root(comm: Any, decide: Callable[[], T]) -> T:
    """Rank 0 decides and broadcasts; an InputError there is raised on every rank."""
    outcome: tuple[str, Any] | None = None
    if comm.Get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except InputError as exc:
            outcome = ("error", str(exc))
    status, value = comm.bcast(outcome, root=0)
    if status == "error":
        raise InputError(value, agreed=True)
    return value


def gathered(comm: Any, work: Callable[[], T]) -> list[T]:
    """Every rank does its share; every rank gets all shares in rank order, or, if any rank
    hit an InputError, all raise the lowest rank's."""
    try:
        share, error = work(), None
    except InputError as exc:
        share, error = None, str(exc)
    shares = comm.allgather((error, share))
    errors = [e for e, _ in shares if e is not None]
    if errors:
        raise InputError(errors[0], agreed=True)
    return [s for _, s in shares]


def agreed(comm: Any, work: Callable[[], T]) -> T:
    """Every rank does its own part; if any rank hits an InputError, all raise the first one."""
    try:
        result, error = work(), None
    except InputError as exc:
        result, error = None, str(exc)
    errors = [e for e in comm.allgather(error) if e is not None]
    if errors:
        raise InputError(errors[0], agreed=True)
    return result


class StreamCheck:
    """Ranks agree, while their batches stream, whether any rank met bad input.

    A rank checks its rows as it reads them, so bad input can turn up on one rank deep into
    the run. Every rank therefore takes part in the same number of agreements: one after
    every ``every`` batches of the longest stream (a rank whose stream is shorter or broke
    off makes up the rest with its finding), and one at the end. A rank that met bad input
    stops reading and waits at the next agreement, at most ``every`` batches of the others
    away; there every rank learns of it together and raises the same one-line error.
    """

    def __init__(self, comm: Any, every: int, longest: int) -> None:
        self._comm, self._every = comm, every
        self._rounds = longest // every  # agreements inside the longest stream
        self._held = 0

    def after_batch(self, batches: int) -> None:
        """Called with this rank's count of finished batches."""
        if batches % self._every == 0:
            self._agree(None)

    def finish(self, error: str | None = None) -> None:
        """This rank's stream ended (``error``: the bad input that ended it); raises the
        agreed InputError if any rank met one."""
        while self._held < self._rounds:
            self._agree(error)
        self._agree(error)

    def _agree(self, error: str | None) -> None:
        self._held += 1
        errors = [e for e in self._comm.allgather(error) if e is not None]
        if errors:
            raise InputError(errors[0], agreed=True)
