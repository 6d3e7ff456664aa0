"""What travels on every connection: the authentication handshake and sealed frames.

Every connection, rank to server or rank to rank, starts with a mutual HMAC
challenge-response, and nothing else is read from it until the peer has proved it knows the
job's key. The proofs cover a transcript of the whole exchange: the protocol name, both fresh
nonces, the job id, who opens the connection and whom it means to reach (a rank number, or
``SERVER``). Each side derives the keys of the frames that follow from the job key and that
transcript, one key per direction. So whoever relays or replays someone else's handshake
(a fake rendezvous forwarding the real server's challenge, an on-path proxy) learns nothing
and can inject nothing: every frame after the handshake, control messages included, is
AES-GCM sealed under keys only the two ends hold, with the frame's sequence number as the
nonce (a replayed, reordered, reflected or spliced frame fails).

A frame starts with a sealed header record of fixed size (kind, source, context, tag, length,
and room for ``INLINE`` payload bytes), checked before anything is allocated for the payload.
A payload that small rides inside it (one record, one seal and one check per small message);
a larger one follows in sealed records of at most ``CHUNK`` bytes, each checked as it arrives.
Lengths are bounded (``MAX_FRAME``); control messages are JSON objects of bounded size and
nesting depth.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lambda_shim.landing import new_bytearray, new_bytes

PROTOCOL = b"CAI-SHIM/4"
NONCE = 32
MAC = 32
TAG = 16  # AES-GCM tag
MIN_SECRET = 32  # bytes: shorter secrets are refused
MAX_JOB_ID = 64
SERVER = -1  # the rendezvous server's identity in a handshake (ranks are >= 0)
HANDSHAKE_TIMEOUT_S = 10.0  # total, for the whole exchange
CHUNK = 1 << 20  # payloads travel in sealed records of at most this many bytes
MAX_FRAME = 1 << 34  # 16 GiB: the largest payload a frame may announce
MAX_CONTROL = 64 * 1024  # largest JSON control message
MAX_REQUEST = 4 * 1024  # largest request a rank sends the server (they are under 200 bytes)
SMALL = 64 * 1024  # frames up to this size go out in one system call
MAX_DEPTH = 4  # control messages are flat objects: deeper nesting is refused before parsing

# Frame header (sealed): kind, source rank, communicator context, tag, payload length.
HEADER = struct.Struct("!BiIiQ")
INLINE = 43  # a payload of at most this many bytes rides in the header record
FIRST = struct.Struct(f"!BiIiQ{INLINE}s")  # the header record: the header, then the inline payload, zero-padded
SEALED_HEADER = FIRST.size + TAG
KIND_OBJECT = 1  # a pickled object: only ever read from an authenticated peer
KIND_BYTES = 2  # raw array bytes for the buffer forms: never unpickled
KIND_CONTROL = 3  # a JSON object (server <-> rank)
KIND_HEARTBEAT = 4  # empty: "still here"
KIND_TABLE = 5  # the address table, binary (see ``pack_table``)
KIND_ACK = 6  # empty: the receiver matched the oldest sync send of this context and tag
KIND_OBJECT_BYTES = 7  # an object that is exactly a bytes: its bytes, not pickled (``objects``)
KIND_OBJECT_BYTEARRAY = 8  # the same for a bytearray
SYNC = 0x80  # or-ed into the kind of an object or bytes frame: acknowledge it when matched
_IDS = struct.Struct("!iiB")  # initiator, acceptor, job id length
_ENTRY = struct.Struct("!4sH4sH")  # per rank: listener IPv4 + port, observed IPv4 + port

TOKEN_ENV = "CAI_HPC_TOKEN"
TOKEN_FILE_ENV = "CAI_HPC_TOKEN_FILE"


class Header(NamedTuple):
    kind: int
    source: int
    ctx: int
    tag: int
    length: int


class Frame(NamedTuple):
    kind: int
    source: int
    ctx: int
    tag: int
    payload: bytearray  # a bytes for KIND_OBJECT_BYTES (from ``FrameReader``)


class AuthError(Exception):
    """The other side did not prove it knows the key, broke the protocol, or a frame failed."""


# ---------------------------------------------------------------- secrets
def job_key(master: bytes, job_id: str) -> bytes:
    """The key of one job, derived from the server's master secret: a rank that knows it can
    join that job and no other."""
    return hmac.new(master, b"cai-hpc job " + job_id.encode(), hashlib.sha256).digest()


def load_secret(environ: dict[str, str] | None = None) -> bytes:
    """The secret from ``$CAI_HPC_TOKEN_FILE`` (preferred) or ``$CAI_HPC_TOKEN``; never argv."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_FILE_ENV):
        path = Path(env[TOKEN_FILE_ENV])
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise AuthError(f"cannot read the token file {path}: {exc.strerror}") from None
    else:
        text = env.get(TOKEN_ENV, "").strip()
    if not text:
        raise AuthError(f"no secret: set {TOKEN_FILE_ENV} (a file holding it) or {TOKEN_ENV}")
    return secret_bytes(text)


