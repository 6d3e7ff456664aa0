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

One progress engine serves every connection: one epoll set over the links, the server's
connection and the listeners, non-blocking sockets, frames read incrementally (a frame cut
anywhere keeps its state on its link) and sends queued per link. A thread that waits for
an operation runs the engine itself, so a receive completes in the thread that waits for
it, with no handoff. A background thread runs it only when no thread has been inside the
transport for a little while (a compute phase), so incoming data is still drained, peers'
large sends never stall and heartbeats go out; in a tight exchange it never needs waking.
A sender whose socket is full keeps reading while it waits, so two ranks sending large
messages to each other never deadlock.

Nothing blocks forever. Connecting has a deadline (the server is retried with backoff until
it). Every link, the server's included, carries heartbeats: a peer that sends nothing for
the liveness deadline (``CAI_HPC_LIVENESS``, 60 s by default; a stopped or frozen process,
a vanished machine) is declared dead, while a slow peer that is alive is not. A send that
makes no progress for that long fails, and an optional per-operation timeout bounds every
wait. A dead peer makes every wait that depends on it raise ``CommError`` naming it (its
connection ends, or the server reports it gone); losing the server while a wait depends on
it (a peer this rank has no connection to) is a ``CommError`` too.
"""

from __future__ import annotations

import collections
import math
import operator
import os
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lambda_shim.constants import ANY_SOURCE, ANY_TAG
from lambda_shim.errors import CommError
from lambda_shim.objects import counted_size
from lambda_shim.wire import (
    HANDSHAKE_TIMEOUT_S,
    KIND_ACK,
    KIND_BYTES,
    KIND_CONTROL,
    KIND_HEARTBEAT,
    KIND_OBJECT,
    KIND_OBJECT_BYTEARRAY,
    KIND_OBJECT_BYTES,
    KIND_TABLE,
    MAX_CONTROL,
    MAX_FRAME,
    SERVER,
    SMALL,
    SYNC,
    AuthError,
    Frame,
    FrameReader,
    RecordBuffers,
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
    table_entry,
    valid_job_id,
)

MODES = ("auto", "punch", "direct", "relay")
GONE_GRACE_S = 2.0  # a rank reported gone may still have a connection being set up
DEFAULT_LIVENESS_S = 60.0
MAX_HANDSHAKES = 32  # handshakes in flight on this rank's listeners; more are turned away
SEAL_BUFFERS = 4  # idle 1 MiB seal buffers a rank keeps for its next big frames (any links)
MAX_WORLD = 100_000
REFUSED_S = 2.0  # a peer's listener that refuses connections this long has left
QUIET_S = 0.002  # the background thread runs progress once no thread was inside for this long
# How long a waiting rank polls its sockets before it sleeps in epoll: a sleeping vCPU takes
# tens of microseconds to wake (on a VM, a halt and an interrupt through the hypervisor), far
# more than a reply on loopback or in a placement group takes to come. Only a process with a
# single rank spins: ranks sharing a process (and its interpreter lock) would only slow each
# other down. CAI_HPC_SPIN_US sets it; 0 never spins.
SPIN_S = float(os.environ.get("CAI_HPC_SPIN_US", "50")) / 1e6
_live = 0  # transports open in this process
_live_lock = threading.Lock()
IN, OUT = select.EPOLLIN, select.EPOLLOUT
MAX_WIRE_TAG = 2**31 - 1  # a frame header's tag is a signed 32-bit integer
MAX_CTX = 2**32 - 1  # and its context an unsigned one
_MESSAGE_KINDS = frozenset((KIND_OBJECT, KIND_OBJECT_BYTES, KIND_OBJECT_BYTEARRAY, KIND_BYTES))  # SYNC may be or-ed in


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


class _Out:
    """A frame queued on a link: its records are sealed as they are taken (in stream order,
    a big payload never held twice); ``op`` is done once the last byte is handed to the kernel."""

    __slots__ = ("op", "pending", "records")

    def __init__(self, records: Iterator[bytes], op: SendOp | None) -> None:
        self.records = records
        self.pending = memoryview(b"")
        self.op = op


def _records(
    session: Session, buffers: RecordBuffers, kind: int, source: int, tag: int, payload, ctx: int
) -> Iterator[bytes]:
    """A frame's records; a small frame as one piece (one system call). A big one is sealed
    into a buffer borrowed from ``buffers`` (each record is sent before the next is sealed),
    given back once its last record has gone to the kernel, or when the link ends and drops
    it (``_Link.flush`` takes the next record only after the previous one has gone)."""
    if len(payload) <= SMALL:
        yield session.seal_small(kind, source, tag, payload, ctx)
    else:
        yield from session.seal_frame(kind, source, tag, payload, ctx, buffers)


class _Link:
    """One authenticated connection (to a peer, or to the server), non-blocking once adopted:
    its frame reader (used by the thread running progress), its queue of frames to send
    (``out_lock`` keeps them whole and in the session's order), and its liveness clocks."""

    def __init__(self, sock: socket.socket, peer: int, session: Session) -> None:
        self.sock = sock
        self.fd = -1  # its descriptor, once in the engine
        self.peer = peer
        self.session = session
        self.reader = FrameReader(session, MAX_CONTROL if peer == SERVER else MAX_FRAME)
        self.out: collections.deque[_Out] = collections.deque()
        self.out_lock = threading.Lock()
        self.writing = False  # registered for EPOLLOUT: output is waiting for room
        self.last_recv = self.last_send = self.moved = time.monotonic()
        self.why_dead: str | None = None  # set once, by whoever ends it
        self.ended = False  # taken out of the engine (under the transport's lock)

    def who(self) -> str:
        return "the rendezvous server" if self.peer == SERVER else f"rank {self.peer}"

    def flush(self) -> bool:
        """Hand queued bytes to the kernel until it takes no more (holding ``out_lock``);
        True when the queue is empty. OSError if the connection failed."""
        while self.out:
            item = self.out[0]
            if not item.pending:
                record = next(item.records, None)
                if record is None:
                    self.out.popleft()
                    if item.op is not None:
                        item.op.done = True
                    continue
                item.pending = memoryview(record)
            try:
                n = self.sock.send(item.pending)
            except BlockingIOError:
                return False
            item.pending = item.pending[n:]
            self.last_send = self.moved = time.monotonic()
        return True


def _reusable_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) that other sockets of this process may share the
    port with: the listener, the server connection and the punched peer connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer whose machine vanishes without closing is noticed by the kernel too.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 2)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


