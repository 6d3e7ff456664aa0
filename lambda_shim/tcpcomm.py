"""TcpComm: the DESIGN.md subset of mpi4py's ``Comm`` over plain TCP, for ranks that have no
MPI launcher (Lambda functions, or processes started by ``lambda_shim.launch``).

Connections, frames, liveness and message matching are ``lambda_shim.transport``'s; this
layer is the API over it (point to point on context 0, collectives on context 1).
Collectives are binomial trees (bcast, reduce, gather, scatter, the buffer forms, and the
barrier as a reduce and a bcast): O(log N) rounds for N ranks, over links only along the tree.
"""

from __future__ import annotations

import pickle
import struct
import time
from typing import Any

import numpy as np

from lambda_shim.constants import ANY_SOURCE, ANY_TAG, IN_PLACE, PROC_NULL, SUM, Status, buffer_array
from lambda_shim.errors import CommError
from lambda_shim.transport import MAX_WORLD, MODES, ShimConfig, Transport, parse_address
from lambda_shim.wire import KIND_BYTES, KIND_OBJECT

__all__ = ["MAX_WORLD", "MODES", "CommError", "ShimConfig", "TcpComm", "parse_address"]
P2P, COLL = 0, 1  # the world communicator's contexts: point to point, collectives
_PART = struct.Struct("!iq")


