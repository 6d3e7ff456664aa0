"""How the object API's messages travel: pickled, except an object that is exactly a ``bytes``
or a ``bytearray``, which goes as its own bytes (no pickling on either end, so a large one is
not copied twice more; the receiver's frame reader writes it straight into the object it
returns). Either way a receiver only ever decodes a frame whose every record has passed its
check, from an authenticated peer.

A message's size, as a status or a probe reports it, is its pickled size whichever way it
travelled, as mpi4py reports it (and as ``recv(buf)`` compares it with the buffer).

Pickling is ``MPI.pickle``'s (``pickler.PICKLE``), which a program may swap for its own
serializer as on mpi4py; the unpickled path is taken only while it is the standard library's
at protocol 5, the format ``counted_size`` counts.
"""

from __future__ import annotations

import pickle
from typing import Any

from lambda_shim.pickler import PICKLE
from lambda_shim.wire import KIND_OBJECT, KIND_OBJECT_BYTEARRAY, KIND_OBJECT_BYTES

PROTOCOL = 5  # pickle's highest today, as mpi4py uses; ``counted_size`` follows its format
UNPICKLED_KINDS = (KIND_OBJECT_BYTES, KIND_OBJECT_BYTEARRAY)
_FRAMED = 65536  # pickle writes a payload this large outside its frames (8 bytes less overhead)


def encode(obj: Any) -> tuple[int, bytes | memoryview]:
    """(frame kind, payload) of an object. A bytearray is copied, as pickling would: the
    caller may change it while the message is still queued."""
    kind = type(obj)
    if (kind is bytes or kind is bytearray) and PICKLE.is_standard(PROTOCOL):
        return (KIND_OBJECT_BYTES, obj) if kind is bytes else (KIND_OBJECT_BYTEARRAY, bytes(obj))
    return KIND_OBJECT, PICKLE.dumps(obj)


def decode(kind: int, payload: bytes | bytearray) -> Any:
    """The object of a checked object frame (``KIND_OBJECT`` or one of ``UNPICKLED_KINDS``)."""
    if kind == KIND_OBJECT_BYTES:
        return payload if type(payload) is bytes else bytes(payload)
    if kind == KIND_OBJECT_BYTEARRAY:
        return payload if type(payload) is bytearray else bytearray(payload)
    return PICKLE.loads(payload)


def received(kind: int, payload: bytes | bytearray) -> Any:
    """What an object receive returns for a message of ``kind``: an unpickled object as
    itself; every other message unpickled, a buffer send's too, as mpi4py does (it is
    authenticated: sealed by the peer's connection key). An empty message is None."""
    if kind in UNPICKLED_KINDS:
        return decode(kind, payload)
    return PICKLE.loads(payload) if payload else None


def as_sent_by_mpi4py(kind: int, payload: bytes | bytearray) -> bytes | bytearray:
    """The bytes mpi4py would have sent for a message: what a buffer receive (``Recv``) of an
    object message takes, which for an unpickled object is its pickle."""
    if kind in (KIND_OBJECT_BYTES, KIND_OBJECT_BYTEARRAY):
        return pickle.dumps(decode(kind, payload), protocol=PROTOCOL)
    return payload


def counted_size(kind: int, nbytes: int) -> int:
    """A message's size as mpi4py counts it: its pickled size (pickle protocol 5)."""
    if kind == KIND_OBJECT_BYTES:
        # PROTO, [FRAME], SHORT_BINBYTES / BINBYTES / BINBYTES8 + length, the bytes, MEMOIZE, STOP
        length = 1 if nbytes < 256 else 4 if nbytes <= 0xFFFFFFFF else 8
        return nbytes + 2 + 1 + length + 2 + (9 if nbytes < _FRAMED else 0)
    if kind == KIND_OBJECT_BYTEARRAY:
        return nbytes + 2 + 9 + 2 + (9 if nbytes < _FRAMED else 0)  # BYTEARRAY8 + 8-byte length
    return nbytes
