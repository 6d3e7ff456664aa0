"""TcpComm: the DESIGN.md subset of mpi4py's ``Comm`` over plain TCP, for ranks that have no
MPI launcher (Lambda functions, or processes started by ``lambda_shim.launch``).

Ranks meet at the rendezvous server, get the job's address table, then open connections
only to the peers they talk to, on first use: ``punch`` (TCP hole punching: both ranks
connect from the port they reached the server from, to the address the server saw the
other come from, and also listen there), ``direct`` (connect to the peer's listener) or
``relay`` (a pipe through the server); ``auto`` tries punch, then direct, then relay. Every
connection is authenticated before anything is read from it. Messages are framed (kind,
source, tag, length) and every frame carries a MAC that is checked before it is unpickled
(``wire.FrameSeal``). Collectives are binomial trees (bcast, reduce, gather, scatter and the
buffer forms) and a dissemination barrier: O(log N) rounds for N ranks.

Nothing blocks forever: connecting has a deadline, an optional per-operation timeout bounds
every wait, and a peer that dies or closes makes every rank waiting on it raise
``CommError`` naming the peer (its connection ends, or the server reports it gone).
"""

from __future__ import annotations

import collections
import os
import pickle
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cai_hpc.comm import ANY_SOURCE, ANY_TAG, IN_PLACE, SUM, Status, buffer_array
from lambda_shim.wire import (
    FRAME,
    KIND_BYTES,
    KIND_OBJECT,
    MAC,
    AuthError,
    FrameSeal,
    handshake_accept,
    handshake_connect,
    load_secret,
    recv_control,
    recv_exact,
    recv_into,
    send_control,
)

MODES = ("auto", "punch", "direct", "relay")
GONE_GRACE_S = 2.0  # a rank reported gone may still have a connection being set up
_RANK = struct.Struct("!i")
_PART = struct.Struct("!iq")


class CommError(RuntimeError):
    """A peer died, closed its connection, or an operation missed its deadline."""


@dataclass
class ShimConfig:
    rank: int
    size: int
    job_id: str
    key: bytes
    server: tuple[str, int]
    mode: str = "auto"
    connect_timeout: float = 120.0
    op_timeout: float | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ShimConfig:
        """From the launcher's environment: RANK, WORLD_SIZE, CAI_HPC_RENDEZVOUS (host:port),
        CAI_HPC_JOB_ID, CAI_HPC_TOKEN_FILE or CAI_HPC_TOKEN (the job key), CAI_HPC_CONNECT,
        CAI_HPC_CONNECT_TIMEOUT, CAI_HPC_OP_TIMEOUT."""
        env = os.environ if environ is None else environ
        missing = [v for v in ("RANK", "WORLD_SIZE", "CAI_HPC_RENDEZVOUS", "CAI_HPC_JOB_ID") if not env.get(v)]
        if missing:
            raise CommError(
                f"tcp backend: {', '.join(missing)} not set (start ranks with python -m lambda_shim.launch)"
            )
        host, _, port = env["CAI_HPC_RENDEZVOUS"].rpartition(":")
        try:
            key = load_secret(env)
        except AuthError as exc:
            raise CommError(f"tcp backend: {exc}") from None
        mode = env.get("CAI_HPC_CONNECT", "auto")
        if mode not in MODES:
            raise CommError(f"CAI_HPC_CONNECT={mode!r}: choose one of {', '.join(MODES)}")
        op_timeout = env.get("CAI_HPC_OP_TIMEOUT")
        return cls(
            rank=int(env["RANK"]),
            size=int(env["WORLD_SIZE"]),
            job_id=env["CAI_HPC_JOB_ID"],
            key=key,
            server=(host, int(port)),
            mode=mode,
            connect_timeout=float(env.get("CAI_HPC_CONNECT_TIMEOUT", "120")),
            op_timeout=float(op_timeout) if op_timeout else None,
        )


class _Link:
    """One authenticated connection to a peer; sends are serialised by a lock, which also
    keeps the send side of its seal in frame order."""

    def __init__(self, sock: socket.socket, peer: int, seal: FrameSeal) -> None:
        self.sock = sock
        self.peer = peer
        self.seal = seal
        self.lock = threading.Lock()


