"""mpi4py's buffer API (the capitalised methods of ``Intracomm``) over a communicator's byte
primitives: ``BufferAPI`` is a mixin of ``Comm``, which supplies ``rank``, ``size``,
``_isend_bytes(dest, tag, payload, sync=False, coll=False)``, ``_irecv_bytes(source, tag,
coll=False)`` (requests completed by ``wait``; a received one holds ``payload`` and ``envelope``
and calls its ``on_complete`` hook), ``_coll_tag()`` (the tag of the next collective, the same
on every rank) and ``_proc_null_request()`` (see ``lambda_shim.tcpcomm.Comm``).

Every spec is read by ``lambda_shim.message`` exactly as mpi4py reads it, and every argument of a
call (specs, root, datatypes against the operator) is checked on each rank before any message of
that call moves, raising what mpi4py raises. Counts and displacements are honoured: only the
entries a spec names are read or written.

Bcast, Reduce, Allreduce, Barrier, Gather(v), Scatter(v) and Allgather(v) are binomial trees:
O(log N) rounds over links along the tree only. Alltoall(v) exchanges with every rank, Scan and
Exscan pass a prefix along the ranks, Reduce_scatter(_block) is a Reduce and a Scatterv.
"""

from __future__ import annotations

import operator
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lambda_shim import message as msgs
from lambda_shim.constants import ANY_SOURCE, ANY_TAG, MAX_TAG, PROC_NULL, SUM
from lambda_shim.errors import ERR_BUFFER, ERR_OP, ERR_RANK, ERR_ROOT, ERR_TAG, ERR_TRUNCATE, MPIException
from lambda_shim.message import Message, VectorMessage

_PART = struct.Struct("!iq")  # (rank, length) before each block of a packed gather/scatter

_ARITHMETIC = {msgs.KIND_INTEGER, msgs.KIND_FLOATING, msgs.KIND_COMPLEX}
_ORDERED = {msgs.KIND_INTEGER, msgs.KIND_FLOATING}
_LOGICAL = {msgs.KIND_INTEGER, msgs.KIND_LOGICAL}
_BITWISE = {msgs.KIND_INTEGER, msgs.KIND_BYTE}
_PAIRS = {msgs.KIND_PAIR}


def _loc(better: Callable) -> Callable:
    """MAXLOC/MINLOC on (value, index) pairs: the better value, the lower index on a tie."""

    def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = a.copy()
        take_b = better(b["v"], a["v"]) | ((b["v"] == a["v"]) & (b["i"] < a["i"]))
        out[take_b] = b[take_b]
        return out

    return combine


def _logical(fn: Callable) -> Callable:
    return lambda a, b: fn(a != 0, b != 0).astype(a.dtype)


