"""mpi4py's constants, operators and ``Status`` for communicators that are not mpi4py
(``SelfComm``, ``TcpComm``), with MPICH's values, so code written against either behaves
the same. Nothing here imports the rest of cai_hpc: the communicator core stands alone.

mpi4py's own objects are accepted too when a program has imported ``mpi4py.MPI`` (``as_op``,
``is_in_place``); this module never imports it (that would initialise MPI)."""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from lambda_shim.errors import ERR_OP, MPIException

ANY_SOURCE = -2  # MPICH's MPI_ANY_SOURCE
ANY_TAG = -1  # MPICH's MPI_ANY_TAG
PROC_NULL = -1  # MPICH's MPI_PROC_NULL: sends to it vanish, receives from it return None
ROOT = -3  # MPICH's MPI_ROOT
UNDEFINED = -32766  # MPICH's MPI_UNDEFINED
TAG_UB = 1681915905  # MPICH's keyval for the attribute (comm.Get_attr(TAG_UB) is MAX_TAG)
MAX_TAG = 2**29 - 1  # MPICH's tag upper bound: larger tags are ERR_TAG
IDENT, CONGRUENT, SIMILAR, UNEQUAL = 0, 1, 2, 3  # Comm.Compare's answers (MPICH's values)
UNIVERSE_SIZE = 1681915913  # MPICH's keyvals of the predefined attributes
WTIME_IS_GLOBAL = 1681915911
APPNUM = 1681915917
BSEND_OVERHEAD = 96  # MPICH's: bytes a buffered send adds (for sizing Attach_buffer's buffer)


class _Sentinel:
    """A named marker object (mpi4py's ``IN_PLACE``, ``BOTTOM``)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


IN_PLACE = _Sentinel("IN_PLACE")  # stands for mpi4py's MPI.IN_PLACE in the buffer forms


class _NullHandle(_Sentinel):
    """A null handle (``INFO_NULL``): false, as mpi4py's null handles are."""

    def __bool__(self) -> bool:
        return False


INFO_NULL = _NullHandle("INFO_NULL")  # no hints: every call that takes an Info accepts and ignores it


class Errhandler(_Sentinel):
    """mpi4py's ``Errhandler``. Every error raises ``MPI.Exception`` whatever the handler: the
    shim behaves as under ERRORS_RETURN (mpi4py's default), it never aborts the job by itself."""


ERRORS_RETURN = Errhandler("ERRORS_RETURN")
ERRORS_ARE_FATAL = Errhandler("ERRORS_ARE_FATAL")
ERRORS_ABORT = Errhandler("ERRORS_ABORT")


def _mpi4py() -> Any:
    """mpi4py's MPI module if this program imported it, else None (never imported here)."""
    return sys.modules.get("mpi4py.MPI")


def is_in_place(obj: Any) -> bool:
    """Whether ``obj`` is ``IN_PLACE``: ours, or mpi4py's."""
    if obj is IN_PLACE:
        return True
    mpi = _mpi4py()
    return mpi is not None and obj is mpi.IN_PLACE


def _land(x: Any, y: Any) -> Any:
    return np.logical_and(x, y) if _arrays(x, y) else bool(x) and bool(y)


def _lor(x: Any, y: Any) -> Any:
    return np.logical_or(x, y) if _arrays(x, y) else bool(x) or bool(y)


def _lxor(x: Any, y: Any) -> Any:
    return np.logical_xor(x, y) if _arrays(x, y) else bool(x) != bool(y)


def _max(x: Any, y: Any) -> Any:
    if _arrays(x, y):
        return np.maximum(x, y)
    return y if y > x else x  # mpi4py's order: the first wins a tie


def _min(x: Any, y: Any) -> Any:
    if _arrays(x, y):
        return np.minimum(x, y)
    return y if y < x else x


def _maxloc(x: Any, y: Any) -> tuple[Any, Any]:
    """mpi4py's MAXLOC on (value, index) pairs: the larger value; on a tie, the lower index."""
    (u, i), (v, j) = x, y
    if u > v:
        return u, i
    if v > u:
        return v, j
    return (v, j) if j < i else (u, i)


def _minloc(x: Any, y: Any) -> tuple[Any, Any]:
    (u, i), (v, j) = x, y
    if u < v:
        return u, i
    if v < u:
        return v, j
    return (v, j) if j < i else (u, i)


def _arrays(x: Any, y: Any) -> bool:
    return isinstance(x, np.ndarray) or isinstance(y, np.ndarray)