def secret_bytes(text: str) -> bytes:
    """A secret as written in a file or a secret store: hex digits, or any other text; at
    least ``MIN_SECRET`` bytes of it (``new_secret`` makes one)."""
    text = text.strip()
    secret = bytes.fromhex(text) if _is_hex(text) else text.encode()
    if len(secret) < MIN_SECRET:
        raise AuthError(f"the secret is {len(secret)} bytes: at least {MIN_SECRET} are needed (64 hex digits)")
    return secret


def new_secret() -> str:
    return secrets.token_hex(32)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return len(text) % 2 == 0


# ---------------------------------------------------------------- reading with deadlines
def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """Exactly ``n`` bytes (retrying partial reads), by ``deadline`` (monotonic) if given;
    EOFError if the peer closed first, TimeoutError at the deadline."""
    buf = bytearray(n)
    recv_into(sock, memoryview(buf), deadline)
    return buf


def recv_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    got = 0
    while got < len(view):
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {got} of {len(view)} bytes")
            sock.settimeout(remaining)
        k = sock.recv_into(view[got:], len(view) - got)
        if k == 0:
            raise EOFError(f"connection closed after {got} of {len(view)} bytes")
        got += k


# ---------------------------------------------------------------- sealed frames
class RecordBuffers:
    """Buffers that big frames' payload records are sealed into, lent to one frame at a time
    and kept for the next (at most ``keep`` idle ones): the memory they hold follows the frames
    being sent at the moment, not every connection that ever sent one. A borrower that finds
    none idle gets a fresh buffer, which goes back to the idle ones, or is freed if ``keep``
    are idle already. Thread-safe (a deque's appends and pops are)."""

    def __init__(self, keep: int) -> None:
        self._idle: collections.deque[bytearray] = collections.deque(maxlen=keep)

    def lend(self) -> bytearray:
        try:
            return self._idle.pop()
        except IndexError:
            return bytearray(CHUNK + TAG)

    def take_back(self, buffer: bytearray) -> None:
        self._idle.append(buffer)  # when full, the deque frees the oldest idle buffer


