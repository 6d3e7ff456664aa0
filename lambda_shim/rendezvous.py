"""The rendezvous server: ranks of a job meet here, learn each other's addresses, and, when
two of them cannot connect directly, talk through it (the relay of last resort).

    CAI_HPC_TOKEN_FILE=secret python -m lambda_shim.rendezvous --host 127.0.0.1 --port 7777

Jobs are keyed by a job id that must be fresh for every run: a job id that already ran, or
whose deadline passed, is refused, so a dead rank's stale entry can never be paired with a
live one. Every connection authenticates (``wire``: a channel-bound HMAC handshake with a
per-job key derived from the server's secret) before anything else is read, and everything
after it is sealed. Unauthenticated connections are capped, globally and per address, and
each has one total deadline; running out of file descriptors costs a rate-limited line, not a
traceback per connection. The server notices a rank leaving (end of stream, a ``bye``, or no
heartbeat within its liveness deadline); only ranks that left abruptly are reported to the
others, in batches, so a job's teardown costs the server work linear in its ranks. Relays
pair only current members of a job that is wired up now, a bounded number per job.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import resource
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from lambda_shim.wire import (
    HANDSHAKE_TIMEOUT_S,
    INLINE,
    KIND_CONTROL,
    KIND_HEARTBEAT,
    KIND_TABLE,
    MAC,
    MAX_CONTROL,
    MAX_REQUEST,
    PROOF_HEAD,
    SEALED_HEADER,
    SERVER,
    TAG,
    AuthError,
    Session,
    check_proof,
    chunk_sizes,
    decode_control,
    encode_control,
    hello,
    job_key,
    job_of,
    load_secret,
    pack_table,
    parse_proof,
    secret_bytes,
    valid_job_id,
)

log = logging.getLogger("lambda_shim.rendezvous")
MAX_WORLD = 100_000
MAX_WAIT_S = 3600.0
REMEMBER_S = 24 * 3600.0  # how long a finished job id stays refused
REMEMBER_MAX = 100_000
RELAY_CHUNK = 256 * 1024
RELAY_WAIT_S = 120.0  # the longest a relay request waits for its other half
RELAYS_WAITING_PER_RANK = 4  # relay halves a job may have waiting for their other half, per rank
RELAYS_PER_RANK = 64  # running relays a job may hold, per rank (a tree or a barrier needs ~2 log2 N)
MAX_PENDING = 1024  # unauthenticated connections at once (lowered to fit the file limit)
MAX_PENDING_PER_HOST = 128  # ... from one address (and at most a quarter of the above)
GONE_BATCH_S = 0.2  # departures are reported to the others in batches
GONE_PER_MESSAGE = 4096
MAX_BUFFERED = 8 * 1024 * 1024  # bytes queued to one connection beyond its table: a stuck reader is dropped
LOG_EVERY_S = 10.0


class Throttled:
    """Warnings of one kind at most once per ``every`` seconds, with a count of the rest."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        self.every = every
        self.last: dict[str, float] = {}
        self.suppressed: Counter = Counter()

    def warning(self, kind: str, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -math.inf) < self.every:
            self.suppressed[kind] += 1
            return
        self.last[kind] = now
        more = self.suppressed.pop(kind, 0)
        log.warning(fmt + (f" ({more} more like this since the last line)" if more else ""), *args)


class StalledError(Exception):
    """A frame stopped part-way: the connection is out of step and cannot be read on."""