@dataclass
class Envelope:
    """What a probe or a completed receive reports about a message."""

    source: int  # world rank
    tag: int
    kind: int  # KIND_OBJECT, KIND_OBJECT_BYTES, KIND_OBJECT_BYTEARRAY or KIND_BYTES
    nbytes: int  # its size as mpi4py counts it (``objects.counted_size``)


class Op:
    """A pending send or receive. (Its state starts as these class defaults: one op is made
    per message, so its constructor is kept to what differs.)"""

    done = False
    cancelled = False
    error: CommError | None = None  # set when it can never complete


class SendOp(Op):
    def __init__(self, dest: int, ctx: int, tag: int) -> None:
        self.dest, self.ctx, self.tag = dest, ctx, tag


class RecvOp(Op):
    envelope: Envelope | None = None
    payload: bytearray | None = None

    def __init__(self, source: int, ctx: int, tag: int) -> None:
        self.source, self.ctx, self.tag = source, ctx, tag

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
        return Envelope(self.source, self.tag, self.kind, counted_size(self.kind, len(self.payload)))


def _opened(change: int) -> None:
    global _live
    with _live_lock:
        _live += change


class Transport:
    """Connections, frames, liveness and message matching for one rank (see the module
    docstring). Addresses are world ranks; every public method is thread-safe."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.rank = config.rank
        self.size = config.size
        # Guards the queues, the ops and the link tables; taken as the bare lock where nobody
        # waits (a Condition's own ``with`` is Python code, on the path of every message).
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        self._unexpected: collections.deque[_Message] = collections.deque()  # in arrival order
        self._posted: list[RecvOp] = []  # receives not yet matched, in posting order
        self._unacked: dict[tuple[int, int, int], collections.deque[SendOp]] = collections.defaultdict(
            collections.deque
        )  # (dest, ctx, tag) -> sync sends waiting for their ack, oldest first
        self._links: dict[int, _Link] = {}  # peer -> the link we send on
        self._all_links: list[_Link] = []  # every adopted link, for heartbeats and to close on leaving
        self._open_links: collections.Counter = collections.Counter()
        self._connecting: dict[int, threading.Lock] = collections.defaultdict(threading.Lock)
        self._dead: dict[int, str] = {}
        self._modes: dict[int, str] = {}  # peer -> how the link we send on was made
        self._server_lost: str | None = None
        self._closed = False
        self._failed = False  # a CommError reached the caller: the bye says so
        self._failed_sends = 0  # sends that can never complete (waits then look at each op's error)
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._seal_buffers = RecordBuffers(SEAL_BUFFERS)  # shared by the links, lent per big frame
        # The progress engine: one epoll set; whoever holds ``_progress`` reads and flushes.
        self._epoll = select.epoll()
        self._fds: dict[int, object] = {}  # fd -> _Link, a listener, or the wake pipe
        self._progress = threading.Lock()
        self._poller: int | None = None  # the thread inside epoll.poll, if any
        self._inside = 0  # threads in wait() or probe()
        self._entries = 0  # how many times one came in (the background thread watches it)
        self._last_exit = time.monotonic()
        self._rests = False  # the background thread sleeps until a thread leaves ...
        self._resting = threading.Event()  # ... which sets this
        self._orphaned = False  # closed while the background thread still ran: it closes the engine
        self._finished = False  # the background thread has ended
        self._waiting = 0  # threads waiting on ``_cond`` for another's progress
        self._chores_due = 0.0
        self._paused: list[socket.socket] = []  # listeners out of descriptors, until _resume_at
        self._resume_at = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._fds[self._wake_r] = self._wake_r
        self._epoll.register(self._wake_r, IN)
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
            # A warm Lambda process lives on after a failed invocation: leave nothing behind.
            for sock in (self._listener, self._punch_listener):
                sock.close()
            self._close_engine()
            raise
        for listener in (self._listener, self._punch_listener):
            listener.setblocking(False)
            self._fds[listener.fileno()] = listener
            self._epoll.register(listener, IN)
        self._engage(self._control)
        _opened(+1)  # close() counts it out
        self._background = threading.Thread(target=self._run_background, daemon=True, name="transport-progress")
        try:
            self._background.start()
        except RuntimeError:  # can't start new thread
            self._finished = True
            self.close()
            raise CommError(f"rank {self.rank}: cannot start this rank's thread (out of threads)") from None

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
            sock = None
            try:  # making the socket fails too when out of descriptors: one more failed attempt
                sock = _reusable_socket(self._bind_host, local_port) if local_port else socket.socket()
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
            if sock is not None:
                sock.close()
            if self._closed or time.monotonic() + delay > deadline:
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
            if len(payload) != table_bytes(self.size):
                raise AuthError(f"an address table of {len(payload)} bytes for {self.size} ranks")
        except (OSError, EOFError, AuthError) as exc:
            link.sock.close()
            raise CommError(f"rank {self.rank}: no address table from the rendezvous server: {exc}") from None
        except CommError:
            link.sock.close()
            raise
        self._table = bytes(payload)  # entries are decoded when needed (see table_entry)
        self._observed_ranks: dict[tuple[str, int], int] | None = None
        return link

    def _rank_in(self, message: dict, key: str) -> int:
        value = message.get(key)
        if type(value) is not int or not 0 <= value < self.size or value == self.rank:
            raise AuthError(f"the server named no peer rank: {key}")
        return value

    def _peers_gone(self, peers: list[int], when: float) -> None:
        """The server saw ``peers`` leave (a moment ago, by ``when``: a connection with one may
        still be being set up). A connection with one says more (its queued messages still
        arrive); without one, nothing from it can ever come."""
        time.sleep(max(0.0, when - time.monotonic()))
        with self._mutex:
            for peer in peers:
                if peer not in self._links:
                    self._dead.setdefault(peer, "it left the job without connecting to this rank")
            self._cond.notify_all()
        self._kick()

    def _send_control(self, message: dict) -> None:
        self._queue(self._control, KIND_CONTROL, 0, encode_control(message), 0)

    def _engage(self, link: _Link) -> None:
        """Hand a link to the progress engine."""
        link.sock.setblocking(False)
        link.fd = link.sock.fileno()
        link.last_recv = time.monotonic()
        self._fds[link.fd] = link
        self._epoll.register(link.fd, IN)

    def _adopt(self, link: _Link) -> None:
        """A new link joins the engine; the first link to a peer is the one we send on. (Two
        ranks may open a link each way; the other side may send on either.)"""
        with self._mutex:
            if self._closed:  # an accept that raced close(): nobody will read or close it
                link.sock.close()
                return
            if self._links.setdefault(link.peer, link) is link:
                self._modes[link.peer] = self._mode_of(link.sock)
            self._open_links[link.peer] += 1
            self._all_links.append(link)
            self._engage(link)

    def _end_link(self, link: _Link, why: str, clean: bool = False) -> None:
        """Take a link out of the engine for good: nothing more is read from it or sent on it
        (shut down, not closed, so no descriptor number is reused under a thread still using
        it). After a ``clean`` end (the peer closed it between frames) its peer is gone once
        every link to it has ended (another may still hold its last frames). Any other end
        lost frames that nothing can recover: the peer is gone at once and its other links
        are ended too, so that its side learns it as well. When the server's ends, waits that
        depend on the server fail."""
        with self._mutex:
            if link.ended:
                return
            link.ended = True
            link.why_dead = link.why_dead or why
            self._fds.pop(link.fd, None)
            for call in (lambda: self._epoll.unregister(link.fd), lambda: link.sock.shutdown(socket.SHUT_RDWR)):
                try:
                    call()
                except (OSError, ValueError):
                    pass  # closed already
            with link.out_lock:
                failed = CommError(f"rank {self.rank}: sending to {link.who()} failed: {link.why_dead}")
                for item in link.out:
                    if item.op is not None:
                        item.op.error = failed
                        self._failed_sends += 1
                link.out.clear()
            if link.peer == SERVER:
                if not self._closed:
                    self._server_lost = f"the rendezvous server is lost: {link.why_dead}"
            else:
                self._open_links[link.peer] -= 1
                if self._open_links[link.peer] == 0 or not clean:
                    self._dead.setdefault(link.peer, link.why_dead)
                if not clean:
                    for other in self._all_links:
                        if other.peer == link.peer and not other.ended:
                            self._end_link(other, f"another link to it ended: {link.why_dead}")
            self._cond.notify_all()
        self._kick()  # a poller may be waiting for what can no longer come

    def _accept(self, listener: socket.socket) -> None:
        """Take the connections waiting on a listener; each is authenticated in a thread of
        its own, at most ``MAX_HANDSHAKES`` at once (more are turned away: the peer retries).
        Errors (out of file descriptors, out of threads) cost the connection at hand only."""
        punched = listener is self._punch_listener
        while True:
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                return  # none left
            except OSError:  # none to be had now (out of descriptors): the backlog keeps them
                self._epoll.modify(listener, 0)  # a short pause, rather than a busy loop
                self._paused.append(listener)
                self._resume_at = time.monotonic() + 0.05
                return
            if not self._handshakes.acquire(blocking=False):
                sock.close()
                continue
            if not _spawn(self._accept_one, sock, addr, punched):
                self._handshakes.release()
                sock.close()

    def _accept_one(self, sock: socket.socket, addr: tuple, punched: bool) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S  # for the whole exchange, however slow the bytes
        try:
            _tune(sock)
            if punched:
                peer = self._observed_rank(tuple(addr[:2]))
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
        self._adopt(link)

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
            sock = None
            try:  # out of descriptors: a failed attempt, retried until the deadline
                sock = _reusable_socket(self._bind_host, self._punch_port)
                sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                sock.connect(self._observed(peer))
                _tune(sock)
                link = self._paired_handshake(sock, peer, min(deadline, time.monotonic() + HANDSHAKE_TIMEOUT_S))
                self._adopt(link)
                return link
            except (OSError, EOFError, AuthError) as exc:
                if sock is not None:
                    sock.close()
                last = exc
                time.sleep(0.02)
        if peer in self._links:
            return None
        raise CommError(f"rank {self.rank}: could not punch through to rank {peer} at {self._observed(peer)}: {last}")

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
        """Connect to the peer's listener, retrying until the deadline, except when the
        peer is known to be gone, or its listener has refused us for ``REFUSED_S`` (it was
        listening before the table went out: it has left)."""
        addr = table_entry(self._table, peer)[0]
        last: Exception | None = None
        refused_since = None
        while time.monotonic() < deadline and peer not in self._dead and not self._closed:
            try:
                sock = socket.create_connection(addr, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except OSError as exc:
                last = exc
                if isinstance(exc, ConnectionRefusedError):
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since > REFUSED_S:
                        break
                time.sleep(0.05)
                continue
            refused_since = None
            try:
                _tune(sock)
                attempt = min(deadline, time.monotonic() + HANDSHAKE_TIMEOUT_S)
                session = handshake_connect(sock, self.config.key, self.config.job_id, self.rank, peer, attempt)
                return _Link(sock, peer, session)
            except (OSError, EOFError, AuthError) as exc:
                sock.close()
                last = exc
                time.sleep(0.05)
        if peer in self._dead:
            raise CommError(f"rank {self.rank}: peer rank {peer} is gone: {self._dead[peer]}")
        if self._closed:
            raise CommError(f"rank {self.rank}: this rank's transport is closed")
        raise CommError(f"rank {self.rank}: cannot connect to rank {peer} at {addr}: {last}")

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
        with self._mutex:
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
            link = self._links.get(peer)
            if link is None:  # closed while connecting: the new link was turned away
                raise CommError(f"rank {self.rank}: this rank's transport is closed")
            return link

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

    # ---------------------------------------------------------------- the progress engine
    def _poll(self, timeout: float, ready: Callable[[], bool], spin: bool = False) -> None:
        """One round of the engine (holding ``_progress``): chores when due, then wait up to
        ``timeout`` for events (unless ``ready()`` already) and handle them; ``spin``: a caller
        waits for a message, so poll a little before sleeping."""
        if self._closed:
            raise CommError(f"rank {self.rank}: this rank's transport is closed")
        now = time.monotonic()
        if now >= self._chores_due:
            self._chores(now)
        if self._paused and now >= self._resume_at:
            for listener in self._paused:
                self._epoll.modify(listener, IN)
            self._paused.clear()
        self._poller = threading.get_ident()  # before the last look: completions kick us from now on
        try:
            if ready():
                return
            due = min(self._chores_due, self._resume_at) if self._paused else self._chores_due
            wait = max(0.0, min(timeout, due - now))
            events = self._spin(ready, wait) if spin and SPIN_S > 0 and _live == 1 else None
            if not events:
                events = self._epoll.poll(wait)
        finally:
            self._poller = None
        for fd, mask in events:
            target = self._fds.get(fd)
            if isinstance(target, _Link):
                if mask & OUT:
                    self._flush(target)
                if mask & ~OUT:
                    self._read(target)
            elif isinstance(target, socket.socket):
                self._accept(target)
            elif target is not None:
                _drain(self._wake_r)

    def _spin(self, ready: Callable[[], bool], wait: float) -> list[tuple[int, int]]:
        """Poll the sockets without sleeping for up to ``SPIN_S`` (not past ``wait``): the
        events, or none when nothing came (or ``ready()`` became true)."""
        end = time.perf_counter() + min(SPIN_S, wait)
        poll, clock, pass_turn = self._epoll.poll, time.perf_counter, os.sched_yield
        while True:
            events = poll(0)
            if events or ready() or clock() >= end:
                return events
            pass_turn()  # a rank sharing this core (more ranks than cores) runs meanwhile

    def _kick(self) -> None:
        """Wake the thread inside epoll.poll, if any."""
        if self._poller is not None:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass  # full (a kick is pending anyway) or closed

    def _read(self, link: _Link) -> None:
        """Frames that arrived on a link; anything wrong with it ends it."""
        seen = link.reader.records
        try:
            frames = link.reader.feed(link.sock)
            if link.reader.records != seen:
                link.last_recv = time.monotonic()
            handle = self._on_control if link.peer == SERVER else self._on_frame
            for frame in frames:
                handle(link, frame)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a link, its peer is dead to every waiter
            if link.peer == SERVER:
                why = str(exc) if isinstance(exc, AuthError) else f"connection ended ({type(exc).__name__})"
            elif isinstance(exc, (OSError, EOFError)):
                why = f"connection closed ({type(exc).__name__})"
            else:
                why = f"{type(exc).__name__}: {exc}"
            # A peer that leaves closes every link between frames; anything else lost frames.
            clean = isinstance(exc, EOFError) and link.reader.between_frames()
            self._end_link(link, why, clean=clean)

    def _on_frame(self, link: _Link, frame: Frame) -> None:
        kind, source, ctx, tag, payload = frame
        if kind == KIND_HEARTBEAT:
            return
        if kind == KIND_ACK and source == link.peer and not payload:
            self._acked(link.peer, ctx, tag)
            return
        # Any other ack (SYNC or-ed in, a payload) is no message either: a protocol error.
        if source != link.peer or kind & ~SYNC not in _MESSAGE_KINDS:
            raise AuthError(f"a malformed frame from rank {link.peer}")
        ack = (lambda: self._queue(link, KIND_ACK, tag, b"", ctx)) if kind & SYNC else None
        self._deliver(link.peer, ctx, tag, kind & ~SYNC, payload, ack)

    def _on_control(self, link: _Link, frame: Frame) -> None:
        """Relay requests, punch requests and departures from the server."""
        if frame.kind == KIND_HEARTBEAT:
            return
        if frame.kind != KIND_CONTROL:
            raise AuthError(f"a frame of kind {frame.kind} from the server")
        message = decode_control(frame.payload)
        op = message.get("op")
        if op == "relay-request":
            _spawn(self._join_relay, self._rank_in(message, "peer"))
        elif op == "punch-request":
            _spawn(
                self._quiet_punch_back, self._rank_in(message, "peer"), time.monotonic() + self.config.connect_timeout
            )
        elif op == "gone":
            ranks = [r for r in message.get("ranks", []) if type(r) is int and 0 <= r < self.size]
            _spawn(self._peers_gone, ranks, time.monotonic() + GONE_GRACE_S)

    def _chores(self, now: float) -> None:
        """Say "still here" on every quiet link; end every link (the server's included) that
        said nothing for the liveness deadline, or whose queued output moved nothing for the
        send deadline (the peer stopped reading)."""
        liveness = self.config.liveness
        every = liveness / 4
        stall = self._send_stall_s()
        self._chores_due = now + every / 2
        for link in [self._control, *self._all_links]:
            if link.ended:
                continue
            if now - link.last_recv > liveness:
                self._end_link(link, f"nothing from {link.who()} for {liveness:g} s (stopped, frozen or cut off)")
            elif link.out and now - link.moved > stall:
                self._end_link(link, f"a send to it failed: it took nothing for {stall:g} s")
            elif now - link.last_send >= every and not link.out:
                self._queue(link, KIND_HEARTBEAT, 0, b"", 0)

    def _observed(self, peer: int) -> tuple[str, int]:
        """Where the server saw ``peer`` come from: the outside of its NAT, for punching."""
        return table_entry(self._table, peer)[1]

    def _observed_rank(self, addr: tuple[str, int]) -> int | None:
        """The rank the server saw come from ``addr`` (the map is made on the first punched
        connection: only punching needs it)."""
        if self._observed_ranks is None:
            self._observed_ranks = {self._observed(r): r for r in range(self.size)}
        return self._observed_ranks.get(addr)

    def _send_stall_s(self) -> float:
        op = self.config.op_timeout
        return self.config.liveness if op is None else min(self.config.liveness, op)

    def _run_background(self) -> None:
        """Run the engine while no thread is inside the transport (a compute phase): drain
        what arrives, keep sends moving, send heartbeats. While threads come and go it looks
        every ``QUIET_S``; while one stays inside (a long wait runs the engine itself) it
        sleeps until that thread leaves (which wakes it: rare, never in a tight exchange);
        it gives the engine up as soon as a thread comes in."""
        while not self._closed:
            if self._inside or time.monotonic() - self._last_exit < QUIET_S:
                entries = self._entries
                time.sleep(QUIET_S)
                if self._inside and self._entries == entries:
                    self._resting.clear()
                    self._rests = True
                    if self._inside and self._entries == entries:  # looked at after _rests is set
                        self._resting.wait(self.config.liveness)
                    self._rests = False
                continue
            if not self._progress.acquire(blocking=False):
                time.sleep(QUIET_S)
                continue
            try:
                while not self._inside and not self._closed:
                    self._poll(self.config.liveness, lambda: self._inside > 0 or self._closed)
            except Exception as exc:  # noqa: BLE001 - this thread's death would make the rank look dead
                if not self._closed:
                    # Links end on their own errors; this is anything else: say it, and go on.
                    print(f"rank {self.rank}: transport progress: {type(exc).__name__}: {exc}", file=sys.stderr)
                    time.sleep(QUIET_S)
            finally:
                self._release_progress(mine=0)
        with self._mutex:
            self._finished = True
            orphaned = self._orphaned
        if orphaned:  # close() could not wait for this thread: the engine is ours to close
            self._close_engine()

    def _release_progress(self, mine: int = 1) -> None:
        """Give the engine up; threads waiting for it are woken. ``mine``: whether the caller
        counts in ``_inside``. (Any thread about to wait counts there before it looks at the
        lock, and the notice is given under ``_cond``, so none can miss it.)"""
        self._progress.release()
        if self._inside > mine:
            with self._mutex:
                self._cond.notify_all()

    def _block(self, ready: Callable[[], bool], ops: list[Op], deadline, seconds) -> None:
        """Run the engine (or wait while another thread runs it) until ``ready()``; raise
        why not when one of ``ops`` that is not done can never be, or at the deadline."""
        with self._mutex:
            self._inside += 1
            self._entries += 1
        if self._poller is not None:
            self._kick()  # the background thread gives the engine up
        try:
            while not ready():
                if self._dead or self._server_lost or self._closed or self._failed_sends:
                    with self._mutex:
                        for op in ops:
                            if not op.done:
                                self._check(op)
                nap = 1.0
                if deadline is not None:
                    nap = min(nap, deadline - time.monotonic())
                    if nap <= 0:
                        pending = [op for op in ops if not op.done]
                        if not pending:  # completed by another thread since ``ready()``
                            continue
                        raise self._timed_out(pending[0], seconds)
                if self._progress.acquire(blocking=False):
                    try:
                        self._poll(nap, ready, spin=True)
                    finally:
                        self._release_progress()
                    continue
                with self._mutex:
                    if ready() or not self._progress.locked():
                        continue
                    self._waiting += 1
                    try:
                        self._cond.wait(nap)
                    finally:
                        self._waiting -= 1
        except CommError:
            self._failed = True
            raise
        finally:
            with self._mutex:
                self._inside -= 1
                self._last_exit = time.monotonic()
            if self._rests:  # looked at after _inside changed
                self._resting.set()

    # ---------------------------------------------------------------- sending
    def _queue(self, link: _Link, kind: int, tag: int, payload, ctx: int, op: SendOp | None = None) -> bool:
        """Queue one frame on a link and send what the socket takes now; False if the link
        has ended. A small frame with nothing queued before it goes out at once, unqueued."""
        error = None
        with link.out_lock:
            if link.ended:
                return False
            if link.out or len(payload) > SMALL:
                if not link.out:
                    link.moved = time.monotonic()  # the send deadline counts from now
                link.out.append(
                    _Out(_records(link.session, self._seal_buffers, kind, self.rank, tag, payload, ctx), op)
                )
            else:
                data = link.session.seal_small(kind, self.rank, tag, payload, ctx)
                try:
                    sent = link.sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    error = exc
                else:
                    link.last_send = link.moved = time.monotonic()
                    if sent == len(data):
                        if op is not None:
                            op.done = True
                        return True
                if error is None:
                    item = _Out(iter(()), op)
                    item.pending = memoryview(data)[sent:]
                    link.out.append(item)
        if error is not None:
            self._end_link(link, f"a send to it failed: {error.strerror or error}")
            return False
        self._flush(link)
        return True

    def _flush(self, link: _Link) -> None:
        """Send what a link's queue holds as far as its socket takes it now, and watch the
        socket for room while some is left; a failed send ends the link."""
        if not link.out_lock.acquire(blocking=False):
            return  # another thread is sending on it, and will watch for room
        try:
            queued = len(link.out)
            drained = link.flush()
            if drained == link.writing:
                link.writing = not drained
                self._epoll.modify(link.fd, IN | OUT if link.writing else IN)
            finished = queued - len(link.out)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a send ends its link, not the engine
            error = exc
        else:
            error = None
        finally:
            link.out_lock.release()
        if error is not None:
            if link.ended or isinstance(error, FileNotFoundError):
                return  # ended meanwhile (unregistered from the engine): that is the news
            why = error.strerror or error if isinstance(error, OSError) else f"{type(error).__name__}: {error}"
            self._end_link(link, f"a send to it failed: {why}")
        elif finished:
            with self._mutex:
                self._completed()

    # ---------------------------------------------------------------- messages
    def isend(
        self, dest: int, ctx: int, tag: int, kind: int, payload: bytes | memoryview, sync: bool = False
    ) -> SendOp:
        """Send one message to world rank ``dest``. A standard send is done once the payload
        is handed to the connection; ``sync`` is done once the receiver has matched it."""
        self._check_address(dest, ctx, tag, receiving=False)
        if self._closed:
            raise CommError(f"rank {self.rank}: this rank's transport is closed")
        if type(payload) is not bytes:
            payload = memoryview(payload).cast("B")  # lengths in bytes, whatever the items
        op = SendOp(dest, ctx, tag)
        if dest == self.rank:
            # Done before delivery: a receive posted already matches (and acks) it at once.
            op.done = not sync
            ack = (lambda: self._complete(op)) if sync else None
            self._deliver(dest, ctx, tag, kind, bytearray(payload), ack)
            return op
        try:
            link = self._link(dest)
        except CommError:
            self._failed = True
            raise
        if sync:
            with self._mutex:
                self._unacked[(dest, ctx, tag)].append(op)
        if not self._queue(link, kind | SYNC if sync else kind, tag, payload, ctx, None if sync else op):
            self._failed = True
            raise CommError(f"rank {self.rank}: peer rank {dest} is gone: {link.why_dead}")
        return op

    def irecv(self, source: int, ctx: int, tag: int) -> RecvOp:
        """Post a receive from world rank ``source`` (or ANY_SOURCE) with ``tag`` (or
        ANY_TAG): it takes the oldest matching message that has arrived, or else the first
        matching one to arrive after every receive posted before it."""
        self._check_address(source, ctx, tag, receiving=True)
        op = RecvOp(source, ctx, tag)
        with self._mutex:
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

    def take_arrived(self, source: int, ctx: int, tag: int) -> RecvOp | None:
        """A matched probe: the oldest matching message that has arrived, taken out of the queue
        in the same step (no other receive can match it after), as a complete receive; None
        if none has arrived."""
        self._check_address(source, ctx, tag, receiving=True)
        op = RecvOp(source, ctx, tag)
        with self._cond:
            found = next((i for i, m in enumerate(self._unexpected) if op.matches(m.source, m.ctx, m.tag)), None)
            if found is None:
                return None
            message = self._unexpected[found]
            del self._unexpected[found]
            self._fill(op, message)
        if message.ack is not None:
            message.ack()
        return op

    def _check_address(self, peer: int, ctx: int, tag: int, receiving: bool) -> None:
        """ValueError (TypeError for a non-integer) unless a frame header can carry these,
        before anything is queued: a frame that cannot be encoded must never reach a link."""
        peer, ctx, tag = operator.index(peer), operator.index(ctx), operator.index(tag)
        if not (0 <= peer < self.size or (receiving and peer == ANY_SOURCE)):
            raise ValueError(f"rank {peer} is not a rank of a {self.size}-rank job")
        if not 0 <= ctx <= MAX_CTX:
            raise ValueError(f"context {ctx} is outside 0..{MAX_CTX}")
        if not (0 <= tag <= MAX_WIRE_TAG or (receiving and tag == ANY_TAG)):
            raise ValueError(f"tag {tag} is outside 0..{MAX_WIRE_TAG}")

    def iprobe(self, source: int, ctx: int, tag: int) -> Envelope | None:
        """The envelope of the message a receive posted now would match, if one has arrived."""
        probe = RecvOp(source, ctx, tag)
        with self._mutex:
            for message in self._unexpected:
                if probe.matches(message.source, message.ctx, message.tag):
                    return message.envelope()
        return None

    def probe(self, source: int, ctx: int, tag: int, deadline: float | None = None) -> Envelope:
        """Wait until ``iprobe`` would report a message, and report it."""
        found: list[Envelope] = []

        def ready() -> bool:
            envelope = self.iprobe(source, ctx, tag)
            if envelope is not None:
                found.append(envelope)
            return envelope is not None

        self._block(ready, [RecvOp(source, ctx, tag)], *self._limit(deadline))
        return found[-1]

    def cancel(self, op: Op) -> bool:
        """Cancel a receive no message has matched yet (True); anything else is left as is."""
        with self._mutex:
            if isinstance(op, RecvOp) and not op.done and op in self._posted:
                self._posted.remove(op)
                op.cancelled = op.done = True
                self._completed()
                return True
        return False

    def test(self, op: Op) -> bool:
        """Progress once (if no other thread is running the engine), then whether ``op`` is
        done; raises its error if it can never be."""
        if not op.done and self._progress.acquire(blocking=False):
            try:
                self._poll(0.0, lambda: op.done)
            finally:
                self._release_progress(mine=0)
        with self._mutex:
            if not op.done:
                try:
                    self._check(op)
                except CommError:
                    self._failed = True
                    raise
            return op.done

    def wait(self, ops: list[Op], deadline: float | None = None, need: int | None = None) -> None:
        """Until at least ``need`` of ``ops`` (default: all) are done; CommError if one of the
        ops it waits for can never complete, or at the deadline (default: the op timeout)."""
        need = len(ops) if need is None else need
        if len(ops) == 1 and need == 1:  # the common case, kept lean
            [op] = ops
            if not op.done:
                self._block(lambda: op.done, ops, *self._limit(deadline))
            return

        def ready() -> bool:
            return sum(op.done for op in ops) >= need

        if not ready():
            self._block(ready, ops, *self._limit(deadline))

    def _limit(self, deadline: float | None) -> tuple[float | None, float | None]:
        """(deadline, its length in seconds): the one given, or the op timeout from now."""
        if deadline is not None:
            return deadline, round(deadline - time.monotonic(), 3)
        if self.config.op_timeout is not None:
            return time.monotonic() + self.config.op_timeout, self.config.op_timeout
        return None, None

    def _check(self, op: Op) -> None:
        """Raise (and record on ``op``) why it can never complete, if it cannot (holding ``_cond``)."""
        if op.error is None:
            op.error = self._why_not(op)
        if op.error is not None:
            raise op.error

    def _timed_out(self, op: Op, seconds: float | None) -> CommError:
        """Why a wait that reached its deadline fails (the op itself stays pending)."""
        if isinstance(op, SendOp):
            return CommError(f"rank {self.rank}: a send to rank {op.dest} (tag {op.tag}) not done within {seconds} s")
        return CommError(f"rank {self.rank}: no message from rank {op.source} (tag {op.tag}) within {seconds} s")

    def _why_not(self, op: Op) -> CommError | None:
        if self._closed:
            return CommError(f"rank {self.rank}: this rank's transport is closed")
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

    def _deliver(self, source: int, ctx: int, tag: int, kind: int, payload: bytearray, ack=None) -> None:
        """An arrived message goes to the first posted receive it matches, or waits for one;
        ``ack()`` is called when a receive matches it (a synchronous send waits for that)."""
        with self._mutex:
            for i, op in enumerate(self._posted):
                if op.ctx == ctx and op.source in (ANY_SOURCE, source) and op.tag in (ANY_TAG, tag):
                    del self._posted[i]
                    op.envelope = Envelope(source, tag, kind, counted_size(kind, len(payload)))
                    op.payload = payload
                    op.done = True
                    break
            else:
                op = None
                self._unexpected.append(_Message(source, ctx, tag, kind, payload, ack))
            self._completed()  # a completed receive, or news for a probe
        if op is not None and ack is not None:
            ack()

    @staticmethod
    def _fill(op: RecvOp, message: _Message) -> None:
        """Complete a receive with its message (holding ``_cond``; the caller acks it after)."""
        op.envelope = message.envelope()
        op.payload = message.payload
        op.done = True

    def _completed(self) -> None:
        """Something a thread may wait for happened (holding ``_cond``): wake the threads
        waiting for another's progress, and the one inside epoll.poll if it is not us."""
        if self._waiting:
            self._cond.notify_all()
        if self._poller not in (None, threading.get_ident()):
            self._kick()

    def _complete(self, op: Op) -> None:
        with self._mutex:
            op.done = True
            self._completed()

    def _acked(self, peer: int, ctx: int, tag: int) -> None:
        with self._mutex:
            waiting = self._unacked.get((peer, ctx, tag))
            if not waiting:
                raise AuthError(f"an ack from rank {peer} for no synchronous send")
            waiting.popleft().done = True
            self._completed()

    # ---------------------------------------------------------------- leaving
    def close(self) -> None:
        """Leave the job: say so to the server (a clean departure is not reported to the
        others), then close every connection and listener and stop the engine. A warm Lambda
        process runs job after job, so nothing may linger."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        _opened(-1)
        self._kick()
        self._resting.set()
        if self._background is not threading.current_thread():
            self._background.join(timeout=5.0)
        with self._progress:  # no thread is using the sockets or the engine from here on
            self._say_bye()
            for sock in [self._listener, self._punch_listener, self._control.sock, *(k.sock for k in self._all_links)]:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._mutex:
                self._orphaned = not self._finished
            if not self._orphaned:
                self._close_engine()

    def _say_bye(self) -> None:
        """A sealed bye after whatever the server link still has queued, within a second. A
        rank that saw an error says so: the server then reports it gone to the others, since
        a rank waiting for it without a connection to it would otherwise wait forever."""
        link = self._control
        if link.ended or not link.out_lock.acquire(timeout=1.0):
            return
        try:
            bye = encode_control({"op": "bye", "failed": True} if self._failed else {"op": "bye"})
            link.out.append(_Out(_records(link.session, self._seal_buffers, KIND_CONTROL, self.rank, 0, bye, 0), None))
            room = select.poll()  # not select(): descriptors past 1023
            room.register(link.sock, select.POLLOUT)
            give_up = time.monotonic() + 1.0
            while not link.flush() and time.monotonic() < give_up:
                room.poll(50)
        except (OSError, ValueError):
            pass  # the server is gone already
        finally:
            link.out_lock.release()

    def _close_engine(self) -> None:
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def abort(self, errorcode: int = 1) -> None:
        """End this process at once; peers see its connections close and raise CommError."""
        self._closed = True
        for link in [self._control, *self._all_links]:
            link.sock.close()
        os._exit(errorcode)


def _spawn(target: Callable, *args: object) -> bool:
    """Run ``target(*args)`` in a daemon thread; False if no thread can be started."""
    try:
        threading.Thread(target=target, args=args, daemon=True).start()
    except RuntimeError:
        return False
    return True


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
