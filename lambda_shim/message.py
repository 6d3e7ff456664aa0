"""mpi4py's buffer messages: the predefined datatypes and the message specs, read as mpi4py 4.1
reads them (``buf``, ``[buf, datatype]``, ``[buf, count]``, ``[buf, count, datatype]``,
``[buf, (count, displ), datatype]``, ``[buf, count, displ, datatype]`` and the vector forms of the
v-collectives), with the same exception classes on bad specs.

A parsed message is a byte view of the user's buffer (never a copy), where the message starts in
it, and a count of one datatype: ``payload()`` gives the bytes to send, ``store()`` writes
received bytes back, ``typed()`` is the region as a numpy array for reductions. One thing is
stricter than mpi4py: a count or displacement that reaches past the end of the buffer is a
``ValueError`` (mpi4py hands it to MPI, which reads or writes out of bounds).

mpi4py's own ``Datatype`` objects, ``IN_PLACE`` and ``BOTTOM`` are accepted too (mapped by name)
when the program uses mpi4py; this module never imports mpi4py itself (that would start MPI).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lambda_shim import dlpack
from lambda_shim.constants import IN_PLACE
from lambda_shim.errors import ERR_COUNT, ERR_TYPE, MPIException

# Datatype kinds: which reduction operators MPICH allows on them.
KIND_INTEGER, KIND_FLOATING, KIND_COMPLEX, KIND_LOGICAL, KIND_BYTE, KIND_PAIR, KIND_OPAQUE = (
    "integer",
    "floating",
    "complex",
    "logical",
    "byte",
    "pair",
    "opaque",
)


class Datatype:
    """A predefined MPI datatype: its MPI name, size, extent, and the numpy dtype of one entry
    as laid out in memory (``layout``, ``extent`` bytes) and on the wire (``packed``, ``size``
    bytes: the value-index pairs of MAXLOC/MINLOC have padding in memory, none on the wire)."""

    def __init__(self, name: str, layout: np.dtype, kind: str, code: str, packed: np.dtype | None = None) -> None:
        self.name = name
        self.layout = np.dtype(layout)
        self.packed = self.layout if packed is None else np.dtype(packed)
        self.kind = kind
        self.code = code
        self.size = self.packed.itemsize
        self.extent = self.layout.itemsize
        self.lb = 0
        self.ub = self.extent

    def __repr__(self) -> str:
        return f"<lambda_shim Datatype {self.name}>"

    def Get_name(self) -> str:  # noqa: N802 - mpi4py's names
        return self.name

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def Get_extent(self) -> tuple[int, int]:  # noqa: N802
        return self.lb, self.extent

    def Get_true_extent(self) -> tuple[int, int]:  # noqa: N802
        return self.lb, self.extent

    @property
    def true_lb(self) -> int:
        return self.lb

    @property
    def true_extent(self) -> int:
        return self.extent

    def tocode(self) -> str:
        return self.code

    @property
    def typechar(self) -> str:
        return self.code

    @property
    def typestr(self) -> str:
        """mpi4py's numpy-style type string: kind and size ("i4", "f8"), "S1" for CHAR, "V<extent>" for pairs."""
        if self.layout.fields is not None:
            return f"V{self.extent}"
        return "S1" if self.code == "c" else self.layout.str[1:]

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        raise MPIException(ERR_TYPE, f"{self.name} is predefined: it cannot be freed")

    free = Free

    def is_predefined(self) -> bool:
        return True

    @property
    def is_named(self) -> bool:
        return True

    @classmethod
    def fromcode(cls, code: str) -> Datatype:
        return lookup(code)


class _NullDatatype(Datatype):
    """mpi4py's ``DATATYPE_NULL``: false, and every question about it is ERR_TYPE, as in MPICH."""

    def __init__(self) -> None:
        self.name = "MPI_DATATYPE_NULL"

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullDatatype)

    __hash__ = Datatype.__hash__

    def _null(self, *args: Any) -> Any:
        raise MPIException(ERR_TYPE, "MPI_DATATYPE_NULL is a null datatype")

    Get_size = Get_extent = Get_true_extent = Free = free = _null
    size = extent = lb = ub = layout = packed = kind = code = property(_null)


