"""Communicators: the mpi4py ``Comm`` subset the engine is written against.

``get_comm`` hands out mpi4py's ``COMM_WORLD`` under an MPI launcher or srun, and otherwise
``SelfComm``, a one-rank communicator with mpi4py's names, defaults and return conventions,
so a laptop needs no MPI at all. mpi4py is only imported when an MPI run asks for it.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Mapping, Sequence
from functools import reduce as _fold
from typing import Any

from cai_hpc.errors import InputError
from lambda_shim.constants import (  # noqa: F401 - re-exported: the engine and tests import them from here
    ANY_SOURCE,
    ANY_TAG,
    IN_PLACE,
    MAX,
    MIN,
    PROC_NULL,
    PROD,
    SUM,
    Op,
    Status,
    buffer_array,
)


class SelfComm:
    """The world of one process: rank 0 of 1.

    Objects pass through collectives unchanged, as mpi4py does at size 1; messages a rank
    sends to itself are queued and matched by tag. A ``recv`` with nothing to match raises
    instead of blocking, because no other rank could ever satisfy it.
    """

    backend = "self"
    rank = 0
    size = 1

    def __init__(self) -> None:
        self._mailbox: list[tuple[int, Any]] = []

    def Get_rank(self) -> int:  # noqa: N802
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    @staticmethod
    def Wtime() -> float:  # noqa: N802
        return time.perf_counter()

    def _check_root(self, root: int) -> None:
        if root != 0:
            raise ValueError(f"root {root} is not a rank of a 1-rank communicator")

    def barrier(self) -> None:
        pass

    def bcast(self, obj: Any, root: int = 0) -> Any:
        self._check_root(root)
        return obj

    def gather(self, sendobj: Any, root: int = 0) -> list[Any]:
        self._check_root(root)
        return [sendobj]

    def allgather(self, sendobj: Any) -> list[Any]:
        return [sendobj]

    def scatter(self, sendobj: Sequence[Any], root: int = 0) -> Any:
        self._check_root(root)
        if sendobj is None or len(sendobj) != 1:
            raise ValueError("scatter needs a sequence of exactly size (1) items")
        return sendobj[0]

    def reduce(self, sendobj: Any, op: Op = SUM, root: int = 0) -> Any:
        self._check_root(root)
        return _fold(op, [sendobj])

    def allreduce(self, sendobj: Any, op: Op = SUM) -> Any:
        return _fold(op, [sendobj])

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        if dest != 0:
            raise ValueError(f"dest {dest} is not a rank of a 1-rank communicator")
        self._mailbox.append((tag, copy.deepcopy(obj)))

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Status | None = None) -> Any:
        if source not in (0, ANY_SOURCE):
            raise ValueError(f"source {source} is not a rank of a 1-rank communicator")
        for i, (msg_tag, obj) in enumerate(self._mailbox):
            if tag in (ANY_TAG, msg_tag):
                del self._mailbox[i]
                if status is not None:
                    status.source, status.tag = 0, msg_tag
                return obj
        raise RuntimeError(f"recv(tag={tag}) on a 1-rank communicator with no matching message")

    # Buffer forms: arrays are copied, never pickled.
    def Bcast(self, buf: Any, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Op = SUM) -> None:  # noqa: N802
        if sendbuf is not IN_PLACE:
            buffer_array(recvbuf)[...] = buffer_array(sendbuf)

    def Reduce(self, sendbuf: Any, recvbuf: Any, op: Op = SUM, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)
        self.Allreduce(sendbuf, recvbuf, op)

    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)
        src = buffer_array(sendbuf).ravel()
        buffer_array(recvbuf).ravel()[: src.size] = src

    def Abort(self, errorcode: int = 1) -> None:  # noqa: N802
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(errorcode)


class TimedComm:
    """Wraps a communicator and adds up the seconds spent inside its calls (``seconds``):
    the communication time of a run, waiting for slower ranks included, as MPI profilers
    count it."""

    _UNTIMED = frozenset({"Get_rank", "Get_size", "Wtime", "Abort"})

    def __init__(self, comm: Any) -> None:
        self._comm = comm
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._comm, name)
        if name in self._UNTIMED or not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


# Variables that an MPI launcher (Hydra, Open MPI, PMIx) or srun sets in every rank.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment says an MPI launcher or ``srun`` started this process."""
    env = os.environ if environ is None else environ
    return any(v in env for v in _LAUNCHER_VARS) or "SLURM_STEP_ID" in env


def launcher_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """The world size the launcher announced (srun, Hydra/PMI, Open MPI), if any."""
    env = os.environ if environ is None else environ
    # SLURM_NTASKS only counts under srun (SLURM_STEP_ID set): a batch script sees the job's.
    names = ("SLURM_NTASKS",) if "SLURM_STEP_ID" in env else ()
    for var in (*names, "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return None


def get_comm(backend: str = "auto") -> Any:
    """The communicator for ``backend``: ``"self"``, ``"mpi"``, ``"tcp"`` or ``"auto"``.

    ``"auto"`` picks mpi4py's ``COMM_WORLD`` when a launcher started this process and
    mpi4py imports, and ``SelfComm`` otherwise; ``"tcp"`` is lambda_shim's TcpComm, set up
    from the environment that ``python -m lambda_shim.launch`` gives its ranks. Under an MPI
    launcher, a world smaller than the one it announced is refused: N processes that each
    think they are rank 0 of 1 would all do the whole job and overwrite each other's output.
    """
    if backend not in ("auto", "self", "mpi", "tcp"):
        raise InputError(f"unknown backend {backend!r}: choose auto, self, mpi or tcp")
    if backend == "tcp":
        from lambda_shim.tcpcomm import TcpComm  # the serverless side, only when asked for

        return TcpComm.from_env()
    launched = launched_by_mpi()
    if backend == "self" or (backend == "auto" and not launched):
        return SelfComm()
    try:
        comm = _mpi_world()
    except ImportError as exc:
        if backend == "auto" and (launcher_world_size() or 1) == 1:
            return SelfComm()
        raise InputError(f"MPI run needs mpi4py ({exc}); install it with: pip install 'cai-hpc[mpi]'") from None
    check_world_size(comm.Get_size())
    return comm


def check_world_size(size: int, environ: Mapping[str, str] | None = None) -> None:
    """Refuse an MPI world that does not match the tasks the launcher started."""
    expected = launcher_world_size(environ)
    if expected is not None and expected != size:
        raise InputError(
            f"the launcher started {expected} tasks but MPI sees a world of {size}: mpi4py's MPI is not "
            "wired to this launcher (under srun, try --mpi=pmi2 or --mpi=pmix, or build mpi4py against "
            "the site MPI)"
        )


def _mpi_world() -> Any:
    from mpi4py import MPI

    return MPI.COMM_WORLD
