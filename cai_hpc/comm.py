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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce as _fold
from typing import Any

from cai_hpc.errors import InputError
from lambda_shim import constants as _shim

# mpi4py's names this module offers (``comm.SUM``, ``comm.Status()``...): mpi4py's own objects
# where mpi4py is installed (mpi4py's communicator takes only its own ops; lambda_shim's take
# both), lambda_shim.MPI's otherwise. Integer constants are equal either way (MPICH's values).
_MPI_NAMES = frozenset(
    {"ANY_SOURCE", "ANY_TAG", "PROC_NULL", "UNDEFINED", "ROOT", "IN_PLACE", "Status", "Op"} | set(_shim.OPS)
)


def _mpi_names() -> Any:
    """mpi4py's ``MPI`` module if mpi4py is installed (imported as ``_mpi_world`` imports it), else lambda_shim's."""
    try:
        import mpi4py
    except ImportError:
        from lambda_shim import MPI

        return MPI
    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.thread_level = "funneled"  # see _mpi_world
    from mpi4py import MPI

    return MPI


def __getattr__(name: str) -> Any:
    if name in _MPI_NAMES:
        return getattr(_mpi_names(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    def reduce(self, sendobj: Any, op: Any = _shim.SUM, root: int = 0) -> Any:
        self._check_root(root)
        return _fold(op, [sendobj])

    def allreduce(self, sendobj: Any, op: Any = _shim.SUM) -> Any:
        return _fold(op, [sendobj])

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        if dest != 0:
            raise ValueError(f"dest {dest} is not a rank of a 1-rank communicator")
        self._mailbox.append((tag, copy.deepcopy(obj)))

    def recv(
        self, buf: Any = None, source: int = _shim.ANY_SOURCE, tag: int = _shim.ANY_TAG, status: Any = None
    ) -> Any:
        if source not in (0, _shim.ANY_SOURCE):
            raise ValueError(f"source {source} is not a rank of a 1-rank communicator")
        for i, (msg_tag, obj) in enumerate(self._mailbox):
            if tag in (_shim.ANY_TAG, msg_tag):
                del self._mailbox[i]
                _shim.fill_status(status, 0, msg_tag, 0)
                return obj
        raise RuntimeError(f"recv(tag={tag}) on a 1-rank communicator with no matching message")

    # Buffer forms: arrays are copied, never pickled.
    def Bcast(self, buf: Any, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = _shim.SUM) -> None:  # noqa: N802
        if not _shim.is_in_place(sendbuf):
            _shim.buffer_array(recvbuf)[...] = _shim.buffer_array(sendbuf)

    def Reduce(self, sendbuf: Any, recvbuf: Any, op: Any = _shim.SUM, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)
        self.Allreduce(sendbuf, recvbuf, op)

    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)
        src = _shim.buffer_array(sendbuf).ravel()
        _shim.buffer_array(recvbuf).ravel()[: src.size] = src

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


# Launcher detection. An MPI's own launcher may start its ranks through srun (Hydra's mpiexec
# and Open MPI's mpirun do inside an allocation: one srun task per node, the ranks below it),
# so Slurm's step describes the ranks only when no MPI variable is set.
#
# World sizes and ranks announced by an MPI launcher or process manager, in every rank it
# starts: PMI (Hydra, Intel MPI, Cray PALS's MPICH, srun --mpi=pmi2), Open MPI, MVAPICH.
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK", "PALS_RANKID")
# Set only by an MPI's own launcher, never by srun: Hydra's and Open MPI's per-node counts.
_OWN_LAUNCHER_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
_MPI_VARS = (*_MPI_SIZE_VARS, *_MPI_RANK_VARS, *_OWN_LAUNCHER_VARS, "PMIX_NAMESPACE", "PALS_APID")


@dataclass(frozen=True)
class Launch:
    """Who started this process, and the world it announced (None: not announced).

    ``launcher`` is ``"srun"`` when Slurm started the ranks itself, ``"mpiexec"`` for an MPI's
    own launcher (mpiexec, mpirun, prterun; inside an allocation too); ``interface`` is how
    the ranks are told to find each other: ``"PMI"``, ``"PMIx"``, ``"PALS"`` or None (srun
    without an MPI plugin).
    """

    launcher: str
    size: int | None
    rank: int | None
    interface: str | None


def _first_int(env: Mapping[str, str], names: Sequence[str]) -> int | None:
    for name in names:
        if env.get(name, "").isdigit():
            return int(env[name])
    return None


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch described by the environment; None when no launcher started this process
    (a laptop, or a batch script, which sees its job's task count but is one process)."""
    env = os.environ if environ is None else environ
    in_step = "SLURM_STEP_ID" in env
    step_tasks = _first_int(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")) if in_step else None
    if not any(name in env for name in _MPI_VARS):
        if not in_step:
            return None
        return Launch("srun", step_tasks, _first_int(env, ("SLURM_PROCID",)), None)
    size = _first_int(env, _MPI_SIZE_VARS)
    rank = _first_int(env, _MPI_RANK_VARS)
    by_srun = (
        in_step
        and not any(name in env for name in _OWN_LAUNCHER_VARS)
        and size in (None, step_tasks)
        and rank in (None, _first_int(env, ("SLURM_PROCID",)))
    )
    if "PMIX_RANK" in env or "PMIX_NAMESPACE" in env:  # not PMIX_MCA_*: modules set those for every shell
        interface = "PMIx"
    elif "PALS_APID" in env or "PALS_RANKID" in env:
        interface = "PALS"
    else:
        interface = "PMI"
    return Launch("srun" if by_srun else "mpiexec", size, rank, interface)


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment says an MPI launcher or ``srun`` started this process."""
    return detect_launch(environ) is not None


def launcher_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """The world size the launcher announced (an MPI launcher's own first, else srun's), if any."""
    launch = detect_launch(environ)
    return None if launch is None else launch.size


def get_comm(backend: str = "auto") -> Any:
    """The communicator for ``backend``: ``"self"``, ``"mpi"``, ``"tcp"`` or ``"auto"``.

    ``"auto"`` picks mpi4py's ``COMM_WORLD`` when a launcher started this process and
    mpi4py imports, and ``SelfComm`` otherwise; ``"tcp"`` is lambda_shim's TcpComm, set up
    from the environment that ``python -m lambda_shim.launch`` gives its ranks. Under a
    launcher, a world other than the one it announced is refused: N processes that each
    think they are rank 0 of 1 would all do the whole job and overwrite each other's output.
    """
    if backend not in ("auto", "self", "mpi", "tcp"):
        raise InputError(f"unknown backend {backend!r}: choose auto, self, mpi or tcp")
    if backend == "tcp":
        from lambda_shim.tcpcomm import TcpComm  # the serverless side, only when asked for

        return TcpComm.from_env()
    environ = dict(os.environ)  # as the launcher left it: MPI_Init may add variables of its own
    launched = launched_by_mpi(environ)
    if backend == "self" or (backend == "auto" and not launched):
        return SelfComm()
    try:
        comm = _mpi_world()
    except ImportError as exc:
        if backend == "auto" and (launcher_world_size(environ) or 1) == 1:
            return SelfComm()
        raise InputError(f"MPI run needs mpi4py ({exc}); install it with: pip install 'cai-hpc[mpi]'") from None
    check_world_size(comm.Get_size(), environ, rank=comm.Get_rank(), library=_mpi_library)
    return comm


def check_world_size(
    size: int,
    environ: Mapping[str, str] | None = None,
    rank: int | None = None,
    library: Callable[[], str] | None = None,
) -> None:
    """Refuse an MPI world (``size``, this process's ``rank``) other than the launcher's.

    The message names the fix for the launcher at hand; ``library`` names mpi4py's MPI in it.
    """
    launch = detect_launch(environ)
    if launch is None:
        return
    if launch.size is not None and launch.size != size:
        what = f"the launcher started {launch.size} tasks but MPI sees a world of {size}"
    elif launch.rank is not None and rank is not None and launch.rank != rank:
        what = f"the launcher started this process as rank {launch.rank} but MPI sees rank {rank} of {size}"
    else:
        return
    mpi = f"mpi4py's MPI ({library()})" if library is not None else "mpi4py's MPI"
    if launch.launcher == "srun" and launch.interface is None:
        fix = (
            "srun gave the tasks no MPI process-management interface (--mpi=none, or none is the site's "
            "MpiDefault): run srun --mpi=pmi2 for MPICH (the pip wheel) or Intel MPI, --mpi=pmix for Open MPI, "
            "--mpi=cray_shasta for Cray MPICH; `srun --mpi=list` shows this Slurm's plugins (the slurm/ scripts "
            "take SRUN_MPI=...)"
        )
    elif launch.launcher == "srun":
        fix = (
            f"srun wired the tasks through {launch.interface}, which {mpi} does not use: choose another plugin "
            "(srun --mpi=pmi2 for MPICH, --mpi=pmix for Open MPI, --mpi=cray_shasta for Cray MPICH; "
            "`srun --mpi=list`), or build mpi4py against the site MPI"
        )
    else:
        fix = (
            f"this mpiexec/mpirun belongs to another MPI than {mpi}: start the job with that MPI's own "
            "mpiexec, or build mpi4py against the launcher's MPI (module load it, then "
            "pip install --no-binary mpi4py mpi4py)"
        )
    raise InputError(f"{what}: {fix}")


def _mpi_world() -> Any:
    import mpi4py

    # Only the main thread calls MPI (the reader threads never do): FUNNELED, not mpi4py's
    # default MULTIPLE, which some MPIs serve with slower locked paths or refuse.
    mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _mpi_library() -> str:
    from mpi4py import MPI

    return MPI.Get_library_version().splitlines()[0].strip()
