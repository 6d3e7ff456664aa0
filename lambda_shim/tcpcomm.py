"""mpi4py's ``Comm`` (an intracommunicator) over ``lambda_shim.transport``, for ranks that
have no MPI launcher (Lambda functions, or processes started by ``lambda_shim.launch``).

Connections, frames, liveness and message matching are the transport's; this layer is the
API: the object methods with mpi4py's signatures, defaults, return values and errors, and
communicator management. A communicator is a group of world ranks (its rank = the index) and
two transport contexts: ``ctx`` for point to point, ``ctx + 1`` for its collectives, so
messages of different communicators never match, and collectives never match user
receives. ``Dup`` and ``Split`` agree on fresh contexts collectively (the largest next free
context of any member). Arguments are checked on every rank before any message moves: a bad
rank, root or tag raises ``MPI.Exception`` with MPICH's error class.

Collectives are binomial trees (bcast, reduce, gather, scatter, and the barrier as a reduce
and a bcast; allreduce and allgather add a bcast): O(log N) rounds for N ranks, over links
only along the tree; scan and exscan are recursive doubling; alltoall is pairwise.
"""

from __future__ import annotations

import struct
import time
import warnings
from typing import Any

from lambda_shim.buffers import BufferAPI
from lambda_shim.constants import (
    ANY_SOURCE,
    ANY_TAG,
    CONGRUENT,
    ERRORS_RETURN,
    IDENT,
    MAX,
    MAX_TAG,
    PROC_NULL,
    SIMILAR,
    SUM,
    TAG_UB,
    UNDEFINED,
    UNEQUAL,
    WTIME_IS_GLOBAL,
    Errhandler,
    Status,
    as_op,
    c_int,
    fill_status,
)
from lambda_shim.errors import ERR_COMM, ERR_RANK, ERR_REQUEST, ERR_ROOT, ERR_TAG, ERR_TRUNCATE, CommError, MPIException
from lambda_shim.message import parse as parse_spec
from lambda_shim.nonblocking import NonblockingAPI, worker_tag
from lambda_shim.objects import encode as encode_object
from lambda_shim.objects import received
from lambda_shim.persistent import PersistentAPI
from lambda_shim.pickler import PICKLE
from lambda_shim.request import RECV_BYTES, RECV_OBJECT, REQUEST_NULL, SEND, Request
from lambda_shim.transport import MAX_WORLD, MODES, SendOp, ShimConfig, Transport, parse_address
from lambda_shim.wire import KIND_BYTES

__all__ = ["MAX_WORLD", "MODES", "Comm", "CommError", "ShimConfig", "TcpComm", "parse_address"]
_PART = struct.Struct("!iq")


def _dumps(obj: Any) -> bytes:
    return PICKLE.dumps(obj)  # MPI.pickle: a program may swap the serializer, as on mpi4py


class _Contexts:
    """The next free context id of this process's transport, shared by all its communicators."""

    def __init__(self, first: int) -> None:
        self.next = first

    def take(self) -> int:
        ctx, self.next = self.next, self.next + 2
        return ctx