# MPICH's predefined operators: the datatype kinds each is defined on, and what it does.
OPERATORS: dict[str, tuple[set[str], Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "SUM": (_ARITHMETIC, np.add),
    "PROD": (_ARITHMETIC, np.multiply),
    "MAX": (_ORDERED, np.maximum),
    "MIN": (_ORDERED, np.minimum),
    "LAND": (_LOGICAL, _logical(np.logical_and)),
    "LOR": (_LOGICAL, _logical(np.logical_or)),
    "LXOR": (_LOGICAL, _logical(np.logical_xor)),
    "BAND": (_BITWISE, np.bitwise_and),
    "BOR": (_BITWISE, np.bitwise_or),
    "BXOR": (_BITWISE, np.bitwise_xor),
    "MAXLOC": (_PAIRS, _loc(np.greater)),
    "MINLOC": (_PAIRS, _loc(np.less)),
    "REPLACE": (set(), lambda a, b: b),  # for one-sided accumulates only: not in a collective
    "NO_OP": (set(), lambda a, b: a),
}


def op_name(op: Any) -> str:
    """The predefined operator ``op`` is (ours by its name, mpi4py's by identity)."""
    name = getattr(op, "name", None)
    if isinstance(name, str) and name in OPERATORS:
        return name
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(op, mpi.Op):
        for candidate in OPERATORS:
            if op == getattr(mpi, candidate):
                return candidate
    raise MPIException(ERR_OP, f"{op!r} is not a predefined reduction operator")


def _is_user(op: Any) -> bool:
    return getattr(op, "name", None) == "USER"


class _OpBuffer(np.ndarray):
    """What a user operator gets, as mpi4py's ``MPI.buffer``: the entries' bytes (``len`` in
    bytes, the buffer protocol), and a slice takes any buffer of as many bytes
    (``inoutbuf[:] = result``, whatever the result's item type)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        if not isinstance(value, (int, np.integer)) and msgs.has_buffer(value):
            value = np.frombuffer(value, dtype=np.uint8)
        super().__setitem__(key, value)


def _user_reducer(op: Any, datatype: msgs.Datatype) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """An ``Op.Create`` operator on buffers, called as mpi4py calls it: ``function(inbuf,
    inoutbuf, datatype)`` with the lower ranks' entries in ``inbuf``, the result left in
    ``inoutbuf`` (byte buffers over the entries)."""
    function = getattr(op, "function", None)

    def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = b.copy()
        inbuf, inoutbuf = a.view(np.uint8).view(_OpBuffer), out.view(np.uint8).view(_OpBuffer)
        if function is not None:
            function(inbuf, inoutbuf, datatype)
        else:  # an Op that keeps only fn(x, y) = function(x, y, None)
            op.fn(inbuf, inoutbuf)
        return out

    return combine


def reducer(op: Any, datatype: msgs.Datatype) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The elementwise function of ``op`` on ``datatype``; MPI.Exception(ERR_OP) if MPI does
    not define it there (LAND on DOUBLE, SUM on C_BOOL, MAXLOC on DOUBLE, REPLACE...)."""
    if _is_user(op):
        return _user_reducer(op, datatype)
    name = op_name(op)
    kinds, fn = OPERATORS[name]
    if datatype.kind not in kinds:
        raise MPIException(ERR_OP, f"MPI_{name} is not defined on {datatype.Get_name()}")

    def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # integer wrap-around and float overflow, as in C
            return np.asarray(fn(a, b), dtype=a.dtype)

    return combine


def _pack(parts: Sequence[tuple[int, bytes | memoryview]]) -> bytes:
    out = bytearray()
    for rank, data in parts:
        out += _PART.pack(rank, len(data))
        out += data
    return bytes(out)


def _unpack(payload: bytes | bytearray | memoryview) -> list[tuple[int, memoryview]]:
    parts, view, pos = [], memoryview(payload), 0
    while pos < len(view):
        if pos + _PART.size > len(view):
            raise MPIException(ERR_TRUNCATE, "a gathered message ends inside a block header")
        rank, length = _PART.unpack_from(view, pos)
        pos += _PART.size
        if length < 0 or pos + length > len(view):
            raise MPIException(ERR_TRUNCATE, "a gathered message ends inside a block")
        parts.append((rank, view[pos : pos + length]))
        pos += length
    return parts


def _store(msg: Message, data: bytes | bytearray | memoryview, what: str) -> None:
    """Received bytes into a message's entries; ERR_TRUNCATE when they do not fit."""
    if len(data) > msg.nbytes:
        raise MPIException(ERR_TRUNCATE, f"{what}: a message of {len(data)} bytes, room for {msg.nbytes}")
    msg.store(data)


def _entries(payload: memoryview, like: Message) -> np.ndarray:
    """A peer's partial result of a reduction, as many entries as ``like`` has."""
    if len(payload) != like.nbytes:
        raise MPIException(ERR_TRUNCATE, f"a reduction of {like.nbytes} bytes met {len(payload)}: counts differ")
    return np.frombuffer(payload, dtype=like.datatype.packed)


def _raw(values: np.ndarray) -> memoryview:
    """An array's bytes without a copy (a pair's record format cannot be cast by memoryview)."""
    return memoryview(np.ascontiguousarray(values).view(np.uint8))


def _address(msg: Message) -> int | None:
    return None if msg.buf is None or not msg.count else msg.buf.ctypes.data + msg.offset


def _check_pair(send: Message, recv: Message) -> None:
    """mpi4py's check of a reduction's send and receive specs, then MPI's aliasing check."""
    if send.datatype is not recv.datatype:
        raise ValueError("mismatch in send and receive MPI datatypes")
    if send.count != recv.count:
        raise ValueError(f"mismatch in send count {send.count} and receive count {recv.count}")
    if _address(send) is not None and _address(send) == _address(recv):
        raise MPIException(ERR_BUFFER, "the send and receive buffers are the same (use IN_PLACE)")


def c_int(value: Any) -> int:
    """A rank, root or tag as mpi4py's C int arguments take it: anything with ``__index__`` or
    ``__int__`` (a float is truncated, as Cython does), else TypeError; OverflowError outside a
    C int."""
    if hasattr(type(value), "__index__"):
        number = operator.index(value)
    elif hasattr(type(value), "__int__"):
        number = int(value)
    else:
        raise TypeError("an integer is required")
    if not -(2**31) <= number < 2**31:
        raise OverflowError(f"value {number} does not fit in a C int")
    return number


def reduce_local(op: Any, inbuf: Any, inoutbuf: Any) -> None:
    """``Op.Reduce_local``: ``inoutbuf``'s entries become ``op(inbuf's, inoutbuf's)``, the specs
    checked as a reduction's are (and ``inbuf`` may not be IN_PLACE, as in MPI)."""
    inout = msgs.parse(inoutbuf, readonly=False)
    if msgs.is_in_place(inbuf):
        raise MPIException(ERR_BUFFER, "Reduce_local: inbuf cannot be IN_PLACE")
    send = msgs.parse(inbuf, readonly=True)
    _check_pair(send, inout)
    combine = reducer(op, send.datatype)
    _store(inout, _raw(combine(BufferAPI._values(send), BufferAPI._values(inout))), "Reduce_local")


def _deliver_into(req: Any, msg: Message) -> Any:
    """Make a posted receive request copy its message into ``msg``'s entries when it completes,
    raising MPI.Exception(ERR_TRUNCATE) from the completing call when it does not fit."""

    def deliver(done: Any, status: Any) -> None:
        env = done.envelope
        _store(msg, done.payload, f"a receive from rank {env.source} (tag {env.tag})")

    req.on_complete = deliver
    return req


def _wait(req: Any) -> None:
    if req is not None:
        req.wait()


class BufferAPI:
    """The buffer methods of mpi4py's ``Intracomm`` (see the module docstring)."""

    rank: int
    size: int

    # ------------------------------------------------------------ the primitives, used here only
    def _post(self, dest: int, tag: int, payload: Any, sync: bool = False, coll: bool = True) -> Any:
        return self._isend_bytes(dest, tag, payload, sync=sync, coll=coll)

    def _take(self, source: int, tag: int) -> memoryview:
        """The payload of the next collective message from ``source`` with ``tag``."""
        req = self._irecv_bytes(source, tag, coll=True)
        req.wait()
        return memoryview(req.payload)

    @staticmethod
    def _finish(requests: list) -> None:
        for req in requests:
            req.wait()

    # ------------------------------------------------------------ argument checks
    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size:
            raise MPIException(ERR_ROOT, f"root {root!r} of a {self.size}-rank communicator")

    def _check_peer(self, rank: int, receiving: bool) -> None:
        if not (0 <= rank < self.size or rank == PROC_NULL or (receiving and rank == ANY_SOURCE)):
            raise MPIException(ERR_RANK, f"rank {rank} of a {self.size}-rank communicator")

    @staticmethod
    def _check_tag(tag: int, receiving: bool) -> None:
        if not 0 <= tag <= MAX_TAG and not (receiving and tag == ANY_TAG):  # MAX_TAG: what TAG_UB says
            raise MPIException(ERR_TAG, f"tag {tag}")

    # ------------------------------------------------------------ point to point
    def _send_args(self, buf: Any, dest: int, tag: int) -> Message | None:
        """The message of a send, checked as mpi4py and MPI do; None to PROC_NULL (not read)."""
        if dest == PROC_NULL:
            return None
        msg = msgs.parse(buf, readonly=True)
        self._check_peer(dest, receiving=False)
        self._check_tag(tag, receiving=False)
        return msg

    def _recv_args(self, buf: Any, source: int, tag: int) -> Message | None:
        if source == PROC_NULL:
            return None
        msg = msgs.parse(buf, readonly=False)
        self._check_peer(source, receiving=True)
        self._check_tag(tag, receiving=True)
        return msg

    def _start_send(self, msg: Message | None, dest: int, tag: int, sync: bool = False) -> Any:
        return None if msg is None else self._post(dest, tag, msg.payload(), sync=sync, coll=False)

    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:  # noqa: N802 - mpi4py's names
        dest, tag = c_int(dest), c_int(tag)
        _wait(self._start_send(self._send_args(buf, dest, tag), dest, tag))

    def Ssend(self, buf: Any, dest: int, tag: int = 0) -> None:  # noqa: N802
        dest, tag = c_int(dest), c_int(tag)
        _wait(self._start_send(self._send_args(buf, dest, tag), dest, tag, sync=True))

    Bsend = Send  # a standard send completes once its bytes are handed over: buffered already
    Rsend = Send

    def Isend(self, buf: Any, dest: int, tag: int = 0) -> Any:  # noqa: N802
        dest, tag = c_int(dest), c_int(tag)
        req = self._start_send(self._send_args(buf, dest, tag), dest, tag)
        return self._proc_null_request() if req is None else req

    def Issend(self, buf: Any, dest: int, tag: int = 0) -> Any:  # noqa: N802
        dest, tag = c_int(dest), c_int(tag)
        req = self._start_send(self._send_args(buf, dest, tag), dest, tag, sync=True)
        return self._proc_null_request() if req is None else req

    Ibsend = Isend
    Irsend = Isend

    def _start_recv(self, msg: Message | None, source: int, tag: int) -> Any:
        """A posted receive into ``msg``'s entries (PROC_NULL: a request already done)."""
        if msg is None:
            return self._proc_null_request()
        return _deliver_into(self._irecv_bytes(source, tag, coll=False), msg)

    def Recv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Any = None) -> None:  # noqa: N802
        source, tag = c_int(source), c_int(tag)
        self._start_recv(self._recv_args(buf, source, tag), source, tag).wait(status)

    def Irecv(self, buf: Any, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Any:  # noqa: N802
        source, tag = c_int(source), c_int(tag)
        return self._start_recv(self._recv_args(buf, source, tag), source, tag)

    def Sendrecv(  # noqa: N802
        self,
        sendbuf: Any,
        dest: int,
        sendtag: int = 0,
        recvbuf: Any = None,
        source: int = ANY_SOURCE,
        recvtag: int = ANY_TAG,
        status: Any = None,
    ) -> None:
        self.Isendrecv(sendbuf, dest, sendtag, recvbuf, source, recvtag).wait(status)

    def Sendrecv_replace(  # noqa: N802
        self,
        buf: Any,
        dest: int,
        sendtag: int = 0,
        source: int = ANY_SOURCE,
        recvtag: int = ANY_TAG,
        status: Any = None,
    ) -> None:
        self.Isendrecv_replace(buf, dest, sendtag, source, recvtag).wait(status)

    def _joined(self, recv: Any, send: Any) -> Any:
        """One request of a receive and a send: complete when both are, with the receive's status."""
        if send is not None:
            recv._also = send._op
        return recv

    def Isendrecv(  # noqa: N802
        self,
        sendbuf: Any,
        dest: int,
        sendtag: int = 0,
        recvbuf: Any = None,
        source: int = ANY_SOURCE,
        recvtag: int = ANY_TAG,
    ) -> Any:
        """Sendrecv that returns at once: its request completes when the send and the receive
        have, with the receive's status (MPI 4.0's MPI_Isendrecv)."""
        dest, sendtag, source, recvtag = c_int(dest), c_int(sendtag), c_int(source), c_int(recvtag)
        out = self._send_args(sendbuf, dest, sendtag)
        into = self._recv_args(recvbuf, source, recvtag)
        recv = self._start_recv(into, source, recvtag)
        return self._joined(recv, self._start_send(out, dest, sendtag))

    def Isendrecv_replace(  # noqa: N802
        self,
        buf: Any,
        dest: int,
        sendtag: int = 0,
        source: int = ANY_SOURCE,
        recvtag: int = ANY_TAG,
    ) -> Any:
        """Sendrecv_replace that returns at once (MPI 4.0's MPI_Isendrecv_replace): the message
        sent is ``buf`` as it was at the call."""
        dest, sendtag, source, recvtag = c_int(dest), c_int(sendtag), c_int(source), c_int(recvtag)
        out = self._send_args(buf, dest, sendtag)
        into = self._recv_args(buf, source, recvtag)
        outgoing = None if out is None else bytes(out.payload())  # a copy: buf is received into
        recv = self._start_recv(into, source, recvtag)
        send = None if outgoing is None else self._post(dest, sendtag, outgoing, coll=False)
        return self._joined(recv, send)

    # ------------------------------------------------------------ trees
    def _tree_bcast(self, payload: Any, root: int, tag: int) -> Any:
        """Binomial-tree broadcast of bytes from ``root``; returns them on every rank."""
        n, vr = self.size, (self.rank - root) % self.size
        mask = 1
        while mask < n:
            if vr & mask:
                payload = self._take((vr - mask + root) % n, tag)
                break
            mask <<= 1
        sends = []
        mask >>= 1
        while mask > 0:
            if vr + mask < n:
                sends.append(self._post((vr + mask + root) % n, tag, payload))
            mask >>= 1
        self._finish(sends)
        return payload

    def _tree_reduce(self, value: Any, combine: Callable, encode: Callable, decode: Callable, root: int, tag: int):
        """Binomial-tree reduction to ``root``: ``value`` there, None elsewhere."""
        n, vr = self.size, (self.rank - root) % self.size
        mask = 1
        while mask < n:
            if vr & mask:
                self._post((vr - mask + root) % n, tag, encode(value)).wait()
                return None
            if vr + mask < n:
                value = combine(value, decode(self._take((vr + mask + root) % n, tag)))
            mask <<= 1
        return value

    def _tree_gather(self, mine: bytes | memoryview | None, root: int, tag: int) -> dict[int, memoryview] | None:
        """Every rank's bytes at ``root`` (keyed by rank), up a binomial tree; None elsewhere."""
        parts = [(self.rank, mine if mine is not None else b"")]
        gathered = self._tree_reduce(parts, lambda a, b: a + b, _pack, _unpack, root, tag)
        return None if gathered is None else {rank: memoryview(data) for rank, data in gathered}

    def _tree_scatter(self, blocks: dict[int, Any] | None, root: int, tag: int) -> memoryview:
        """Rank r gets ``blocks[r]`` of the root's, down a binomial tree (each subtree's blocks
        travel together)."""
        n, vr = self.size, (self.rank - root) % self.size
        if self.rank == root:
            held = [(r, blocks[r]) for r in range(n)]
        mask = 1
        while mask < n:
            if vr & mask:
                held = _unpack(self._take((vr - mask + root) % n, tag))
                break
            mask <<= 1
        sends = []
        mask >>= 1
        while mask > 0:
            if vr + mask < n:
                child = [(r, d) for r, d in held if vr + mask <= (r - root) % n < vr + 2 * mask]
                sends.append(self._post((vr + mask + root) % n, tag, _pack(child)))
            mask >>= 1
        self._finish(sends)
        return memoryview(dict(held)[self.rank])

    def _everyones(self, mine: bytes | memoryview, tag: int) -> dict[int, memoryview]:
        """Every rank's bytes on every rank: a tree gather to rank 0 and a tree broadcast."""
        parts = self._tree_gather(mine, 0, tag)
        packed = self._tree_bcast(_pack(sorted(parts.items())) if parts is not None else None, 0, tag)
        return dict(_unpack(packed))

    # ------------------------------------------------------------ collectives
    # Each takes its tag before anything else: ranks where a bad argument raises still advance
    # the collective sequence, so the next collective matches across ranks (and the messages of
    # the ranks that went ahead, under the old tag, never match anything).
    def Barrier(self) -> None:  # noqa: N802
        tag = self._coll_tag()
        self._tree_reduce(b"", lambda a, b: a, bytes, bytes, 0, tag)
        self._tree_bcast(b"", 0, tag)

    def Bcast(self, buf: Any, root: int = 0) -> None:  # noqa: N802
        tag = self._coll_tag()
        root = c_int(root)
        msg = msgs.parse(buf, readonly=self.rank == root)
        self._check_root(root)
        data = self._tree_bcast(msg.payload() if self.rank == root else None, root, tag)
        if self.rank != root:
            _store(msg, data, f"Bcast from rank {root}")

    def _reduction_args(self, sendbuf: Any, recvbuf: Any, receiving: bool) -> tuple[Message, Message | None]:
        """(what this rank contributes, where the result goes) of a reduction, checked as mpi4py
        does; IN_PLACE takes the contribution from the receive buffer."""
        recv = msgs.parse(recvbuf, readonly=False) if receiving else None
        if recv is not None and msgs.is_in_place(sendbuf):
            return recv, recv
        send = msgs.parse(sendbuf, readonly=True)
        if recv is not None:
            _check_pair(send, recv)
        return send, recv

    @staticmethod
    def _values(msg: Message) -> np.ndarray:
        """A message's entries as a fresh array in their wire layout (packed pairs)."""
        return msg.typed().astype(msg.datatype.packed)

    def _reduce_to(self, send: Message, op: Any, root: int, tag: int) -> np.ndarray | None:
        """The reduction of every rank's entries at ``root``. A tree rooted at ``root`` combines
        ranks out of order; an operator that does not commute goes up the tree of rank 0 (which
        combines lower ranks first, as MPI requires) and its result on to the root."""
        combine = reducer(op, send.datatype)
        commutes = not _is_user(op) or getattr(op, "commute", False)
        top = root if commutes else 0
        result = self._tree_reduce(self._values(send), combine, _raw, lambda p: _entries(p, send), top, tag)
        if top == root:
            return result
        if self.rank == top:
            self._post(root, tag, _raw(result)).wait()
        elif self.rank == root:
            return _entries(self._take(top, tag), send).copy()
        return None

    def Reduce(self, sendbuf: Any, recvbuf: Any, op: Any = SUM, root: int = 0) -> None:  # noqa: N802
        tag = self._coll_tag()
        root = c_int(root)
        send, recv = self._reduction_args(sendbuf, recvbuf, receiving=self.rank == root)
        self._check_root(root)
        reducer(op, send.datatype)
        result = self._reduce_to(send, op, root, tag)
        if recv is not None:
            _store(recv, _raw(result), "Reduce")

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = SUM) -> None:  # noqa: N802
        tag = self._coll_tag()
        send, recv = self._reduction_args(sendbuf, recvbuf, receiving=True)
        reducer(op, send.datatype)
        result = self._reduce_to(send, op, 0, tag)
        data = self._tree_bcast(_raw(result) if self.rank == 0 else None, 0, tag)
        _store(recv, data, "Allreduce")

    def _prefix(self, sendbuf: Any, recvbuf: Any, op: Any, inclusive: bool) -> None:
        """Scan/Exscan: each rank takes the prefix of the ranks before it, adds its own, passes it on."""
        tag = self._coll_tag()
        send, recv = self._reduction_args(sendbuf, recvbuf, receiving=True)
        combine = reducer(op, send.datatype)
        mine = self._values(send)
        before = _entries(self._take(self.rank - 1, tag), send) if self.rank > 0 else None
        through = mine if before is None else combine(before, mine)
        if self.rank + 1 < self.size:
            self._post(self.rank + 1, tag, _raw(through)).wait()
        if inclusive:
            _store(recv, _raw(through), "Scan")
        elif before is not None:
            _store(recv, _raw(before), "Exscan")

    def Scan(self, sendbuf: Any, recvbuf: Any, op: Any = SUM) -> None:  # noqa: N802
        self._prefix(sendbuf, recvbuf, op, inclusive=True)

    def Exscan(self, sendbuf: Any, recvbuf: Any, op: Any = SUM) -> None:  # noqa: N802
        self._prefix(sendbuf, recvbuf, op, inclusive=False)

    # ------------------------------------------------------------ gathers and scatters
    def _place(self, recv: VectorMessage, parts: dict[int, memoryview], what: str) -> None:
        for rank in range(self.size):
            if rank in parts:
                _store(recv.block(rank), parts[rank], f"{what}: the block of rank {rank}")

    def _gather(self, sendbuf: Any, recvbuf: Any, root: int, vector: bool) -> None:
        tag = self._coll_tag()
        root = c_int(root)
        what = "Gatherv" if vector else "Gather"
        recv = None
        if self.rank == root:
            recv = self._blocks(recvbuf, readonly=False, vector=vector)
        in_place = self.rank == root and msgs.is_in_place(sendbuf)
        mine = None if in_place else msgs.parse(sendbuf, readonly=True).payload()
        self._check_root(root)
        parts = self._tree_gather(mine, root, tag)
        if parts is not None:
            if in_place:
                del parts[root]
            self._place(recv, parts, what)

    def _blocks(self, spec: Any, readonly: bool, vector: bool) -> VectorMessage:
        """A spec of one block per rank: a vector spec, or a simple one cut in ``size`` blocks."""
        if vector:
            return msgs.parse_vector(spec, readonly=readonly, blocks=self.size)
        whole = msgs.parse(spec, readonly=readonly, blocks=self.size)
        first = whole.offset // whole.datatype.extent
        counts = [whole.count] * self.size
        return VectorMessage(whole.buf, counts, [first + i * whole.count for i in range(self.size)], whole.datatype)

    def Gather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        self._gather(sendbuf, recvbuf, root, vector=False)

    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        self._gather(sendbuf, recvbuf, root, vector=True)

    def _scatter(self, sendbuf: Any, recvbuf: Any, root: int, vector: bool) -> None:
        tag = self._coll_tag()
        root = c_int(root)
        what = "Scatterv" if vector else "Scatter"
        blocks = None
        in_place = self.rank == root and msgs.is_in_place(recvbuf)
        if self.rank == root:
            send = self._blocks(sendbuf, readonly=True, vector=vector)
            blocks = {r: send.block(r).payload() for r in range(self.size)}
        recv = None if in_place else msgs.parse(recvbuf, readonly=False)
        self._check_root(root)
        data = self._tree_scatter(blocks, root, tag)
        if recv is not None:
            _store(recv, data, f"{what} from rank {root}")

    def Scatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        self._scatter(sendbuf, recvbuf, root, vector=False)

    def Scatterv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        self._scatter(sendbuf, recvbuf, root, vector=True)

    def _allgather(self, sendbuf: Any, recvbuf: Any, vector: bool) -> None:
        tag = self._coll_tag()
        what = "Allgatherv" if vector else "Allgather"
        recv = self._blocks(recvbuf, readonly=False, vector=vector)
        if msgs.is_in_place(sendbuf):
            mine = bytes(recv.block(self.rank).payload())
        else:
            mine = msgs.parse(sendbuf, readonly=True).payload()
        self._place(recv, self._everyones(mine, tag), what)

    def Allgather(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        self._allgather(sendbuf, recvbuf, vector=False)

    def Allgatherv(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        self._allgather(sendbuf, recvbuf, vector=True)

    def _alltoall(self, sendbuf: Any, recvbuf: Any, vector: bool) -> None:
        tag = self._coll_tag()
        what = "Alltoallv" if vector else "Alltoall"
        recv = self._blocks(recvbuf, readonly=False, vector=vector)
        if msgs.is_in_place(sendbuf):
            outgoing = {r: bytes(recv.block(r).payload()) for r in range(self.size)}
        else:
            send = self._blocks(sendbuf, readonly=True, vector=vector)
            outgoing = {r: send.block(r).payload() for r in range(self.size)}
        peers = [(self.rank + k) % self.size for k in range(1, self.size)]
        receives = {p: self._irecv_bytes(p, tag, coll=True) for p in peers}
        sends = [self._post(p, tag, outgoing[p]) for p in peers]
        _store(recv.block(self.rank), outgoing[self.rank], f"{what}: this rank's own block")
        for peer, req in receives.items():
            req.wait()
            _store(recv.block(peer), req.payload, f"{what}: the block of rank {peer}")
        self._finish(sends)

    def Alltoall(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        self._alltoall(sendbuf, recvbuf, vector=False)

    def Alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        self._alltoall(sendbuf, recvbuf, vector=True)

    # ------------------------------------------------------------ reduce-scatter
    def _reduce_then_scatter(self, contribution: Message, op: Any, counts: list[int], recv: Message, tag: int) -> None:
        """Reduce every rank's ``sum(counts)`` entries to rank 0, then rank r gets entries
        ``counts[r]`` of them (after those of the ranks before it)."""
        result = self._reduce_to(contribution, op, 0, tag)
        blocks = None
        if self.rank == 0:
            size = contribution.datatype.size
            flat = _raw(result)
            starts = np.concatenate([[0], np.cumsum(counts)]) * size
            blocks = {r: flat[starts[r] : starts[r + 1]] for r in range(self.size)}
        _store(recv, self._tree_scatter(blocks, 0, tag), "Reduce_scatter")

    def Reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: Any = SUM) -> None:  # noqa: N802
        tag = self._coll_tag()
        if msgs.is_in_place(sendbuf):
            whole = msgs.parse(recvbuf, readonly=False, blocks=self.size)
            contribution = Message(whole.buf, whole.offset, whole.count * self.size, whole.datatype)
            recv = whole
        else:
            recv = msgs.parse(recvbuf, readonly=False)
            contribution = msgs.parse(sendbuf, readonly=True, blocks=self.size)
            _check_pair(contribution, recv)
            contribution = Message(contribution.buf, contribution.offset, recv.count * self.size, recv.datatype)
        reducer(op, contribution.datatype)
        self._reduce_then_scatter(contribution, op, [recv.count] * self.size, recv, tag)

    def Reduce_scatter(  # noqa: N802
        self, sendbuf: Any, recvbuf: Any, recvcounts: Sequence[int] | None = None, op: Any = SUM
    ) -> None:
        tag = self._coll_tag()
        recv = msgs.parse(recvbuf, readonly=False)
        in_place = msgs.is_in_place(sendbuf)
        send = recv if in_place else msgs.parse(sendbuf, readonly=True)
        if recvcounts is None and not in_place:
            everyones = self._everyones(struct.pack("!q", recv.count), tag)
            counts = [struct.unpack("!q", everyones[r])[0] for r in range(self.size)]
        else:
            counts = msgs.int_array(recvcounts, self.size)
        total = sum(counts)
        if in_place:
            if recv.count != total:
                raise ValueError(f"mismatch in receive count {recv.count} and sum(counts) {total}")
            recv = Message(recv.buf, recv.offset, counts[self.rank], recv.datatype)
        else:
            if send.datatype is not recv.datatype:
                raise ValueError("mismatch in send and receive MPI datatypes")
            if send.count != total:
                raise ValueError(f"mismatch in send count {send.count} and sum(counts) {total}")
            if recv.count != counts[self.rank]:
                raise ValueError(f"mismatch in receive count {recv.count} and counts[{self.rank}] {counts[self.rank]}")
        reducer(op, send.datatype)
        self._reduce_then_scatter(send, op, counts, recv, tag)
