"""The wire format on its own: the handshake and the per-frame MACs, over a socket pair."""

from __future__ import annotations

import pickle
import socket
import threading

import pytest

from lambda_shim.wire import (
    FRAME,
    HELLO,
    KIND_OBJECT,
    MAC,
    NONCE,
    AuthError,
    FrameSeal,
    handshake_accept,
    handshake_connect,
)

KEY = bytes(range(32))


def handshake_pair(accept_key: bytes = KEY, connect_key: bytes = KEY) -> tuple[object, object]:
    """What each side's handshake returned (or raised) over a real socket pair. The acceptor
    closes its end when it is done, as a rank does, so a refused initiator sees EOF."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    got: dict[str, object] = {}

    def accept() -> None:
        try:
            got["accept"] = handshake_accept(a, accept_key)
        except (AuthError, EOFError) as exc:
            got["accept"] = exc
        finally:
            a.close()

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        connected: object = handshake_connect(b, connect_key, "job-1")
    except (AuthError, EOFError) as exc:
        connected = exc
    finally:
        thread.join(timeout=10)
        b.close()
    return got["accept"], connected


def sealed_pair() -> tuple[FrameSeal, FrameSeal]:
    """(acceptor's seal, initiator's seal) after a successful handshake."""
    accepted, initiator = handshake_pair()
    job, acceptor = accepted
    assert job == "job-1"
    return acceptor, initiator


def frame(payload: bytes, source: int = 1, tag: int = 7) -> tuple[bytes, bytes]:
    return FRAME.pack(KIND_OBJECT, source, tag, len(payload)), payload


def test_frames_check_in_order_in_both_directions() -> None:
    acceptor, initiator = sealed_pair()
    for i in range(3):
        header, payload = frame(pickle.dumps(["to acceptor", i]))
        acceptor.check(header, payload, initiator.seal(header, payload))
        header, payload = frame(pickle.dumps(["to initiator", i]))
        initiator.check(header, payload, acceptor.seal(header, payload))


def test_a_changed_payload_or_header_fails_before_anything_is_unpickled() -> None:
    acceptor, initiator = sealed_pair()
    header, payload = frame(pickle.dumps({"rank": 1}))
    mac = initiator.seal(header, payload)
    tampered = bytearray(payload)
    tampered[-2] ^= 1
    with pytest.raises(AuthError, match="frame 0 failed its MAC"):
        acceptor.check(header, tampered, mac)
    other_source, _ = frame(payload, source=2)
    with pytest.raises(AuthError, match="frame 0 failed its MAC"):
        acceptor.check(other_source, payload, mac)


def test_a_replayed_or_reflected_frame_fails() -> None:
    acceptor, initiator = sealed_pair()
    header, payload = frame(b"x")
    mac = initiator.seal(header, payload)
    acceptor.check(header, payload, mac)
    with pytest.raises(AuthError, match="frame 1 failed"):
        acceptor.check(header, payload, mac)  # the same frame again
    reflected = acceptor.seal(header, payload)
    with pytest.raises(AuthError):
        acceptor.check(header, payload, reflected)  # our own frame sent back to us


def test_each_connection_has_its_own_keys() -> None:
    first_acceptor, _ = sealed_pair()
    _, second_initiator = sealed_pair()
    header, payload = frame(b"x")
    with pytest.raises(AuthError):
        first_acceptor.check(header, payload, second_initiator.seal(header, payload))


def test_a_wrong_key_fails_the_handshake_on_both_sides() -> None:
    accepted, connected = handshake_pair(accept_key=KEY, connect_key=bytes(32))
    assert isinstance(accepted, AuthError) and "wrong key for job 'job-1'" in str(accepted)
    assert isinstance(connected, EOFError)  # refused before the acceptor proves anything


def test_an_acceptor_that_skips_the_key_check_is_caught_by_the_initiator() -> None:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)

    def impostor() -> None:
        a.sendall(HELLO + bytes(NONCE))
        a.recv(4096)  # the initiator's proof, ignored
        a.sendall(bytes(MAC))

    thread = threading.Thread(target=impostor)
    thread.start()
    try:
        with pytest.raises(AuthError, match="does not know the job key"):
            handshake_connect(b, KEY, "job-1")
    finally:
        thread.join(timeout=10)
        a.close()
        b.close()