DATATYPE_NULL = _NullDatatype()


def _pair_type(name: str, value: str) -> Datatype:
    """A (value, int index) pair of MAXLOC/MINLOC: C's struct layout in memory, packed on the wire."""
    layout = np.dtype([("v", value), ("i", "i4")], align=True)
    packed = np.dtype([("v", value), ("i", "i4")])
    return Datatype(name, layout, KIND_PAIR, "", packed)


BYTE = Datatype("MPI_BYTE", np.dtype("u1"), KIND_BYTE, "B")
PACKED = Datatype("MPI_PACKED", np.dtype("u1"), KIND_OPAQUE, "B")
CHAR = Datatype("MPI_CHAR", np.dtype("i1"), KIND_INTEGER, "c")
WCHAR = Datatype("MPI_WCHAR", np.dtype("u4"), KIND_OPAQUE, "U")
SIGNED_CHAR = Datatype("MPI_SIGNED_CHAR", np.dtype("b"), KIND_INTEGER, "b")
UNSIGNED_CHAR = Datatype("MPI_UNSIGNED_CHAR", np.dtype("B"), KIND_INTEGER, "B")
SHORT = Datatype("MPI_SHORT", np.dtype("h"), KIND_INTEGER, "h")
UNSIGNED_SHORT = Datatype("MPI_UNSIGNED_SHORT", np.dtype("H"), KIND_INTEGER, "H")
INT = Datatype("MPI_INT", np.dtype("i"), KIND_INTEGER, "i")
UNSIGNED = Datatype("MPI_UNSIGNED", np.dtype("I"), KIND_INTEGER, "I")
LONG = Datatype("MPI_LONG", np.dtype("l"), KIND_INTEGER, "l")
UNSIGNED_LONG = Datatype("MPI_UNSIGNED_LONG", np.dtype("L"), KIND_INTEGER, "L")
LONG_LONG = Datatype("MPI_LONG_LONG_INT", np.dtype("q"), KIND_INTEGER, "q")
UNSIGNED_LONG_LONG = Datatype("MPI_UNSIGNED_LONG_LONG", np.dtype("Q"), KIND_INTEGER, "Q")
FLOAT = Datatype("MPI_FLOAT", np.dtype("f"), KIND_FLOATING, "f")
DOUBLE = Datatype("MPI_DOUBLE", np.dtype("d"), KIND_FLOATING, "d")
LONG_DOUBLE = Datatype("MPI_LONG_DOUBLE", np.dtype("g"), KIND_FLOATING, "g")
C_FLOAT16 = Datatype("MPIX_C_FLOAT16", np.dtype("e"), KIND_FLOATING, "e")
C_BOOL = Datatype("MPI_C_BOOL", np.dtype("?"), KIND_LOGICAL, "?")
INT8_T = Datatype("MPI_INT8_T", np.dtype("i1"), KIND_INTEGER, "i1")
INT16_T = Datatype("MPI_INT16_T", np.dtype("i2"), KIND_INTEGER, "i2")
INT32_T = Datatype("MPI_INT32_T", np.dtype("i4"), KIND_INTEGER, "i4")
INT64_T = Datatype("MPI_INT64_T", np.dtype("i8"), KIND_INTEGER, "i8")
UINT8_T = Datatype("MPI_UINT8_T", np.dtype("u1"), KIND_INTEGER, "u1")
UINT16_T = Datatype("MPI_UINT16_T", np.dtype("u2"), KIND_INTEGER, "u2")
UINT32_T = Datatype("MPI_UINT32_T", np.dtype("u4"), KIND_INTEGER, "u4")
UINT64_T = Datatype("MPI_UINT64_T", np.dtype("u8"), KIND_INTEGER, "u8")
AINT = Datatype("MPI_AINT", np.dtype("i8"), KIND_INTEGER, "p")
OFFSET = Datatype("MPI_OFFSET", np.dtype("i8"), KIND_INTEGER, "p")
COUNT = Datatype("MPI_COUNT", np.dtype("i8"), KIND_INTEGER, "p")
C_COMPLEX = Datatype("MPI_C_COMPLEX", np.dtype("F"), KIND_COMPLEX, "F")
C_DOUBLE_COMPLEX = Datatype("MPI_C_DOUBLE_COMPLEX", np.dtype("D"), KIND_COMPLEX, "D")
C_LONG_DOUBLE_COMPLEX = Datatype("MPI_C_LONG_DOUBLE_COMPLEX", np.dtype("G"), KIND_COMPLEX, "G")
COMPLEX = Datatype("MPI_COMPLEX", np.dtype("F"), KIND_COMPLEX, "F")  # Fortran's
DOUBLE_COMPLEX = Datatype("MPI_DOUBLE_COMPLEX", np.dtype("D"), KIND_COMPLEX, "D")  # Fortran's
FLOAT_INT = _pair_type("MPI_FLOAT_INT", "f4")
DOUBLE_INT = _pair_type("MPI_DOUBLE_INT", "f8")
LONG_INT = _pair_type("MPI_LONG_INT", "i8")
TWOINT = _pair_type("MPI_2INT", "i4")
SHORT_INT = _pair_type("MPI_SHORT_INT", "i2")
LONG_DOUBLE_INT = _pair_type("MPI_LONG_DOUBLE_INT", "g")
BOOL = C_BOOL
C_FLOAT_COMPLEX = C_COMPLEX
INT_INT = TWOINT
SIGNED_SHORT = SHORT
SIGNED_INT = INT
UNSIGNED_INT = UNSIGNED
SIGNED_LONG = LONG
SIGNED_LONG_LONG = LONG_LONG

