"""TcpComm: the DESIGN.md subset of mpi4py's ``Comm`` over plain TCP, for ranks that have no
MPI launcher (Lambda functions, or processes started by ``lambda_shim.launch``).

Ranks meet at the rendezvous server, get the job's address table, then open connections
only to the peers they talk to, on first use: ``punch`` (TCP hole punching: both ranks
connect from the port they reached the server from, to the address the server saw the
other come from, and also listen there), ``direct`` (connect to the peer's listener) or
``relay`` (a pipe through the server); ``auto`` tries punch, then direct, then relay. Every
connection is authenticated before anything is read from it, and every frame on it is
sealed (``wire``: AES-GCM, keys per connection and direction). Collectives are binomial
trees (bcast, reduce, gather, scatter, the buffer forms, and the barrier as a reduce and a
bcast): O(log N) rounds for N ranks, over links only along the tree.

Nothing blocks forever. Connecting has a deadline (the server is retried with backoff until
it). Every link, the server's included, carries heartbeats: a peer that sends nothing for
the liveness deadline (``CAI_HPC_LIVENESS``, 60 s by default; a stopped or frozen process,
a vanished machine) is declared dead, while a slow peer that is alive is not. A send that
makes no progress for that long fails, and an optional per-operation timeout bounds every
wait and send. A dead peer makes every rank waiting on it raise ``CommError`` naming it
(its connection ends, or the server reports it gone); losing the server while a wait
depends on it (a peer this rank has no connection to) is a ``CommError`` too.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import random
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lambda_shim.constants import ANY_SOURCE, ANY_TAG, IN_PLACE, PROC_NULL, SUM, Status, buffer_array
from lambda_shim.errors import CommError
from lambda_shim.wire import (
    HANDSHAKE_TIMEOUT_S,
    KIND_BYTES,
    KIND_CONTROL,
    KIND_HEARTBEAT,
    KIND_OBJECT,
    KIND_TABLE,
    MAX_CONTROL,
    SERVER,
    SMALL,
    AuthError,
    RefusedError,
    Session,
    decode_control,
    encode_control,
    handshake_accept,
    handshake_connect,
    load_secret,
    read_frame,
    send_frame,
    table_bytes,
    unpack_table,
    valid_job_id,
)

MODES = ("auto", "punch", "direct", "relay")
GONE_GRACE_S = 2.0  # a rank reported gone may still have a connection being set up
DEFAULT_LIVENESS_S = 60.0
MAX_HANDSHAKES = 32  # handshakes in flight on this rank's listeners; more are turned away
MAX_WORLD = 100_000
_PART = struct.Struct("!iq")


def _writable(sock: socket.socket) -> bool:
    """Whether a send would not block now (poll: select() fails on descriptors past 1023)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


