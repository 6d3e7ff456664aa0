"""The wire format on its own: the channel-bound handshake and sealed frames, over real
socket pairs."""

from __future__ import annotations

import json
import pickle
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from lambda_shim import wire
from lambda_shim.landing import DIRECT, new_bytearray, new_bytes
from lambda_shim.wire import (
    FIRST,
    HEADER,
    INLINE,
    KIND_CONTROL,
    KIND_HEARTBEAT,
    KIND_OBJECT,
    KIND_OBJECT_BYTEARRAY,
    KIND_OBJECT_BYTES,
    MAC,
    MAX_CONTROL,
    MAX_JOB_ID,
    NONCE,
    PROOF_HEAD,
    PROTOCOL,
    SEALED_HEADER,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    AuthError,
    FrameReader,
    RecordBuffers,
    RefusedError,
    Session,
    decode_control,
    encode_control,
    handshake_accept,
    handshake_connect,
    job_key,
    job_of,
    load_secret,
    new_secret,
    pack_table,
    parse_proof,
    read_frame,
    recv_exact,
    secret_bytes,
    send_frame,
    table_bytes,
    table_entry,
    unpack_table,
    valid_job_id,
)

KEY = bytes(range(32))


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    return a, b


def handshake_pair(accept_key: bytes = KEY, connect_key: bytes = KEY, me: int = 1, them: int = 0):
    """(acceptor's result or error, initiator's result or error, acceptor socket, initiator
    socket) over a real socket pair; the acceptor is rank 0 and closes its end if refused."""
    a, b = pair()
    got: dict[str, object] = {}

    def accept() -> None:
        try:
            got["accept"] = handshake_accept(a, accept_key, 0)
        except (AuthError, EOFError) as exc:
            got["accept"] = exc
            a.close()

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        connected: object = handshake_connect(b, connect_key, "job-1", me, them)
    except (AuthError, EOFError) as exc:
        connected = exc
    thread.join(timeout=10)
    return got["accept"], connected, a, b


@pytest.fixture
def linked():
    """(acceptor socket, its session, initiator socket, its session) after a good handshake."""
    accepted, initiator, a, b = handshake_pair()
    job, peer, acceptor = accepted
    assert (job, peer) == ("job-1", 1)
    yield a, acceptor, b, initiator
    a.close()
    b.close()


def test_frames_arrive_in_order_in_both_directions_and_are_not_readable_on_the_wire(linked) -> None:
    a, acceptor, b, initiator = linked
    payload = pickle.dumps(["to acceptor", "plaintext-marker", bytes(3 * 2**20 + 5)])
    spy_a, spy_b = pair()  # what an on-path observer sees
    sender = threading.Thread(target=send_frame, args=(spy_a, initiator, KIND_OBJECT, 1, 7, payload))
    sender.start()
    wire_bytes = bytes(read_exactly(spy_b, SEALED_HEADER + len(payload) + 4 * 16))
    sender.join(timeout=10)
    assert b"plaintext-marker" not in wire_bytes and b"to acceptor" not in wire_bytes
    threading.Thread(target=b.sendall, args=(wire_bytes,)).start()
    assert read_frame(a, acceptor) == (KIND_OBJECT, 1, 0, 7, bytearray(payload))
    for i in range(3):
        send_frame(a, acceptor, KIND_OBJECT, 0, i, pickle.dumps(i))
    assert [pickle.loads(read_frame(b, initiator).payload) for _ in range(3)] == [0, 1, 2]
    spy_a.close()
    spy_b.close()


def read_exactly(sock: socket.socket, n: int) -> bytearray:
    out = bytearray()
    while len(out) < n:
        out += sock.recv(n - len(out))
    return out


def test_a_forged_header_announcing_100_gb_fails_before_anything_is_allocated(linked) -> None:
    a, acceptor, b, _ = linked
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # What a relay or on-path attacker injects: a header with a huge length (no key, so no seal).
    b.sendall(HEADER.pack(KIND_OBJECT, 1, 0, 0, 100 * 10**9) + bytes(SEALED_HEADER - HEADER.size))
    with pytest.raises(AuthError, match="record 0 failed its check"):
        read_frame(a, acceptor)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: nothing like 100 GB


def test_a_sealed_header_over_the_limit_is_refused_before_allocation(linked) -> None:
    a, acceptor, b, initiator = linked
    b.sendall(next(initiator.seal_frame(KIND_OBJECT, 1, 0, b"x" * 100)))  # the header only
    with pytest.raises(AuthError, match="over the 64-byte limit"):
        read_frame(a, acceptor, limit=64)


