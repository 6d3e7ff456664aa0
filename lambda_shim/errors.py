"""mpi4py's ``MPI.Exception`` and error classes (MPICH's values), and ``CommError``, what a rank
sees when the job cannot go on (a peer gone, the server lost, a deadline passed).

mpi4py raises ``MPI.Exception`` (a ``RuntimeError``) whose ``Get_error_class()`` names what was
wrong; the shim raises the same, so ``except MPI.Exception`` and error-class checks written for
mpi4py work unchanged."""

from __future__ import annotations

# MPICH's error classes (mpi4py exposes them as MPI.ERR_*).
SUCCESS = 0
ERR_BUFFER = 1
ERR_COUNT = 2
ERR_TYPE = 3
ERR_TAG = 4
ERR_COMM = 5
ERR_RANK = 6
ERR_ROOT = 7
ERR_GROUP = 8
ERR_OP = 9
ERR_TOPOLOGY = 10
ERR_DIMS = 11
ERR_ARG = 12
ERR_UNKNOWN = 13
ERR_PROC_FAILED = 13
ERR_TRUNCATE = 14
ERR_OTHER = 15
ERR_INTERN = 16
ERR_IN_STATUS = 17
ERR_PENDING = 18
ERR_REQUEST = 19
ERR_KEYVAL = 48
ERR_NO_MEM = 34
ERR_NOT_SAME = 35
ERR_LASTCODE = 1073741823

_MESSAGES = {
    SUCCESS: "No MPI error",
    ERR_BUFFER: "Invalid buffer pointer",
    ERR_COUNT: "Invalid count",
    ERR_TYPE: "Invalid datatype",
    ERR_TAG: "Invalid tag",
    ERR_COMM: "Invalid communicator",
    ERR_RANK: "Invalid rank",
    ERR_ROOT: "Invalid root",
    ERR_GROUP: "Invalid group",
    ERR_OP: "Invalid MPI_Op",
    ERR_TOPOLOGY: "Invalid topology",
    ERR_DIMS: "Invalid dimension argument",
    ERR_ARG: "Invalid argument",
    ERR_PROC_FAILED: "Process failed",
    ERR_TRUNCATE: "Message truncated",
    ERR_OTHER: "Other MPI error",
    ERR_INTERN: "Internal MPI error",
    ERR_IN_STATUS: "See the MPI_ERROR field in MPI_Status for the error code",
    ERR_PENDING: "Pending request (no error)",
    ERR_REQUEST: "Invalid MPI_Request",
    ERR_KEYVAL: "Invalid keyval",
    ERR_NO_MEM: "Out of memory",
    ERR_NOT_SAME: "Collective argument not identical on all processes",
}


class MPIException(RuntimeError):  # noqa: N818 - mpi4py's MPI.Exception, exported under that name
    """mpi4py's ``MPI.Exception``: an error class and, optionally, what exactly went wrong."""

    def __init__(self, error_class: int = SUCCESS, detail: str | None = None) -> None:
        self.error_class = error_class
        self.detail = detail
        text = _MESSAGES.get(error_class, f"MPI error class {error_class}")
        super().__init__(f"{text}: {detail}" if detail else text)

    def Get_error_class(self) -> int:  # noqa: N802 - mpi4py's name
        return self.error_class

    def Get_error_code(self) -> int:  # noqa: N802 - mpi4py's name
        return self.error_class

    def Get_error_string(self) -> str:  # noqa: N802 - mpi4py's name
        return str(self)

    @property
    def error_code(self) -> int:
        return self.error_class

    @property
    def error_string(self) -> str:
        return str(self)

    def __int__(self) -> int:
        return self.error_class

    def __eq__(self, other: object) -> bool:
        """As mpi4py's: an exception equals its error code (``exc == MPI.ERR_RANK``)."""
        if isinstance(other, int):
            return self.error_class == other
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"MPI.Exception({self.error_class})"


class CommError(MPIException):
    """The job cannot go on from this rank: a peer is gone, the server is lost, a deadline passed,
    or wire-up failed. ``str()`` is the one line that names the rank and the peer."""

    def __init__(self, message: str, error_class: int = ERR_OTHER) -> None:
        RuntimeError.__init__(self, message)
        self.error_class = error_class
        self.detail = message


# mpi4py's class is MPI.Exception: programs that report ``type(exc).__name__`` see the same name.
MPIException.__name__ = MPIException.__qualname__ = "Exception"