class Conn:
    """One authenticated connection: its streams, its frame session and who opened it."""

    def __init__(self, reader, writer, session: Session, job_id: str, rank: int) -> None:
        self.reader, self.writer, self.session = reader, writer, session
        self.job_id, self.rank = job_id, rank

    def send(self, kind: int, payload: bytes = b"", allowance: int = 0) -> None:
        """Queue one sealed frame. Never waits: a peer that stops reading is dropped once it
        has more than ``MAX_BUFFERED`` (+ ``allowance``) bytes queued."""
        if self.writer.is_closing():
            raise ConnectionError("closed")
        self.writer.writelines(self.session.seal_frame(kind, SERVER, 0, payload))
        if self.writer.transport.get_write_buffer_size() > MAX_BUFFERED + allowance:
            self.writer.transport.abort()
            raise ConnectionError("the rank does not read what it is sent")

    def control(self, message: dict) -> None:
        self.send(KIND_CONTROL, encode_control(message))

    async def read(self, first_s: float | None = None, rest_s: float | None = None) -> tuple[int, bytearray]:
        """One frame, read whole or not at all. TimeoutError if its header record has not come
        within ``first_s``: nothing is taken from the stream then (``readexactly`` takes a
        record only once all of it is there, and the timeout cancels this task, not a task of
        its own that may have taken it), so the next read is in step. Once the header is
        taken, the rest must come within ``rest_s``, else ``StalledError``."""
        async with asyncio.timeout(first_s):
            record = await self.reader.readexactly(SEALED_HEADER)
        (kind, _, _, _, length), inline = self.session.open_header(record, MAX_REQUEST)
        if length <= INLINE:
            return kind, bytearray(inline)
        payload = bytearray(length)
        out, off = memoryview(payload), 0
        try:
            async with asyncio.timeout(rest_s):
                for n in chunk_sizes(length):
                    self.session.open_into(await self.reader.readexactly(n + TAG), out[off : off + n])
                    off += n
        except TimeoutError:
            raise StalledError(f"a request stopped after its header for {rest_s:g} s") from None
        return kind, payload

    def close(self) -> None:
        self.writer.close()


@dataclass
class Member:
    rank: int
    addr: tuple[str, int]
    observed: tuple[str, int]
    conn: Conn
    liveness_s: float


@dataclass
class Job:
    job_id: str
    size: int
    deadline: float
    members: dict[int, Member] = field(default_factory=dict)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    completed_at: float = 0.0  # monotonic time the table went out
    lost: list[int] = field(default_factory=list)  # ranks gone abruptly, not yet reported
    relays: dict[tuple[int, int], tuple[Conn, asyncio.Future]] = field(default_factory=dict)
    pipes: set = field(default_factory=set)  # the writers of running relays