class TcpComm:
    """An mpi4py-style communicator over TCP (see the module docstring)."""

    backend = "tcp"

    def __init__(self, config: ShimConfig) -> None:
        self._transport = Transport(config)
        self.config = config
        self.rank = config.rank
        self.size = config.size
        self._seq = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> TcpComm:
        return cls(ShimConfig.from_env(environ))

    def link_modes(self) -> dict[int, str]:
        """The connection mode (punch, direct or relay) of the link to each peer this rank has one with."""
        return self._transport.link_modes()

    # ---------------------------------------------------------------- point to point
    def _send_frame(self, dest: int, tag: int, kind: int, payload: bytes | memoryview, ctx: int = COLL) -> None:
        self._transport.wait([self._transport.isend(dest, ctx, tag, kind, payload)])

    def _recv_frame(
        self, source: int, tag: int, status: Status | None = None, ctx: int = COLL
    ) -> tuple[int, bytearray]:
        op = self._transport.irecv(source, ctx, tag)
        self._transport.wait([op])
        if status is not None:
            status.source, status.tag = op.envelope.source, op.envelope.tag
        return op.envelope.kind, op.payload

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        if tag < 0:
            raise ValueError("tags must be >= 0")
        if dest == PROC_NULL:
            return
        self._send_frame(dest, tag, KIND_OBJECT, pickle.dumps(obj, protocol=5), P2P)

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Status | None = None) -> Any:
        if source == PROC_NULL:
            if status is not None:
                status.source, status.tag = PROC_NULL, ANY_TAG
            return None
        kind, payload = self._recv_frame(source, tag, status, P2P)
        return pickle.loads(payload) if kind == KIND_OBJECT else payload

    # ---------------------------------------------------------------- collectives
    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    @staticmethod
    def Wtime() -> float:  # noqa: N802
        return time.perf_counter()

    def _tag(self) -> int:
        """A fresh tag for each collective call (ranks call them in the same order)."""
        self._seq += 1
        return self._seq % (1 << 30)

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} is not a rank of a {self.size}-rank communicator")

    def _tree_bcast(self, payload: bytes | None, root: int, tag: int) -> bytes:
        """Binomial-tree broadcast of bytes from ``root``."""
        vr = (self.rank - root) % self.size
        mask = 1
        while mask < self.size:
            if vr & mask:
                _, payload = self._recv_frame((vr - mask + root) % self.size, tag)
                break
            mask <<= 1
        mask >>= 1
        while mask > 0:
            if vr + mask < self.size:
                self._send_frame((vr + mask + root) % self.size, tag, KIND_BYTES, payload)
            mask >>= 1
        return payload

    def _tree_reduce(self, value: Any, combine, encode, decode, tag: int) -> Any:
        """Binomial-tree reduction to rank 0, combining in rank order: ``combine(lower, higher)``."""
        mask = 1
        while mask < self.size:
            if self.rank & mask:
                self._send_frame(self.rank - mask, tag, KIND_BYTES, encode(value))
                return None
            if self.rank + mask < self.size:
                _, payload = self._recv_frame(self.rank + mask, tag)
                value = combine(value, decode(payload))
            mask <<= 1
        return value

    def _to_root(self, payload: bytes | None, root: int, tag: int) -> bytes | None:
        """Move a result held by rank 0 to ``root``."""
        if root == 0:
            return payload
        if self.rank == 0:
            self._send_frame(root, tag, KIND_BYTES, payload)
        elif self.rank == root:
            return bytes(self._recv_frame(0, tag)[1])
        return None

    def barrier(self) -> None:
        """Up the binomial tree to rank 0 and back down: 2 log2 N rounds, over the links the
        other collectives use (a dissemination barrier would open 2 log2 N links a rank)."""
        self._tree_reduce(b"", lambda a, b: a, bytes, bytes, self._tag())
        self._tree_bcast(b"" if self.rank == 0 else None, 0, self._tag())

    Barrier = barrier

    def bcast(self, obj: Any, root: int = 0) -> Any:
        self._check_root(root)
        payload = self._tree_bcast(pickle.dumps(obj, protocol=5) if self.rank == root else None, root, self._tag())
        return obj if self.rank == root else pickle.loads(payload)

    def reduce(self, sendobj: Any, op=SUM, root: int = 0) -> Any:
        self._check_root(root)
        tag = self._tag()
        value = self._tree_reduce(sendobj, op, lambda v: pickle.dumps(v, protocol=5), pickle.loads, tag)
        payload = self._to_root(pickle.dumps(value, protocol=5) if self.rank == 0 else None, root, tag)
        if self.rank != root:
            return None
        return value if root == 0 else pickle.loads(payload)

    def allreduce(self, sendobj: Any, op=SUM) -> Any:
        return self.bcast(self.reduce(sendobj, op, root=0), root=0)

    def gather(self, sendobj: Any, root: int = 0) -> list[Any] | None:
        self._check_root(root)
        parts = self._gather_parts(pickle.dumps(sendobj, protocol=5), root)
        return None if parts is None else [pickle.loads(p) for _, p in sorted(parts)]

    def _gather_parts(self, mine: bytes, root: int) -> list[tuple[int, bytes]] | None:
        tag = self._tag()
        parts = self._tree_reduce([(self.rank, mine)], lambda a, b: a + b, _pack, _unpack, tag)
        payload = self._to_root(_pack(parts) if self.rank == 0 else None, root, tag)
        if self.rank != root:
            return None
        return parts if root == 0 else _unpack(payload)

    def allgather(self, sendobj: Any) -> list[Any]:
        return self.bcast(self.gather(sendobj, root=0), root=0)

    def scatter(self, sendobj: Any, root: int = 0) -> Any:
        self._check_root(root)
        tag = self._tag()
        vr = (self.rank - root) % self.size
        if self.rank == root:
            if sendobj is None or len(sendobj) != self.size:
                raise ValueError(f"scatter needs a sequence of exactly {self.size} items at the root")
            block = [(r, pickle.dumps(sendobj[(r + root) % self.size], protocol=5)) for r in range(self.size)]
        mask = 1
        while mask < self.size:
            if vr & mask:
                block = _unpack(self._recv_frame((vr - mask + root) % self.size, tag)[1])
                break
            mask <<= 1
        mask >>= 1
        while mask > 0:
            if vr + mask < self.size:
                child = [(r, p) for r, p in block if vr + mask <= r < vr + 2 * mask]
                self._send_frame((vr + mask + root) % self.size, tag, KIND_BYTES, _pack(child))
            mask >>= 1
        return pickle.loads(dict(block)[vr])

    # ---------------------------------------------------------------- buffer forms
    def Bcast(self, buf: Any, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)
        array = buffer_array(buf)
        data = self._tree_bcast(
            memoryview(np.ascontiguousarray(array)).cast("B") if self.rank == root else None, root, self._tag()
        )
        if self.rank != root:
            _fill(array, data)

    def Reduce(self, sendbuf: Any, recvbuf: Any, op=SUM, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)
        source = buffer_array(recvbuf) if sendbuf is IN_PLACE else buffer_array(sendbuf)
        value = np.array(source, copy=True)
        tag = self._tag()

        def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return op.ufunc(a, b) if hasattr(op, "ufunc") else op(a, b)

        result = self._tree_reduce(
            value,
            combine,
            lambda v: memoryview(np.ascontiguousarray(v)).cast("B"),
            lambda p: np.frombuffer(p, dtype=value.dtype).reshape(value.shape),
            tag,
        )
        payload = self._to_root(
            memoryview(np.ascontiguousarray(result)).cast("B") if self.rank == 0 else None, root, tag
        )
        if self.rank == root:
            _fill(buffer_array(recvbuf), memoryview(np.ascontiguousarray(result)).cast("B") if root == 0 else payload)

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op=SUM) -> None:  # noqa: N802
        self.Reduce(sendbuf, recvbuf, op, root=0)
        self.Bcast(recvbuf, root=0)

    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        self._check_root(root)
        mine = memoryview(np.ascontiguousarray(buffer_array(sendbuf))).cast("B").tobytes()
        parts = self._gather_parts(mine, root)
        if parts is None:
            return
        out = buffer_array(recvbuf).reshape(-1)
        counts, displs = _counts_displs(recvbuf, self.size)
        for rank, data in parts:
            chunk = np.frombuffer(data, dtype=out.dtype)
            if len(chunk) != counts[rank]:
                raise ValueError(f"Gatherv: rank {rank} sent {len(chunk)} items, recvbuf expects {counts[rank]}")
            out[displs[rank] : displs[rank] + len(chunk)] = chunk

    def close(self) -> None:
        """Leave the job (see ``Transport.close``)."""
        self._transport.close()

    def __enter__(self) -> TcpComm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def Abort(self, errorcode: int = 1) -> None:  # noqa: N802
        """End this process at once; peers see its connections close and raise CommError."""
        self._transport.abort(errorcode)