class _NullComm:
    """mpi4py's ``COMM_NULL``, and what a communicator becomes once freed: its every call
    raises ``MPI.Exception`` with ERR_COMM."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not (name in ("rank", "size") or hasattr(Comm, name)):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name in ("rank", "size") or not callable(getattr(Comm, name)):
            raise MPIException(ERR_COMM, "a null communicator (COMM_NULL, or one that was freed)")

        def null_call(*args: Any, **kwargs: Any) -> Any:
            raise MPIException(ERR_COMM, f"{name} on a null communicator (COMM_NULL, or one that was freed)")

        return null_call

    def __bool__(self) -> bool:
        return False

    def Get_name(self) -> str:  # noqa: N802 - mpi4py's name
        return "MPI_COMM_NULL"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullComm)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "COMM_NULL"


COMM_NULL = _NullComm()


class Message:
    """mpi4py's ``Message`` (from ``mprobe``/``Mprobe``): a message already taken out of the
    queue, received by ``recv``/``irecv`` (an object) or ``Recv``/``Irecv`` (into a buffer).
    ``Message()`` is null and ``Message(message)`` has ``message``'s handle (equal to it);
    ``MESSAGE_NO_PROC`` is what a matched probe of PROC_NULL gives: its receives complete at
    once with PROC_NULL's status (a copy of it becomes null once received, the constant stays)."""

    def __init__(self, message: Message | None = None) -> None:
        if message is not None and not isinstance(message, Message):
            raise TypeError(f"Argument 'message' has incorrect type (expected Message, got {type(message).__name__})")
        self._request = REQUEST_NULL if message is None else message._request
        self._no_proc = message is not None and message._no_proc

    @classmethod
    def _of(cls, request: Request) -> Message:
        message = cls()
        message._request = request
        return message

    def __bool__(self) -> bool:
        return self._no_proc or bool(self._request)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        if self._no_proc or other._no_proc:
            return self._no_proc == other._no_proc
        return self._request == other._request

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # as mpi4py's

    def __reduce__(self) -> str | tuple[Any, ...]:
        """The constants unpickle as themselves, copies of them as copies; a pending message
        cannot be pickled (ValueError, as mpi4py's)."""
        if self is MESSAGE_NULL or self is MESSAGE_NO_PROC:
            return "MESSAGE_NULL" if self is MESSAGE_NULL else "MESSAGE_NO_PROC"
        if self._no_proc or not self:
            return Message, ((MESSAGE_NO_PROC if self._no_proc else MESSAGE_NULL),)
        raise ValueError(f"cannot serialize '{type(self).__name__}' instance")

    def __repr__(self) -> str:
        return "MESSAGE_NO_PROC" if self._no_proc else "MESSAGE_NULL" if not self else super().__repr__()

    @classmethod
    def probe(cls, comm: Comm, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Any = None) -> Message:
        """``comm.mprobe(source, tag, status)``."""
        return comm.mprobe(source, tag, status)

    @classmethod
    def iprobe(cls, comm: Comm, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Any = None) -> Message | None:
        """``comm.improbe(source, tag, status)``."""
        return comm.improbe(source, tag, status)

    Probe, Iprobe = probe, iprobe

    def irecv(self) -> Request:
        """The receive of the message; the handle becomes MESSAGE_NULL (receiving twice is ERR_REQUEST)."""
        if self._no_proc:
            self._no_proc = self is MESSAGE_NO_PROC
            return Request._new(None, None, RECV_OBJECT)
        if not self._request:
            raise MPIException(ERR_REQUEST, "receive of a null message (MESSAGE_NULL, or one already received)")
        request, self._request = self._request, REQUEST_NULL
        return request

    def recv(self, status: Any = None) -> Any:
        return self.irecv().wait(status)

    def Irecv(self, buf: Any) -> Request:  # noqa: N802 - mpi4py's name
        request = self.irecv()
        if request._op is None:  # PROC_NULL: nothing to receive
            return request
        spec = parse_spec(buf, readonly=False)

        def store(done: Request, status: Status) -> None:
            if len(done.payload) > spec.nbytes:
                raise MPIException(ERR_TRUNCATE, f"a message of {len(done.payload)} bytes, room for {spec.nbytes}")
            spec.store(done.payload)

        request._what, request.on_complete = RECV_BYTES, store
        return request

    def Recv(self, buf: Any, status: Any = None) -> None:  # noqa: N802 - mpi4py's name
        self.Irecv(buf).wait(status)


MESSAGE_NULL = Message()
MESSAGE_NO_PROC = Message()
MESSAGE_NO_PROC._no_proc = True