def _reusable_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) that other sockets of this process may share the
    port with: the listener, the server connection and the punched peer connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer whose machine vanishes without closing is noticed within about 20 s.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 2)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


class TcpComm:
    """An mpi4py-style communicator over TCP (see the module docstring)."""

    backend = "tcp"

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.rank = config.rank
        self.size = config.size
        self._inbox: collections.deque = collections.deque()  # (source, tag, kind, payload)
        self._cond = threading.Condition()
        self._links: dict[int, _Link] = {}
        self._sockets: list[socket.socket] = []  # every adopted link, to close on leaving
        self._open_links: collections.Counter = collections.Counter()
        self._connecting: dict[int, threading.Lock] = collections.defaultdict(threading.Lock)
        self._dead: dict[int, str] = {}
        self._modes: dict[int, str] = {}  # peer -> how the link we send on was made
        self._seq = 0
        self._closed = False
        self._control_lock = threading.Lock()
        # Loopback jobs listen on loopback only; others on every interface.
        loopback = config.server[0] in ("127.0.0.1", "localhost", "::1")
        self._bind_host = "127.0.0.1" if loopback else ""
        # Direct mode: peers connect to this listener.
        self._listener = socket.create_server((self._bind_host, 0), backlog=1024)
        # Punch mode: the port this rank reaches the server from is also where it listens and
        # where its outgoing peer connections start, as TCP hole punching through a NAT needs.
        self._punch_listener = _reusable_socket(self._bind_host, 0)
        self._punch_port = self._punch_listener.getsockname()[1]
        self._punch_listener.listen(1024)
        try:
            self._control = self._register()
        except BaseException:
            # A warm Lambda process lives on after a failed invocation: leave no listener behind.
            self._listener.close()
            self._punch_listener.close()
            raise
        for listener, punched in ((self._listener, False), (self._punch_listener, True)):
            threading.Thread(target=self._accept_loop, args=(listener, punched), daemon=True).start()
        threading.Thread(target=self._control_loop, daemon=True, name="tcpcomm-control").start()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> TcpComm:
        return cls(ShimConfig.from_env(environ))

    # ---------------------------------------------------------------- wiring up
    def _server_connection(self, local_port: int = 0) -> socket.socket:
        deadline = time.monotonic() + self.config.connect_timeout
        while True:
            sock = _reusable_socket(self._bind_host, local_port) if local_port else socket.socket()
            sock.settimeout(10)
            try:
                sock.connect(self.config.server)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    host, port = self.config.server
                    raise CommError(f"rank {self.rank}: rendezvous server {host}:{port} unreachable: {exc}") from None
                time.sleep(0.2)
        _tune(sock)
        try:
            handshake_connect(sock, self.config.key, self.config.job_id)
        except AuthError as exc:
            sock.close()
            raise CommError(f"rank {self.rank}: rendezvous server refused us: {exc}") from None
        except (OSError, EOFError) as exc:
            sock.close()
            raise CommError(
                f"rank {self.rank}: rendezvous server closed the connection (wrong token?): {exc}"
            ) from None
        return sock

    def _register(self) -> socket.socket:
        sock = self._server_connection(local_port=self._punch_port)
        host = sock.getsockname()[0]
        port = self._listener.getsockname()[1]
        send_control(
            sock,
            {
                "op": "register",
                "rank": self.rank,
                "size": self.size,
                "addrs": [[host, port]],
                "wait_s": self.config.connect_timeout,
            },
        )
        sock.settimeout(self.config.connect_timeout + 10)
        try:
            reply = recv_control(sock)
        except (OSError, EOFError) as exc:
            raise CommError(f"rank {self.rank}: no address table from the rendezvous server: {exc}") from None
        if reply.get("op") != "table":
            raise CommError(f"rank {self.rank}: rendezvous: {reply.get('message', reply)}")
        self._table = {int(r): [tuple(a) for a in addrs] for r, addrs in reply["addrs"].items()}
        # Where the server saw each rank come from: the outside of its NAT, for punching.
        self._observed = {int(r): tuple(a) for r, a in reply["observed"].items()}
        self._observed_rank = {a: r for r, a in self._observed.items()}
        sock.settimeout(None)
        return sock

    def _send_control(self, message: dict) -> None:
        with self._control_lock:
            send_control(self._control, message)

    def _control_loop(self) -> None:
        """Relay requests and departures reported by the server, until it closes."""
        try:
            while True:
                message = recv_control(self._control)
                if message.get("op") == "relay-request":
                    peer = int(message["peer"])
                    threading.Thread(target=self._join_relay, args=(peer,), daemon=True).start()
                elif message.get("op") == "punch-request":
                    peer = int(message["peer"])
                    deadline = time.monotonic() + self.config.connect_timeout
                    threading.Thread(target=self._punch_back, args=(peer, deadline), daemon=True).start()
                elif message.get("op") == "gone":
                    threading.Timer(GONE_GRACE_S, self._peer_gone, args=(int(message["rank"]),)).start()
        except (OSError, EOFError, ValueError):
            pass

    def _peer_gone(self, peer: int) -> None:
        """The server saw ``peer`` leave. A connection with it, if any, says more (its queued
        messages still arrive); without one, nothing from it can ever come."""
        with self._cond:
            if peer not in self._links:
                self._dead.setdefault(peer, "it left the job without connecting to this rank")
                self._cond.notify_all()

    def _accept_loop(self, listener: socket.socket, punched: bool) -> None:
        while not self._closed:
            try:
                sock, addr = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._accept_one, args=(sock, addr, punched), daemon=True).start()

    def _accept_one(self, sock: socket.socket, addr: tuple, punched: bool) -> None:
        try:
            _tune(sock)
            sock.settimeout(10)
            if punched:
                peer = self._observed_rank.get(tuple(addr[:2]))
                if peer is None:
                    raise AuthError(f"{addr} is no rank's punched address")
                link = self._paired_handshake(sock, peer)
            else:
                job, seal = handshake_accept(sock, self.config.key)
                if job != self.config.job_id:
                    raise AuthError(f"peer is in job {job!r}")
                (peer,) = _RANK.unpack(recv_exact(sock, _RANK.size))
                sock.settimeout(None)
                link = _Link(sock, peer, seal)
        except (AuthError, OSError, EOFError, CommError):
            sock.close()  # never read anything else from an unauthenticated connection
            return
        self._adopt(link)

    def _paired_handshake(self, sock: socket.socket, peer: int) -> _Link:
        """Authenticate a connection whose two ends both think they opened it (a relay pipe,
        a punched or simultaneously opened connection): the lower rank plays the acceptor."""
        if self.rank < peer:
            job, seal = handshake_accept(sock, self.config.key)
            if job != self.config.job_id:
                raise AuthError("the peer named another job")
        else:
            seal = handshake_connect(sock, self.config.key, self.config.job_id)
        sock.sendall(_RANK.pack(self.rank))
        (their_rank,) = _RANK.unpack(recv_exact(sock, _RANK.size))
        if their_rank != peer:
            raise CommError(f"rank {self.rank}: expected rank {peer} on this connection, got {their_rank}")
        sock.settimeout(None)
        return _Link(sock, peer, seal)

    def _punch_link(self, peer: int, deadline: float) -> _Link | None:
        """Connect from our punched port to the peer's, asking it (through the server) to do
        the same towards us; the first connection that authenticates wins. None when the
        peer's own attempt won (it is then in ``self._links``)."""
        self._send_control({"op": "punch", "peer": peer})
        return self._punch_back(peer, deadline)

    def _punch_back(self, peer: int, deadline: float) -> _Link | None:
        last: Exception | None = None
        while time.monotonic() < deadline and peer not in self._links:
            sock = _reusable_socket(self._bind_host, self._punch_port)
            sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
            try:
                sock.connect(self._observed[peer])
                _tune(sock)
                link = self._paired_handshake(sock, peer)
                self._adopt(link)
                return link
            except (OSError, EOFError, AuthError) as exc:
                sock.close()
                last = exc
                time.sleep(0.02)
        if peer in self._links:
            return None
        raise CommError(f"rank {self.rank}: could not punch through to rank {peer} at {self._observed[peer]}: {last}")

    def _join_relay(self, peer: int) -> None:
        try:
            self._adopt(self._relay_link(peer))
        except (CommError, OSError, EOFError, AuthError):
            pass  # the requesting rank gets the error through its own deadline

    def _relay_link(self, peer: int) -> _Link:
        sock = self._server_connection()
        send_control(sock, {"op": "relay", "rank": self.rank, "peer": peer, "wait_s": self.config.connect_timeout})
        sock.settimeout(self.config.connect_timeout + 10)
        reply = recv_control(sock)
        if reply.get("op") != "relay-ready":
            raise CommError(f"rank {self.rank}: relay to rank {peer}: {reply.get('message', reply)}")
        return self._paired_handshake(sock, peer)  # end-to-end authentication over the pipe

    def _direct_link(self, peer: int, deadline: float) -> _Link:
        last: Exception | None = None
        for addr in self._table[peer]:
            while time.monotonic() < deadline:
                try:
                    sock = socket.create_connection(addr, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                    _tune(sock)
                    seal = handshake_connect(sock, self.config.key, self.config.job_id)
                    sock.sendall(_RANK.pack(self.rank))
                    sock.settimeout(None)
                    return _Link(sock, peer, seal)
                except (OSError, EOFError) as exc:
                    last = exc
                    time.sleep(0.05)
        raise CommError(f"rank {self.rank}: cannot connect to rank {peer} at {self._table[peer]}: {last}")

    def _adopt(self, link: _Link) -> None:
        """Start reading a new link; the first link to a peer is the one we send on. (Two
        ranks may open a link each way; the other side may send on either.)"""
        with self._cond:
            if self._closed:  # an accept that raced close(): nobody will read or close it
                link.sock.close()
                return
            if self._links.setdefault(link.peer, link) is link:
                self._modes[link.peer] = self._mode_of(link.sock)
            self._open_links[link.peer] += 1
            self._sockets.append(link.sock)
        threading.Thread(target=self._read_loop, args=(link,), daemon=True, name=f"tcpcomm-read-{link.peer}").start()

    def _mode_of(self, sock: socket.socket) -> str:
        """How a link was made, from its socket: through the server, from or to the punched port, or direct."""
        try:
            if sock.getsockname()[1] == self._punch_port:
                return "punch"
            return "relay" if sock.getpeername()[:2] == self._control.getpeername()[:2] else "direct"
        except OSError:  # closed already: its reader will report the peer gone
            return "closed"

    def link_modes(self) -> dict[int, str]:
        """The connection mode (punch, direct or relay) of the link to each peer this rank has one with."""
        with self._cond:
            return dict(self._modes)

    def _link(self, peer: int) -> _Link:
        link = self._links.get(peer)
        if link is not None:
            return link
        with self._connecting[peer]:
            link = self._links.get(peer)
            if link is not None:
                return link
            if peer in self._dead:
                raise CommError(f"rank {self.rank}: peer rank {peer} is gone: {self._dead[peer]}")
            self._connect(peer, self.config.mode, time.monotonic() + self.config.connect_timeout)
            return self._links[peer]

    def _connect(self, peer: int, mode: str, deadline: float) -> None:
        """Open a link to ``peer``: one mode, or ``auto``: punch, then direct, then relay, each
        with a share of the connect deadline."""
        if mode == "punch":
            self._punch_link(peer, deadline)
        elif mode == "direct":
            self._adopt(self._direct_link(peer, deadline))
        elif mode == "relay":
            self._adopt(self._relay_link(peer))
        else:
            # A Lambda function listens on a private address no other function can reach.
            on_lambda = "AWS_LAMBDA_FUNCTION_NAME" in os.environ
            for attempt, share in (("punch", 5.0),) if on_lambda else (("punch", 5.0), ("direct", 5.0)):
                try:
                    self._connect(peer, attempt, min(deadline, time.monotonic() + share))
                    return
                except CommError:
                    if peer in self._links:
                        return
            self._adopt(self._relay_link(peer))

    def _read_loop(self, link: _Link) -> None:
        header = bytearray(FRAME.size)
        try:
            while True:
                recv_into(link.sock, memoryview(header))
                kind, source, tag, length = FRAME.unpack(header)
                if source != link.peer or length < 0:
                    raise EOFError(f"malformed frame from rank {link.peer}")
                payload = bytearray(length)
                recv_into(link.sock, memoryview(payload))
                link.seal.check(header, payload, recv_exact(link.sock, MAC))
                with self._cond:
                    self._inbox.append((link.peer, tag, kind, payload))
                    self._cond.notify_all()
        except (OSError, EOFError, AuthError) as exc:
            if isinstance(exc, AuthError):
                link.sock.close()  # nothing more is read from a connection that failed a MAC
            why = str(exc) if isinstance(exc, AuthError) else f"connection closed ({type(exc).__name__})"
            with self._cond:
                # Gone only once every link to it has closed: another may still hold its last frames.
                self._open_links[link.peer] -= 1
                if self._open_links[link.peer] == 0:
                    self._dead.setdefault(link.peer, why)
                self._cond.notify_all()

    # ---------------------------------------------------------------- point to point
    def _send_frame(self, dest: int, tag: int, kind: int, payload: bytes | memoryview) -> None:
        if not 0 <= dest < self.size:
            raise ValueError(f"dest {dest} is not a rank of a {self.size}-rank communicator")
        if dest == self.rank:
            with self._cond:
                self._inbox.append((dest, tag, kind, bytearray(payload)))
                self._cond.notify_all()
            return
        link = self._link(dest)
        try:
            header = FRAME.pack(kind, self.rank, tag, len(payload))
            with link.lock:
                mac = link.seal.seal(header, payload)
                link.sock.sendall(header)
                link.sock.sendall(payload)
                link.sock.sendall(mac)
        except OSError as exc:
            raise CommError(f"rank {self.rank}: sending to rank {dest} failed: {exc}") from None

    def _recv_frame(self, source: int, tag: int, status: Status | None = None) -> tuple[int, bytearray]:
        deadline = None if self.config.op_timeout is None else time.monotonic() + self.config.op_timeout
        with self._cond:
            while True:
                for i, (src, msg_tag, kind, payload) in enumerate(self._inbox):
                    if (source in (ANY_SOURCE, src)) and (msg_tag == tag or (tag == ANY_TAG and msg_tag >= 0)):
                        del self._inbox[i]
                        if status is not None:
                            status.source, status.tag = src, msg_tag
                        return kind, payload
                gone = (
                    self._dead if source == ANY_SOURCE else {source: self._dead[source]} if source in self._dead else {}
                )
                if gone:
                    peer, why = next(iter(gone.items()))
                    raise CommError(f"rank {self.rank}: peer rank {peer} is gone while we wait for it: {why}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CommError(
                        f"rank {self.rank}: no message from rank {source} (tag {tag}) within {self.config.op_timeout} s"
                    )
                self._cond.wait(timeout=1.0 if remaining is None else min(1.0, remaining))

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        if tag < 0:
            raise ValueError("tags must be >= 0")
        self._send_frame(dest, tag, KIND_OBJECT, pickle.dumps(obj, protocol=5))

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Status | None = None) -> Any:
        kind, payload = self._recv_frame(source, tag, status)
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
        """A fresh tag below ANY_TAG for each collective call (ranks call them in the same order)."""
        self._seq += 1
        return -2 - self._seq % (1 << 30)

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
        tag = self._tag()
        k = 1
        while k < self.size:
            self._send_frame((self.rank + k) % self.size, tag, KIND_BYTES, b"")
            self._recv_frame((self.rank - k) % self.size, tag)
            k <<= 1

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
        """Leave the job: close every connection and listener, which ends the threads that
        serve them. A warm Lambda process runs job after job, so nothing may linger."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            sockets = [self._listener, self._punch_listener, self._control, *self._sockets]
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> TcpComm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def Abort(self, errorcode: int = 1) -> None:  # noqa: N802
        """End this process at once; peers see its connections close and raise CommError."""
        self._closed = True
        for link in list(self._links.values()):
            link.sock.close()
        self._control.close()
        os._exit(errorcode)


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