# mpi4py's attribute names (aliases are the same object, as in mpi4py).
DATATYPES: dict[str, Datatype] = {
    "BYTE": BYTE,
    "PACKED": PACKED,
    "CHAR": CHAR,
    "WCHAR": WCHAR,
    "SIGNED_CHAR": SIGNED_CHAR,
    "UNSIGNED_CHAR": UNSIGNED_CHAR,
    "SHORT": SHORT,
    "SIGNED_SHORT": SHORT,
    "UNSIGNED_SHORT": UNSIGNED_SHORT,
    "INT": INT,
    "SIGNED_INT": INT,
    "UNSIGNED": UNSIGNED,
    "UNSIGNED_INT": UNSIGNED,
    "LONG": LONG,
    "SIGNED_LONG": LONG,
    "UNSIGNED_LONG": UNSIGNED_LONG,
    "LONG_LONG": LONG_LONG,
    "SIGNED_LONG_LONG": LONG_LONG,
    "UNSIGNED_LONG_LONG": UNSIGNED_LONG_LONG,
    "FLOAT": FLOAT,
    "DOUBLE": DOUBLE,
    "LONG_DOUBLE": LONG_DOUBLE,
    "C_BOOL": C_BOOL,
    "BOOL": C_BOOL,
    "INT8_T": INT8_T,
    "INT16_T": INT16_T,
    "INT32_T": INT32_T,
    "INT64_T": INT64_T,
    "UINT8_T": UINT8_T,
    "UINT16_T": UINT16_T,
    "UINT32_T": UINT32_T,
    "UINT64_T": UINT64_T,
    "AINT": AINT,
    "OFFSET": OFFSET,
    "COUNT": COUNT,
    "C_COMPLEX": C_COMPLEX,
    "C_FLOAT_COMPLEX": C_COMPLEX,
    "C_DOUBLE_COMPLEX": C_DOUBLE_COMPLEX,
    "C_LONG_DOUBLE_COMPLEX": C_LONG_DOUBLE_COMPLEX,
    "COMPLEX": COMPLEX,
    "DOUBLE_COMPLEX": DOUBLE_COMPLEX,
    "FLOAT_INT": FLOAT_INT,
    "DOUBLE_INT": DOUBLE_INT,
    "LONG_INT": LONG_INT,
    "TWOINT": TWOINT,
    "INT_INT": TWOINT,
    "SHORT_INT": SHORT_INT,
    "LONG_DOUBLE_INT": LONG_DOUBLE_INT,
}