class Rendezvous:
    def __init__(self, master: bytes, max_pending: int = MAX_PENDING, max_per_host: int = MAX_PENDING_PER_HOST):
        self.master = master
        self.max_pending, self.max_per_host = max_pending, max_per_host
        self.pending: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()  # oldest first
        self.pending_by_host: Counter = Counter()
        self.jobs: dict[str, Job] = {}
        self.finished: OrderedDict[str, float] = OrderedDict()
        self.warn = Throttled()

    # ---- connection entry point ----
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        host = peer[0]
        if self.pending_by_host[host] >= self.max_per_host:
            self.warn.warning("busy", "refusing connections from %s: too many of its handshakes in flight", host)
            writer.transport.abort()
            return
        if len(self.pending) >= self.max_pending:
            # Full: drop the oldest handshake still unfinished. A real rank's takes milliseconds,
            # so it is the idle ones that go first, and a flood only shortens their lives.
            oldest, _ = self.pending.popitem(last=False)
            oldest.transport.abort()
            self.warn.warning("full", "%d handshakes in flight: dropping the oldest", self.max_pending)
        self.pending[writer] = None
        self.pending_by_host[host] += 1
        try:
            try:
                conn, request = await asyncio.wait_for(self._open(reader, writer), HANDSHAKE_TIMEOUT_S)
            finally:
                self.pending.pop(writer, None)
                self.pending_by_host[host] -= 1
                if not self.pending_by_host[host]:
                    del self.pending_by_host[host]
            op = request.get("op")
            if op == "register":
                await self._register(conn, request, peer)
            elif op == "relay":
                await self._relay(conn, request)
            else:
                conn.control({"op": "error", "message": "unknown request"})
        except AuthError as exc:  # our own fixed texts: nothing the other side chose is logged
            self.warn.warning("refused", "refused a connection from %s: %s", host, exc)
        except (TimeoutError, asyncio.IncompleteReadError, OSError, ValueError, KeyError, TypeError) as exc:
            log.info("dropped a connection from %s: %s", host, type(exc).__name__)
        finally:
            writer.close()

    async def _open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[Conn, dict]:
        """The handshake (as the acceptor, identity ``SERVER``) and the first request."""
        nonce_a, greeting = hello()
        writer.write(greeting)
        await writer.drain()
        nonce_b, initiator, acceptor, length = parse_proof(await reader.readexactly(PROOF_HEAD))
        rest = await reader.readexactly(length + MAC)
        raw_job = bytes(rest[:length])
        job_id = job_of(raw_job)
        if acceptor != SERVER or not 0 <= initiator < MAX_WORLD or not valid_job_id(job_id):
            raise AuthError("malformed handshake")
        key = job_key(self.master, job_id)
        reply, session = check_proof(key, nonce_a, nonce_b, initiator, acceptor, raw_job, bytes(rest[length:]))
        writer.write(reply)
        conn = Conn(reader, writer, session, job_id, initiator)
        kind, payload = await conn.read()
        if kind != KIND_CONTROL:
            raise AuthError("the first frame is not a request")
        return conn, decode_control(payload)

    # ---- registration: wait for the whole job, hand out the address table ----
    async def _register(self, conn: Conn, request: dict, peer: tuple) -> None:
        rank, job_id = conn.rank, conn.job_id
        size = _int(request, "size", 1, MAX_WORLD)
        addr = (_ipv4(request["host"]), _int(request, "port", 1, 65535))
        observed = (_ipv4(peer[0]), int(peer[1]))
        wait_s = _number(request, "wait_s", 0.0, MAX_WAIT_S)
        liveness_s = _number(request, "liveness_s", 0.1, MAX_WAIT_S)
        self._forget_old()
        problem = self._admit(job_id, rank, size)
        if problem:
            self.warn.warning("admit", "job %s rank %d refused: %s", job_id, rank, problem)
            conn.control({"op": "error", "message": problem})
            return
        loop = asyncio.get_running_loop()
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Job(job_id, size, loop.time() + wait_s)
        member = job.members[rank] = Member(rank, addr, observed, conn, liveness_s)
        if len(job.members) == size:
            self._publish(job)
        reading = asyncio.create_task(self._read_member(job, member))
        complete = asyncio.create_task(job.complete.wait())
        try:
            done, _ = await asyncio.wait(
                {reading, complete}, timeout=max(0.0, job.deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if not job.complete.is_set():
                if reading in done:  # it left before the job was wired up: its slot is free again
                    self._drop(job, member)
                    return
                self._expire(job)
            if job.error:
                conn.control({"op": "error", "message": job.error})
                return
            how = await reading  # the table is out: serve this rank until it leaves
        finally:
            complete.cancel()
            reading.cancel()
        self._drop(job, member)
        if how is not None:
            self._lost(job, rank, how)

    async def _read_member(self, job: Job, member: Member) -> str | None:
        """Serve one registered rank's requests until it leaves: None after a ``bye``, else
        how it went (its connection ended, or it fell silent past its liveness deadline)."""
        conn = member.conn
        while True:
            try:
                # A frame whose header came in time has its own deadline: a wait given up
                # part-way through a frame would leave the next read out of step.
                kind, payload = await conn.read(member.liveness_s, member.liveness_s)
            except TimeoutError:
                if not job.complete.is_set() or time.monotonic() - job.completed_at < member.liveness_s:
                    continue  # a rank says nothing until it has the table, then heartbeats
                return f"no heartbeat for {member.liveness_s:g} s"
            except StalledError as exc:
                return str(exc)
            except (asyncio.IncompleteReadError, ConnectionError, AuthError) as exc:
                return f"its connection to the server ended ({type(exc).__name__})"
            if kind == KIND_HEARTBEAT:
                _quietly(conn.send, KIND_HEARTBEAT)  # a failed reply shows as the read's end
                continue
            # Whatever a request does wrong ends this member like a lost connection (and tells
            # the others), never the task: a member left behind would hold its job forever.
            try:
                message = decode_control(payload) if kind == KIND_CONTROL else {}
                op = message.get("op")
                if op == "bye":  # after an error the others are told, as if it had vanished
                    return "it left after an error" if message.get("failed") is True else None
                if op == "punch" and job.complete.is_set():
                    target = job.members.get(_int(message, "peer", 0, job.size - 1))
                    if target is not None:
                        _quietly(target.conn.control, {"op": "punch-request", "peer": member.rank})
            except (AuthError, ValueError, KeyError, TypeError) as exc:
                return f"it sent a request the server cannot take ({type(exc).__name__})"

    def _drop(self, job: Job, member: Member) -> None:
        if job.members.get(member.rank) is member:
            del job.members[member.rank]
        if not job.members and self.jobs.get(job.job_id) is job:
            self._end(job)

    def _lost(self, job: Job, rank: int, how: str) -> None:
        """Tell the ranks still there (in a batch with others that go soon after), so that a
        rank waiting on this one without a connection to it does not wait forever."""
        log.info("job %s: rank %d is gone: %s", job.job_id, rank, how)
        job.lost.append(rank)
        if len(job.lost) == 1:
            asyncio.get_running_loop().call_later(GONE_BATCH_S, self._report_lost, job)

    def _report_lost(self, job: Job) -> None:
        lost, job.lost = job.lost, []
        for start in range(0, len(lost), GONE_PER_MESSAGE):
            message = {"op": "gone", "ranks": lost[start : start + GONE_PER_MESSAGE]}
            for member in list(job.members.values()):
                _quietly(member.conn.control, message)

    def _end(self, job: Job) -> None:
        """Every rank has left: forget the job, end its relays."""
        self.jobs.pop(job.job_id, None)
        for _, waiting in job.relays.values():
            if not waiting.done():
                waiting.set_exception(ConnectionError("the job ended"))
        job.relays.clear()
        for writer in list(job.pipes):
            writer.transport.abort()

    def _admit(self, job_id: str, rank: int, size: int) -> str | None:
        if job_id in self.finished:
            return f"job {job_id} already ran: every run needs a fresh job id"
        if not 0 <= rank < size:
            return f"rank {rank} of world size {size} is out of range"
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.size != size:
            return f"job {job_id} has world size {job.size}, not {size}"
        if job.complete.is_set():
            return f"job {job_id} is already wired up"
        if rank in job.members:
            return f"rank {rank} of job {job_id} is already registered"
        return None

    def _publish(self, job: Job) -> None:
        table = pack_table([(*job.members[r].addr, *job.members[r].observed) for r in range(job.size)])
        for member in job.members.values():
            _quietly(member.conn.send, KIND_TABLE, table, len(table))
        self._remember(job.job_id)
        job.completed_at = time.monotonic()
        job.complete.set()
        log.info("job %s wired up: %d ranks", job.job_id, job.size)

    def _expire(self, job: Job) -> None:
        if job.complete.is_set():
            return
        missing = sorted(set(range(job.size)) - set(job.members))
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        job.error = f"job {job.job_id}: {len(missing)} of {job.size} ranks never arrived before the deadline: {shown}"
        self.warn.warning("expire", "%s", job.error)
        self._remember(job.job_id)
        self.jobs.pop(job.job_id, None)
        job.complete.set()

    def _remember(self, job_id: str) -> None:
        self.finished[job_id] = time.monotonic()
        while len(self.finished) > REMEMBER_MAX:
            self.finished.popitem(last=False)

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - REMEMBER_S
        while self.finished and next(iter(self.finished.values())) < cutoff:
            self.finished.popitem(last=False)

    # ---- relay: pair (rank -> peer) with (peer -> rank), then pipe bytes both ways ----
    async def _relay(self, conn: Conn, request: dict) -> None:
        rank = conn.rank
        peer = _int(request, "peer", 0, MAX_WORLD - 1)
        wait_s = min(_number(request, "wait_s", 0.0, MAX_WAIT_S), RELAY_WAIT_S)
        job = self.jobs.get(conn.job_id)
        if job is None or not job.complete.is_set() or peer == rank or not {rank, peer} <= set(job.members):
            conn.control({"op": "error", "message": "relay refused: both ranks must be members of a running job"})
            return
        other = job.relays.pop((peer, rank), None)
        if other is None:
            full = len(job.relays) >= RELAYS_WAITING_PER_RANK * job.size or len(job.pipes) >= RELAYS_PER_RANK * job.size
            if (rank, peer) in job.relays or full:
                conn.control({"op": "error", "message": "relay refused: too many relays for this job"})
                return
            joined = asyncio.get_running_loop().create_future()
            job.relays[(rank, peer)] = (conn, joined)
            _quietly(job.members[peer].conn.control, {"op": "relay-request", "peer": rank})
            try:
                finished = await asyncio.wait_for(joined, wait_s)
            except (TimeoutError, ConnectionError):
                job.relays.pop((rank, peer), None)
                _quietly(conn.control, {"op": "error", "message": f"rank {peer} never joined the relay"})
                return
            await finished  # the joining side runs the pipe until either end closes
            return
        other_conn, joined = other
        if joined.done():  # its wait timed out a moment ago (wait_for yields while it cancels)
            _quietly(conn.control, {"op": "error", "message": f"rank {peer} stopped waiting for the relay"})
            return
        finished = asyncio.get_running_loop().create_future()
        joined.set_result(finished)
        job.pipes |= {conn.writer, other_conn.writer}
        try:
            for c in (conn, other_conn):
                c.control({"op": "relay-ready"})
            await asyncio.gather(_pipe(conn.reader, other_conn.writer), _pipe(other_conn.reader, conn.writer))
        finally:
            job.pipes -= {conn.writer, other_conn.writer}
            other_conn.close()
            finished.set_result(None)


def _quietly(send, *args) -> None:
    """A notice to a rank that may have just gone: its own reader handles the loss."""
    try:
        send(*args)
    except ConnectionError:
        pass


def _int(message: dict, key: str, low: int, high: int) -> int:
    value = message[key]
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{key} out of range")
    return value


def _number(message: dict, key: str, low: float, high: float) -> float:
    value = message[key]
    if type(value) not in (int, float) or not low <= value <= high:  # NaN fails both comparisons
        raise ValueError(f"{key} out of range")
    return float(value)


def _ipv4(text: object) -> str:
    return str(ipaddress.IPv4Address(text))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF with bounded buffering (drain after every chunk), then half-close."""
    try:
        while chunk := await reader.read(RELAY_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        pass


def _pending_cap(wanted: int) -> int:
    """Raise the file limit as far as allowed, and keep the unauthenticated connections to a
    quarter of it: members and relays need the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(1, min(wanted, soft // 4))


async def serve(
    host: str,
    port: int,
    master: bytes,
    ready: Path | None = None,
    max_pending: int = MAX_PENDING,
    max_per_host: int = MAX_PENDING_PER_HOST,
) -> None:
    cap = _pending_cap(max_pending)
    rendezvous = Rendezvous(master, cap, max(1, min(max_per_host, cap // 4)))
    loop = asyncio.get_running_loop()
    # asyncio reports accept() failing for want of file descriptors (it retries a second
    # later) through the loop's handler, with a traceback each time: one line now and then.
    loop.set_exception_handler(
        lambda _, context: rendezvous.warn.warning(
            "loop", "%s: %s", context.get("message"), _one_line(context.get("exception"))
        )
    )
    server = await asyncio.start_server(rendezvous.handle, host, port, limit=MAX_CONTROL, backlog=4096)
    bound = server.sockets[0].getsockname()
    log.info("rendezvous listening on %s:%d", bound[0], bound[1])
    if ready is not None:
        tmp = ready.with_name(ready.name + ".tmp")
        tmp.write_text(f"{bound[0]}:{bound[1]}\n")
        tmp.replace(ready)
    async with server:
        await server.serve_forever()


def _one_line(exc: BaseException | None) -> str:
    return "" if exc is None else f"{type(exc).__name__}: {exc}".splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambda_shim.rendezvous", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7777, help="0 picks a free port (see --ready-file)")
    parser.add_argument("--ready-file", type=Path, help="write HOST:PORT here once listening")
    parser.add_argument("--secret-stdin", action="store_true", help="read the secret from standard input")
    parser.add_argument("--max-pending", type=int, default=MAX_PENDING, help="unauthenticated connections at once")
    parser.add_argument("--max-pending-per-host", type=int, default=MAX_PENDING_PER_HOST, help="... from one address")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="rendezvous: %(message)s")
    try:
        master = secret_bytes(sys.stdin.readline()) if args.secret_stdin else load_secret()
    except AuthError as exc:
        print(f"rendezvous: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args.host, args.port, master, args.ready_file, args.max_pending, args.max_pending_per_host))
    except OSError as exc:
        print(f"rendezvous: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
