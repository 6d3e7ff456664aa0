# ruff: noqa: N999 - the module is named as mpi4py's is (from lambda_shim import MPI)
"""lambda_shim as mpi4py: the names of ``mpi4py.MPI``, so a program written for mpi4py runs on
lambda_shim with one changed line::

    from lambda_shim import MPI   # instead of: from mpi4py import MPI

``COMM_WORLD`` (and ``COMM_SELF``) are made on first use from the environment that
``python -m lambda_shim.launch`` (or the Lambda handler) gives each rank: importing this
module opens no connection.
"""

from __future__ import annotations

import atexit
import socket
import threading
import time
from typing import Any

from lambda_shim import errors as _errors
from lambda_shim.constants import (  # noqa: F401 - mpi4py's names, re-exported
    ANY_SOURCE,
    ANY_TAG,
    APPNUM,
    BAND,
    BOR,
    BSEND_OVERHEAD,
    BXOR,
    CONGRUENT,
    ERRORS_ABORT,
    ERRORS_ARE_FATAL,
    ERRORS_RETURN,
    IDENT,
    IN_PLACE,
    INFO_NULL,
    LAND,
    LOR,
    LXOR,
    MAX,
    MAXLOC,
    MIN,
    MINLOC,
    NO_OP,
    OP_NULL,
    PROC_NULL,
    PROD,
    REPLACE,
    ROOT,
    SIMILAR,
    SUM,
    TAG_UB,
    UNDEFINED,
    UNEQUAL,
    UNIVERSE_SIZE,
    WTIME_IS_GLOBAL,
    Errhandler,
    Op,
    Status,
)
from lambda_shim.errors import MPIException as Exception  # noqa: F401 - mpi4py's MPI.Exception
from lambda_shim.grequest import Grequest  # noqa: F401
from lambda_shim.message import BOTTOM, DATATYPE_NULL, DATATYPES, Datatype, byte_view  # noqa: F401
from lambda_shim.persistent import Prequest  # noqa: F401
from lambda_shim.pickler import PICKLE as pickle  # noqa: F401, N811 - mpi4py's MPI.pickle
from lambda_shim.pickler import Pickle  # noqa: F401
from lambda_shim.request import REQUEST_NULL, Request  # noqa: F401
from lambda_shim.tcpcomm import COMM_NULL, MESSAGE_NO_PROC, MESSAGE_NULL, Comm, Message  # noqa: F401

globals().update(DATATYPES)  # DOUBLE, INT, FLOAT, BYTE, ... as mpi4py names them
globals().update({name: value for name, value in vars(_errors).items() if name.startswith("ERR_")})
SUCCESS = _errors.SUCCESS
Intracomm = Comm
THREAD_SINGLE, THREAD_FUNNELED, THREAD_SERIALIZED, THREAD_MULTIPLE = 0, 1, 2, 3
VERSION, SUBVERSION = 4, 1  # the MPI standard whose semantics the object API follows
_VENDOR_VERSION = (0, 1, 0)  # the package version (setup.cfg), as get_vendor reports it

_lock = threading.Lock()
_worlds: dict[str, Any] = {}
_finalized = False
_attached: dict[str, Any] = {}


def _world() -> Any:
    """The job's world communicator, connected on first use (``TcpComm.from_env()``)."""
    with _lock:
        if "world" not in _worlds:
            from lambda_shim.tcpcomm import TcpComm

            world = TcpComm.from_env()
            _worlds["world"] = world
            _worlds["self"] = world.self_comm()
            atexit.register(world.close)
        return _worlds["world"]


def __getattr__(name: str) -> Any:
    if name == "COMM_WORLD":
        return _world()
    if name == "COMM_SELF":
        _world()
        return _worlds["self"]
    raise AttributeError(f"module 'lambda_shim.MPI' has no attribute {name!r}")


def Wtime() -> float:  # noqa: N802 - mpi4py's name
    return time.perf_counter()


def Wtick() -> float:  # noqa: N802 - mpi4py's name
    return time.get_clock_info("perf_counter").resolution


def Init() -> None:  # noqa: N802 - mpi4py's name
    """Nothing to do: the world connects on first use."""


def Init_thread(required: int = THREAD_MULTIPLE) -> int:  # noqa: N802 - mpi4py's name
    """Every thread may call the communicators (the transport is thread-safe)."""
    return THREAD_MULTIPLE


def Query_thread() -> int:  # noqa: N802 - mpi4py's name
    return THREAD_MULTIPLE


def Is_thread_main() -> bool:  # noqa: N802 - mpi4py's name
    return threading.current_thread() is threading.main_thread()


def Finalize() -> None:  # noqa: N802 - mpi4py's name
    """Leave the job now if the world was connected (it also leaves at exit)."""
    global _finalized
    _finalized = True
    world = _worlds.get("world")
    if world is not None:
        world.close()


def Is_initialized() -> bool:  # noqa: N802 - mpi4py's name
    return True


def Is_finalized() -> bool:  # noqa: N802 - mpi4py's name
    return _finalized


def Get_processor_name() -> str:  # noqa: N802 - mpi4py's name
    return socket.gethostname()


def Get_version() -> tuple[int, int]:  # noqa: N802 - mpi4py's name
    return VERSION, SUBVERSION


def Get_library_version() -> str:  # noqa: N802 - mpi4py's name
    return "lambda_shim (mpi4py's object API over TCP)"


def get_vendor() -> tuple[str, tuple[int, int, int]]:
    """The MPI implementation's name and version, as mpi4py's ``get_vendor`` (programs use it to
    tell implementations apart, e.g. to skip what one lacks)."""
    return "lambda_shim", _VENDOR_VERSION


def Get_error_class(errorcode: int) -> int:  # noqa: N802 - mpi4py's name
    return errorcode


def Get_error_string(errorcode: int) -> str:  # noqa: N802 - mpi4py's name
    return str(_errors.MPIException(errorcode))


def Attach_buffer(buf: Any) -> None:  # noqa: N802 - mpi4py's name
    """Kept only to be given back: buffered sends need no buffer here (they complete as standard sends do)."""
    _attached["buffer"] = buf


def Detach_buffer() -> Any:  # noqa: N802 - mpi4py's name
    return _attached.pop("buffer", None)


def Alloc_mem(size: int, info: Any = INFO_NULL) -> memoryview:  # noqa: N802 - mpi4py's name
    """``size`` bytes of zeroed memory (a writable buffer, as mpi4py's ``MPI.buffer``)."""
    size = int(size)
    if size < 0:
        raise _errors.MPIException(_errors.ERR_ARG, f"Alloc_mem of {size} bytes")
    return memoryview(bytearray(size))


def Free_mem(mem: Any) -> None:  # noqa: N802 - mpi4py's name
    """Nothing to do: the memory of Alloc_mem goes when its last reference does."""


def Get_address(location: Any) -> int:  # noqa: N802 - mpi4py's name
    """The address of a buffer's first byte (mpi4py's ``Get_address``)."""
    flat, _ = byte_view(location, readonly=True)
    return flat.ctypes.data