class Comm(NonblockingAPI, PersistentAPI, BufferAPI):
    """An intracommunicator over a Transport: ``group`` lists its members' world ranks."""

    def __init__(self, transport: Transport, group: list[int], ctx: int, contexts: _Contexts, name: str = "") -> None:
        self._transport = transport
        self._group = group
        self._world_rank = {w: r for r, w in enumerate(group)}
        self._ctx = ctx
        self._contexts = contexts
        self._name = name
        self._seq = 0
        self._permanent = False  # COMM_WORLD and COMM_SELF cannot be freed
        self._errhandler = ERRORS_RETURN
        self.rank = self._world_rank[transport.rank]
        self.size = len(group)

    # ---------------------------------------------------------------- identity
    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return self.rank

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's name
        return self.size

    def Get_name(self) -> str:  # noqa: N802 - mpi4py's name
        return self._name

    def Set_name(self, name: str) -> None:  # noqa: N802 - mpi4py's name
        self._name = str(name)

    name = property(Get_name, Set_name)

    def Is_inter(self) -> bool:  # noqa: N802 - mpi4py's name
        return False

    def Is_intra(self) -> bool:  # noqa: N802 - mpi4py's name
        return True

    is_inter = property(Is_inter)
    is_intra = property(Is_intra)

    def Get_attr(self, keyval: int) -> Any:  # noqa: N802 - mpi4py's name
        """``TAG_UB``: the largest tag; ``WTIME_IS_GLOBAL``: 0 (each rank's own clock); other
        attributes are not kept (None)."""
        return {TAG_UB: MAX_TAG, WTIME_IS_GLOBAL: 0}.get(keyval)

    def Set_errhandler(self, errhandler: Errhandler) -> None:  # noqa: N802 - mpi4py's name
        """Recorded only: errors always raise MPI.Exception here, as under ERRORS_RETURN."""
        if not isinstance(errhandler, Errhandler):
            raise TypeError(f"expected an Errhandler, got {type(errhandler).__name__}")
        self._errhandler = errhandler

    def Get_errhandler(self) -> Errhandler:  # noqa: N802 - mpi4py's name
        return self._errhandler

    @staticmethod
    def Wtime() -> float:  # noqa: N802 - mpi4py's name
        return time.perf_counter()

    def Compare(self, other: Comm) -> int:  # noqa: N802 - mpi4py's name
        """IDENT (the same communicator), CONGRUENT (same ranks in the same order), SIMILAR
        (same ranks, another order) or UNEQUAL."""
        if not other:
            raise MPIException(ERR_COMM, "Compare with a null communicator")
        if other is self:
            return IDENT
        if other._group == self._group:
            return CONGRUENT
        return SIMILAR if sorted(other._group) == sorted(self._group) else UNEQUAL

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name or 'comm'}: rank {self.rank} of {self.size}>"

    # ---------------------------------------------------------------- checks
    def _valid_rank(self, rank: Any, wildcard: bool, what: str = "rank") -> int:
        """A peer rank: of this communicator, PROC_NULL, or (receives) ANY_SOURCE."""
        if type(rank) is not int:  # an int in range needs no conversion (the path of every message)
            rank = c_int(rank)
        if 0 <= rank < self.size or rank == PROC_NULL or (wildcard and rank == ANY_SOURCE):
            return rank
        rank = c_int(rank)  # OverflowError beyond a C int, as mpi4py's
        raise MPIException(ERR_RANK, f"{what} has value {rank} but must be nonnegative and less than {self.size}")

    @staticmethod
    def _valid_tag(tag: Any, wildcard: bool) -> int:
        if type(tag) is not int:
            tag = c_int(tag)
        if 0 <= tag <= MAX_TAG or (wildcard and tag == ANY_TAG):
            return tag
        tag = c_int(tag)
        raise MPIException(ERR_TAG, f"value is {tag}")

    def _valid_root(self, root: Any) -> int:
        root = c_int(root)
        if 0 <= root < self.size:
            return root
        raise MPIException(ERR_ROOT, f"root has value {root} but must be nonnegative and less than {self.size}")

    def _rank_of(self, world_rank: int) -> int:
        return self._world_rank[world_rank]

    # ---------------------------------------------------------------- primitives (used by BufferAPI)
    def _isend_bytes(self, dest: int, tag: int, payload: Any, sync: bool = False, coll: bool = False) -> Request:
        """Send raw bytes to rank ``dest`` of this communicator (not PROC_NULL)."""
        op = self._transport.isend(self._group[dest], self._ctx + coll, tag, KIND_BYTES, payload, sync=sync)
        return Request._new(self._transport, op, SEND, self._world_rank)

    def _irecv_bytes(self, source: int, tag: int, coll: bool = False) -> Request:
        """Receive raw bytes from rank ``source`` of this communicator or ANY_SOURCE (not PROC_NULL)."""
        world = source if source == ANY_SOURCE else self._group[source]
        op = self._transport.irecv(world, self._ctx + coll, tag)
        return Request._new(self._transport, op, RECV_BYTES, self._world_rank, (source, tag))

    def _proc_null_request(self) -> Request:
        """A complete request with PROC_NULL's status (source PROC_NULL, tag ANY_TAG, no bytes)."""
        return Request._new(self._transport, None, RECV_BYTES, self._world_rank)

    def _coll_tag(self) -> int:
        """The next tag of this communicator's sequence of collectives (the same on every rank);
        in a nonblocking collective's worker thread, the tag its call took."""
        if worker_tag() is not None:
            return worker_tag()
        self._seq += 1
        return self._seq % (MAX_TAG + 1)

    # ---------------------------------------------------------------- point to point
    def _send_op(self, obj: Any, dest: int, tag: int, sync: bool) -> SendOp | None:
        """The transport's op sending ``obj`` (None for PROC_NULL)."""
        dest = self._valid_rank(dest, wildcard=False)
        tag = self._valid_tag(tag, wildcard=False)
        if dest == PROC_NULL:
            return None
        kind, payload = encode_object(obj)
        return self._transport.isend(self._group[dest], self._ctx, tag, kind, payload, sync=sync)

    def _isend(self, obj: Any, dest: int, tag: int, sync: bool) -> Request:
        return Request._new(self._transport, self._send_op(obj, dest, tag, sync), SEND, self._world_rank)

    def _send(self, obj: Any, dest: int, tag: int, sync: bool) -> None:
        """A blocking send: its op is waited for here, with no Request (latency)."""
        op = self._send_op(obj, dest, tag, sync)
        if op is not None and not op.done:
            self._transport.wait([op])

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        return self._isend(obj, dest, tag, sync=False)

    def issend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        """Complete only once the receiver has matched the message."""
        return self._isend(obj, dest, tag, sync=True)

    def ibsend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        """Buffered: complete once the message is out of the caller's hands, as a standard send here."""
        return self._isend(obj, dest, tag, sync=False)

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._send(obj, dest, tag, sync=False)

    def ssend(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._send(obj, dest, tag, sync=True)

    def bsend(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._send(obj, dest, tag, sync=False)

    def irecv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        """A receive whose ``wait`` returns the object; ``buf`` (if given: a buffer, or an int,
        the size of the buffer mpi4py would allocate) bounds its pickled size (ERR_TRUNCATE)."""
        source = self._valid_rank(source, wildcard=True)
        tag = self._valid_tag(tag, wildcard=True)
        limit = None if buf is None else _buffer_size(buf)
        if source == PROC_NULL:
            return Request._new(self._transport, None, RECV_OBJECT, self._world_rank)
        world = source if source == ANY_SOURCE else self._group[source]
        op = self._transport.irecv(world, self._ctx, tag)
        return Request._new(self._transport, op, RECV_OBJECT, self._world_rank, (source, tag), limit)

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Any = None) -> Any:
        if buf is not None:  # as mpi4py 4, which still honours it
            warnings.warn("the 'buf' argument is deprecated", UserWarning, stacklevel=2)
        if buf is not None or status is not None:
            return self.irecv(buf, source, tag).wait(status)
        # Nothing to fill or bound (and a blocking receive cannot be cancelled): its op is
        # waited for here, with no Request (latency), as a blocking send's is.
        source = self._valid_rank(source, wildcard=True)
        tag = self._valid_tag(tag, wildcard=True)
        if source == PROC_NULL:
            return None
        op = self._transport.irecv(source if source == ANY_SOURCE else self._group[source], self._ctx, tag)
        if not op.done:
            self._transport.wait([op])
        return received(op.envelope.kind, op.payload)

    def sendrecv(
        self,
        sendobj: Any,
        dest: int,
        sendtag: int = 0,
        recvbuf: Any = None,
        source: int = ANY_SOURCE,
        recvtag: int = ANY_TAG,
        status: Any = None,
    ) -> Any:
        self._valid_rank(dest, wildcard=False)
        self._valid_tag(sendtag, wildcard=False)
        receive = self.irecv(recvbuf, source, recvtag)
        self.send(sendobj, dest, sendtag)
        return receive.wait(status)

    def _probed(self, source: int, tag: int, status: Any, wait: bool) -> bool:
        """Whether a matching message has arrived (``status`` describes it; it stays queued);
        wait for one if ``wait``."""
        source = self._valid_rank(source, wildcard=True)
        tag = self._valid_tag(tag, wildcard=True)
        if source == PROC_NULL:
            fill_status(status, PROC_NULL, ANY_TAG, 0)
            return True
        world = source if source == ANY_SOURCE else self._group[source]
        probe = self._transport.probe if wait else self._transport.iprobe
        envelope = probe(world, self._ctx, tag)
        if envelope is None:
            return False
        fill_status(status, self._rank_of(envelope.source), envelope.tag, envelope.nbytes)
        return True

    def iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Any = None) -> bool:
        """Whether a matching message has arrived (``status`` describes it); it stays queued."""
        return self._probed(source, tag, status, wait=False)

    def probe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Any = None) -> bool:
        """Wait until a matching message has arrived (``status`` describes it); True."""
        return self._probed(source, tag, status, wait=True)

    def _matched_message(self, source: int, tag: int, status: Any, wait: bool) -> Message | None:
        """Take a matching message out of the queue in the step that finds it, so no other
        thread's receive can take it after (MPI's matched probe); wait for one if ``wait``."""
        source = self._valid_rank(source, wildcard=True)
        tag = self._valid_tag(tag, wildcard=True)
        if source == PROC_NULL:
            fill_status(status, PROC_NULL, ANY_TAG, 0)
            return MESSAGE_NO_PROC
        world = source if source == ANY_SOURCE else self._group[source]
        while (op := self._transport.take_arrived(world, self._ctx, tag)) is None:
            if not wait:
                return None
            self._transport.probe(world, self._ctx, tag)  # until one arrives (another thread may take it first)
        fill_status(status, self._rank_of(op.envelope.source), op.envelope.tag, op.envelope.nbytes)
        return Message._of(Request._new(self._transport, op, RECV_OBJECT, self._world_rank, (source, tag)))

    def mprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Any = None) -> Message:
        """Wait for a matching message and take it out of the queue (``Message.recv()`` returns it)."""
        return self._matched_message(source, tag, status, wait=True)

    def improbe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Any = None) -> Message | None:
        """``mprobe`` if a matching message has arrived, else None."""
        return self._matched_message(source, tag, status, wait=False)

    Probe, Iprobe, Mprobe, Improbe = probe, iprobe, mprobe, improbe

    # ---------------------------------------------------------------- collective plumbing
    def _csend(self, dest: int, tag: int, payload: Any) -> None:
        self._isend_bytes(dest, tag, payload, coll=True).wait()

    def _crecv(self, source: int, tag: int) -> bytearray:
        request = self._irecv_bytes(source, tag, coll=True)
        self._transport.wait([request._op])
        return request._op.payload

    def _bcast_bytes(self, payload: Any, root: int, tag: int) -> Any:
        """Binomial-tree broadcast of bytes from ``root``."""
        vr = (self.rank - root) % self.size
        mask = 1
        while mask < self.size:
            if vr & mask:
                payload = self._crecv((vr - mask + root) % self.size, tag)
                break
            mask <<= 1
        mask >>= 1
        while mask > 0:
            if vr + mask < self.size:
                self._csend((vr + mask + root) % self.size, tag, payload)
            mask >>= 1
        return payload

    def _reduce_bytes(self, value: Any, combine, encode, decode, tag: int) -> Any:
        """Binomial-tree reduction to rank 0, combining in rank order: ``combine(lower, higher)``."""
        mask = 1
        while mask < self.size:
            if self.rank & mask:
                self._csend(self.rank - mask, tag, encode(value))
                return None
            if self.rank + mask < self.size:
                value = combine(value, decode(self._crecv(self.rank + mask, tag)))
            mask <<= 1
        return value

    def _to_root(self, payload: Any, root: int, tag: int) -> Any:
        """Move a result held by rank 0 to ``root``."""
        if root == 0:
            return payload
        if self.rank == 0:
            self._csend(root, tag, payload)
        elif self.rank == root:
            return self._crecv(0, tag)
        return None

    def _gather_parts(self, mine: bytes, root: int, tag: int) -> list[tuple[int, bytes]] | None:
        parts = self._reduce_bytes([(self.rank, mine)], lambda a, b: a + b, _pack, _unpack, tag)
        payload = self._to_root(_pack(parts) if self.rank == 0 else None, root, tag)
        if self.rank != root:
            return None
        return parts if root == 0 else _unpack(payload)

    def _reduce_object(self, sendobj: Any, fn, root: int, tag: int) -> Any:
        value = self._reduce_bytes(sendobj, fn, _dumps, PICKLE.loads, tag)
        payload = self._to_root(_dumps(value) if self.rank == 0 else None, root, tag)
        if self.rank != root:
            return None
        return value if root == 0 else PICKLE.loads(payload)

    # ---------------------------------------------------------------- collectives
    def barrier(self) -> None:
        """Up the binomial tree to rank 0 and back down: 2 log2 N rounds."""
        tag = self._coll_tag()
        self._reduce_bytes(b"", lambda a, b: a, bytes, bytes, tag)
        self._bcast_bytes(b"" if self.rank == 0 else None, 0, tag)

    Barrier = barrier

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        root = self._valid_root(root)
        tag = self._coll_tag()
        payload = self._bcast_bytes(_dumps(obj) if self.rank == root else None, root, tag)
        return obj if self.rank == root else PICKLE.loads(payload)

    def reduce(self, sendobj: Any, op: Any = SUM, root: int = 0) -> Any:
        root = self._valid_root(root)
        fn = as_op(op).fn
        return self._reduce_object(sendobj, fn, root, self._coll_tag())

    def allreduce(self, sendobj: Any, op: Any = SUM) -> Any:
        fn = as_op(op).fn
        tag = self._coll_tag()
        value = self._reduce_bytes(sendobj, fn, _dumps, PICKLE.loads, tag)
        payload = self._bcast_bytes(_dumps(value) if self.rank == 0 else None, 0, tag)
        return value if self.rank == 0 else PICKLE.loads(payload)

    def gather(self, sendobj: Any, root: int = 0) -> list[Any] | None:
        root = self._valid_root(root)
        parts = self._gather_parts(_dumps(sendobj), root, self._coll_tag())
        return None if parts is None else [PICKLE.loads(p) for _, p in sorted(parts)]

    def allgather(self, sendobj: Any) -> list[Any]:
        tag = self._coll_tag()
        parts = self._gather_parts(_dumps(sendobj), 0, tag)
        payload = self._bcast_bytes(_pack(parts) if self.rank == 0 else None, 0, tag)
        return [PICKLE.loads(p) for _, p in sorted(parts if self.rank == 0 else _unpack(payload))]

    def scatter(self, sendobj: Any, root: int = 0) -> Any:
        """Item i of the root's sequence to rank i (None at the root: None to every rank)."""
        root = self._valid_root(root)
        if self.rank == root:
            items = [None] * self.size if sendobj is None else list(sendobj)
            if len(items) != self.size:
                raise ValueError(f"expecting {self.size} items, got {len(items)}")
        tag = self._coll_tag()
        vr = (self.rank - root) % self.size
        if self.rank == root:
            block = [(v, _dumps(items[(v + root) % self.size])) for v in range(self.size)]
        mask = 1
        while mask < self.size:
            if vr & mask:
                block = _unpack(self._crecv((vr - mask + root) % self.size, tag))
                break
            mask <<= 1
        mask >>= 1
        while mask > 0:
            if vr + mask < self.size:
                child = [(v, p) for v, p in block if vr + mask <= v < vr + 2 * mask]
                self._csend((vr + mask + root) % self.size, tag, _pack(child))
            mask >>= 1
        return PICKLE.loads(dict(block)[vr])

    def alltoall(self, sendobj: Any) -> list[Any]:
        """Item j of rank i's sequence goes to rank j, which returns them in rank order."""
        items = [None] * self.size if sendobj is None else list(sendobj)
        if len(items) != self.size:
            raise ValueError(f"expecting {self.size} items, got {len(items)}")
        tag = self._coll_tag()
        receives = {r: self._irecv_bytes(r, tag, coll=True) for r in range(self.size) if r != self.rank}
        for step in range(1, self.size):  # a different peer per step, so no rank is flooded at once
            dest = (self.rank + step) % self.size
            self._csend(dest, tag, _dumps(items[dest]))
        self._transport.wait([r._op for r in receives.values()])
        return [items[r] if r == self.rank else PICKLE.loads(receives[r]._op.payload) for r in range(self.size)]

    def _prefix_object(self, sendobj: Any, op: Any, inclusive: bool) -> Any:
        """Recursive doubling: after round k each rank holds the fold of the 2^k ranks below it."""
        fn = as_op(op).fn
        tag = self._coll_tag()
        partial, below = sendobj, None
        mask = 1
        while mask < self.size:
            partner = self.rank ^ mask
            if partner < self.size:
                receive = self._irecv_bytes(partner, tag, coll=True)
                self._csend(partner, tag, _dumps(partial))
                self._transport.wait([receive._op])
                theirs = PICKLE.loads(receive._op.payload)
                if partner < self.rank:
                    below = theirs if below is None else fn(theirs, below)
                    partial = fn(theirs, partial)
                else:
                    partial = fn(partial, theirs)
            mask <<= 1
        if inclusive:
            return sendobj if below is None else fn(below, sendobj)
        return below

    def scan(self, sendobj: Any, op: Any = SUM) -> Any:
        """The fold of ranks 0..rank's objects."""
        return self._prefix_object(sendobj, op, inclusive=True)

    def exscan(self, sendobj: Any, op: Any = SUM) -> Any:
        """The fold of ranks 0..rank-1's objects (None at rank 0)."""
        return self._prefix_object(sendobj, op, inclusive=False)

    # ---------------------------------------------------------------- communicators
    def Dup(self, info: Any = None) -> Comm:  # noqa: N802 - mpi4py's name
        """The same group in a new message space."""
        ctx = self.allreduce(self._contexts.next, MAX)
        self._contexts.next = ctx + 2
        return Comm(self._transport, list(self._group), ctx, self._contexts)

    Clone = Dup

    def Split(self, color: int = 0, key: int = 0) -> Comm | _NullComm:  # noqa: N802 - mpi4py's name
        """One communicator per color, ranked by (key, rank here); COMM_NULL for UNDEFINED."""
        color, key = c_int(color), c_int(key)
        table = self.allgather((color, key, self._contexts.next))
        ctx = max(nxt for _, _, nxt in table)
        self._contexts.next = ctx + 2
        if color == UNDEFINED:
            return COMM_NULL
        members = sorted((k, r) for r, (c, k, _) in enumerate(table) if c == color)
        return Comm(self._transport, [self._group[r] for _, r in members], ctx, self._contexts)

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        """This communicator becomes COMM_NULL: every later call on it raises ERR_COMM. (Its
        pending requests still complete: they hold what they need.)"""
        if self._permanent:
            raise MPIException(ERR_COMM, f"{self._name} cannot be freed")
        self.__dict__.clear()
        self.__class__ = _NullComm

    def Abort(self, errorcode: int = 1) -> None:  # noqa: N802 - mpi4py's name
        """End this process at once; peers see its connections close and raise CommError.
        (DESIGN.md's default code, 1: mpi4py's is 0, which would look like success.)"""
        self._transport.abort(errorcode)