def test_a_changed_replayed_or_reflected_record_fails(linked) -> None:
    a, acceptor, b, initiator = linked
    records = list(initiator.seal_frame(KIND_OBJECT, 1, 0, pickle.dumps({"rank": 1, "pad": "x" * INLINE})))
    tampered = bytearray(records[1])
    tampered[3] ^= 1
    b.sendall(records[0] + tampered)
    with pytest.raises(AuthError, match="record 1 failed its check"):
        read_frame(a, acceptor)
    # A fresh pair: a frame sent twice, or our own frame sent back to us.
    accepted, initiator2, a2, b2 = handshake_pair()
    acceptor2 = accepted[2]
    frame = b"".join(initiator2.seal_frame(KIND_OBJECT, 1, 0, b"once"))
    b2.sendall(frame + frame)
    assert read_frame(a2, acceptor2).payload == b"once"
    with pytest.raises(AuthError):
        read_frame(a2, acceptor2)
    a3_accepted, _, a3, b3 = handshake_pair()
    b3.sendall(b"".join(a3_accepted[2].seal_frame(KIND_OBJECT, 0, 0, b"mine")))  # reflected
    with pytest.raises(AuthError):
        read_frame(a3, a3_accepted[2])
    for s in (a2, b2, a3, b3):
        s.close()


def test_each_connection_has_its_own_keys() -> None:
    first, _, a1, b1 = handshake_pair()
    _, second_initiator, a2, b2 = handshake_pair()
    b1.sendall(b"".join(second_initiator.seal_frame(KIND_OBJECT, 1, 0, b"x")))
    with pytest.raises(AuthError):
        read_frame(a1, first[2])
    for s in (a1, b1, a2, b2):
        s.close()


def test_a_wrong_key_fails_the_handshake_on_both_sides() -> None:
    accepted, connected, _, b = handshake_pair(accept_key=KEY, connect_key=bytes(32))
    assert isinstance(accepted, AuthError) and str(accepted) == "wrong key"  # nothing the initiator chose
    assert isinstance(connected, RefusedError)
    b.close()


def test_a_handshake_meant_for_another_rank_is_refused() -> None:
    accepted, connected, _, b = handshake_pair(them=3)  # the acceptor is rank 0
    assert isinstance(accepted, AuthError) and "meant for 3, not 0" in str(accepted)
    assert isinstance(connected, RefusedError)
    b.close()


def test_an_acceptor_that_skips_the_key_check_is_caught_by_the_initiator() -> None:
    a, b = pair()

    def impostor() -> None:
        a.sendall(PROTOCOL + bytes(NONCE))
        a.recv(4096)  # the initiator's proof, ignored
        a.sendall(bytes(MAC))

    thread = threading.Thread(target=impostor)
    thread.start()
    try:
        with pytest.raises(AuthError, match="does not know the job key"):
            handshake_connect(b, KEY, "job-1", 1, 0)
    finally:
        thread.join(timeout=10)
        a.close()
        b.close()


def test_relaying_someone_elses_handshake_gives_nothing_to_inject() -> None:
    """A man in the middle forwards a real handshake between the two ends, then writes its
    own frame into the acceptor's stream: it fails, since the frame keys come from the
    transcript and the job key, which the relay never holds."""
    acceptor_side, relay_a = pair()
    relay_b, initiator_side = pair()
    got: dict[str, object] = {}
    thread = threading.Thread(target=lambda: got.setdefault("a", handshake_accept(acceptor_side, KEY, 0)))
    thread.start()
    hello = read_exactly(relay_a, len(PROTOCOL) + NONCE)
    relay_b.sendall(hello)
    connecting = threading.Thread(target=lambda: got.setdefault("i", handshake_connect(initiator_side, KEY, "j", 1, 0)))
    connecting.start()
    proof = relay_b.recv(4096)
    relay_a.sendall(proof)
    relay_b.sendall(read_exactly(relay_a, MAC))
    thread.join(timeout=10)
    connecting.join(timeout=10)
    _, _, session = got["a"]
    relay_a.sendall(FIRST.pack(KIND_CONTROL, 1, 0, 0, 2, b"{}") + bytes(16))
    with pytest.raises(AuthError):
        read_frame(acceptor_side, session)
    for s in (acceptor_side, relay_a, relay_b, initiator_side):
        s.close()


def test_secrets_shorter_than_32_bytes_are_refused() -> None:
    with pytest.raises(AuthError, match="at least 32"):
        secret_bytes("hunter2")
    with pytest.raises(AuthError, match="at least 32"):
        secret_bytes("ab" * 31)
    assert len(secret_bytes("ab" * 32)) == 32