class Op:
    """A reduction operator (mpi4py's ``Op``): ``fn(x, y)`` folds two Python objects (``x``
    from the lower ranks), numpy arrays elementwise; ``ufunc`` does arrays for the buffer forms
    (None for MAXLOC, MINLOC, REPLACE, NO_OP and user operators); ``function`` is a user
    operator's ``function(inbuf, inoutbuf, datatype)``.

    ``Op()`` is ``OP_NULL``'s equal and ``Op(op)`` a second object with ``op``'s handle (equal
    to it, sharing its state: freeing one frees both). As mpi4py's, ops are not hashable."""

    def __init__(self, op: Op | None = None) -> None:
        if op is not None and not isinstance(op, Op):
            raise TypeError(f"Argument 'op' has incorrect type (expected Op, got {type(op).__name__})")
        if op is not None and op:
            self.__dict__ = op.__dict__  # the same handle
            return
        self.name, self.fn, self.ufunc, self.commute, self.function = "NULL", _null_op, None, True, None

    @classmethod
    def _make(
        cls,
        name: str,
        fn: Callable[[Any, Any], Any],
        ufunc: np.ufunc | None = None,
        commute: bool = True,
        function: Callable[[Any, Any, Any], Any] | None = None,
    ) -> Op:
        op = cls()
        op.name, op.fn, op.ufunc, op.commute, op.function = name, fn, ufunc, commute, function
        return op

    def __call__(self, x: Any, y: Any) -> Any:
        return self.fn(x, y)

    def __repr__(self) -> str:
        return f"<Op {self.name}>"

    def __bool__(self) -> bool:
        return self.name != "NULL"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Op):
            return NotImplemented
        return self.__dict__ is other.__dict__ or (not self and not other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # as mpi4py's

    def __reduce__(self) -> str | tuple[Any, ...]:
        """A predefined operator unpickles as itself (mpi4py pickles them by name), a copy of
        one as a new copy; a user operator as a new operator of the same function."""
        if self.name == "USER":
            return Op.Create, (self.function, self.commute)
        predefined = OP_NULL if self.name == "NULL" else OPS[self.name]
        if self is predefined:
            return "OP_NULL" if self.name == "NULL" else self.name
        return Op, (predefined,)

    def Is_commutative(self) -> bool:  # noqa: N802 - mpi4py's name
        return self.commute

    def Is_predefined(self) -> bool:  # noqa: N802 - mpi4py's name
        return self.name != "USER"

    @property
    def is_commutative(self) -> bool:
        return self.commute

    @property
    def is_predefined(self) -> bool:
        return self.Is_predefined()

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        """A user operator becomes null; predefined ones (and OP_NULL) are ERR_OP, as in MPI."""
        if self.name != "USER":
            raise MPIException(ERR_OP, f"{self.name} is not a user-defined operator: it cannot be freed")
        self.name, self.fn, self.ufunc, self.commute, self.function = "NULL", _null_op, None, True, None

    free = Free

    def Reduce_local(self, inbuf: Any, inoutbuf: Any) -> None:  # noqa: N802 - mpi4py's name
        """``inoutbuf = op(inbuf, inoutbuf)`` elementwise, on buffer specs read as the
        collectives read them (same count and datatype, else ValueError; ERR_OP where MPI
        does not define the operator on the datatype)."""
        # Deferred: the buffer machinery imports this module (its operators and Status).
        from lambda_shim.buffers import reduce_local

        reduce_local(self, inbuf, inoutbuf)

    @classmethod
    def Create(cls, function: Callable[[Any, Any, Any], Any], commute: bool = False) -> Op:  # noqa: N802
        """A user operator, as mpi4py's ``Op.Create``: ``function(x, y, datatype)`` returns
        the combination of ``x`` (lower ranks) and ``y`` for objects (``datatype`` None), and
        for buffers leaves it in ``y`` (byte buffers, ``datatype`` the entries')."""
        return cls._make("USER", lambda x, y: function(x, y, None), None, bool(commute), function)


def _null_op(x: Any, y: Any) -> Any:
    raise ValueError("cannot call user-defined operation")


SUM = Op._make("SUM", operator.add, np.add)
PROD = Op._make("PROD", operator.mul, np.multiply)
MAX = Op._make("MAX", _max, np.maximum)
MIN = Op._make("MIN", _min, np.minimum)
LAND = Op._make("LAND", _land, np.logical_and)
LOR = Op._make("LOR", _lor, np.logical_or)
LXOR = Op._make("LXOR", _lxor, np.logical_xor)
BAND = Op._make("BAND", operator.and_, np.bitwise_and)
BOR = Op._make("BOR", operator.or_, np.bitwise_or)
BXOR = Op._make("BXOR", operator.xor, np.bitwise_xor)
MAXLOC = Op._make("MAXLOC", _maxloc)
MINLOC = Op._make("MINLOC", _minloc)
REPLACE = Op._make("REPLACE", lambda x, y: y, commute=False)
NO_OP = Op._make("NO_OP", lambda x, y: x, commute=False)
OP_NULL = Op()
OPS = {op.name: op for op in (SUM, PROD, MAX, MIN, LAND, LOR, LXOR, BAND, BOR, BXOR, MAXLOC, MINLOC, REPLACE, NO_OP)}


def as_op(op: Any) -> Op:
    """Our ``Op`` for ``op``: one of ours, mpi4py's predefined ``MPI.SUM`` ..., a user operator
    made by mpi4py's ``Op.Create`` or any callable ``f(x, y)``; TypeError otherwise."""
    if isinstance(op, Op):
        return op
    mpi = _mpi4py()
    if mpi is not None and isinstance(op, mpi.Op):
        for name, ours in OPS.items():
            if op == getattr(mpi, name):
                return ours
        return Op._make("USER", op, None, op.Is_commutative())
    if callable(op):
        return Op._make("USER", op, None, False)
    raise TypeError(f"expected an MPI.Op, got {type(op).__name__}")


class Status:
    """mpi4py's ``Status``: the source, tag, error, size (``count``, in bytes) and cancelled
    flag of a completed receive. An empty status has ANY_SOURCE, ANY_TAG, no error, count 0."""

    def __init__(self, status: Status | None = None) -> None:
        if status is not None and not isinstance(status, Status):
            raise TypeError(f"Argument 'status' has incorrect type (expected Status, got {type(status).__name__})")
        self.source, self.tag, self.error, self.count, self.cancelled = ANY_SOURCE, ANY_TAG, 0, 0, False
        if status is not None:
            self.source, self.tag, self.error = status.source, status.tag, status.error
            self.count, self.cancelled = status.count, status.cancelled

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        mine = (self.source, self.tag, self.error, self.count, self.cancelled)
        return mine == (other.source, other.tag, other.error, other.count, other.cancelled)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"Status(source={self.source}, tag={self.tag}, error={self.error}, count={self.count})"

    def _fill(self, source: int, tag: int, nbytes: int, cancelled: bool = False) -> None:
        self.source, self.tag, self.error, self.count, self.cancelled = source, tag, 0, nbytes, cancelled

    def Get_source(self) -> int:  # noqa: N802 - mpi4py's name
        return self.source

    def Set_source(self, source: int) -> None:  # noqa: N802 - mpi4py's name
        self.source = source

    def Get_tag(self) -> int:  # noqa: N802 - mpi4py's name
        return self.tag

    def Set_tag(self, tag: int) -> None:  # noqa: N802 - mpi4py's name
        self.tag = tag

    def Get_error(self) -> int:  # noqa: N802 - mpi4py's name
        return self.error

    def Set_error(self, error: int) -> None:  # noqa: N802 - mpi4py's name
        self.error = error

    def Get_count(self, datatype: Any = None) -> int:  # noqa: N802 - mpi4py's name
        """Whole items of ``datatype`` (default bytes) received; UNDEFINED if not a whole number."""
        size = 1 if datatype is None else datatype.Get_size()
        if size == 0:
            return 0
        return self.count // size if self.count % size == 0 else UNDEFINED

    def Get_elements(self, datatype: Any) -> int:  # noqa: N802 - mpi4py's name
        return self.Get_count(datatype)

    def Set_elements(self, datatype: Any, count: int) -> None:  # noqa: N802 - mpi4py's name
        self.count = count * (1 if datatype is None else datatype.Get_size())

    def Is_cancelled(self) -> bool:  # noqa: N802 - mpi4py's name
        return self.cancelled

    def Set_cancelled(self, flag: bool) -> None:  # noqa: N802 - mpi4py's name
        self.cancelled = bool(flag)


def fill_status(status: Any, source: int, tag: int, nbytes: int, cancelled: bool = False) -> None:
    """Fill ``status``: ours, or mpi4py's ``MPI.Status`` (a program may pass either)."""
    if status is None:
        return
    if isinstance(status, Status):
        status._fill(source, tag, nbytes, cancelled)
        return
    status.Set_source(source)
    status.Set_tag(tag)
    status.Set_error(0)
    status.Set_cancelled(cancelled)
    status.Set_elements(_mpi4py().BYTE, nbytes)


def c_int(value: Any) -> int:
    """A rank, root or tag as mpi4py's C int arguments take it: anything with ``__index__`` or
    ``__int__`` (a float is truncated, as Cython does), TypeError otherwise, OverflowError
    outside a C int's range."""
    if hasattr(type(value), "__index__"):
        value = operator.index(value)
    elif hasattr(type(value), "__int__"):
        value = int(value)
    else:
        raise TypeError(f"an integer is required, not {type(value).__name__}")
    if not -(2**31) <= value < 2**31:
        raise OverflowError("value too large to convert to int")
    return value


def buffer_array(buf: Any) -> np.ndarray:
    """The array of an mpi4py buffer spec: ``arr``, ``[arr, counts]`` or ``[arr, counts, displs, type]``."""
    return buf[0] if isinstance(buf, (list, tuple)) else buf
