"""Transport: everything about connections between the ranks of a job, below the mpi4py API.

Ranks meet at the rendezvous server, get the job's address table, then open connections
only to the peers they talk to, on first use: ``punch`` (TCP hole punching: both ranks
connect from the port they reached the server from, to the address the server saw the
other come from, and also listen there), ``direct`` (connect to the peer's listener) or
``relay`` (a pipe through the server); ``auto`` tries punch, then direct, then relay. Every
connection is authenticated before anything is read from it, and every frame on it is
sealed (``wire``: AES-GCM, keys per connection and direction).

Messages are matched as MPI matches them: a frame carries its communicator context and tag;
messages from one source on one context are matched in the order they were sent, posted
receives in the order they were posted, at the moment a message arrives or a receive is
posted. A synchronous send completes when the receiver has matched it (an ack frame comes
back).

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
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lambda_shim.constants import ANY_SOURCE, ANY_TAG
from lambda_shim.errors import CommError
from lambda_shim.wire import (
    HANDSHAKE_TIMEOUT_S,
    KIND_ACK,
    KIND_BYTES,
    KIND_CONTROL,
    KIND_HEARTBEAT,
    KIND_OBJECT,
    KIND_TABLE,
    MAX_CONTROL,
    SERVER,
    SMALL,
    SYNC,
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


@dataclass
class Envelope:
    """What a probe or a completed receive reports about a message."""

    source: int  # world rank
    tag: int
    kind: int  # KIND_OBJECT or KIND_BYTES
    nbytes: int  # payload length


class Op:
    """A pending send or receive."""

    def __init__(self) -> None:
        self.done = False
        self.cancelled = False
        self.error: CommError | None = None  # set when it can never complete


class SendOp(Op):
    def __init__(self, dest: int, ctx: int, tag: int) -> None:
        super().__init__()
        self.dest, self.ctx, self.tag = dest, ctx, tag


class RecvOp(Op):
    def __init__(self, source: int, ctx: int, tag: int) -> None:
        super().__init__()
        self.source, self.ctx, self.tag = source, ctx, tag
        self.envelope: Envelope | None = None
        self.payload: bytearray | None = None

    def matches(self, source: int, ctx: int, tag: int) -> bool:
        return ctx == self.ctx and self.source in (ANY_SOURCE, source) and self.tag in (ANY_TAG, tag)


@dataclass
class _Message:
    """An arrived message no receive has matched yet. ``ack`` is called when one does (a
    synchronous send waits for it)."""

    source: int
    ctx: int
    tag: int
    kind: int
    payload: bytearray
    ack: Callable[[], None] | None = None

    def envelope(self) -> Envelope:
        return Envelope(self.source, self.tag, self.kind, len(self.payload))


class Transport:
    """Connections, frames, liveness and message matching for one rank (see the module
    docstring). Addresses are world ranks; every method is thread-safe."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.rank = config.rank
        self.size = config.size
        self._cond = threading.Condition()  # guards the queues, the ops and the link tables
        self._unexpected: collections.deque[_Message] = collections.deque()  # in arrival order
        self._posted: list[RecvOp] = []  # receives not yet matched, in posting order
        self._unacked: dict[tuple[int, int, int], collections.deque[SendOp]] = collections.defaultdict(
            collections.deque
        )  # (dest, ctx, tag) -> sync sends waiting for their ack, oldest first
        self._links: dict[int, _Link] = {}
        self._all_links: list[_Link] = []  # every adopted link, for heartbeats and to close on leaving
        self._open_links: collections.Counter = collections.Counter()
        self._connecting: dict[int, threading.Lock] = collections.defaultdict(threading.Lock)
        self._dead: dict[int, str] = {}
        self._modes: dict[int, str] = {}  # peer -> how the link we send on was made
        self._server_lost: str | None = None
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
            threading.Thread(target=self._control_loop, daemon=True, name="transport-control").start()
            threading.Thread(target=self._heartbeat_loop, daemon=True, name="transport-heartbeat").start()
        except RuntimeError:  # can't start new thread
            self.close()
            raise CommError(f"rank {self.rank}: cannot start this rank's threads (out of threads)") from None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Transport:
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
            kind, _, _, _, payload = read_frame(link.sock, link.session, max(MAX_CONTROL, table_bytes(self.size)))
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
                kind, _, _, _, payload = read_frame(link.sock, link.session, MAX_CONTROL)
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
            kind, _, _, _, payload = read_frame(server.sock, server.session, MAX_CONTROL)
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
                kind, source, ctx, tag, payload = read_frame(link.sock, link.session, on_record=link.touch)
                link.touch()
                if kind == KIND_HEARTBEAT:
                    continue
                if source != link.peer or kind & ~SYNC not in (KIND_OBJECT, KIND_BYTES, KIND_ACK):
                    raise AuthError(f"a malformed frame from rank {link.peer}")
                if kind == KIND_ACK:
                    self._acked(link.peer, ctx, tag)
                    continue
                ack = (lambda c=ctx, t=tag: self._send_on(link, KIND_ACK, t, b"", c)) if kind & SYNC else None
                self._deliver(_Message(link.peer, ctx, tag, kind & ~SYNC, payload, ack))
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

    # ---------------------------------------------------------------- messages
    def isend(
        self, dest: int, ctx: int, tag: int, kind: int, payload: bytes | memoryview, sync: bool = False
    ) -> SendOp:
        """Send one message to world rank ``dest``. A standard send is done once the payload
        is handed to the connection; ``sync`` is done once the receiver has matched it."""
        if not 0 <= dest < self.size:
            raise ValueError(f"dest {dest} is not a rank of a {self.size}-rank job")
        op = SendOp(dest, ctx, tag)
        if dest == self.rank:
            ack = (lambda: self._complete(op)) if sync else None
            self._deliver(_Message(dest, ctx, tag, kind, bytearray(payload), ack))
            if not sync:
                op.done = True
            return op
        if dest in self._dead:
            raise CommError(f"rank {self.rank}: peer rank {dest} is gone: {self._dead[dest]}")
        link = self._link(dest)
        if sync:
            with self._cond:
                self._unacked[(dest, ctx, tag)].append(op)
        self._send_on(link, kind | SYNC if sync else kind, tag, payload, ctx)
        if not sync:
            op.done = True
        return op

    def irecv(self, source: int, ctx: int, tag: int) -> RecvOp:
        """Post a receive from world rank ``source`` (or ANY_SOURCE) with ``tag`` (or
        ANY_TAG): it takes the oldest matching message that has arrived, or else the first
        matching one to arrive after every receive posted before it."""
        op = RecvOp(source, ctx, tag)
        with self._cond:
            for i, message in enumerate(self._unexpected):
                if op.matches(message.source, message.ctx, message.tag):
                    del self._unexpected[i]
                    self._fill(op, message)
                    break
            else:
                self._posted.append(op)
                return op
        if message.ack is not None:
            message.ack()
        return op

    def iprobe(self, source: int, ctx: int, tag: int) -> Envelope | None:
        """The envelope of the message a receive posted now would match, if one has arrived."""
        probe = RecvOp(source, ctx, tag)
        with self._cond:
            for message in self._unexpected:
                if probe.matches(message.source, message.ctx, message.tag):
                    return message.envelope()
        return None

    def probe(self, source: int, ctx: int, tag: int, deadline: float | None = None) -> Envelope:
        """Wait until ``iprobe`` would report a message, and report it."""
        deadline, seconds = self._limit(deadline)
        probe = RecvOp(source, ctx, tag)
        with self._cond:
            while True:
                envelope = self.iprobe(source, ctx, tag)
                if envelope is not None:
                    return envelope
                self._check(probe)
                self._check_time(probe, deadline, seconds)
                self._cond.wait(self._nap(deadline))

    def cancel(self, op: Op) -> bool:
        """Cancel a receive no message has matched yet (True); anything else is left as is."""
        with self._cond:
            if isinstance(op, RecvOp) and not op.done and op in self._posted:
                self._posted.remove(op)
                op.cancelled = op.done = True
                self._cond.notify_all()
                return True
        return False

    def test(self, op: Op) -> bool:
        """Whether ``op`` is done; raises its error if it can never be."""
        with self._cond:
            if not op.done:
                self._check(op)
            return op.done

    def wait(self, ops: list[Op], deadline: float | None = None, need: int | None = None) -> None:
        """Until at least ``need`` of ``ops`` (default: all) are done; CommError if one of the
        ops it waits for can never complete, or at the deadline (default: the op timeout)."""
        need = len(ops) if need is None else need
        deadline, seconds = self._limit(deadline)
        with self._cond:
            while sum(op.done for op in ops) < need:
                pending = [op for op in ops if not op.done]
                for op in pending:
                    self._check(op)
                self._check_time(pending[0], deadline, seconds)
                self._cond.wait(self._nap(deadline))

    def _limit(self, deadline: float | None) -> tuple[float | None, float | None]:
        """(deadline, its length in seconds): the one given, or the op timeout from now."""
        if deadline is not None:
            return deadline, round(deadline - time.monotonic(), 3)
        if self.config.op_timeout is not None:
            return time.monotonic() + self.config.op_timeout, self.config.op_timeout
        return None, None

    @staticmethod
    def _nap(deadline: float | None) -> float:
        return 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))

    def _check(self, op: Op) -> None:
        """Raise (and record on ``op``) why it can never complete, if it cannot (holding ``_cond``)."""
        if op.error is None:
            op.error = self._why_not(op)
        if op.error is not None:
            raise op.error

    def _check_time(self, op: Op, deadline: float | None, seconds: float | None) -> None:
        """A wait that reached its deadline fails (the op itself stays pending)."""
        if deadline is not None and time.monotonic() >= deadline:
            what = "no ack" if isinstance(op, SendOp) else "no message"
            peer = op.dest if isinstance(op, SendOp) else op.source
            raise CommError(f"rank {self.rank}: {what} from rank {peer} (tag {op.tag}) within {seconds} s")

    def _why_not(self, op: Op) -> CommError | None:
        peer = op.dest if isinstance(op, SendOp) else op.source
        gone = self._dead if peer == ANY_SOURCE else {peer: self._dead[peer]} if peer in self._dead else {}
        if gone:
            peer, why = next(iter(gone.items()))
            return CommError(f"rank {self.rank}: peer rank {peer} is gone while we wait for it: {why}")
        if self._server_lost:
            # Only the server would tell us that a peer we have no connection to is gone.
            waited = range(self.size) if peer == ANY_SOURCE else [peer]
            unlinked = [r for r in waited if r != self.rank and r not in self._links]
            if unlinked:
                return CommError(
                    f"rank {self.rank}: waiting for rank {unlinked[0]}, which has no connection to this rank, "
                    f"and {self._server_lost}"
                )
        return None

    def _deliver(self, message: _Message) -> None:
        """An arrived message goes to the first posted receive it matches, or waits for one."""
        with self._cond:
            op = next((op for op in self._posted if op.matches(message.source, message.ctx, message.tag)), None)
            if op is None:
                self._unexpected.append(message)
            else:
                self._posted.remove(op)
                self._fill(op, message)
            self._cond.notify_all()  # a completed receive, or news for a probe
        if op is not None and message.ack is not None:
            message.ack()

    @staticmethod
    def _fill(op: RecvOp, message: _Message) -> None:
        """Complete a receive with its message (holding ``_cond``; the caller acks it after)."""
        op.envelope = message.envelope()
        op.payload = message.payload
        op.done = True

    def _complete(self, op: Op) -> None:
        with self._cond:
            op.done = True
            self._cond.notify_all()

    def _acked(self, peer: int, ctx: int, tag: int) -> None:
        with self._cond:
            waiting = self._unacked.get((peer, ctx, tag))
            if not waiting:
                raise AuthError(f"an ack from rank {peer} for no synchronous send")
            waiting.popleft().done = True
            self._cond.notify_all()

    # ---------------------------------------------------------------- sending
    def _send_on(self, link: _Link, kind: int, tag: int, payload: bytes | memoryview, ctx: int = 0) -> None:
        """Send one frame by the operation deadline, if any; a send that fails or stalls
        leaves the stream mid-frame, so the link is declared dead."""
        deadline = None if self.config.op_timeout is None else time.monotonic() + self.config.op_timeout
        who = "the rendezvous server" if link.peer == SERVER else f"rank {link.peer}"
        try:
            with link.lock:
                records = link.session.seal_frame(kind, self.rank, tag, payload, ctx)
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

    # ---------------------------------------------------------------- leaving
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

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def abort(self, errorcode: int = 1) -> None:
        """End this process at once; peers see its connections close and raise CommError."""
        self._closed = True
        for link in list(self._all_links):
            link.sock.close()
        self._control.sock.close()
        os._exit(errorcode)