def test_deep_or_oversized_control_messages_are_refused_without_recursion() -> None:
    with pytest.raises(AuthError, match="nested deeper"):
        decode_control(b"[" * 30_000 + b"]" * 30_000)
    with pytest.raises(AuthError, match="over the"):
        decode_control(b'{"a":"' + b"x" * 70_000 + b'"}')
    assert decode_control(b'{"op":"x","s":"[[[[[[[["}') == {"op": "x", "s": "[[[[[[[["}


@pytest.mark.timeout(5)  # milliseconds now; the quadratic check took 15 s here for one
def test_the_depth_check_reads_a_control_message_once() -> None:
    """Unterminated strings of escaped quotes made the check quadratic (minutes at 64 KiB)."""
    for message in (b'"' + b'\\"' * 32_000, b'["' + b'\\"' * 32_000, b"\\" * 64_000):
        with pytest.raises(AuthError, match="not JSON"):
            decode_control(message)
    assert decode_control(b'{"s":"\\"[[[[[[","t":["]]]]"]}') == {"s": '"[[[[[[', "t": ["]]]]"]}
    with pytest.raises(AuthError, match="nested deeper"):
        decode_control(b'{"s":"\\\\","t":[[[[[]]]]]}')  # an escaped backslash ends no string


def test_the_address_table_of_100000_ranks_round_trips() -> None:
    entries = [(f"10.0.{r // 256 % 256}.{r % 256}", 1000 + r % 60000, "127.0.0.1", 7) for r in range(100_000)]
    data = pack_table(entries)
    assert len(data) == 12 * 100_000
    table = unpack_table(data, 100_000)
    assert table[12345] == ((entries[12345][0], entries[12345][1]), ("127.0.0.1", 7))
    with pytest.raises(AuthError):
        unpack_table(data, 99_999)


def feed_all(reader: FrameReader, sock: socket.socket) -> list:
    sock.setblocking(False)
    return reader.feed(sock)


def test_the_incremental_reader_keeps_a_frame_cut_anywhere(linked) -> None:
    """Frames arriving a byte at a time, a big frame in pieces, several frames in one read."""
    a, acceptor, b, initiator = linked
    reader = FrameReader(acceptor)
    small = b"".join(initiator.seal_frame(KIND_OBJECT, 1, 0, b"tiny", ctx=7))
    for byte in small[:-1]:
        b.sendall(bytes([byte]))
        assert feed_all(reader, a) == []
    b.sendall(small[-1:])
    assert feed_all(reader, a) == [(KIND_OBJECT, 1, 7, 0, bytearray(b"tiny"))]
    big = bytes(range(256)) * (5 * 2**12 + 3)  # 5 MiB + 768 bytes: six records, most past the scratch
    wire_bytes = b"".join(initiator.seal_frame(KIND_OBJECT, 1, 2, big))
    wire_bytes += b"".join(initiator.seal_frame(KIND_CONTROL, 1, 3, b"after", ctx=1))
    sender = threading.Thread(target=b.sendall, args=(wire_bytes,))
    sender.start()
    frames: list = []
    while len(frames) < 2:
        frames += feed_all(reader, a)
    sender.join(timeout=10)
    assert frames == [(KIND_OBJECT, 1, 0, 2, bytearray(big)), (KIND_CONTROL, 1, 1, 3, bytearray(b"after"))]


def test_the_incremental_reader_checks_the_header_before_allocating(linked) -> None:
    a, acceptor, b, _ = linked
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b.sendall(HEADER.pack(KIND_OBJECT, 1, 0, 0, 100 * 10**9) + bytes(SEALED_HEADER - HEADER.size))
    with pytest.raises(AuthError, match="record 0 failed its check"):
        feed_all(FrameReader(acceptor), a)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB


def test_the_incremental_reader_refuses_a_sealed_header_over_its_limit(linked) -> None:
    a, acceptor, b, initiator = linked
    b.sendall(next(initiator.seal_frame(KIND_OBJECT, 1, 0, b"x" * 100)))  # the header only
    with pytest.raises(AuthError, match="over the 64-byte limit"):
        feed_all(FrameReader(acceptor, limit=64), a)


def test_the_incremental_reader_fails_a_tampered_record_and_the_end_of_the_stream(linked) -> None:
    a, acceptor, b, initiator = linked
    header, record = initiator.seal_frame(KIND_OBJECT, 1, 0, b"payload" * INLINE)
    tampered = bytearray(record)
    tampered[0] ^= 1
    b.sendall(header + tampered)
    with pytest.raises(AuthError, match="record 1 failed its check"):
        feed_all(FrameReader(acceptor), a)
    b.close()
    with pytest.raises(EOFError):
        feed_all(FrameReader(acceptor), a)


