"""Nonblocking requests and every completion call, in object and buffer form: each case has
rank 1 wait on messages from rank 0 that are sent in a known order (the others only meet the
barriers), so which request completes first is fixed."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from harness import Suite


def run(s: Suite) -> None:
    MPI, comm, rank = s.MPI, s.comm, s.rank  # noqa: N806 - the name mpi4py programs use
    Request = MPI.Request  # noqa: N806 - as mpi4py programs write it

    def sends(*tags: int) -> None:
        if rank == 0:
            for tag in tags:
                comm.send(f"msg{tag}", dest=1, tag=tag)

    def buffer_sends(*tags: int) -> None:
        if rank == 0:
            for tag in tags:
                comm.Send(np.full(2, tag, dtype=np.int32), dest=1, tag=tag)

    @s.case("wait")
    def wait() -> Any:
        req = comm.irecv(source=0, tag=1) if rank == 1 else None
        sends(1)
        if req is None:
            return None
        status = MPI.Status()
        return req.wait(status), s.status(status), bool(req), req.wait()

    @s.case("test")
    def test() -> Any:
        req = comm.irecv(source=0, tag=2) if rank == 1 else None
        before = req.test() if req else None
        comm.Barrier()
        sends(2)
        if req is None:
            return None
        status = MPI.Status()
        after = s.until(lambda: req.test(status), lambda r: r[0])
        return before, after, s.status(status), bool(req), req.test()

    @s.case("cancel")
    def cancel() -> Any:
        if rank != 1:
            return None
        req = comm.irecv(source=0, tag=3)  # never sent
        cancelled = req.cancel()
        status = MPI.Status()
        return cancelled, req.wait(status), status.Is_cancelled(), bool(req)

    @s.case("get_status")
    def get_status() -> Any:
        req = comm.irecv(source=0, tag=4) if rank == 1 else None
        before = req.get_status() if req else None
        comm.Barrier()
        sends(4)
        if req is None:
            return None
        status = MPI.Status()
        after = s.until(lambda: req.get_status(status), bool)
        return before, after, s.status(status), bool(req), req.wait()

    @s.case("issend.unmatched")
    def issend_unmatched() -> Any:
        # A synchronous send is not complete before the receiver has matched it.
        req = comm.issend("sync", dest=1, tag=18) if rank == 0 else None
        before = (req.test(), Request.testall([req]), req.get_status()) if req else None
        comm.Barrier()
        if rank == 1:
            return comm.recv(source=0, tag=18)
        return (before, req.wait(), bool(req)) if req else None

    @s.case("Issend.unmatched")
    def buffer_issend_unmatched() -> Any:
        req = comm.Issend(np.arange(3, dtype=np.int32), dest=1, tag=19) if rank == 0 else None
        before = (req.Test(), req.Get_status()) if req else None
        comm.Barrier()
        if rank == 1:
            buf = np.zeros(3, dtype=np.int32)
            comm.Recv(buf, source=0, tag=19)
            return buf
        return (before, req.Wait(), bool(req)) if req else None

    @s.case("waitall")
    def waitall() -> Any:
        reqs = [comm.isend((rank, "a"), dest=s.right, tag=5), comm.irecv(source=s.left, tag=5)]
        reqs += [comm.issend((rank, "b"), dest=s.left, tag=6), comm.irecv(source=s.right, tag=6)]
        statuses = [MPI.Status() for _ in reqs]
        got = Request.waitall(reqs, statuses)
        return got, [s.status(st) for st in statuses[1::2]], [bool(r) for r in reqs], Request.waitall(reqs)

    @s.case("waitany")
    def waitany() -> Any:
        reqs = [comm.irecv(source=0, tag=7), comm.irecv(source=0, tag=8)] if rank == 1 else []
        sends(8)
        status = MPI.Status()
        first = Request.waitany(reqs, status) if reqs else None
        first_status = s.status(status)
        comm.Barrier()
        sends(7)
        if not reqs:
            return None
        second = Request.waitany(reqs, status)
        return first, first_status, second, s.status(status), Request.waitany(reqs), [bool(r) for r in reqs]

    @s.case("waitsome")
    def waitsome() -> Any:
        reqs = [comm.irecv(source=0, tag=9), comm.irecv(source=0, tag=10)] if rank == 1 else []
        sends(10)
        statuses = [MPI.Status(), MPI.Status()]
        first = Request.waitsome(reqs, statuses) if reqs else None
        comm.Barrier()
        sends(9)
        if not reqs:
            return None
        second = Request.waitsome(reqs)
        return first, s.status(statuses[0]), second, Request.waitsome(reqs)

    @s.case("testall")
    def testall() -> Any:
        reqs = [comm.irecv(source=0, tag=11), comm.irecv(source=0, tag=12)] if rank == 1 else []
        before = Request.testall(reqs) if reqs else None
        comm.Barrier()
        sends(11, 12)
        if not reqs:
            return None
        statuses = [MPI.Status(), MPI.Status()]
        after = s.until(lambda: Request.testall(reqs, statuses), lambda r: r[0])
        return before, after, [s.status(st) for st in statuses], Request.testall(reqs)

    @s.case("testany")
    def testany() -> Any:
        reqs = [comm.irecv(source=0, tag=13), comm.irecv(source=0, tag=14)] if rank == 1 else []
        before = Request.testany(reqs) if reqs else None
        comm.Barrier()
        if rank == 0:  # tag 14 first; tag 13 once rank 1 has seen 14 complete alone
            sends(14)
            comm.recv(source=1, tag=15)
            sends(13)
        if not reqs:
            return None
        status = MPI.Status()
        after = s.until(lambda: Request.testany(reqs, status), lambda r: r[1])
        first_status = s.status(status)
        comm.send("seen", dest=0, tag=15)
        second = s.until(lambda: Request.testany(reqs), lambda r: r[1])
        return before, after, first_status, second, Request.testany(reqs)

    @s.case("testsome")
    def testsome() -> Any:
        reqs = [comm.irecv(source=0, tag=16), comm.irecv(source=0, tag=17)] if rank == 1 else []
        before = Request.testsome(reqs) if reqs else None
        comm.Barrier()
        sends(16, 17)
        if not reqs:
            return None
        done: list = []
        while len(done) < 2:
            indices, msgs = s.until(lambda: Request.testsome(reqs), lambda r: r[0])
            done += zip(indices, msgs, strict=True)
        return before, sorted(done), Request.testsome(reqs)

    # The same calls on buffer requests (Irecv into arrays).
    @s.case("Wait")
    def buffer_wait() -> Any:
        buf = np.zeros(2, dtype=np.int32)
        req = comm.Irecv(buf, source=0, tag=21) if rank == 1 else None
        buffer_sends(21)
        if req is None:
            return None
        status = MPI.Status()
        return req.Wait(status), buf, s.status(status, MPI.INT), bool(req)

    @s.case("Test")
    def buffer_test() -> Any:
        buf = np.zeros(2, dtype=np.int32)
        req = comm.Irecv(buf, source=0, tag=22) if rank == 1 else None
        before = req.Test() if req else None
        comm.Barrier()
        buffer_sends(22)
        if req is None:
            return None
        status = MPI.Status()
        after = s.until(lambda: req.Test(status), bool)
        return before, after, buf, s.status(status, MPI.INT), bool(req)

    @s.case("Cancel")
    def buffer_cancel() -> Any:
        if rank != 1:
            return None
        buf = np.full(2, 5, dtype=np.int32)
        req = comm.Irecv(buf, source=0, tag=23)
        cancelled = req.Cancel()
        status = MPI.Status()
        return cancelled, req.Wait(status), status.Is_cancelled(), buf, bool(req)

    @s.case("Get_status")
    def buffer_get_status() -> Any:
        buf = np.zeros(2, dtype=np.int32)
        req = comm.Irecv(buf, source=0, tag=24) if rank == 1 else None
        before = req.Get_status() if req else None
        comm.Barrier()
        buffer_sends(24)
        if req is None:
            return None
        status = MPI.Status()
        after = s.until(lambda: req.Get_status(status), bool)
        return before, after, s.status(status, MPI.INT), req.Wait(), buf

    @s.case("Waitall")
    def buffer_waitall() -> Any:
        got = [np.zeros(3), np.zeros(3)]
        reqs = [comm.Isend(np.full(3, rank * 1.0), dest=s.right, tag=25), comm.Irecv(got[0], source=s.left, tag=25)]
        reqs += [comm.Issend(np.full(3, rank * 2.0), dest=s.left, tag=26), comm.Irecv(got[1], source=s.right, tag=26)]
        statuses = [MPI.Status() for _ in reqs]
        done = Request.Waitall(reqs, statuses)
        return done, got, [s.status(st, MPI.DOUBLE) for st in statuses[1::2]], [bool(r) for r in reqs]

    @s.case("Waitany")
    def buffer_waitany() -> Any:
        bufs = [np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int32)]
        reqs = [comm.Irecv(bufs[0], source=0, tag=27), comm.Irecv(bufs[1], source=0, tag=28)] if rank == 1 else []
        buffer_sends(28)
        status = MPI.Status()
        first = Request.Waitany(reqs, status) if reqs else None
        first_status = s.status(status, MPI.INT)
        comm.Barrier()
        buffer_sends(27)
        if not reqs:
            return None
        return first, first_status, Request.Waitany(reqs), Request.Waitany(reqs), bufs

    @s.case("Waitsome")
    def buffer_waitsome() -> Any:
        bufs = [np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int32)]
        reqs = [comm.Irecv(bufs[0], source=0, tag=29), comm.Irecv(bufs[1], source=0, tag=30)] if rank == 1 else []
        buffer_sends(30)
        first = Request.Waitsome(reqs) if reqs else None
        comm.Barrier()
        buffer_sends(29)
        if not reqs:
            return None
        return first, Request.Waitsome(reqs), Request.Waitsome(reqs), bufs

    @s.case("Testall")
    def buffer_testall() -> Any:
        bufs = [np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int32)]
        reqs = [comm.Irecv(bufs[0], source=0, tag=31), comm.Irecv(bufs[1], source=0, tag=32)] if rank == 1 else []
        before = Request.Testall(reqs) if reqs else None
        comm.Barrier()
        buffer_sends(31, 32)
        if not reqs:
            return None
        after = s.until(lambda: Request.Testall(reqs), bool)
        return before, after, bufs, Request.Testall(reqs)

    @s.case("Testany")
    def buffer_testany() -> Any:
        bufs = [np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int32)]
        reqs = [comm.Irecv(bufs[0], source=0, tag=33), comm.Irecv(bufs[1], source=0, tag=34)] if rank == 1 else []
        before = Request.Testany(reqs) if reqs else None
        comm.Barrier()
        if rank == 0:
            buffer_sends(34)
            comm.recv(source=1, tag=37)
            buffer_sends(33)
        if not reqs:
            return None
        after = s.until(lambda: Request.Testany(reqs), lambda r: r[1])
        comm.send("seen", dest=0, tag=37)
        second = s.until(lambda: Request.Testany(reqs), lambda r: r[1])
        return before, after, second, Request.Testany(reqs), bufs, [bool(r) for r in reqs]

    @s.case("Testsome")
    def buffer_testsome() -> Any:
        bufs = [np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int32)]
        reqs = [comm.Irecv(bufs[0], source=0, tag=35), comm.Irecv(bufs[1], source=0, tag=36)] if rank == 1 else []
        before = Request.Testsome(reqs) if reqs else None
        comm.Barrier()
        buffer_sends(35, 36)
        if not reqs:
            return None
        done: list = []
        while len(done) < 2:
            done += s.until(lambda: Request.Testsome(reqs), bool)
        return before, sorted(done), bufs, Request.Testsome(reqs)

    # Handles: a copy of a request has its handle (equal to it); a completed or freed request
    # equals REQUEST_NULL; a persistent one only when freed; requests are not hashable.
    def unhashable(obj: Any) -> Any:
        return s.attempt(lambda: hash(obj))

    @s.case("handles.request")
    def request_handles() -> Any:
        got = np.zeros(1, dtype=np.int32)
        req = comm.Irecv(got, source=s.left, tag=37)
        copy = MPI.Request(req)
        looked_up = MPI.Request.fromhandle(req.handle)
        seen = (req == copy, copy is req, type(copy).__name__, req == looked_up, req != MPI.REQUEST_NULL, bool(req))
        seen += (s.attempt(lambda: MPI.Prequest(req)),)
        other = comm.Isend(np.full(1, rank, dtype=np.int32), dest=s.right, tag=37)
        seen += (req == other, req != other, req == None, req != 0)  # noqa: E711 - mpi4py's __eq__ with None
        Request.Waitall([req, other])
        null = MPI.Request()
        return (
            seen,
            (req == MPI.REQUEST_NULL, bool(req), req.handle == MPI.REQUEST_NULL.handle, null == req, bool(null)),
            (unhashable(req), unhashable(MPI.REQUEST_NULL)),
            s.attempt(lambda: MPI.Request(5)),
            got,
        )

    @s.case("handles.prequest")
    def prequest_handles() -> Any:
        got = np.zeros(1, dtype=np.int32)
        send = comm.Send_init(np.full(1, rank, dtype=np.int32), dest=s.right, tag=38)
        recv = comm.Recv_init(got, source=s.left, tag=38)
        copy = MPI.Prequest(send)
        states = [(send == MPI.REQUEST_NULL, bool(send), send == copy, type(copy).__name__, send == recv)]
        MPI.Prequest.Startall([send, recv])
        states.append((send == MPI.REQUEST_NULL, bool(send), send == copy))
        Request.Waitall([send, recv])
        states.append((send == MPI.REQUEST_NULL, bool(send), send == copy, recv == MPI.REQUEST_NULL))
        as_request = MPI.Request(send)
        states.append((type(as_request).__name__, as_request == send, bool(as_request)))
        send.Free()
        states.append((send == MPI.REQUEST_NULL, bool(send), send.handle == MPI.REQUEST_NULL.handle))
        recv.Free()
        states.append((recv == send, unhashable(recv), s.attempt(recv.Start)))
        null = MPI.Prequest.fromhandle(MPI.REQUEST_NULL.handle)
        return states, got, MPI.Prequest() == MPI.REQUEST_NULL, type(null).__name__, bool(null)

    # Generalized requests: the program completes them; query_fn fills the status, free_fn runs
    # at completion, cancel_fn on Cancel (told whether it had completed).
    @s.case("Grequest")
    def grequest() -> Any:
        calls: list = []

        def query(status: Any, *args: Any) -> None:
            calls.append(("query", args))
            status.Set_source(3)
            status.Set_tag(7)

        greq = MPI.Grequest.Start(
            query, lambda *a: calls.append(("free", a)), lambda done, *a: calls.append(("cancel", done))
        )
        seen = [type(greq).__name__, greq.Test(), bool(greq)]
        greq.Cancel()
        greq.Complete()
        greq.Cancel()
        status = MPI.Status()
        seen += [greq.Test(status), s.status(status), bool(greq), greq == MPI.REQUEST_NULL, list(calls)]
        seen += [
            s.attempt(lambda: MPI.Prequest(MPI.Grequest.Start())),
            type(MPI.Request(MPI.Grequest.Start())).__name__,
        ]
        with_args = MPI.Grequest.Start(query, None, None, args=(1, 2))
        with_args.Complete()
        seen += [with_args.Wait(), calls[-1]]
        plain = MPI.Grequest.Start()
        plain.complete(42)
        status = MPI.Status()
        seen += [plain.wait(status), s.status(status), plain.test()]
        return seen

    @s.case("Grequest.mixed")
    def grequest_mixed() -> Any:
        greq = MPI.Grequest.Start()
        copy = MPI.Grequest(greq)
        same = copy == greq
        got = np.zeros(1, dtype=np.int32)
        recv = comm.Irecv(got, source=s.left, tag=39)
        threading.Timer(0.2, copy.Complete).start()
        comm.Send(np.full(1, rank, dtype=np.int32), dest=s.right, tag=39)
        statuses = [MPI.Status(), MPI.Status()]
        done = Request.Waitall([greq, recv], statuses)
        return done, same, got, s.status(statuses[0]), s.status(statuses[1])

    @s.case("Grequest.errors")
    def grequest_errors() -> Any:
        def raise_mpi(*_: Any) -> None:
            raise MPI.Exception(MPI.ERR_BUFFER)

        def raise_other(*_: Any) -> None:
            raise ValueError(42)

        seen = []
        for fail in (raise_mpi, raise_other):
            for position in range(3):
                callbacks = [None, None, None]
                callbacks[position] = fail
                greq = MPI.Grequest.Start(*callbacks)
                seen.append(s.attempt(greq.Cancel))
                greq.Complete()
                seen.append(s.attempt(greq.Wait))
        return seen, s.attempt(MPI.REQUEST_NULL.Cancel)