# What mpi4py infers from a buffer's format (its MPI._typedict), and takes as a typecode string.
TYPECODES: dict[str, Datatype] = {
    **dict.fromkeys(("?", "b1"), C_BOOL),
    **dict.fromkeys(("c", "S", "S1", "1s", "s", "a"), CHAR),
    **dict.fromkeys(("w", "U", "U1", "1w"), WCHAR),
    "b": SIGNED_CHAR,
    "B": UNSIGNED_CHAR,
    "h": SHORT,
    "H": UNSIGNED_SHORT,
    "i": INT,
    "I": UNSIGNED,
    "l": LONG,
    **dict.fromkeys(("L", "N", "P"), UNSIGNED_LONG),
    "q": LONG_LONG,
    "Q": UNSIGNED_LONG_LONG,
    "n": COUNT,
    "p": AINT,
    **dict.fromkeys(("e", "f2"), C_FLOAT16),
    **dict.fromkeys(("f", "f4"), FLOAT),
    **dict.fromkeys(("d", "f8"), DOUBLE),
    **dict.fromkeys(("g", "f16"), LONG_DOUBLE),
    **dict.fromkeys(("F", "Zf", "c8"), C_COMPLEX),
    **dict.fromkeys(("D", "Zd", "c16"), C_DOUBLE_COMPLEX),
    **dict.fromkeys(("G", "Zg", "c32"), C_LONG_DOUBLE_COMPLEX),
    "i1": INT8_T,
    "i2": INT16_T,
    "i4": INT32_T,
    **dict.fromkeys(("i8", "M", "M8", "m", "m8"), INT64_T),
    "u1": UINT8_T,
    **dict.fromkeys(("u2", "u", "1u"), UINT16_T),
    "u4": UINT32_T,
    "u8": UINT64_T,
}

BY_NAME: dict[str, Datatype] = {t.name: t for t in (*DATATYPES.values(), *TYPECODES.values())}


class _Bottom:
    """mpi4py's ``MPI.BOTTOM``: as a buffer, an empty message of an explicit datatype."""

    def __repr__(self) -> str:
        return "BOTTOM"


BOTTOM = _Bottom()


def _mpi4py():
    """mpi4py's MPI module if this program already uses it (never imported here: that starts MPI)."""
    return sys.modules.get("mpi4py.MPI")


def is_in_place(obj: Any) -> bool:
    """``IN_PLACE`` (ours or mpi4py's), or None, which mpi4py also reads as in place."""
    if obj is None or obj is IN_PLACE:
        return True
    mpi = _mpi4py()
    return mpi is not None and obj is mpi.IN_PLACE


def is_bottom(obj: Any) -> bool:
    if obj is None or obj is BOTTOM:
        return True
    mpi = _mpi4py()
    return mpi is not None and obj is mpi.BOTTOM


def is_datatype(obj: Any) -> bool:
    """What mpi4py takes for a datatype in a spec: a Datatype or a typecode string."""
    if isinstance(obj, (Datatype, str)):
        return True
    mpi = _mpi4py()
    return mpi is not None and isinstance(obj, mpi.Datatype)


def lookup(key: Any) -> Datatype:
    try:
        return TYPECODES[key]
    except (KeyError, TypeError):
        raise KeyError(f"cannot map {key!r} to MPI datatype") from None


def as_datatype(obj: Any) -> Datatype:
    """A Datatype from ours, mpi4py's (by its MPI name) or a typecode string."""
    if isinstance(obj, Datatype):
        return obj
    mpi = _mpi4py()
    if mpi is not None and isinstance(obj, mpi.Datatype):
        found = BY_NAME.get(obj.Get_name())
        if found is None:
            raise MPIException(ERR_TYPE, f"mpi4py datatype {obj.Get_name()} is not one lambda_shim supports")
        return found
    return lookup(obj)


def _datatype_of_format(fmt: str) -> Datatype:
    """mpi4py's inference: the buffer's struct format, native byte order only."""
    if fmt[:1] in ("@", "<", ">"):
        if fmt[0] == ">" if sys.byteorder == "little" else fmt[0] == "<":
            raise BufferError(f"format string {fmt!r} with non-native byte order")
        fmt = fmt[1:]
    return lookup(fmt)