def _fill(array: np.ndarray, data: bytes | memoryview) -> None:
    target = memoryview(array).cast("B") if array.flags.c_contiguous else None
    if len(data) != array.nbytes:
        raise ValueError(f"buffer of {array.nbytes} bytes cannot take a message of {len(data)} bytes")
    if target is not None:
        target[:] = data
    else:
        array[...] = np.frombuffer(data, dtype=array.dtype).reshape(array.shape)


def _counts_displs(recvbuf: Any, size: int) -> tuple[list[int], list[int]]:
    if not isinstance(recvbuf, (list, tuple)) or len(recvbuf) < 2:
        n = buffer_array(recvbuf).size // size
        return [n] * size, [i * n for i in range(size)]
    spec = recvbuf[1]
    if len(recvbuf) >= 3 and not isinstance(recvbuf[2], type):
        counts, displs = list(spec), list(recvbuf[2])
    elif isinstance(spec, tuple) and len(spec) == 2 and not np.isscalar(spec[0]):
        counts, displs = list(spec[0]), list(spec[1])
    else:
        counts = list(spec)
        displs = list(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int))
    return [int(c) for c in counts], [int(d) for d in displs]


def _pack(parts: list[tuple[int, bytes]]) -> bytes:
    """(rank, bytes) pairs as one payload: no pickling, so arrays stay raw bytes."""
    out = bytearray()
    for rank, data in parts:
        out += _PART.pack(rank, len(data))
        out += data
    return bytes(out)


def _unpack(payload: bytes | bytearray) -> list[tuple[int, bytes]]:
    parts, view, pos = [], memoryview(payload), 0
    while pos < len(view):
        rank, length = _PART.unpack_from(view, pos)
        pos += _PART.size
        parts.append((rank, bytes(view[pos : pos + length])))
        pos += length
    return parts
