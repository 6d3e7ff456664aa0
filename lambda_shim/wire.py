"""What travels on every connection: the authentication handshake and message frames.

Every connection, rank to server or rank to rank, starts with a mutual HMAC
challenge-response over fresh nonces, and nothing else is read from it until the peer has
proved it knows the job's key. Frames then carry their kind, source, tag and length, so a
reader always knows how much to expect; partial reads and writes are retried to completion.

The handshake only proves who opened the connection; whoever can write into the TCP stream
afterwards (a relay in the middle, an attacker on the path) could still inject frames. So
each frame also carries an HMAC under a key of that connection and direction (derived from
the job key and both nonces) over a sequence number, the header and the payload: a frame
is unpickled only once its MAC checks, and a replayed, reordered or spliced frame fails.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

HELLO = b"CAI-SHIM/1"
NONCE = 32
MAC = 32
MAX_JOB_ID = 64
MAX_CONTROL = 64 * 1024  # largest JSON control message (server side)
HANDSHAKE_TIMEOUT_S = 10.0

# Frame header: kind, source rank, tag, payload length.
FRAME = struct.Struct("!Biiq")
KIND_OBJECT = 1  # a pickled object: only ever read from an authenticated peer
KIND_BYTES = 2  # raw array bytes for the buffer forms: never unpickled

TOKEN_ENV = "CAI_HPC_TOKEN"
TOKEN_FILE_ENV = "CAI_HPC_TOKEN_FILE"


class AuthError(Exception):
    """The other side did not prove it knows the key (or broke the handshake)."""


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
    """A secret as written in a file or a secret store: hex digits, or any other text."""
    text = text.strip()
    return bytes.fromhex(text) if _is_hex(text) else text.encode()


def new_secret() -> str:
    return secrets.token_hex(32)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return len(text) % 2 == 0


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes (retrying partial reads); EOFError if the peer closed first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:], len(view) - got)
        if k == 0:
            raise EOFError(f"connection closed after {got} of {len(view)} bytes")
        got += k


def initiator_mac(key: bytes, nonce_a: bytes, nonce_b: bytes, raw_job: bytes) -> bytes:
    return hmac.new(key, b"I" + nonce_a + nonce_b + raw_job, hashlib.sha256).digest()


def acceptor_mac(key: bytes, nonce_a: bytes, nonce_b: bytes, raw_job: bytes) -> bytes:
    return hmac.new(key, b"A" + nonce_b + nonce_a + raw_job, hashlib.sha256).digest()


class FrameSeal:
    """The MACs of one connection's frames: one key and one sequence counter per direction."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send_key, self._recv_key = send_key, recv_key
        self._sent = self._received = 0

    def seal(self, header: bytes, payload: bytes | memoryview) -> bytes:
        """The MAC to send after this frame (callers serialise sends on a connection)."""
        mac = _frame_mac(self._send_key, self._sent, header, payload)
        self._sent += 1
        return mac

    def check(self, header: bytes | bytearray, payload: bytes | bytearray, mac: bytes) -> None:
        if not hmac.compare_digest(mac, _frame_mac(self._recv_key, self._received, header, payload)):
            raise AuthError(f"frame {self._received} failed its MAC (tampered, replayed or reordered)")
        self._received += 1


def _frame_mac(key: bytes, seq: int, header: bytes | bytearray, payload: bytes | bytearray | memoryview) -> bytes:
    mac = hmac.new(key, seq.to_bytes(8, "big"), hashlib.sha256)
    mac.update(header)
    mac.update(payload)
    return mac.digest()


@dataclass(frozen=True)
class _Exchange:
    """What both ends know after a handshake, from which the frame keys are derived."""

    key: bytes
    nonce_a: bytes
    nonce_b: bytes
    raw_job: bytes

    def seal(self, initiator: bool) -> FrameSeal:
        context = self.nonce_a + self.nonce_b + self.raw_job
        to_acceptor = hmac.new(self.key, b"frames I>A" + context, hashlib.sha256).digest()
        to_initiator = hmac.new(self.key, b"frames A>I" + context, hashlib.sha256).digest()
        return FrameSeal(to_acceptor, to_initiator) if initiator else FrameSeal(to_initiator, to_acceptor)


def handshake_accept(sock: socket.socket, key: bytes) -> tuple[str, FrameSeal]:
    """Acceptor side (a rank; the server runs the same exchange on asyncio streams).
    Returns the job id the initiator named, which the caller must check, and the seal for
    the frames that follow."""
    nonce_a = secrets.token_bytes(NONCE)
    sock.sendall(HELLO + nonce_a)
    nonce_b = recv_exact(sock, NONCE)
    (length,) = recv_exact(sock, 1)
    if not 0 < length <= MAX_JOB_ID:
        raise AuthError("bad job id length")
    raw_job = recv_exact(sock, length)
    mac = recv_exact(sock, MAC)
    try:
        job_id = raw_job.decode("ascii")
    except UnicodeDecodeError:
        raise AuthError("job id is not ASCII") from None
    if not hmac.compare_digest(mac, initiator_mac(key, nonce_a, nonce_b, raw_job)):
        raise AuthError(f"wrong key for job {job_id!r}")
    sock.sendall(acceptor_mac(key, nonce_a, nonce_b, raw_job))
    return job_id, _Exchange(key, nonce_a, nonce_b, raw_job).seal(initiator=False)


def handshake_connect(sock: socket.socket, key: bytes, job_id: str) -> FrameSeal:
    """Initiator side: prove the key, and check that the acceptor knows it too. Returns the
    seal for the frames that follow."""
    raw_job = job_id.encode("ascii")
    hello = recv_exact(sock, len(HELLO) + NONCE)
    if not hello.startswith(HELLO):
        raise AuthError("the other side does not speak the cai-hpc shim protocol")
    nonce_a = hello[len(HELLO) :]
    nonce_b = secrets.token_bytes(NONCE)
    sock.sendall(nonce_b + bytes([len(raw_job)]) + raw_job + initiator_mac(key, nonce_a, nonce_b, raw_job))
    reply = recv_exact(sock, MAC)
    if not hmac.compare_digest(reply, acceptor_mac(key, nonce_a, nonce_b, raw_job)):
        raise AuthError("the other side does not know the job key")
    return _Exchange(key, nonce_a, nonce_b, raw_job).seal(initiator=True)


def send_control(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_control(sock: socket.socket) -> dict:
    (length,) = struct.unpack("!I", recv_exact(sock, 4))
    if length > MAX_CONTROL:
        raise AuthError(f"control message of {length} bytes is over the {MAX_CONTROL} limit")
    return json.loads(recv_exact(sock, length))