def byte_view(obj: Any, readonly: bool) -> tuple[np.ndarray, str]:
    """The buffer's memory as a flat uint8 array (a view, never a copy) and its format."""
    if not has_buffer(obj) and hasattr(obj, "__dlpack__"):
        flat, fmt = dlpack.byte_view(obj)
        if not readonly and not flat.flags.writeable:
            raise BufferError("Object is not writable.")
        return flat, fmt
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"message: expecting a buffer, got {type(obj).__name__}") from None
    if not readonly and mv.readonly:
        raise BufferError("Object is not writable.")
    if mv.c_contiguous:
        flat = np.frombuffer(mv, dtype=np.uint8) if mv.nbytes else np.zeros(0, np.uint8)
    elif mv.f_contiguous:  # a Fortran-ordered array: its transpose is C-ordered, same memory
        flat = np.asarray(mv).T.reshape(-1).view(np.uint8)
    else:
        raise BufferError("memoryview: underlying buffer is not contiguous")
    return flat, mv.format


@dataclass
class Message:
    """``count`` entries of ``datatype`` at byte ``offset`` of ``buf`` (None: an empty message)."""

    buf: np.ndarray | None
    offset: int
    count: int
    datatype: Datatype

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return self.count * self.datatype.size

    def region(self) -> np.ndarray:
        if self.buf is None:
            return np.zeros(0, np.uint8)
        return self.buf[self.offset : self.offset + self.count * self.datatype.extent]

    def typed(self) -> np.ndarray:
        """The message's entries as a numpy array over the user's memory."""
        return self.region().view(self.datatype.layout)

    def payload(self) -> memoryview:
        dt = self.datatype
        if dt.extent == dt.size:
            return memoryview(self.region())
        return memoryview(self.typed().astype(dt.packed).view(np.uint8))

    def store(self, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Write received wire bytes (at most ``nbytes``: the caller checks) into the buffer."""
        dt = self.datatype
        raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
        if dt.extent == dt.size:
            if len(raw):
                self.region()[: len(raw)] = raw
            return
        whole = len(raw) // dt.size
        self.typed()[:whole] = raw[: whole * dt.size].view(dt.packed)


@dataclass
class VectorMessage:
    """A v-collective's buffer: block i is ``counts[i]`` entries at entry ``displs[i]``."""

    buf: np.ndarray | None
    counts: list[int]
    displs: list[int]
    datatype: Datatype

    def block(self, i: int) -> Message:
        return Message(self.buf, self.displs[i] * self.datatype.extent, self.counts[i], self.datatype)


def _unpack(msg: Any, vector: bool) -> tuple[Any, Any, Any, Any]:
    """(buffer, count(s), displ(s), datatype) of a spec, before any of them is checked."""
    if msg is IN_PLACE:  # mpi4py's IN_PLACE is an empty byte buffer: a message of nothing
        return bytearray(), None, None, None
    if _is_buffer(msg):
        return msg, None, None, None
    if not isinstance(msg, (list, tuple)):
        raise TypeError("message: expecting buffer or list/tuple")
    pair = tuple if vector else (tuple, list)  # mpi4py: only a tuple is (counts, displs) in a vector
    count = displ = datatype = None
    if len(msg) == 2:
        buf, count = msg
        if is_datatype(count):
            count, datatype = None, count
        elif isinstance(count, pair):
            count, displ = count
    elif len(msg) == 3:
        buf, count, datatype = msg
        if isinstance(count, pair):
            count, displ = count
    elif len(msg) == 4:
        buf, count, displ, datatype = msg
    else:
        raise ValueError("message: expecting 2 to 4 items")
    return buf, count, displ, datatype


def has_buffer(obj: Any) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


def _is_buffer(obj: Any) -> bool:
    """What mpi4py takes for a whole message: the buffer protocol, or DLPack (torch tensors)."""
    return has_buffer(obj) or hasattr(obj, "__dlpack__")


def _basic(buf: Any, datatype: Any, readonly: bool) -> tuple[np.ndarray | None, Datatype]:
    if is_bottom(buf):
        return None, as_datatype(datatype)
    flat, fmt = byte_view(buf, readonly)
    return flat, (_datatype_of_format(fmt) if datatype is None else as_datatype(datatype))


def parse(msg: Any, readonly: bool, blocks: int = 0) -> Message:
    """A simple spec; ``blocks`` > 1: the buffer holds that many messages and the count (when
    inferred) is one block's. Raises what mpi4py raises on a bad spec."""
    o_buf, o_count, o_displ, o_type = _unpack(msg, vector=False)
    buf, datatype = _basic(o_buf, o_type, readonly)
    length = 0 if buf is None else len(buf)
    extent = datatype.extent
    offset = 0
    if o_displ is not None:
        displ = operator.index(o_displ)
        if displ < 0:
            raise ValueError(f"message: negative displacement {displ}")
        if displ * extent > length:
            raise ValueError(
                f"message: displacement {displ} out of bounds, number of datatype entries {length // extent}"
            )
        offset = displ * extent
    available = length - offset
    if o_count is not None:
        count = operator.index(o_count)
        if count < 0:
            raise ValueError(f"message: negative count {count}")
        if count > 0 and buf is None:
            raise ValueError(f"message: buffer is None but count is {count}")
        if count * max(blocks, 1) * extent > available:  # a count is per block
            raise ValueError(
                f"message: count {count} out of bounds"
                f"{f' ({blocks} blocks)' if blocks > 1 else ''}, number of datatype entries {available // extent}"
            )
    else:
        if available % extent:
            raise ValueError(
                f"message: cannot infer count, buffer length {available} is not a multiple of "
                f"datatype extent {extent} (lb:0, ub:{extent})"
            )
        count = available // extent
        if blocks > 1:
            if count % blocks:
                raise ValueError(
                    f"message: cannot infer count, number of entries {count} is not a multiple of "
                    f"required number of blocks {blocks}"
                )
            count //= blocks
    return Message(buf, offset, count, datatype)


def int_array(values: Any, blocks: int) -> list[int]:
    """mpi4py's check of a per-rank sequence (counts, displacements): exactly ``blocks`` ints."""
    items = [operator.index(v) for v in values]  # mpi4py converts every item before the length
    if len(items) != blocks:
        raise ValueError(f"expecting {blocks} items, got {len(items)}")
    return items


def _is_integral(obj: Any) -> bool:
    if isinstance(obj, Sequence) or (isinstance(obj, np.ndarray) and obj.ndim):
        return False
    try:
        operator.index(obj)
    except TypeError:
        return False
    return True


def parse_vector(msg: Any, readonly: bool, blocks: int) -> VectorMessage:
    """A v-collective's spec for ``blocks`` ranks. Raises what mpi4py (and MPI) raise."""
    o_buf, o_counts, o_displs, o_type = _unpack(msg, vector=True)
    buf, datatype = _basic(o_buf, o_type, readonly)
    extent = datatype.extent
    entries = 0 if buf is None else len(buf) // extent
    if o_counts is None:
        if buf is not None and len(buf) % extent:
            raise ValueError(
                f"message: cannot infer count, buffer length {len(buf)} is not a multiple of "
                f"datatype extent {extent} (lb:0, ub:{extent})"
            )
        counts = [entries // blocks + (entries % blocks > i) for i in range(blocks)]
    elif _is_integral(o_counts):
        counts = [operator.index(o_counts)] * blocks
    else:
        counts = int_array(o_counts, blocks)
    if o_displs is None:
        displs = [sum(counts[:i]) for i in range(blocks)]
    elif _is_integral(o_displs):
        displs = [operator.index(o_displs) * i for i in range(blocks)]
    else:
        displs = int_array(o_displs, blocks)
    for i, (count, displ) in enumerate(zip(counts, displs, strict=True)):
        if count < 0:
            raise MPIException(ERR_COUNT, f"negative count {count} for block {i}")
        if count and (displ < 0 or (displ + count) > entries):
            raise ValueError(
                f"message: block {i} (count {count}, displacement {displ}) out of bounds, "
                f"number of datatype entries {entries}"
            )
    return VectorMessage(buf, counts, displs, datatype)