class Session:
    """The AES-GCM keys of one connection, one per direction, and a record counter for each
    (the nonce). Callers serialise sends on a connection, and reads."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send, self._recv = AESGCM(send_key), AESGCM(recv_key)
        self._sent = self._received = 0

    def _seal(self, data: bytes | memoryview) -> bytes:
        record = self._send.encrypt(self._sent.to_bytes(12, "big"), data, None)
        self._sent += 1
        return record

    def seal_frame(
        self,
        kind: int,
        source: int,
        tag: int,
        payload: bytes | memoryview = b"",
        ctx: int = 0,
        buffers: RecordBuffers | None = None,
    ) -> Iterator[bytes | memoryview]:
        """The sealed records of one frame, in sending order, each sealed as it is taken (a big
        payload is never held twice). With ``buffers``, the payload records are sealed into one
        buffer borrowed from them, each valid until the next is taken (for a consumer that is
        done with each record first): a big frame then costs no fresh memory, whose first
        touch costs more here than sealing it. The buffer goes back when the frame's last
        record has been taken and the next call finds nothing more (or when the records are
        dropped unfinished), so it is held only while the frame is being sent."""
        n = len(payload)
        yield self._seal(FIRST.pack(kind, source, ctx, tag, n, bytes(payload) if n <= INLINE else b""))
        if n <= INLINE:
            return
        view = memoryview(payload)
        if buffers is None:
            for off in range(0, len(view), CHUNK):
                yield self._seal(view[off : off + CHUNK])
            return
        buffer = buffers.lend()
        try:
            record, seal = memoryview(buffer), self._send.encrypt_into
            for off in range(0, len(view), CHUNK):
                piece = view[off : off + CHUNK]
                out = record[: len(piece) + TAG]
                seal(self._sent.to_bytes(12, "big"), piece, None, out)
                self._sent += 1
                yield out
        finally:
            buffers.take_back(buffer)

    def seal_small(self, kind: int, source: int, tag: int, payload: bytes | memoryview = b"", ctx: int = 0) -> bytes:
        """A frame whose payload fits one record (``seal_frame``'s records as one piece)."""
        n, seal, length = self._sent, self._send.encrypt, len(payload)
        if length <= INLINE:
            self._sent = n + 1
            return seal(n.to_bytes(12, "big"), FIRST.pack(kind, source, ctx, tag, length, bytes(payload)), None)
        self._sent = n + 2
        header = seal(n.to_bytes(12, "big"), FIRST.pack(kind, source, ctx, tag, length, b""), None)
        return header + seal((n + 1).to_bytes(12, "big"), payload, None)

    def open_header(self, record: bytes | bytearray | memoryview, limit: int = MAX_FRAME) -> tuple[Header, bytes]:
        """The fields of a sealed header record, and the payload riding in it (all of it when the
        length is at most ``INLINE``; else nothing, and ``chunk_sizes(length)`` records follow).
        AuthError if it was not sealed by the other end in this order, or announces more than
        ``limit`` bytes."""
        kind, source, ctx, tag, length, inline = self.open_first(record, limit)
        return Header(kind, source, ctx, tag, length), inline

    def open_first(self, record: bytes | bytearray | memoryview, limit: int) -> tuple[int, int, int, int, int, bytes]:
        """``open_header`` as one flat tuple (kind, source, ctx, tag, length, inline payload)."""
        kind, source, ctx, tag, length, inline = FIRST.unpack(self._open(record))
        if length > limit:
            raise AuthError(f"a frame of {length} bytes is over the {limit}-byte limit")
        return kind, source, ctx, tag, length, inline[:length] if length <= INLINE else b""

    def open_into(self, record: bytes | bytearray | memoryview, out: memoryview) -> None:
        """Check one payload record and write its bytes into ``out`` (exactly its size)."""
        try:
            self._recv.decrypt_into(self._nonce_in(), record, None, out)
        except (InvalidTag, ValueError):
            raise AuthError(f"record {self._received} failed its check (tampered, replayed or reordered)") from None
        self._received += 1

    def _open(self, record: bytes | bytearray | memoryview) -> bytes:
        try:
            data = self._recv.decrypt(self._received.to_bytes(12, "big"), record, None)
        except (InvalidTag, ValueError):
            raise AuthError(f"record {self._received} failed its check (tampered, replayed or reordered)") from None
        self._received += 1
        return data

    def _nonce_in(self) -> bytes:
        return self._received.to_bytes(12, "big")


def chunk_sizes(length: int) -> list[int]:
    """The plaintext sizes of the records after the header record (none for an inline payload)."""
    if length <= INLINE:
        return []
    return [min(CHUNK, length - off) for off in range(0, length, CHUNK)]


def read_frame(sock: socket.socket, session: Session, limit: int = MAX_FRAME, on_record=None) -> Frame:
    """One frame: the header is checked before the payload is allocated, and the payload is
    read and checked record by record. ``on_record()`` is called after each record (liveness)."""
    (kind, source, ctx, tag, length), inline = session.open_header(recv_exact(sock, SEALED_HEADER), limit)
    payload = bytearray(inline) if length <= INLINE else bytearray(length)
    out = memoryview(payload)
    record = bytearray(min(CHUNK, length) + TAG)  # not 1 MiB zero-filled for every small frame
    off = 0
    for n in chunk_sizes(length):
        view = memoryview(record)[: n + TAG]
        recv_into(sock, view)
        session.open_into(view, out[off : off + n])
        off += n
        if on_record is not None:
            on_record()
    return Frame(kind, source, ctx, tag, payload)


_NOTHING = memoryview(b"")


class FrameReader:
    """Frames from a non-blocking socket, read as the bytes arrive: ``feed`` takes what the
    socket has now and returns the frames it completed; a frame cut anywhere waits, with its
    state, for the next call. The same checks as ``read_frame``: the header is opened before
    anything is allocated for the payload, the length is bounded, and each record is checked
    as it arrives. Small records go through a scratch buffer (one system call takes several);
    a record larger than it is read into a buffer of its own, its payload decrypted from there."""

    SCRATCH = 64 * 1024

    def __init__(self, session: Session, limit: int = MAX_FRAME) -> None:
        self._session = session
        self._limit = limit
        self._scratch = memoryview(bytearray(self.SCRATCH))
        self._start = self._end = 0  # unread bytes: scratch[start:end]
        self._header: Header | None = None  # of the frame under way
        self._payload = _NOTHING
        self._object: bytes | bytearray = b""  # what ``_payload`` writes into (holds it alive)
        self._off = 0  # payload bytes checked so far
        self._big: memoryview | None = None  # a record larger than the scratch, being read
        self._spare: memoryview | None = None  # where such records are read, during a big frame
        self._got = 0
        self.records = 0  # records checked, ever (liveness: authenticated bytes arrived)

    def feed(self, sock: socket.socket, budget: int = 4 * CHUNK) -> list[Frame]:
        """The frames completed by what ``sock`` has now (at most about ``budget`` bytes read);
        EOFError at the end of the stream, AuthError on a record that fails its check."""
        frames: list[Frame] = []
        scratch, read = self._scratch, 0
        try:
            while read < budget:
                header = self._header
                need = SEALED_HEADER if header is None else min(CHUNK, header.length - self._off) + TAG
                if need > self.SCRATCH:
                    read += self._feed_big(sock, need, frames)
                    continue
                start = self._start
                if self._end - start >= need:
                    self._start = start + need
                    self._take(scratch[start : start + need], frames)
                    if frames and self._start == self._end:
                        self._start = self._end = 0
                        break  # nothing more buffered: the poller says when more comes
                    continue
                if self.SCRATCH - start < need:  # make room: the unread bytes to the front
                    left = self._end - start
                    scratch[:left] = scratch[start : self._end]
                    self._start, self._end = 0, left
                n = sock.recv_into(scratch[self._end :])
                if n == 0:
                    raise EOFError("connection closed")
                self._end += n
                read += n
        except BlockingIOError:
            pass
        except EOFError:
            if not frames:
                raise
            # The frames completed before the end count; the next call reports the end.
        return frames

    def between_frames(self) -> bool:
        """No frame is under way: an end of the stream here cut nothing."""
        return self._header is None and self._big is None and self._start == self._end

    def _feed_big(self, sock: socket.socket, need: int, frames: list[Frame]) -> int:
        """Read a record larger than the scratch buffer straight into a buffer of its size."""
        if self._big is None:
            if self._spare is None:  # one record buffer for the whole frame, not one per record
                self._spare = memoryview(bytearray(CHUNK + TAG))
            self._big = self._spare[:need]
            held = min(need, self._end - self._start)  # what the scratch holds of it already
            self._big[:held] = self._scratch[self._start : self._start + held]
            self._start += held
            self._got = held
        n = 0
        if self._got < need:
            n = sock.recv_into(self._big[self._got : need])
            if n == 0:
                raise EOFError("connection closed")
            self._got += n
        if self._got == need:
            big, self._big = self._big, None
            self._take(big, frames)
        return n

    def _take(self, unit: memoryview, frames: list[Frame]) -> None:
        """Check one whole record: a header (with the whole payload, if small), or the next
        piece of the payload."""
        self.records += 1
        header = self._header
        if header is None:
            kind, source, ctx, tag, length, inline = self._session.open_first(unit, self._limit)
            if length <= INLINE:
                frames.append(
                    Frame(kind, source, ctx, tag, inline if kind & ~SYNC == KIND_OBJECT_BYTES else bytearray(inline))
                )
                return
            # Allocated only now, on the checked length, and filled entirely before delivery.
            if kind & ~SYNC == KIND_OBJECT_BYTES:
                self._object, self._payload = new_bytes(length)
            else:
                self._object = new_bytearray(length)
                self._payload = memoryview(self._object)
            self._header, self._off = Header(kind, source, ctx, tag, length), 0
            return
        n = len(unit) - TAG
        self._session.open_into(unit, self._payload[self._off : self._off + n])
        self._off += n
        if self._off == header.length:
            frames.append(Frame(header.kind, header.source, header.ctx, header.tag, self._object))
            self._header, self._payload, self._object, self._spare = None, _NOTHING, b"", None


def send_frame(sock: socket.socket, session: Session, kind: int, source: int, tag: int, payload=b"") -> None:
    """Seal and send one frame (callers hold the connection's send lock)."""
    records = session.seal_frame(kind, source, tag, payload)
    if len(payload) <= SMALL:
        sock.sendall(b"".join(records))  # one system call for small frames: latency
    else:
        for record in records:
            sock.sendall(record)


# ---------------------------------------------------------------- control messages
# A JSON string (to its end, even an unterminated one, so no byte is scanned twice) or a bracket.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"?|[][{}]')


def encode_control(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode_control(data: bytes | bytearray) -> dict:
    """A JSON object of bounded size and depth (checked before parsing, so deep nesting
    cannot exhaust the parser's recursion)."""
    if len(data) > MAX_CONTROL:
        raise AuthError(f"control message of {len(data)} bytes is over the {MAX_CONTROL} limit")
    depth = 0
    for token in _TOKEN.finditer(data):  # one pass: brackets outside strings
        opener = token.group()
        if opener in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise AuthError(f"control message nested deeper than {MAX_DEPTH}")
        elif opener in (b"]", b"}"):
            depth -= 1
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):
        raise AuthError("control message is not JSON") from None
    if not isinstance(message, dict):
        raise AuthError("control message is not a JSON object")
    return message


def pack_table(entries: list[tuple[str, int, str, int]]) -> bytes:
    """The address table, 12 bytes a rank: (listener host, port, observed host, port), IPv4."""
    return b"".join(_ENTRY.pack(socket.inet_aton(h), p, socket.inet_aton(oh), op) for h, p, oh, op in entries)


def unpack_table(data: bytes | bytearray, size: int) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    if len(data) != size * _ENTRY.size:
        raise AuthError(f"an address table of {len(data)} bytes for {size} ranks")
    return [((socket.inet_ntoa(h), p), (socket.inet_ntoa(oh), op)) for h, p, oh, op in _ENTRY.iter_unpack(data)]


def table_entry(data: bytes | bytearray, rank: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """One rank's (listener, observed) addresses from a table already checked by its length:
    a rank reads the entries of the peers it talks to, not all N of them (N ranks decoding N
    entries each is quadratic work at wire-up)."""
    h, p, oh, op = _ENTRY.unpack_from(data, rank * _ENTRY.size)
    return (socket.inet_ntoa(h), p), (socket.inet_ntoa(oh), op)


def table_bytes(size: int) -> int:
    return size * _ENTRY.size


# ---------------------------------------------------------------- handshake
def _transcript(nonce_a: bytes, nonce_b: bytes, initiator: int, acceptor: int, raw_job: bytes) -> bytes:
    return PROTOCOL + nonce_a + nonce_b + _IDS.pack(initiator, acceptor, len(raw_job)) + raw_job


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


def _session(key: bytes, transcript: bytes, initiator: bool) -> Session:
    to_acceptor = _mac(key, b"frames I>A", transcript)
    to_initiator = _mac(key, b"frames A>I", transcript)
    return Session(to_acceptor, to_initiator) if initiator else Session(to_initiator, to_acceptor)


def hello() -> tuple[bytes, bytes]:
    """(nonce, what the acceptor sends first)."""
    nonce = secrets.token_bytes(NONCE)
    return nonce, PROTOCOL + nonce


def parse_proof(head: bytes | bytearray) -> tuple[bytes, int, int, int]:
    """(initiator's nonce, initiator id, acceptor id, job id length) from the fixed part of
    the initiator's message; AuthError if the length is out of range."""
    nonce_b = bytes(head[:NONCE])
    initiator, acceptor, length = _IDS.unpack(head[NONCE:])
    if not 0 < length <= MAX_JOB_ID:
        raise AuthError("bad job id length")
    return nonce_b, initiator, acceptor, length


PROOF_HEAD = NONCE + _IDS.size


def check_proof(
    key: bytes, nonce_a: bytes, nonce_b: bytes, initiator: int, acceptor: int, raw_job: bytes, mac: bytes
) -> tuple[bytes, Session]:
    """The acceptor's check of the initiator's proof: (our proof to send back, session)."""
    transcript = _transcript(nonce_a, nonce_b, initiator, acceptor, raw_job)
    if not hmac.compare_digest(mac, _mac(key, b"initiator", transcript)):
        raise AuthError("wrong key")
    return _mac(key, b"acceptor", transcript), _session(key, transcript, initiator=False)


_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_job_id(job_id: object) -> bool:
    """1 to 64 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit."""
    return isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) is not None


def job_of(raw_job: bytes) -> str:
    try:
        return raw_job.decode("ascii")
    except UnicodeDecodeError:
        raise AuthError("job id is not ASCII") from None


def handshake_accept(
    sock: socket.socket, key: bytes, me: int, deadline: float | None = None
) -> tuple[str, int, Session]:
    """Acceptor side, as rank ``me`` (the server runs the same exchange on asyncio streams).
    Returns (job id, initiator's rank, session); the caller checks both belong to its job."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S if deadline is None else deadline
    nonce_a, greeting = hello()
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    sock.sendall(greeting)
    nonce_b, initiator, acceptor, length = parse_proof(recv_exact(sock, PROOF_HEAD, deadline))
    rest = recv_exact(sock, length + MAC, deadline)
    raw_job, mac = bytes(rest[:length]), bytes(rest[length:])
    if acceptor != me:
        raise AuthError(f"the connection was meant for {acceptor}, not {me}")
    reply, session = check_proof(key, nonce_a, nonce_b, initiator, acceptor, raw_job, mac)
    sock.sendall(reply)
    return job_of(raw_job), initiator, session


def handshake_connect(
    sock: socket.socket, key: bytes, job_id: str, me: int, them: int, deadline: float | None = None
) -> Session:
    """Initiator side, as rank ``me`` reaching ``them`` (a rank or ``SERVER``): prove the key,
    and check that the acceptor knows it too. EOFError if the acceptor hangs up before the
    greeting (busy) or after our proof (it refused the key)."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S if deadline is None else deadline
    raw_job = job_id.encode("ascii")
    greeting = recv_exact(sock, len(PROTOCOL) + NONCE, deadline)
    if not greeting.startswith(PROTOCOL):
        raise AuthError("the other side does not speak this version of the cai-hpc shim protocol")
    nonce_a = bytes(greeting[len(PROTOCOL) :])
    nonce_b = secrets.token_bytes(NONCE)
    transcript = _transcript(nonce_a, nonce_b, me, them, raw_job)
    sock.sendall(nonce_b + _IDS.pack(me, them, len(raw_job)) + raw_job + _mac(key, b"initiator", transcript))
    try:
        reply = recv_exact(sock, MAC, deadline)
    except EOFError:
        raise RefusedError("the other side refused our proof (wrong key, or not a member of the job)") from None
    if not hmac.compare_digest(bytes(reply), _mac(key, b"acceptor", transcript)):
        raise AuthError("the other side does not know the job key")
    return _session(key, transcript, initiator=True)


class RefusedError(AuthError):
    """The acceptor hung up after our proof: it did not accept our key or identity."""
