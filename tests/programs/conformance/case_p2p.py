"""Point to point: every send mode in object and buffer form, probe, sendrecv, Isendrecv,
PROC_NULL, ANY_SOURCE/ANY_TAG, message order, large messages, and MPI.pickle."""

from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np
from harness import Suite


def run(s: Suite) -> None:
    MPI, comm, rank, size = s.MPI, s.comm, s.rank, s.size  # noqa: N806 - the name mpi4py programs use

    @s.case("attach_buffer")
    def attach_buffer() -> Any:
        return MPI.Attach_buffer(bytearray(1 << 20))

    # Blocking object sends, rank 0 to each rank and back (a star: no mode can deadlock).
    for mode in ("send", "ssend", "bsend"):

        @s.case(f"{mode}.star")
        def star(mode: str = mode) -> Any:
            send = getattr(comm, mode)
            if rank == 0:
                for dest in range(1, size):
                    send({"mode": mode, "to": dest}, dest=dest, tag=11)
                replies = []
                for _ in range(1, size):
                    status = MPI.Status()
                    msg = comm.recv(source=MPI.ANY_SOURCE, tag=12, status=status)
                    replies.append((msg, s.status(status)))
                return sorted(replies)
            status = MPI.Status()
            msg = comm.recv(source=0, tag=11, status=status)
            send((mode, rank), dest=0, tag=12)
            return msg, s.status(status)

    # Nonblocking object sends round a ring.
    for mode in ("isend", "issend", "ibsend"):

        @s.case(f"{mode}.ring")
        def ring(mode: str = mode) -> Any:
            send = getattr(comm, mode)(("ring", mode, rank, list(range(rank))), dest=s.right, tag=21)
            recv = comm.irecv(source=s.left, tag=21)
            status = MPI.Status()
            msg = recv.wait(status)
            sent = send.wait()
            return msg, sent, s.status(status), bool(send), bool(recv)

    # Synchronous sends to self matching receives posted before them.
    @s.case("sync_to_self.posted_first")
    def sync_to_self() -> Any:
        first = comm.irecv(source=rank, tag=31)
        comm.ssend(("ssend", rank), dest=rank, tag=31)
        second = comm.irecv(source=rank, tag=32)
        comm.issend(("issend", rank), dest=rank, tag=32).wait()
        bufs = [np.zeros(2), np.zeros(2)]
        reqs = [comm.Irecv(bufs[0], source=rank, tag=33), comm.Irecv(bufs[1], source=rank, tag=34)]
        comm.Ssend(np.ones(2), dest=rank, tag=33)
        some = MPI.Request.Waitsome(reqs)
        comm.Ssend(np.full(2, 2.0), dest=rank, tag=34)
        MPI.Request.Waitall(reqs)
        return first.wait(), second.wait(), some, bufs

    # Blocking buffer sends, a star again; Rsend needs the receive posted first.
    for mode in ("Send", "Ssend", "Bsend", "Rsend"):

        @s.case(f"{mode}.star")
        def buffer_star(mode: str = mode) -> Any:
            send = getattr(comm, mode)
            if rank == 0:
                comm.Barrier()
                for dest in range(1, size):
                    send(np.arange(dest + 2, dtype=np.int32) * 10, dest=dest, tag=13)
                return None
            buf = np.full(rank + 4, -1, dtype=np.int32)
            req = comm.Irecv(buf, source=0, tag=13)
            comm.Barrier()
            status = MPI.Status()
            req.Wait(status)
            return buf, s.status(status, MPI.INT)

    for mode in ("Isend", "Issend", "Ibsend", "Irsend"):

        @s.case(f"{mode}.ring")
        def buffer_ring(mode: str = mode) -> Any:
            buf = np.zeros(3)
            recv = comm.Irecv([buf, MPI.DOUBLE], source=s.left, tag=22)
            comm.Barrier()  # every receive posted: an Irsend is legal
            send = getattr(comm, mode)(np.array([rank, rank + 0.5, -rank]), dest=s.right, tag=22)
            statuses = [MPI.Status(), MPI.Status()]
            done = MPI.Request.Waitall([send, recv], statuses)
            return done, buf, s.status(statuses[1], MPI.DOUBLE)

    @s.case("detach_buffer")
    def detach_buffer() -> Any:
        return len(MPI.Detach_buffer())

    # The send forms of a buffer message, received with a status and counted.
    specs = {
        "plain": lambda a: a,
        "count": lambda a: [a, 3],
        "count_type": lambda a: [a, 3, MPI.INT64_T],
        "count_displ_type": lambda a: [a, (3, 2), MPI.INT64_T],
        "count_displ_type4": lambda a: [a, 2, 1, MPI.INT64_T],
        "type": lambda a: [a, MPI.INT64_T],
        "bytes_type": lambda a: [a, MPI.BYTE],
        "memoryview": lambda a: memoryview(a)[1:4],
    }
    for name, spec in specs.items():

        @s.case(f"Send.spec.{name}")
        def send_spec(spec: Any = spec) -> Any:
            if rank == 0:
                for dest in range(1, size):
                    comm.Send(spec(np.arange(6, dtype=np.int64) + dest), dest=dest, tag=14)
                return None
            buf = np.full(8, -1, dtype=np.int64)
            status = MPI.Status()
            comm.Recv(buf, source=0, tag=14, status=status)
            return buf, s.status(status, MPI.INT64_T), status.Get_count(MPI.BYTE), status.Get_count()

    @s.case("Recv.spec.count_displ")
    def recv_spec() -> Any:
        buf = np.full(6, -1.0)
        comm.Sendrecv(np.array([rank, 1.5]), dest=s.right, sendtag=15, recvbuf=[buf, (2, 3), MPI.DOUBLE], source=s.left)
        return buf

    @s.case("status.fresh")
    def status_fresh() -> Any:
        status = MPI.Status()
        fields = status.source, status.tag, status.error, status.count, status.cancelled
        return fields, s.status(status, MPI.BYTE), status.Get_count()

    @s.case("status.count_undefined")
    def status_count_undefined() -> Any:
        # 3 bytes are no whole number of ints: Get_count and Get_elements say UNDEFINED.
        comm.Send(bytearray(b"abc"), dest=s.right, tag=16)
        status = MPI.Status()
        comm.Recv(bytearray(8), source=s.left, tag=16, status=status)
        fields = status.source, status.tag, status.error, status.count, status.cancelled
        return fields, s.status(status, MPI.INT), status.Get_count()

    # Tags out of order; ANY_SOURCE and ANY_TAG with a status.
    @s.case("tags_and_wildcards")
    def tags_and_wildcards() -> Any:
        if rank == 0:
            for dest in range(1, size):
                comm.send(f"tag7-to-{dest}", dest=dest, tag=7)
                comm.send(f"tag3-to-{dest}", dest=dest, tag=3)
            seen = []
            for _ in range(1, size):
                status = MPI.Status()
                msg = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
                seen.append((status.Get_source(), status.Get_tag(), msg, status.source, status.tag))
            return sorted(seen)
        first = comm.recv(source=0, tag=3)
        second = comm.recv(source=0, tag=7)
        comm.send(("hello", rank), dest=0, tag=10 + rank)
        return first, second

    @s.case("non_overtaking")
    def non_overtaking() -> Any:
        for i in range(5):
            comm.send((rank, i), dest=s.right, tag=30 + i % 2)
        return [comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG) for _ in range(5)]

    @s.case("sendrecv.ring")
    def sendrecv_ring() -> Any:
        status = MPI.Status()
        msg = comm.sendrecv({"from": rank}, dest=s.right, sendtag=5, source=s.left, recvtag=5, status=status)
        return msg, s.status(status)

    @s.case("sendrecv.chain")
    def sendrecv_chain() -> Any:
        right = rank + 1 if rank < s.last else MPI.PROC_NULL
        left = rank - 1 if rank > 0 else MPI.PROC_NULL
        status = MPI.Status()
        return comm.sendrecv(rank * 10, dest=right, source=left, status=status), s.status(status)

    @s.case("Sendrecv.ring")
    def buffer_sendrecv() -> Any:
        recv = np.zeros(2, dtype=np.int32)
        status = MPI.Status()
        comm.Sendrecv(np.array([rank, -rank], dtype=np.int32), s.right, 6, recv, s.left, 6, status)
        return recv, s.status(status, MPI.INT)

    @s.case("Sendrecv_replace.ring")
    def sendrecv_replace() -> Any:
        buf = np.array([rank, rank * 2, rank * 3], dtype=np.float32)
        status = MPI.Status()
        comm.Sendrecv_replace(buf, dest=s.right, sendtag=8, source=s.left, recvtag=8, status=status)
        return buf, s.status(status, MPI.FLOAT)

    @s.case("Sendrecv_replace.spec")
    def sendrecv_replace_spec() -> Any:
        buf = np.array([rank, rank * 2, rank * 3, 99], dtype=np.int64)
        comm.Sendrecv_replace([buf, 2, MPI.INT64_T], dest=s.right, source=s.left)
        return buf

    # PROC_NULL: sends vanish, receives complete at once with an empty status.
    @s.case("proc_null.object")
    def proc_null_object() -> Any:
        status = MPI.Status()
        got = [comm.send("x", dest=MPI.PROC_NULL), comm.ssend("x", dest=MPI.PROC_NULL)]
        got.append(comm.isend("x", dest=MPI.PROC_NULL).wait())
        got.append(comm.recv(source=MPI.PROC_NULL, status=status))
        got.append(s.status(status, MPI.BYTE))
        got.append(comm.irecv(source=MPI.PROC_NULL).wait(status))
        got.append(s.status(status, MPI.BYTE))
        got.append(comm.sendrecv("y", dest=MPI.PROC_NULL, source=MPI.PROC_NULL))
        return got

    @s.case("proc_null.buffer")
    def proc_null_buffer() -> Any:
        status = MPI.Status()
        buf = np.arange(3.0)
        comm.Send(buf, dest=MPI.PROC_NULL)
        comm.Recv(buf, source=MPI.PROC_NULL, status=status)
        first = s.status(status, MPI.DOUBLE)
        comm.Irecv(buf, source=MPI.PROC_NULL).Wait(status)
        return buf, first, s.status(status, MPI.DOUBLE)

    @s.case("proc_null.probe")
    def proc_null_probe() -> Any:
        status = MPI.Status()
        probed = comm.probe(source=MPI.PROC_NULL, status=status)
        first = s.status(status, MPI.BYTE)
        return probed, first, comm.iprobe(source=MPI.PROC_NULL, status=status), s.status(status, MPI.BYTE)

    # probe / iprobe: nothing there yet, then the message, counted before it is received.
    @s.case("probe")
    def probe() -> Any:
        if rank == 0:
            comm.Barrier()
            for dest in range(1, size):
                comm.Send(np.arange(dest + 1, dtype=np.float64), dest=dest, tag=40)
            return None
        before = comm.iprobe(source=0, tag=40)
        comm.Barrier()
        status = MPI.Status()
        probed = comm.probe(source=0, tag=40, status=status)
        counted = s.status(status, MPI.DOUBLE), status.Get_count(MPI.BYTE)
        buf = np.zeros(status.Get_count(MPI.DOUBLE))
        comm.Recv(buf, source=status.Get_source(), tag=status.Get_tag())
        return before, probed, counted, buf, comm.iprobe(source=0, tag=40)

    @s.case("iprobe.any")
    def iprobe_any() -> Any:
        comm.Send(np.arange(rank + 1, dtype=np.int16), dest=s.right, tag=41 + rank)
        status = MPI.Status()
        found = s.until(lambda: comm.iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status), bool)
        counted = s.status(status, MPI.INT16_T)
        buf = np.zeros(rank + 5, dtype=np.int16)
        comm.Recv(buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        return found, counted, buf

    @s.case("Probe.Iprobe")
    def buffer_probe() -> Any:
        comm.Send(np.arange(rank + 2, dtype=np.float32), dest=s.right, tag=42)
        status = MPI.Status()
        found = s.until(lambda: comm.Iprobe(s.left, 42, status), bool)
        first = s.status(status, MPI.FLOAT)
        probed = comm.Probe(source=MPI.ANY_SOURCE, tag=42, status=status)
        buf = np.zeros(status.Get_count(MPI.FLOAT), dtype=np.float32)
        comm.Recv(buf, source=s.left, tag=42)
        return found, first, probed, s.status(status, MPI.FLOAT), buf

    @s.case("mprobe")
    def mprobe() -> Any:
        comm.send({"m": rank}, dest=s.right, tag=43)
        status = MPI.Status()
        message = comm.mprobe(source=MPI.ANY_SOURCE, tag=43, status=status)
        return s.status(status), message.recv(), comm.iprobe(source=s.left, tag=43)

    @s.case("improbe")
    def improbe() -> Any:
        before = comm.improbe(source=s.left, tag=44)
        comm.Barrier()
        comm.send(("im", rank), dest=s.right, tag=44)
        status = MPI.Status()
        message = s.until(lambda: comm.improbe(source=s.left, tag=44, status=status), lambda m: m is not None)
        return before, s.status(status), message.recv()

    @s.case("Mprobe.Improbe")
    def buffer_mprobe() -> Any:
        comm.Send(np.full(3, rank, dtype=np.int64), dest=s.right, tag=45)
        comm.Send(np.full(2, -rank, dtype=np.int64), dest=s.right, tag=46)
        status = MPI.Status()
        message = comm.Mprobe(source=s.left, tag=45, status=status)
        first = np.zeros(3, dtype=np.int64)
        message.Recv(first)
        counted = s.status(status, MPI.INT64_T)
        other = s.until(lambda: comm.Improbe(source=s.left, tag=46, status=status), lambda m: m is not None)
        second = np.zeros(2, dtype=np.int64)
        other.Recv(second)
        return first, counted, second, s.status(status, MPI.INT64_T)

    @s.case("argument_types")
    def argument_types() -> Any:
        # Ranks and tags are C ints to mpi4py: numpy integers and floats (truncated) are taken.
        comm.send("np", dest=np.int64(s.right), tag=np.int32(47))
        got = comm.recv(source=np.int16(s.left), tag=np.uint8(47))
        comm.send("float", dest=float(s.right), tag=48)
        return got, comm.recv(source=s.left, tag=48.0)

    @s.case("tag_ub")
    def tag_ub() -> Any:
        ub = comm.Get_attr(MPI.TAG_UB)
        comm.send("highest tag", dest=s.right, tag=ub)
        status = MPI.Status()
        return ub, comm.recv(source=s.left, tag=ub, status=status), s.status(status)

    @s.case("zero_length")
    def zero_length() -> Any:
        comm.Send(np.zeros(0), dest=s.right, tag=49)
        status = MPI.Status()
        buf = np.full(2, -1.0)
        comm.Recv(buf, source=s.left, tag=49, status=status)
        comm.Send([buf, 0, MPI.DOUBLE], dest=s.right, tag=50)
        comm.Recv(buf, source=s.left, tag=50)
        empty = comm.sendrecv(b"", dest=s.right, sendtag=51, source=s.left, recvtag=51)
        return buf, s.status(status, MPI.DOUBLE), empty

    @s.case("keywords")
    def keywords() -> Any:
        # Every argument by mpi4py's keyword names.
        st = MPI.Status()
        comm.send(obj=("kw", rank), dest=s.right, tag=52)
        got = [comm.recv(buf=None, source=s.left, tag=52, status=st), s.status(st)]
        req = comm.isend(obj=rank, dest=s.right, tag=53)
        got += [comm.irecv(source=s.left, tag=53).wait(status=st), req.wait(status=None)]
        got.append(comm.sendrecv(sendobj=rank, dest=s.right, sendtag=54, recvbuf=None, source=s.left, recvtag=54))
        comm.Send(buf=np.full(2, rank), dest=s.right, tag=55)
        got.append(comm.probe(source=s.left, tag=55, status=st))
        buf = np.zeros(2, dtype=int)
        comm.Recv(buf=buf, source=s.left, tag=55, status=st)
        got += [buf, s.status(st, MPI.LONG)]
        req = comm.Isend(buf=np.full(1, rank), dest=s.right, tag=56)
        one = np.zeros(1, dtype=int)
        comm.Irecv(buf=one, source=s.left, tag=56).Wait(status=st)
        req.Wait()
        got.append(one)
        two = np.zeros(2)
        comm.Sendrecv(sendbuf=np.full(2, rank + 0.5), dest=s.right, sendtag=57, recvbuf=two, source=s.left, recvtag=57)
        comm.Sendrecv_replace(buf=two, dest=s.right, sendtag=58, source=s.left, recvtag=58, status=st)
        return [*got, two, s.status(st, MPI.DOUBLE), comm.iprobe(source=s.left, tag=58, status=None)]

    # Large messages: 100 MB as an object, 32 MB as a buffer, last rank to rank 0.
    @s.case("large.object")
    def large_object() -> Any:
        if rank == s.last:
            comm.send(np.full(100 * 2**20 // 8, 3.5), dest=0, tag=99)
        if rank == 0:
            big = comm.recv(source=s.last, tag=99)
            return big.nbytes, float(big.sum()), big.dtype.str
        return None

    @s.case("large.buffer")
    def large_buffer() -> Any:
        n = 32 * 2**20 // 4
        if rank == s.last:
            comm.Send(np.arange(n, dtype=np.int32), dest=0, tag=98)
        if rank == 0:
            big = np.zeros(n, dtype=np.int32)
            status = MPI.Status()
            comm.Recv(big, source=s.last, tag=98, status=status)
            return int(big.astype(np.int64).sum()), int(big[-1]), s.status(status, MPI.INT)
        return None

    # MPI 4.0's nonblocking Sendrecv: the data and the completion (MPICH fills the request's
    # status with other values than the receive's, so statuses are checked in test_mpi_api).
    @s.case("Isendrecv")
    def isendrecv() -> Any:
        got = np.zeros(3, dtype=np.int32)
        req = comm.Isendrecv(np.full(3, rank, dtype=np.int32), s.right, 60, got, s.left, 60)
        return type(req).__name__, req.Wait(), got, bool(req), req == MPI.REQUEST_NULL

    @s.case("Isendrecv.specs")
    def isendrecv_specs() -> Any:
        got = np.full(4, -1.0)
        req = comm.Isendrecv([np.arange(4.0) + rank, 2, MPI.DOUBLE], s.right, 61, [got, (2, 1), MPI.DOUBLE], s.left, 61)
        return MPI.Request.Waitall([req]), got

    @s.case("Isendrecv_replace")
    def isendrecv_replace() -> Any:
        buf = np.full(2, rank * 10.0)
        req = comm.Isendrecv_replace([buf, MPI.DOUBLE], s.right, 62, MPI.ANY_SOURCE, MPI.ANY_TAG)
        return s.until(lambda: req.Test(), bool), buf, bool(req)

    @s.case("Isendrecv.proc_null")
    def isendrecv_proc_null() -> Any:
        got = np.zeros(2, dtype=np.int32)
        both = comm.Isendrecv(np.ones(2, dtype=np.int32), MPI.PROC_NULL, 63, got, MPI.PROC_NULL, 63)
        out = both.Wait(), got.tolist()
        send_only = comm.Isendrecv(np.full(2, rank, dtype=np.int32), s.right, 64, None, MPI.PROC_NULL)
        comm.Recv(got, s.left, 64)
        recv_only = comm.Isendrecv(None, MPI.PROC_NULL, 0, [got, 1, MPI.INT], s.left, 65)
        comm.Send([np.full(1, rank + 100, dtype=np.int32), MPI.INT], s.right, 65)
        return out, MPI.Request.Waitall([send_only, recv_only]), got

    # The object API goes through MPI.pickle, which a program may reconfigure as on mpi4py.
    @s.case("pickle.defaults")
    def pickle_defaults() -> Any:
        pkl = MPI.pickle
        return type(pkl).__name__, pkl.PROTOCOL, pkl.THRESHOLD, pkl.loads(pkl.dumps([1, "a"]))

    @s.case("pickle.custom")
    def pickle_custom() -> Any:
        calls: list = []

        def dumps(obj: Any, *protocol: Any) -> bytes:
            calls.append(("dumps", protocol))
            return json.dumps(obj).encode()

        def loads(data: Any) -> Any:
            calls.append(("loads", type(data).__name__ in ("bytes", "bytearray", "buffer", "memoryview")))
            return json.loads(bytes(data))

        MPI.pickle.__init__(dumps, loads)
        try:
            settings = MPI.pickle.PROTOCOL, MPI.pickle.THRESHOLD
            got = comm.sendrecv({"rank": rank}, s.right, 66, None, s.left, 66)
            everyone = comm.allgather(rank)
            MPI.pickle.PROTOCOL = 2
            comm.send([rank], s.right, 67)
            last = comm.recv(None, s.left, 67)
        finally:
            MPI.pickle.__init__()
        return settings, got, everyone, last, sorted(set(map(repr, calls))), MPI.pickle.PROTOCOL

    # An object receive unpickles whatever matches it, a buffer send's bytes too, as mpi4py does.
    @s.case("recv.of_a_buffer_send")
    def recv_of_a_buffer_send() -> Any:
        comm.Send(bytearray(pickle.dumps({"from": rank})), s.right, 68)
        comm.Send(np.frombuffer(pickle.dumps((rank, "x")), dtype=np.uint8), s.right, 69)
        comm.Send([b"", 0, MPI.BYTE], s.right, 70)
        got = [comm.recv(source=s.left, tag=tag) for tag in (68, 69, 70)]
        comm.Send(b"\x00not a pickle", s.right, 71)
        return got, s.attempt(lambda: comm.recv(source=s.left, tag=71))

    @s.case("mprobe.of_a_buffer_send")
    def mprobe_of_a_buffer_send() -> Any:
        comm.Send(bytearray(pickle.dumps(["m", rank])), s.right, 72)
        status = MPI.Status()
        message = comm.mprobe(source=s.left, tag=72, status=status)
        return message.recv(), s.status(status), comm.improbe(source=s.left, tag=72), bool(message)

    # Message handles: Message() is null, Message(m) has m's handle; the class-method probes.
    @s.case("message.handles")
    def message_handles() -> Any:
        null, no_proc = MPI.MESSAGE_NULL, MPI.MESSAGE_NO_PROC
        seen = [MPI.Message() == null, bool(MPI.Message()), MPI.Message(null) == null, MPI.Message(no_proc) == no_proc]
        seen += [no_proc != null, s.attempt(lambda: MPI.Message(5)), s.attempt(lambda: hash(null))]
        seen += [pickle.loads(pickle.dumps(null)) is null, pickle.loads(pickle.dumps(no_proc)) is no_proc]
        seen += [pickle.loads(pickle.dumps(MPI.Message(no_proc))) == no_proc]
        copy = MPI.Message(no_proc)
        seen += [copy.recv(), copy == null, bool(no_proc.recv() is None and no_proc), no_proc == MPI.MESSAGE_NO_PROC]
        comm.send(("m", rank), s.right, 73)
        status = MPI.Status()
        message = MPI.Message.probe(comm, s.left, 73, status)
        twin = MPI.Message(message)
        seen += [twin == message, message != null, s.attempt(lambda: pickle.dumps(message)), s.status(status)]
        seen += [message.recv(), message == null, MPI.Message.iprobe(comm, s.left, 73)]
        comm.Send(np.full(2, rank, dtype=np.int32), s.right, 74)
        got = np.zeros(2, dtype=np.int32)
        found = s.until(lambda: MPI.Message.Iprobe(comm, s.left, 74), lambda m: m is not None)
        found.Recv(got)
        comm.Send(np.full(1, rank, dtype=np.int32), s.right, 75)
        MPI.Message.Probe(comm, s.left, 75).Recv(got[:1])
        return seen, got, s.attempt(lambda: pickle.dumps(comm.isend(None, MPI.PROC_NULL)))