class TcpComm(Comm):
    """The world communicator of a job (mpi4py's ``COMM_WORLD``): its transport's every rank."""

    backend = "tcp"

    def __init__(self, config: ShimConfig) -> None:
        transport = Transport(config)
        super().__init__(transport, list(range(config.size)), 0, _Contexts(2), "MPI_COMM_WORLD")
        self._permanent = True
        self.config = config

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> TcpComm:
        return cls(ShimConfig.from_env(environ))

    def self_comm(self) -> Comm:
        """``COMM_SELF``: this rank alone, in a message space of its own."""
        alone = Comm(self._transport, [self._transport.rank], self._contexts.take(), self._contexts, "MPI_COMM_SELF")
        alone._permanent = True
        return alone

    def link_modes(self) -> dict[int, str]:
        """The connection mode (punch, direct or relay) of the link to each peer this rank has one with."""
        return self._transport.link_modes()

    def close(self) -> None:
        """Leave the job (see ``Transport.close``)."""
        self._transport.close()

    def __enter__(self) -> TcpComm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _buffer_size(buf: Any) -> int:
    """Bytes an object receive may take: an int is a size (mpi4py allocates that many bytes)."""
    if isinstance(buf, int):
        if buf < 0:
            raise ValueError(f"negative receive buffer size {buf}")
        return buf
    return memoryview(buf).nbytes


def _pack(parts: list[tuple[int, bytes]]) -> bytes:
    """(rank, bytes) pairs as one payload: no pickling, so arrays stay raw bytes."""
    out = bytearray()
    for rank, data in parts:
        out += _PART.pack(rank, len(data))
        out += data
    return bytes(out)


def _unpack(payload: Any) -> list[tuple[int, bytes]]:
    parts, view, pos = [], memoryview(payload), 0
    while pos < len(view):
        rank, length = _PART.unpack_from(view, pos)
        pos += _PART.size
        parts.append((rank, bytes(view[pos : pos + length])))
        pos += length
    return parts
