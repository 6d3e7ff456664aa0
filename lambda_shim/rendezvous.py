"""The rendezvous server: ranks of a job meet here, learn each other's addresses, and, when
two of them cannot connect directly, talk through it (the relay of last resort).

    CAI_HPC_TOKEN_FILE=secret python -m lambda_shim.rendezvous --host 127.0.0.1 --port 7777

Jobs are keyed by a job id that must be fresh for every run: a job id that already ran, or
whose deadline passed, is refused, so a dead rank's stale entry can never be paired with a
live one. Every connection authenticates (HMAC over fresh nonces, with a per-job key derived
from the server's secret) before anything else is read; messages are bounded JSON, and every
wait has a deadline, so a client that sends garbage, stalls or disconnects costs the server
one closed connection and nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import secrets
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from lambda_shim.wire import (
    HANDSHAKE_TIMEOUT_S,
    HELLO,
    MAC,
    MAX_CONTROL,
    MAX_JOB_ID,
    NONCE,
    AuthError,
    acceptor_mac,
    initiator_mac,
    job_key,
    load_secret,
)

log = logging.getLogger("lambda_shim.rendezvous")
MAX_WORLD = 100_000
MAX_WAIT_S = 3600.0
REMEMBER_S = 24 * 3600.0  # how long a finished job id stays refused
REMEMBER_MAX = 100_000
RELAY_CHUNK = 256 * 1024


@dataclass
class Member:
    addrs: list
    observed: list
    writer: asyncio.StreamWriter


@dataclass
class Job:
    job_id: str
    size: int
    deadline: float
    members: dict[int, Member] = field(default_factory=dict)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


class Rendezvous:
    def __init__(self, master: bytes) -> None:
        self.master = master
        self.jobs: dict[str, Job] = {}
        self.finished: OrderedDict[str, float] = OrderedDict()
        # (job, rank, peer) -> the waiting side's reader, writer, "joined" and "finished" futures
        self.relays: dict[tuple[str, int, int], tuple] = {}

    # ---- connection entry point ----
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            job_id = await asyncio.wait_for(self._authenticate(reader, writer), HANDSHAKE_TIMEOUT_S)
            request = await asyncio.wait_for(_read_control(reader), HANDSHAKE_TIMEOUT_S)
            op = request.get("op")
            if op == "register":
                await self._register(job_id, request, reader, writer, peer)
            elif op == "relay":
                await self._relay(job_id, request, reader, writer)
            else:
                await _send_control(writer, {"op": "error", "message": f"unknown op {op!r}"})
        except AuthError as exc:
            log.warning("refused %s: %s", peer, exc)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, TypeError) as exc:
            log.info("dropped %s: %s", peer, type(exc).__name__)
        finally:
            writer.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        nonce_a = secrets.token_bytes(NONCE)
        writer.write(HELLO + nonce_a)
        await writer.drain()
        nonce_b = await reader.readexactly(NONCE)
        (length,) = await reader.readexactly(1)
        if not 0 < length <= MAX_JOB_ID:
            raise AuthError("bad job id length")
        raw_job = await reader.readexactly(length)
        mac = await reader.readexactly(MAC)
        try:
            job_id = raw_job.decode("ascii")
        except UnicodeDecodeError:
            raise AuthError("job id is not ASCII") from None
        key = job_key(self.master, job_id)
        if not hmac.compare_digest(mac, initiator_mac(key, nonce_a, nonce_b, raw_job)):
            raise AuthError(f"wrong key for job {job_id!r}")
        writer.write(acceptor_mac(key, nonce_a, nonce_b, raw_job))
        await writer.drain()
        return job_id

    # ---- registration: wait for the whole job, hand out the address table ----
    async def _register(self, job_id: str, request: dict, reader, writer, peer) -> None:
        rank, size = int(request["rank"]), int(request["size"])
        wait_s = min(float(request.get("wait_s", 120.0)), MAX_WAIT_S)
        self._forget_old()
        problem = self._admit(job_id, rank, size)
        if problem:
            log.warning("job %s rank %d refused: %s", job_id, rank, problem)
            await _send_control(writer, {"op": "error", "message": problem})
            return
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Job(job_id, size, time.monotonic() + wait_s)
        job.members[rank] = Member(list(request.get("addrs", [])), list(peer[:2]), writer)
        if len(job.members) == size:
            await self._publish(job)
        try:
            await asyncio.wait_for(job.complete.wait(), max(0.0, job.deadline - time.monotonic()))
        except TimeoutError:
            self._expire(job)
        if job.error:
            await _send_control(writer, {"op": "error", "message": job.error})
            return
        # The table was sent; this connection now carries punch and relay requests, and its
        # closing tells us the rank is gone.
        try:
            while True:
                try:
                    message = await _read_control(reader)
                except asyncio.IncompleteReadError:
                    break
                if message.get("op") == "punch":
                    target = job.members.get(int(message["peer"]))
                    if target is not None:
                        await _send_control(target.writer, {"op": "punch-request", "peer": rank})
        finally:
            if job.members.get(rank) and job.members[rank].writer is writer:
                del job.members[rank]
            for other in list(job.members.values()):  # ranks waiting on this one must not wait forever
                try:
                    await _send_control(other.writer, {"op": "gone", "rank": rank})
                except ConnectionError:
                    pass
            if not job.members:
                self.jobs.pop(job_id, None)

    def _admit(self, job_id: str, rank: int, size: int) -> str | None:
        if job_id in self.finished:
            return f"job {job_id} already ran: every run needs a fresh job id"
        if not 0 < size <= MAX_WORLD or not 0 <= rank < size:
            return f"rank {rank} of world size {size} is out of range"
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.size != size:
            return f"job {job_id} has world size {job.size}, not {size}"
        if job.complete.is_set():
            return f"job {job_id} is already wired up"
        old = job.members.get(rank)
        if old is not None and not old.writer.is_closing():
            return f"rank {rank} of job {job_id} is already registered"
        return None

    async def _publish(self, job: Job) -> None:
        table = {
            "op": "table",
            "addrs": {str(r): m.addrs for r, m in job.members.items()},
            "observed": {str(r): m.observed for r, m in job.members.items()},
        }
        for member in job.members.values():
            try:
                await _send_control(member.writer, table)
            except ConnectionError:
                pass
        self._remember(job.job_id)
        job.complete.set()
        log.info("job %s wired up: %d ranks", job.job_id, job.size)

    def _expire(self, job: Job) -> None:
        if job.complete.is_set():
            return
        missing = sorted(set(range(job.size)) - set(job.members))
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        job.error = f"job {job.job_id}: {len(missing)} of {job.size} ranks never arrived before the deadline: {shown}"
        log.warning("%s", job.error)
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
    async def _relay(self, job_id: str, request: dict, reader, writer) -> None:
        rank, peer = int(request["rank"]), int(request["peer"])
        wait_s = min(float(request.get("wait_s", 120.0)), MAX_WAIT_S)
        other = self.relays.pop((job_id, peer, rank), None)
        if other is None:
            loop = asyncio.get_running_loop()
            joined, finished = loop.create_future(), loop.create_future()
            self.relays[(job_id, rank, peer)] = (reader, writer, joined, finished)
            job = self.jobs.get(job_id)
            target = job.members.get(peer) if job else None
            if target is not None:  # ask the peer to open its side
                await _send_control(target.writer, {"op": "relay-request", "peer": rank})
            try:
                await asyncio.wait_for(joined, wait_s)
            except TimeoutError:
                self.relays.pop((job_id, rank, peer), None)
                await _send_control(writer, {"op": "error", "message": f"rank {peer} never joined the relay"})
                return
            await finished  # the joining side runs the pipe until either end closes
            return
        other_reader, other_writer, joined, finished = other
        joined.set_result(None)
        try:
            for w in (writer, other_writer):
                await _send_control(w, {"op": "relay-ready"})
            await asyncio.gather(_pipe(reader, other_writer), _pipe(other_reader, writer))
        finally:
            other_writer.close()
            finished.set_result(None)


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


async def _read_control(reader: asyncio.StreamReader) -> dict:
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    if length > MAX_CONTROL:
        raise ValueError(f"control message of {length} bytes")
    message = json.loads(await reader.readexactly(length))
    if not isinstance(message, dict):
        raise ValueError("control message is not an object")
    return message


async def _send_control(writer: asyncio.StreamWriter, message: dict) -> None:
    data = json.dumps(message).encode()
    writer.write(struct.pack("!I", len(data)) + data)
    await writer.drain()


async def serve(host: str, port: int, master: bytes, ready: Path | None = None) -> None:
    server = await asyncio.start_server(Rendezvous(master).handle, host, port, limit=MAX_CONTROL, backlog=4096)
    bound = server.sockets[0].getsockname()
    log.info("rendezvous listening on %s:%d", bound[0], bound[1])
    if ready is not None:
        tmp = ready.with_name(ready.name + ".tmp")
        tmp.write_text(f"{bound[0]}:{bound[1]}\n")
        tmp.replace(ready)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambda_shim.rendezvous", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7777, help="0 picks a free port (see --ready-file)")
    parser.add_argument("--ready-file", type=Path, help="write HOST:PORT here once listening")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="rendezvous: %(message)s")
    try:
        master = load_secret()
    except AuthError as exc:
        print(f"rendezvous: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args.host, args.port, master, args.ready_file))
    except OSError as exc:
        print(f"rendezvous: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