# ---------------------------------------------------------------- payloads landing in place (issue 18)
def test_a_frame_sealed_into_the_reused_record_buffer_reads_back_whole(linked) -> None:
    """The transport seals a big frame's records into one buffer, sending each before the next
    is sealed; the reader writes a bytes object's frame straight into a bytes."""
    a, acceptor, b, initiator = linked
    big = bytes(range(251)) * (3 * 2**20 // 251 + 5)  # four records, the last one short

    def send() -> None:
        for record in initiator.seal_frame(KIND_OBJECT_BYTES, 1, 4, big, ctx=2, buffers=RecordBuffers(1)):
            b.sendall(record)

    sender = threading.Thread(target=send)
    sender.start()
    reader, frames = FrameReader(acceptor), []
    while not frames:
        frames = feed_all(reader, a)
    sender.join(timeout=10)
    assert frames == [(KIND_OBJECT_BYTES, 1, 2, 4, big)]
    assert type(frames[0].payload) is bytes


@pytest.mark.parametrize("kind", [KIND_OBJECT_BYTES, KIND_OBJECT_BYTEARRAY])
def test_an_object_frame_over_the_limit_is_refused_before_allocation(linked, kind) -> None:
    a, acceptor, b, initiator = linked
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b.sendall(initiator._seal(FIRST.pack(kind, 1, 0, 0, 2**36, b"")))  # a genuine sealed header: 64 GiB
    with pytest.raises(AuthError, match="over the 1073741824-byte limit"):
        feed_all(FrameReader(acceptor, limit=2**30), a)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB


@pytest.mark.parametrize("kind", [KIND_OBJECT_BYTES, KIND_OBJECT_BYTEARRAY])
def test_a_tampered_record_of_an_object_frame_is_refused(linked, kind) -> None:
    a, acceptor, b, initiator = linked
    records = [bytes(r) for r in initiator.seal_frame(kind, 1, 0, bytes(2 * 2**20 + 7), buffers=RecordBuffers(1))]
    tampered = bytearray(records[2])
    tampered[-1] ^= 1  # the tag of the second payload record
    sender = threading.Thread(target=b.sendall, args=(b"".join([*records[:2], tampered]),))
    sender.start()
    reader = FrameReader(acceptor)
    with pytest.raises(AuthError, match="record 2 failed its check"):
        while True:
            assert feed_all(reader, a) == []
    sender.join(timeout=10)


@pytest.mark.parametrize("n", [0, 1, 100_000, 5 * 2**20 + 3])
def test_landing_buffers_are_the_promised_objects_and_take_every_byte(n) -> None:
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    made, view = new_bytes(n)
    view[:] = data
    assert type(made) is (bytes if n >= DIRECT else bytearray) and made == data
    array = new_bytearray(n)
    memoryview(array)[:] = data
    assert type(array) is bytearray and array == data


def test_the_incremental_reader_hands_over_the_last_frame_before_the_end_of_the_stream(linked) -> None:
    """A peer that sends a big frame and closes: the frame arrives, then the end (a clean one,
    between frames); a stream cut inside a frame ends in the middle of one."""
    a, acceptor, b, initiator = linked
    big = bytes(3 * 2**20)
    b.setblocking(True)
    wire_bytes = b"".join(initiator.seal_frame(KIND_OBJECT, 1, 0, big))
    sender = threading.Thread(target=lambda: (b.sendall(wire_bytes), b.close()))
    sender.start()
    reader = FrameReader(acceptor)
    frames: list = []
    a.setblocking(True)  # every recv waits for bytes or the end: the end comes right after the frame
    while not frames:
        frames = reader.feed(a, budget=2**40)
    sender.join(timeout=10)
    assert frames == [(KIND_OBJECT, 1, 0, 0, bytearray(big))]
    with pytest.raises(EOFError):
        reader.feed(a)
    assert reader.between_frames()


# ---------------------------------------------------------------- issue 22: mutation survivors
# Tests added after mutation testing of wire.py (README, Development): each kills mutants the
# tests above let through. Kept in this separate block, as others edit the tests above.
SECRET_HEX = "0f" * 32


def test_a_new_secret_is_32_random_bytes_in_hex() -> None:
    first, second = new_secret(), new_secret()
    assert len(first) == 64 and len(bytes.fromhex(first)) == 32 and first != second


def test_the_secret_is_read_from_the_token_file_before_the_variable(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text(f"  {SECRET_HEX}\n")
    env = {TOKEN_FILE_ENV: str(token), TOKEN_ENV: "ab" * 32}
    assert load_secret(env) == bytes([15] * 32)
    assert load_secret({TOKEN_FILE_ENV: "", TOKEN_ENV: f" {SECRET_HEX} "}) == bytes([15] * 32)
    assert load_secret({TOKEN_ENV: "x" * 40}) == b"x" * 40  # not hex: the text's own bytes


def test_the_environment_is_the_process_environment_unless_given(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    monkeypatch.setenv(TOKEN_ENV, SECRET_HEX)
    assert load_secret() == bytes([15] * 32)


@pytest.mark.parametrize(
    "env",
    [{}, {TOKEN_ENV: ""}, {TOKEN_ENV: " \n"}, {TOKEN_FILE_ENV: "", TOKEN_ENV: ""}],
    ids=["nothing set", "empty variable", "blank variable", "both empty"],
)
def test_no_secret_is_one_error_naming_both_ways_to_give_it(env) -> None:
    with pytest.raises(AuthError) as caught:
        load_secret(env)
    assert str(caught.value) == "no secret: set CAI_HPC_TOKEN_FILE (a file holding it) or CAI_HPC_TOKEN"


def test_an_unreadable_or_blank_token_file_is_refused_naming_it(tmp_path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(AuthError) as caught:
        load_secret({TOKEN_FILE_ENV: str(missing), TOKEN_ENV: SECRET_HEX})  # the variable is no fallback
    assert str(caught.value) == f"cannot read the token file {missing}: No such file or directory"
    blank = tmp_path / "blank"
    blank.write_text("\n")
    with pytest.raises(AuthError, match=r"^no secret: set CAI_HPC_TOKEN_FILE"):
        load_secret({TOKEN_FILE_ENV: str(blank), TOKEN_ENV: SECRET_HEX})


def test_a_job_id_that_is_not_ascii_is_refused_in_words() -> None:
    assert job_of(b"job-1") == "job-1"
    with pytest.raises(AuthError) as caught:
        job_of("jöb".encode())
    assert str(caught.value) == "job id is not ASCII"


def test_an_address_table_of_the_wrong_length_is_refused_in_words() -> None:
    with pytest.raises(AuthError) as caught:
        unpack_table(bytes(25), 2)
    assert str(caught.value) == "an address table of 25 bytes for 2 ranks"


BIG = bytes(range(256)) * 1024  # 256 KiB: one record larger than the reader's scratch buffer


@pytest.mark.timeout(20)  # a reader that missed the end would spin here
@pytest.mark.parametrize(
    "cut",
    [SEALED_HEADER // 2, SEALED_HEADER, SEALED_HEADER + 100, SEALED_HEADER + FrameReader.SCRATCH + 100],
    ids=["inside the header", "after the header", "inside a small record", "inside a big record"],
)
def test_a_stream_cut_inside_a_frame_ends_in_the_middle_of_one(linked, cut) -> None:
    """The transport takes an end of the stream between frames for a peer that left cleanly,
    and one inside a frame for a failure: the reader must tell them apart wherever the cut is."""
    a, acceptor, b, initiator = linked
    payload = BIG if cut > SEALED_HEADER + 100 else b"x" * 1000
    b.sendall(b"".join(initiator.seal_frame(KIND_OBJECT, 1, 0, payload))[:cut])
    b.close()
    reader = FrameReader(acceptor)
    with pytest.raises(EOFError) as caught:
        feed_all(reader, a)
    assert str(caught.value) == "connection closed"  # it ends up in the transport's one-line error
    assert not reader.between_frames()


def test_a_big_record_arriving_a_byte_at_a_time_is_read_whole(linked) -> None:
    a, acceptor, b, initiator = linked
    wire_bytes = b"".join(initiator.seal_frame(KIND_OBJECT, 1, 4, BIG))
    reader = FrameReader(acceptor)
    first = SEALED_HEADER + 1000
    b.sendall(wire_bytes[:first])
    assert feed_all(reader, a) == []
    for i in range(first, first + 3):  # single bytes of the big record, each its own read
        b.sendall(wire_bytes[i : i + 1])
        assert feed_all(reader, a) == []
    sender = threading.Thread(target=b.sendall, args=(wire_bytes[first + 3 :],))
    sender.start()
    frames: list = []
    while not frames:
        frames = feed_all(reader, a)
    sender.join(timeout=10)
    assert frames == [(KIND_OBJECT, 1, 0, 4, bytearray(BIG))] and reader.between_frames()


def test_an_acceptor_of_another_protocol_version_is_refused_in_words() -> None:
    a, b = pair()
    a.sendall(b"CAI-SHIM/2" + bytes(NONCE))  # an older server or rank
    try:
        with pytest.raises(AuthError) as caught:
            handshake_connect(b, KEY, "job-1", 1, 0)
        assert str(caught.value) == "the other side does not speak this version of the cai-hpc shim protocol"
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(10)  # without its own deadline the handshake would wait here for ever
@pytest.mark.parametrize("side", ["initiator", "acceptor"])
def test_a_handshake_with_a_silent_peer_ends_at_its_deadline(side, monkeypatch) -> None:
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT_S", 0.2)
    a, b = socket.socketpair()  # blocking, no socket timeout: only the handshake's deadline ends the wait
    try:
        with pytest.raises(TimeoutError):
            if side == "initiator":
                handshake_connect(b, KEY, "job-1", 1, 0)  # no greeting ever comes
            else:
                handshake_accept(a, KEY, 0)  # no proof ever comes
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- attack2: review of the perf wire (issue 18)
_OTHER_CTYPES_USER = {
    # What another library in the same process may set on ctypes.pythonapi's shared functions
    # (common idioms); the landing buffers must not depend on them, nor change them.
    "as_string": "api.PyBytes_AsString.restype = ctypes.c_char_p",
    "view": "api.PyMemoryView_FromMemory.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t, ctypes.c_int)",
    "from_string": "api.PyBytes_FromStringAndSize.restype = ctypes.c_void_p",
}


@pytest.mark.parametrize("idiom", sorted(_OTHER_CTYPES_USER))
def test_landing_buffers_do_not_share_ctypes_pythonapi_settings_with_other_code(idiom) -> None:
    """landing.py once configured ctypes.pythonapi's own (process-wide, cached) function
    objects: another module setting them its way crashed the receiver (a segfault writing
    into a temporary), or made every big receive fail; and landing changed theirs."""
    script = f"""
import ctypes
api = ctypes.pythonapi
default = api.PyBytes_AsString.restype
from lambda_shim.landing import new_bytes
assert api.PyBytes_AsString.restype is default, "landing changed ctypes.pythonapi's settings"
{_OTHER_CTYPES_USER[idiom]}
made, view = new_bytes(1 << 20)
view[:] = b"Z" * (1 << 20)
assert type(made) is bytes and made == b"Z" * (1 << 20)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-500:]


def test_a_job_key_depends_on_both_the_master_secret_and_the_job() -> None:
    key = job_key(KEY, "job-1")
    assert len(key) == 32 and key == job_key(KEY, "job-1")
    assert key != job_key(bytes(32), "job-1") and key != job_key(KEY, "job-2")


def test_control_messages_are_compact_json_objects_both_ways() -> None:
    message = {"op": "register", "rank": 3, "ports": [1, 2]}
    assert encode_control(message) == b'{"op":"register","rank":3,"ports":[1,2]}'
    assert decode_control(encode_control(message)) == message


def test_a_control_message_of_exactly_the_size_limit_is_read() -> None:
    at_limit = b'{"s":"' + b"x" * (MAX_CONTROL - 8) + b'"}'
    assert len(at_limit) == MAX_CONTROL and decode_control(at_limit) == {"s": "x" * (MAX_CONTROL - 8)}
    with pytest.raises(AuthError) as caught:
        decode_control(at_limit[:-2] + b' "}')
    assert str(caught.value) == f"control message of {MAX_CONTROL + 1} bytes is over the {MAX_CONTROL} limit"


@pytest.mark.parametrize(
    "message",
    [
        b'{"a":[[[1]]]}',  # nesting of exactly the limit
        b'{"a":{"b":{"c":{"d":1}}}}',
        b'{"a":[1],"b":[2],"c":{"d":3},"e":{"f":4},"g":[[[5]]]}',  # siblings do not add up
    ],
)
def test_control_messages_nested_to_the_limit_are_read(message) -> None:
    assert decode_control(message) == json.loads(message)


@pytest.mark.parametrize(
    "message",
    [b'{"a":[[[[1]]]]}', b'{"a":{"b":{"c":{"d":{}}}}}', b"[[[[],[[]]]]]", b'[{"a":[1]},[[[[]]]]]'],
)
def test_control_messages_nested_past_the_limit_are_refused(message) -> None:
    with pytest.raises(AuthError) as caught:
        decode_control(message)
    assert str(caught.value) == "control message nested deeper than 4"


def test_control_messages_that_are_not_json_objects_are_refused_in_words() -> None:
    with pytest.raises(AuthError) as caught:
        decode_control(b'{"op":')
    assert str(caught.value) == "control message is not JSON"
    with pytest.raises(AuthError) as caught:
        decode_control(b'["op"]')
    assert str(caught.value) == "control message is not a JSON object"


def test_a_proof_announcing_a_job_id_of_0_or_65_bytes_is_refused() -> None:
    for length in (0, MAX_JOB_ID + 1):
        with pytest.raises(AuthError) as caught:
            parse_proof(bytes(NONCE) + struct.pack("!iiB", 1, 0, length))
        assert str(caught.value) == "bad job id length"
    assert parse_proof(bytes(NONCE) + struct.pack("!iiB", 1, 0, MAX_JOB_ID))[1:] == (1, 0, MAX_JOB_ID)


def test_a_job_id_of_the_longest_allowed_length_makes_a_handshake() -> None:
    job = "j" * MAX_JOB_ID
    a, b = pair()
    got: dict[str, object] = {}
    thread = threading.Thread(target=lambda: got.setdefault("a", handshake_accept(a, KEY, 0)))
    thread.start()
    try:
        session = handshake_connect(b, KEY, job, 1, 0)
        thread.join(timeout=10)
        assert got["a"][:2] == (job, 1)
        b.sendall(b"".join(session.seal_frame(KIND_OBJECT, 1, 0, b"hi")))
        assert read_frame(a, got["a"][2]).payload == b"hi"
    finally:
        a.close()
        b.close()


def test_a_refused_proof_is_one_line_saying_why() -> None:
    _, connected, _, b = handshake_pair(connect_key=bytes(32))
    assert str(connected) == "the other side refused our proof (wrong key, or not a member of the job)"
    b.close()


def _drip(sock: socket.socket, data: bytes, sent: list[int], every_s: float = 0.1) -> None:
    """Send ``data`` a byte at a time (a slow or hostile peer keeping the connection busy),
    counting in ``sent[0]`` the bytes that went out."""
    try:
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            sent[0] += 1
            time.sleep(every_s)
    except OSError:
        pass  # the other side gave up and closed: what the test waits for


@pytest.mark.timeout(20)  # the default deadline (10 s) would end the wait only after the dripping
@pytest.mark.parametrize("dripped", ["proof head", "job id and proof"])
def test_an_acceptor_keeps_its_deadline_against_a_peer_sending_a_byte_at_a_time(dripped) -> None:
    a, b = socket.socketpair()
    proof = bytes(NONCE) + struct.pack("!iiB", 1, 0, 5) + b"job-1" + bytes(MAC)  # 78 bytes
    head = 0 if dripped == "proof head" else PROOF_HEAD
    b.sendall(proof[:head])
    sent = [0]
    dripper = threading.Thread(target=_drip, args=(b, proof[head:], sent, 0.2), daemon=True)
    dripper.start()
    try:
        with pytest.raises(TimeoutError):
            handshake_accept(a, KEY, 0, deadline=time.monotonic() + 0.5)
    finally:
        a.close()
        dripper.join(timeout=20)
        b.close()
    # The deadline ended the wait, not the proof's head arriving whole after it: at 0.2 s a byte,
    # the 0.5 s let about 3 bytes through, where the head's 41 take 8 s.
    assert sent[0] < PROOF_HEAD


@pytest.mark.timeout(10)
@pytest.mark.parametrize("dripped", ["greeting", "reply"])
def test_an_initiator_keeps_its_deadline_against_an_acceptor_sending_a_byte_at_a_time(dripped) -> None:
    a, b = socket.socketpair()
    greeting = PROTOCOL + bytes(NONCE)
    if dripped == "greeting":
        dripper = threading.Thread(target=_drip, args=(a, greeting, [0]), daemon=True)
    else:
        a.sendall(greeting)
        dripper = threading.Thread(target=_drip, args=(a, bytes(MAC), [0]), daemon=True)
    dripper.start()
    try:
        with pytest.raises(TimeoutError):
            handshake_connect(b, KEY, "job-1", 1, 0, deadline=time.monotonic() + 0.5)
    finally:
        b.close()
        dripper.join(timeout=10)
        a.close()


def _sessions() -> tuple[Session, Session, Session]:
    """Two senders with the same keys (sealing is deterministic) and the matching receiver."""
    to_b, to_a = bytes(range(32)), bytes(range(1, 33))
    return Session(to_b, to_a), Session(to_b, to_a), Session(to_a, to_b)


def test_a_small_frame_sealed_in_one_piece_is_the_records_of_seal_frame() -> None:
    one_piece, by_records, receiver = _sessions()
    frames = [(KIND_HEARTBEAT, 1, 0, b"", 0), (KIND_OBJECT, 1, 7, b"x" * 100, 3), (KIND_CONTROL, 1, 9, b"{}", 1)]
    a, b = pair()
    try:
        for kind, source, tag, payload, ctx in frames:
            sealed = one_piece.seal_small(kind, source, tag, payload, ctx=ctx)
            assert sealed == b"".join(by_records.seal_frame(kind, source, tag, payload, ctx=ctx))
            b.sendall(sealed)
        assert [read_frame(a, receiver) for _ in frames] == [
            (kind, source, ctx, tag, bytearray(payload)) for kind, source, tag, payload, ctx in frames
        ]
    finally:
        a.close()
        b.close()


def test_a_frame_without_a_payload_carries_none() -> None:
    one_piece, by_records, receiver = _sessions()
    sealed = one_piece.seal_small(KIND_HEARTBEAT, 1, 5)
    assert sealed == b"".join(by_records.seal_frame(KIND_HEARTBEAT, 1, 5))
    a, b = pair()
    try:
        b.sendall(sealed)
        send_frame(b, by_records, KIND_HEARTBEAT, 1, 6)
        assert [read_frame(a, receiver) for _ in range(2)] == [(KIND_HEARTBEAT, 1, 0, t, bytearray()) for t in (5, 6)]
    finally:
        a.close()
        b.close()


def test_the_incremental_reader_counts_every_record_it_checks(linked) -> None:
    # The transport's liveness watches this count: authenticated bytes arrived from the peer.
    a, acceptor, b, initiator = linked
    reader = FrameReader(acceptor)
    b.sendall(b"".join(initiator.seal_frame(KIND_OBJECT, 1, 0, b"x" * (INLINE + 1))))  # header + 1 record
    assert len(feed_all(reader, a)) == 1 and reader.records == 2
    b.sendall(b"".join(initiator.seal_frame(KIND_OBJECT, 1, 0, b"x" * INLINE)))  # inside the header record
    assert len(feed_all(reader, a)) == 1 and reader.records == 3
    b.sendall(b"".join(initiator.seal_frame(KIND_HEARTBEAT, 1, 0)))  # header only
    assert len(feed_all(reader, a)) == 1 and reader.records == 4


def test_recv_exact_takes_what_is_there_before_its_deadline_and_says_how_far_it_got() -> None:
    a, b = pair()
    try:
        b.sendall(b"0123456789")
        assert recv_exact(a, 4, deadline=time.monotonic() + 0.5) == b"0123"  # under a second is still time
        with pytest.raises(TimeoutError) as caught:
            recv_exact(a, 10, deadline=time.monotonic() - 0.1)  # the socket's own timeout says less
        assert str(caught.value) == "timed out after 0 of 10 bytes"
        assert recv_exact(a, 6) == b"456789"
        b.sendall(b"abc")
        b.close()
        with pytest.raises(EOFError) as ended:
            recv_exact(a, 10)
        assert str(ended.value) == "connection closed after 3 of 10 bytes"
    finally:
        a.close()
        b.close()


def test_one_ranks_entry_is_read_from_a_packed_table() -> None:
    entries = [
        ("10.0.0.1", 5001, "1.2.3.4", 6001),
        ("10.0.0.2", 5002, "1.2.3.5", 6002),
        ("10.0.0.3", 5003, "9.9.9.9", 1),
    ]
    data = pack_table(entries)
    assert table_bytes(3) == len(data) == 36
    assert [table_entry(data, r) for r in (2, 0)] == [
        (("10.0.0.3", 5003), ("9.9.9.9", 1)),
        (("10.0.0.1", 5001), ("1.2.3.4", 6001)),
    ]


@pytest.mark.parametrize(
    ("job_id", "valid"),
    [
        ("a", True),
        ("Job-1.run_2", True),
        ("j" * 64, True),
        ("j" * 65, False),
        ("", False),
        ("-job", False),
        (".job", False),
        ("a b", False),
        ("jöb", False),
        (b"job", False),
        (None, False),
    ],
)
def test_valid_job_ids(job_id, valid) -> None:
    assert valid_job_id(job_id) is valid


def test_a_frame_of_exactly_the_limit_is_read(linked) -> None:
    a, acceptor, b, initiator = linked
    b.sendall(b"".join(initiator.seal_frame(KIND_OBJECT, 1, 0, b"x" * 64)))
    assert read_frame(a, acceptor, limit=64).payload == b"x" * 64


def test_an_acceptor_without_the_key_is_named_in_words() -> None:
    a, b = pair()
    thread = threading.Thread(target=lambda: (a.sendall(PROTOCOL + bytes(NONCE)), a.recv(4096), a.sendall(bytes(MAC))))
    thread.start()
    try:
        with pytest.raises(AuthError) as caught:
            handshake_connect(b, KEY, "job-1", 1, 0)
        assert str(caught.value) == "the other side does not know the job key"
    finally:
        thread.join(timeout=10)
        a.close()
        b.close()