@dataclass
class ShimConfig:
    rank: int
    size: int
    job_id: str
    key: bytes = field(repr=False)  # never in a log line or traceback
    server: tuple[str, int]
    mode: str = "auto"
    connect_timeout: float = 120.0
    op_timeout: float | None = None
    liveness: float = DEFAULT_LIVENESS_S

    def __post_init__(self) -> None:
        def finite(value: object, low: float) -> bool:
            return type(value) in (int, float) and math.isfinite(value) and value >= low

        problems = []
        size_ok = type(self.size) is int and 1 <= self.size <= MAX_WORLD
        if not size_ok:
            problems.append(f"world size {self.size!r} (1..{MAX_WORLD})")
        if type(self.rank) is not int or not (size_ok and 0 <= self.rank < self.size):
            problems.append(f"rank {self.rank!r} (0..world size - 1)")
        if not valid_job_id(self.job_id):
            problems.append("job id (1-64 letters, digits, '.', '_' or '-')")
        if self.mode not in MODES:
            problems.append(f"connect mode {self.mode!r} ({', '.join(MODES)})")
        if not finite(self.connect_timeout, 0.0):
            problems.append(f"connect timeout {self.connect_timeout!r}")
        if self.op_timeout is not None and not finite(self.op_timeout, 0.001):
            problems.append(f"operation timeout {self.op_timeout!r}")
        if not finite(self.liveness, 0.05):
            problems.append(f"liveness deadline {self.liveness!r}")
        if problems:
            raise CommError(f"tcp backend: bad {'; bad '.join(problems)}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ShimConfig:
        """From the launcher's environment: RANK, WORLD_SIZE, CAI_HPC_RENDEZVOUS (host:port),
        CAI_HPC_JOB_ID, CAI_HPC_TOKEN_FILE or CAI_HPC_TOKEN (the job key), CAI_HPC_CONNECT,
        CAI_HPC_CONNECT_TIMEOUT, CAI_HPC_OP_TIMEOUT, CAI_HPC_LIVENESS (seconds)."""
        env = os.environ if environ is None else environ
        missing = [v for v in ("RANK", "WORLD_SIZE", "CAI_HPC_RENDEZVOUS", "CAI_HPC_JOB_ID") if not env.get(v)]
        if missing:
            raise CommError(
                f"tcp backend: {', '.join(missing)} not set (start ranks with python -m lambda_shim.launch)"
            )
        try:
            key = load_secret(env)
        except AuthError as exc:
            raise CommError(f"tcp backend: {exc}") from None
        op_timeout = env.get("CAI_HPC_OP_TIMEOUT")
        return cls(
            rank=_env_number(env, "RANK", int),
            size=_env_number(env, "WORLD_SIZE", int),
            job_id=env["CAI_HPC_JOB_ID"],
            key=key,
            server=parse_address(env["CAI_HPC_RENDEZVOUS"]),
            mode=env.get("CAI_HPC_CONNECT", "auto"),
            connect_timeout=_env_number(env, "CAI_HPC_CONNECT_TIMEOUT", float, 120.0),
            op_timeout=_env_number(env, "CAI_HPC_OP_TIMEOUT", float) if op_timeout else None,
            liveness=_env_number(env, "CAI_HPC_LIVENESS", float, DEFAULT_LIVENESS_S),
        )


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` as (host, port); CommError if it is not one."""
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommError(f"tcp backend: the rendezvous address must be host:port, got {text!r}")
    return host, int(port)


def _env_number(env, name: str, kind: type, default: float | None = None):
    text = env.get(name)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        raise CommError(f"tcp backend: {name}={text!r} is not a number") from None


class _Link:
    """One authenticated connection (to a peer, or to the server): sends are serialised by
    a lock, which also keeps the send side of its session in frame order."""

    def __init__(self, sock: socket.socket, peer: int, session: Session) -> None:
        self.sock = sock
        self.peer = peer
        self.session = session
        self.lock = threading.Lock()
        self.last_recv = self.last_send = time.monotonic()
        self.why_dead: str | None = None  # set by whoever declares it dead, before closing it

    def touch(self) -> None:
        self.last_recv = time.monotonic()


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
    # A peer whose machine vanishes without closing is noticed by the kernel too.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 2)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _send_deadline(sock: socket.socket, seconds: float) -> None:
    """A blocking send that moves no byte for ``seconds`` fails (the peer stopped reading)."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


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
        self._all_links: list[_Link] = []  # every adopted link, for heartbeats and to close on leaving
        self._open_links: collections.Counter = collections.Counter()
        self._connecting: dict[int, threading.Lock] = collections.defaultdict(threading.Lock)
        self._dead: dict[int, str] = {}
        self._modes: dict[int, str] = {}  # peer -> how the link we send on was made
        self._server_lost: str | None = None
        self._seq = 0
        self._closed = False
        self._stop = threading.Event()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
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
        try:
            for listener, punched in ((self._listener, False), (self._punch_listener, True)):
                threading.Thread(target=self._accept_loop, args=(listener, punched), daemon=True).start()
            threading.Thread(target=self._control_loop, daemon=True, name="tcpcomm-control").start()
            threading.Thread(target=self._heartbeat_loop, daemon=True, name="tcpcomm-heartbeat").start()
        except RuntimeError:  # can't start new thread
            self.close()
            raise CommError(f"rank {self.rank}: cannot start this rank's threads (out of threads)") from None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> TcpComm:
        return cls(ShimConfig.from_env(environ))

    # ---------------------------------------------------------------- wiring up
    def _server_connection(self, local_port: int = 0) -> _Link:
        """An authenticated connection to the server, retried with backoff until the connect
        deadline; the error says what happened (refused, timed out, busy, wrong key)."""
        host, port = self.config.server
        deadline = time.monotonic() + self.config.connect_timeout
        delay, last = 0.05, "no attempt"
        while True:
            sock = _reusable_socket(self._bind_host, local_port) if local_port else socket.socket()
            try:
                sock.settimeout(max(0.05, min(HANDSHAKE_TIMEOUT_S, deadline - time.monotonic())))
                sock.connect(self.config.server)
                _tune(sock)
                attempt = min(deadline, time.monotonic() + HANDSHAKE_TIMEOUT_S)
                session = handshake_connect(sock, self.config.key, self.config.job_id, self.rank, SERVER, attempt)
                sock.settimeout(None)
                return _Link(sock, SERVER, session)
            except RefusedError:
                sock.close()
                raise CommError(
                    f"rank {self.rank}: the rendezvous server {host}:{port} refused our key for job "
                    f"{self.config.job_id} (wrong token?)"
                ) from None
            except AuthError as exc:
                sock.close()
                raise CommError(f"rank {self.rank}: {host}:{port} is not our rendezvous server: {exc}") from None
            except ConnectionRefusedError:
                last = "connection refused"
            except TimeoutError:
                last = "timed out"
            except EOFError:
                last = "it closed the connection before the handshake (busy)"
            except OSError as exc:
                last = exc.strerror or str(exc)
            sock.close()
            if time.monotonic() + delay > deadline:
                raise CommError(
                    f"rank {self.rank}: rendezvous server {host}:{port} unreachable within "
                    f"{self.config.connect_timeout:g} s: {last}"
                )
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(2 * delay, 2.0)

    def _register(self) -> _Link:
        link = self._server_connection(local_port=self._punch_port)
        try:
            send_frame(
                link.sock,
                link.session,
                KIND_CONTROL,
                self.rank,
                0,
                encode_control(
                    {
                        "op": "register",
                        "size": self.size,
                        "host": link.sock.getsockname()[0],
                        "port": self._listener.getsockname()[1],
                        "wait_s": self.config.connect_timeout,
                        "liveness_s": self.config.liveness,
                    }
                ),
            )
            link.sock.settimeout(self.config.connect_timeout + 10)
            kind, _, _, payload = read_frame(link.sock, link.session, max(MAX_CONTROL, table_bytes(self.size)))
            if kind == KIND_CONTROL:
                raise CommError(f"rank {self.rank}: rendezvous: {decode_control(payload).get('message')}")
            if kind != KIND_TABLE:
                raise AuthError(f"a frame of kind {kind} instead of the address table")
            table = unpack_table(payload, self.size)
        except (OSError, EOFError, AuthError) as exc:
            link.sock.close()
            raise CommError(f"rank {self.rank}: no address table from the rendezvous server: {exc}") from None
        except CommError:
            link.sock.close()
            raise
        self._table = {r: [listener] for r, (listener, _) in enumerate(table)}
        # Where the server saw each rank come from: the outside of its NAT, for punching.
        self._observed = {r: observed for r, (_, observed) in enumerate(table)}
        self._observed_rank = {a: r for r, a in self._observed.items()}
        link.sock.settimeout(None)
        _send_deadline(link.sock, self._send_stall_s())
        link.touch()
        return link

    def _send_stall_s(self) -> float:
        op = self.config.op_timeout
        return self.config.liveness if op is None else min(self.config.liveness, op)

    def _send_control(self, message: dict) -> None:
        self._send_on(self._control, KIND_CONTROL, 0, encode_control(message))

    def _control_loop(self) -> None:
        """Relay requests, punch requests and departures from the server, until it is lost."""
        link = self._control
        try:
            while True:
                kind, _, _, payload = read_frame(link.sock, link.session, MAX_CONTROL)
                link.touch()
                if kind == KIND_HEARTBEAT:
                    continue
                if kind != KIND_CONTROL:
                    raise AuthError(f"a frame of kind {kind} from the server")
                message = decode_control(payload)
                op = message.get("op")
                if op == "relay-request":
                    peer = self._rank_in(message, "peer")
                    threading.Thread(target=self._join_relay, args=(peer,), daemon=True).start()
                elif op == "punch-request":
                    peer = self._rank_in(message, "peer")
                    deadline = time.monotonic() + self.config.connect_timeout
                    threading.Thread(target=self._quiet_punch_back, args=(peer, deadline), daemon=True).start()
                elif op == "gone":
                    ranks = [r for r in message.get("ranks", []) if type(r) is int and 0 <= r < self.size]
                    threading.Timer(GONE_GRACE_S, self._peers_gone, args=(ranks,)).start()
        except Exception as exc:  # noqa: BLE001 - whatever ends this loop, the server is lost: waiters must know
            why = link.why_dead or (
                str(exc) if isinstance(exc, AuthError) else f"connection ended ({type(exc).__name__})"
            )
            self._declare_dead(link, why)
            with self._cond:
                if not self._closed:
                    self._server_lost = f"the rendezvous server is lost: {why}"
                self._cond.notify_all()

    def _rank_in(self, message: dict, key: str) -> int:
        value = message.get(key)
        if type(value) is not int or not 0 <= value < self.size or value == self.rank:
            raise AuthError(f"the server named no peer rank: {key}")
        return value

    def _peers_gone(self, peers: list[int]) -> None:
        """The server saw ``peers`` leave. A connection with one, if any, says more (its queued
        messages still arrive); without one, nothing from it can ever come."""
        with self._cond:
            for peer in peers:
                if peer not in self._links:
                    self._dead.setdefault(peer, "it left the job without connecting to this rank")
            self._cond.notify_all()

    def _heartbeat_loop(self) -> None:
        """Say "still here" on every quiet link, and declare dead every link (the server's
        included) that said nothing for the liveness deadline."""
        liveness = self.config.liveness
        every = liveness / 4
        while not self._stop.wait(every / 2):
            now = time.monotonic()
            for link in [self._control, *self._all_links]:
                if link.why_dead:
                    continue
                if now - link.last_recv > liveness:
                    who = "the rendezvous server" if link.peer == SERVER else f"rank {link.peer}"
                    self._declare_dead(link, f"nothing from {who} for {liveness:g} s (stopped, frozen or cut off)")
                elif now - link.last_send >= every:
                    self._heartbeat(link)

    def _heartbeat(self, link: _Link) -> None:
        """Only when the link is idle and its socket has room: a heartbeat never waits."""
        if not link.lock.acquire(blocking=False):
            return  # a send is under way: it is what the peer hears from us
        try:
            if _writable(link.sock):
                send_frame(link.sock, link.session, KIND_HEARTBEAT, self.rank, 0)
                link.last_send = time.monotonic()
        except (OSError, ValueError) as exc:
            self._declare_dead(link, f"a heartbeat could not be sent: {exc}")
        finally:
            link.lock.release()

    def _declare_dead(self, link: _Link, why: str) -> None:
        """Record why, then shut the socket down: its reader wakes up and reports the peer."""
        if link.why_dead is None:
            link.why_dead = why
        try:
            link.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _accept_loop(self, listener: socket.socket, punched: bool) -> None:
        """Accept until closed: errors (out of file descriptors, out of threads) cost the
        connection at hand, never the loop; at most ``MAX_HANDSHAKES`` run at once."""
        while not self._closed:
            try:
                sock, addr = listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)
                continue
            if not self._handshakes.acquire(blocking=False):
                sock.close()  # too many handshakes under way: the peer retries
                continue
            try:
                threading.Thread(target=self._accept_one, args=(sock, addr, punched), daemon=True).start()
            except RuntimeError:  # can't start a new thread
                self._handshakes.release()
                sock.close()
                time.sleep(0.05)

    def _accept_one(self, sock: socket.socket, addr: tuple, punched: bool) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S  # for the whole exchange, however slow the bytes
        try:
            _tune(sock)
            if punched:
                peer = self._observed_rank.get(tuple(addr[:2]))
                if peer is None:
                    raise AuthError(f"{addr} is no rank's punched address")
                link = self._paired_handshake(sock, peer, deadline)
            else:
                job, peer, session = handshake_accept(sock, self.config.key, self.rank, deadline)
                if job != self.config.job_id or not 0 <= peer < self.size or peer == self.rank:
                    raise AuthError("not a peer of this job")
                link = _Link(sock, peer, session)
        except (AuthError, OSError, EOFError, CommError):
            sock.close()  # never read anything else from an unauthenticated connection
            return
        finally:
            self._handshakes.release()
        try:
            self._adopt(link)
        except CommError:
            pass  # out of threads: the link is shut, the peer sees it end

    def _paired_handshake(self, sock: socket.socket, peer: int, deadline: float | None = None) -> _Link:
        """Authenticate a connection whose two ends both think they opened it (a relay pipe,
        a punched or simultaneously opened connection): the lower rank plays the acceptor."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S if deadline is None else deadline
        if self.rank < peer:
            job, initiator, session = handshake_accept(sock, self.config.key, self.rank, deadline)
            if job != self.config.job_id or initiator != peer:
                raise AuthError(f"expected rank {peer} of this job on this connection")
        else:
            session = handshake_connect(sock, self.config.key, self.config.job_id, self.rank, peer, deadline)
        return _Link(sock, peer, session)

    def _punch_link(self, peer: int, deadline: float) -> _Link | None:
        """Connect from our punched port to the peer's, asking it (through the server) to do
        the same towards us; the first connection that authenticates wins. None when the
        peer's own attempt won (it is then in ``self._links``)."""
        self._send_control({"op": "punch", "peer": peer})
        return self._punch_back(peer, deadline)

    def _quiet_punch_back(self, peer: int, deadline: float) -> None:
        try:
            self._punch_back(peer, deadline)
        except CommError:
            pass  # the requesting rank gets the error through its own deadline

    def _punch_back(self, peer: int, deadline: float) -> _Link | None:
        last: Exception | None = None
        while time.monotonic() < deadline and peer not in self._links and not self._closed:
            sock = _reusable_socket(self._bind_host, self._punch_port)
            sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
            try:
                sock.connect(self._observed[peer])
                _tune(sock)
                link = self._paired_handshake(sock, peer, min(deadline, time.monotonic() + HANDSHAKE_TIMEOUT_S))
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
        server = self._server_connection()
        try:
            send_frame(
                server.sock,
                server.session,
                KIND_CONTROL,
                self.rank,
                0,
                encode_control({"op": "relay", "peer": peer, "wait_s": self.config.connect_timeout}),
            )
            server.sock.settimeout(self.config.connect_timeout + 10)
            kind, _, _, payload = read_frame(server.sock, server.session, MAX_CONTROL)
            reply = decode_control(payload) if kind == KIND_CONTROL else {}
            if reply.get("op") != "relay-ready":
                raise CommError(f"rank {self.rank}: relay to rank {peer}: {reply.get('message', 'refused')}")
            return self._paired_handshake(server.sock, peer)  # end-to-end authentication over the pipe
        except (OSError, EOFError, AuthError) as exc:
            server.sock.close()
            raise CommError(f"rank {self.rank}: relay to rank {peer} failed: {exc}") from None
        except CommError:
            server.sock.close()
            raise

    def _direct_link(self, peer: int, deadline: float) -> _Link:
        last: Exception | None = None
        for addr in self._table[peer]:
            while time.monotonic() < deadline:
                try:
                    sock = socket.create_connection(addr, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                except OSError as exc:
                    last = exc
                    time.sleep(0.05)
                    continue
                try:
                    _tune(sock)
                    attempt = min(deadline, time.monotonic() + HANDSHAKE_TIMEOUT_S)
                    session = handshake_connect(sock, self.config.key, self.config.job_id, self.rank, peer, attempt)
                    return _Link(sock, peer, session)
                except (OSError, EOFError, AuthError) as exc:
                    sock.close()
                    last = exc
                    time.sleep(0.05)
        raise CommError(f"rank {self.rank}: cannot connect to rank {peer} at {self._table[peer]}: {last}")

    def _adopt(self, link: _Link) -> None:
        """Start reading a new link; the first link to a peer is the one we send on. (Two
        ranks may open a link each way; the other side may send on either.)"""
        link.sock.settimeout(None)
        _send_deadline(link.sock, self._send_stall_s())
        link.touch()
        with self._cond:
            if self._closed:  # an accept that raced close(): nobody will read or close it
                link.sock.close()
                return
            if self._links.setdefault(link.peer, link) is link:
                self._modes[link.peer] = self._mode_of(link.sock)
            self._open_links[link.peer] += 1
            self._all_links.append(link)
        try:
            threading.Thread(
                target=self._read_loop, args=(link,), daemon=True, name=f"tcpcomm-read-{link.peer}"
            ).start()
        except RuntimeError:  # out of threads: this link cannot be served
            with self._cond:
                self._open_links[link.peer] -= 1
                if self._links.get(link.peer) is link:
                    del self._links[link.peer]
            self._declare_dead(link, "no thread to read it")
            raise CommError(f"rank {self.rank}: cannot start a thread for the link to rank {link.peer}") from None

    def _mode_of(self, sock: socket.socket) -> str:
        """How a link was made, from its socket: through the server, from or to the punched port, or direct."""
        try:
            if sock.getsockname()[1] == self._punch_port:
                return "punch"
            return "relay" if sock.getpeername()[:2] == self._control.sock.getpeername()[:2] else "direct"
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
        try:
            while True:
                kind, source, tag, payload = read_frame(link.sock, link.session, on_record=link.touch)
                link.touch()
                if kind == KIND_HEARTBEAT:
                    continue
                if source != link.peer or kind not in (KIND_OBJECT, KIND_BYTES):
                    raise AuthError(f"a malformed frame from rank {link.peer}")
                with self._cond:
                    self._inbox.append((link.peer, tag, kind, payload))
                    self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - whatever ends a reader, its peer is dead to every waiter
            if link.why_dead:
                why = link.why_dead
            elif isinstance(exc, (OSError, EOFError)):
                why = f"connection closed ({type(exc).__name__})"
            else:
                why = f"{type(exc).__name__}: {exc}"
            # Nothing more is read from it, or sent. (Shut down, not closed: a sender may be
            # inside a call on it, and a closed descriptor's number could be reused under it.)
            self._declare_dead(link, why)
            with self._cond:
                # Gone only once every link to it has closed: another may still hold its last frames.
                self._open_links[link.peer] -= 1
                if self._open_links[link.peer] == 0:
                    self._dead.setdefault(link.peer, why)
                self._cond.notify_all()

    # ---------------------------------------------------------------- point to point
    def _send_on(self, link: _Link, kind: int, tag: int, payload: bytes | memoryview) -> None:
        """Send one frame by the operation deadline, if any; a send that fails or stalls
        leaves the stream mid-frame, so the link is declared dead."""
        deadline = None if self.config.op_timeout is None else time.monotonic() + self.config.op_timeout
        who = "the rendezvous server" if link.peer == SERVER else f"rank {link.peer}"
        try:
            with link.lock:
                records = link.session.seal_frame(kind, self.rank, tag, payload)
                if len(payload) <= SMALL:
                    link.sock.sendall(b"".join(records))  # one system call for small frames
                else:
                    for record in records:
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError(f"not sent within {self.config.op_timeout:g} s")
                        link.sock.sendall(record)
                link.last_send = time.monotonic()
        except OSError as exc:
            if link.why_dead:  # declared dead while we sent: that is the news
                why = link.why_dead
            elif isinstance(exc, BlockingIOError):
                why = f"it took nothing for {self._send_stall_s():g} s"
            else:
                why = str(exc) if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            self._declare_dead(link, f"a send to it failed: {why}")
            raise CommError(f"rank {self.rank}: sending to {who} failed: {why}") from None

    def _send_frame(self, dest: int, tag: int, kind: int, payload: bytes | memoryview) -> None:
        if not 0 <= dest < self.size:
            raise ValueError(f"dest {dest} is not a rank of a {self.size}-rank communicator")
        if dest == self.rank:
            with self._cond:
                self._inbox.append((dest, tag, kind, bytearray(payload)))
                self._cond.notify_all()
            return
        if dest in self._dead:
            raise CommError(f"rank {self.rank}: peer rank {dest} is gone: {self._dead[dest]}")
        self._send_on(self._link(dest), kind, tag, payload)

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
                self._check_waitable(source)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CommError(
                        f"rank {self.rank}: no message from rank {source} (tag {tag}) within {self.config.op_timeout} s"
                    )
                self._cond.wait(timeout=1.0 if remaining is None else min(1.0, remaining))

    def _check_waitable(self, source: int) -> None:
        """Raise if what we wait for can never come (called holding ``self._cond``)."""
        gone = self._dead if source == ANY_SOURCE else {source: self._dead[source]} if source in self._dead else {}
        if gone:
            peer, why = next(iter(gone.items()))
            raise CommError(f"rank {self.rank}: peer rank {peer} is gone while we wait for it: {why}")
        if self._server_lost:
            # Only the server would tell us that a peer we have no connection to is gone.
            waited = range(self.size) if source == ANY_SOURCE else [source]
            unlinked = [r for r in waited if r != self.rank and r not in self._links]
            if unlinked:
                raise CommError(
                    f"rank {self.rank}: waiting for rank {unlinked[0]}, which has no connection to this rank, "
                    f"and {self._server_lost}"
                )

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        if tag < 0:
            raise ValueError("tags must be >= 0")
        if dest == PROC_NULL:
            return
        self._send_frame(dest, tag, KIND_OBJECT, pickle.dumps(obj, protocol=5))

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Status | None = None) -> Any:
        if source == PROC_NULL:
            if status is not None:
                status.source, status.tag = PROC_NULL, ANY_TAG
            return None
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
        """Leave the job: say so to the server (a clean departure is not reported to the
        others), then close every connection and listener, which ends the threads that serve
        them. A warm Lambda process runs job after job, so nothing may linger."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            sockets = [self._listener, self._punch_listener, self._control.sock, *(k.sock for k in self._all_links)]
        self._stop.set()
        if self._control.lock.acquire(timeout=1.0):
            try:
                send_frame(self._control.sock, self._control.session, KIND_CONTROL, self.rank, 0, b'{"op":"bye"}')
            except OSError:
                pass  # the server is gone already
            finally:
                self._control.lock.release()
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
        for link in list(self._all_links):
            link.sock.close()
        self._control.sock.close()
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
