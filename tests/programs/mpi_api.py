"""mpi4py's object API, call by call, on mpi4py (``mpi``) or on lambda_shim (``shim``: the
same program with only the import changed). Each rank writes ``case -> repr(outcome)`` as
JSON to OUT/rank<r>.json; an exception is recorded as (``raised``, its class name, whether it
is an ``MPI.Exception``, its error class). Needs 3 or more ranks.

Usage: mpi_api.py {mpi|shim} OUT_DIR"""

from __future__ import annotations

import json
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np

if sys.argv[1] == "mpi":
    from mpi4py import MPI
else:
    from lambda_shim import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
last, right, left = size - 1, (comm.rank + 1) % size, (comm.rank - 1) % size
got: dict[str, str] = {}


def case(name: str, call) -> None:
    if "-v" in sys.argv:
        print(rank, name, file=sys.stderr, flush=True)
    try:
        value = call()
    except Exception as exc:  # noqa: BLE001 - what was raised is the outcome
        is_mpi = isinstance(exc, MPI.Exception)
        value = ("raised", type(exc).__name__, is_mpi, exc.Get_error_class() if is_mpi else None)
    got[name] = repr(value)


def status_of(status) -> tuple:
    return status.Get_source(), status.Get_tag(), status.Get_error(), status.Get_count(), status.Is_cancelled()


# ---- constants
case("constants", lambda: (MPI.ANY_SOURCE, MPI.ANY_TAG, MPI.PROC_NULL, MPI.UNDEFINED, MPI.ROOT))
case("tag_ub", lambda: comm.Get_attr(MPI.TAG_UB))
case("names", lambda: (comm.Get_name(), comm.Is_inter(), comm.Is_intra(), comm.rank, comm.size))
case("empty_status", lambda: status_of(MPI.Status()))
case("error_class", lambda: (MPI.Exception(MPI.ERR_RANK).Get_error_class(), MPI.ERR_ROOT, MPI.ERR_TAG))

# ---- collectives on objects
case("bcast", lambda: comm.bcast({"from": rank}, root=last))
case("reduce_prod_root1", lambda: comm.reduce(rank + 2, op=MPI.PROD, root=1))
for name in ("SUM", "PROD", "MAX", "MIN", "LAND", "LOR", "LXOR", "BAND", "BOR", "BXOR", "REPLACE", "NO_OP"):
    case(f"allreduce_{name}", lambda name=name: comm.allreduce(rank + 1, op=getattr(MPI, name)))
case("allreduce_MAXLOC", lambda: comm.allreduce((rank % 2, rank), op=MPI.MAXLOC))
case("allreduce_MINLOC", lambda: comm.allreduce((rank % 2, rank), op=MPI.MINLOC))
case("allreduce_lists", lambda: comm.allreduce([rank]))
case("allreduce_max_lists", lambda: comm.allreduce([rank, -rank], op=MPI.MAX))
case("reduce_str_root_last", lambda: comm.reduce(str(rank), root=last))
case("op_create", lambda: comm.allreduce(rank, op=MPI.Op.Create(lambda a, b, _: a * 10 + b, commute=False)))
case("gather_root_last", lambda: comm.gather(rank * rank, root=last))
case("allgather", lambda: comm.allgather({"r": rank}))
case("scatter_root1", lambda: comm.scatter([i * 10 for i in range(size)] if rank == 1 else None, root=1))
case("scatter_none", lambda: comm.scatter(None, root=0))
case("alltoall", lambda: comm.alltoall([(rank, j) for j in range(size)]))
case("scan", lambda: comm.scan(rank + 1))
case("scan_str", lambda: comm.scan(str(rank)))
case("scan_max", lambda: comm.scan(-rank, op=MPI.MAX))
case("exscan", lambda: comm.exscan(rank + 1))
case("exscan_str", lambda: comm.exscan(str(rank)))
case("exscan_prod", lambda: comm.exscan(rank + 2, op=MPI.PROD))
case("barrier", lambda: comm.barrier())

# ---- bad arguments: every rank raises, nothing moves
case("bcast_bad_root", lambda: comm.bcast(1, root=size))
case("reduce_negative_root", lambda: comm.reduce(1, root=-1))
case("gather_bad_root", lambda: comm.gather(1, root=size + 3))
case("scatter_bad_root", lambda: comm.scatter([1] * size, root=size))
case("send_bad_dest", lambda: comm.send(1, size))
case("send_root_dest", lambda: comm.send(1, MPI.ROOT))
case("send_negative_tag", lambda: comm.send(1, right, tag=-5))
case("send_any_tag", lambda: comm.send(1, right, tag=MPI.ANY_TAG))
case("send_tag_above_ub", lambda: comm.send(1, right, tag=comm.Get_attr(MPI.TAG_UB) + 1))
case("isend_bad_dest", lambda: comm.isend(1, size + 1))
case("recv_bad_source", lambda: comm.recv(source=size))
case("recv_bad_tag", lambda: comm.recv(source=left, tag=-7))
case("irecv_bad_source", lambda: comm.irecv(source=size))
case("probe_bad_source", lambda: comm.probe(source=size))
case("iprobe_bad_tag", lambda: comm.iprobe(source=left, tag=-9))
case("sendrecv_bad_dest", lambda: comm.sendrecv(1, size))

# ---- PROC_NULL: sends vanish, receives get None with source PROC_NULL, tag ANY_TAG
status = MPI.Status()
case("send_proc_null", lambda: comm.send("x", MPI.PROC_NULL))
case("recv_proc_null", lambda: (comm.recv(source=MPI.PROC_NULL, status=status), status_of(status)))
case("irecv_proc_null", lambda: (comm.irecv(source=MPI.PROC_NULL).wait(status), status_of(status)))
case("isend_proc_null", lambda: comm.isend("x", MPI.PROC_NULL).wait())
case("sendrecv_proc_null", lambda: comm.sendrecv("x", MPI.PROC_NULL, source=MPI.PROC_NULL))
case("probe_proc_null", lambda: (comm.probe(MPI.PROC_NULL, status=status), status_of(status)))
case("iprobe_proc_null", lambda: (comm.iprobe(MPI.PROC_NULL, status=status), status_of(status)))

# ---- point to point
if rank == 0:
    for dest in range(1, size):
        comm.send(("seven", dest), dest, tag=7)
        comm.send(("three", dest), dest, tag=3)
    received = []
    for _ in range(1, size):
        item = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
        received.append((item, status_of(status)))
    case("any_source_any_tag", lambda: sorted(received))
else:
    case("tag3_first", lambda: (comm.recv(source=0, tag=3, status=status), status_of(status)))
    case("tag7_second", lambda: comm.recv(source=0, tag=7))
    comm.send({"rank": rank}, 0, tag=10 + rank)
comm.barrier()  # else rank 0's wildcard receives could take the next case's messages
case("sendrecv_ring", lambda: (comm.sendrecv(rank, right, 5, None, left, 5, status), status_of(status)))
case("sendrecv_self", lambda: comm.sendrecv("me", rank, 6, None, rank, 6))
case("isend_self", lambda: (comm.isend("me", rank, 8).wait(), comm.recv(source=rank, tag=8)))
case("ssend_ring", lambda: (comm.irecv(source=left, tag=9), comm.ssend(rank, right, 9))[0].wait())
MPI.Attach_buffer(bytearray(1 << 16))
case("bsend_ring", lambda: (comm.bsend(rank, right, 11), comm.recv(source=left, tag=11)))
case("ibsend_ring", lambda: (comm.ibsend(rank, right, 12).wait(), comm.recv(source=left, tag=12)))


def ring_requests():
    receive = comm.irecv(source=left, tag=13)
    send = comm.isend([rank] * 3, right, tag=13)
    statuses = [MPI.Status(), MPI.Status()]
    values = MPI.Request.waitall([send, receive], statuses)
    return values, [status_of(s) for s in statuses], bool(send), bool(receive), send == MPI.REQUEST_NULL


case("waitall_ring", ring_requests)


def synchronous_send_waits_for_the_match():
    """issend is incomplete until the receiver matches it (the receiver waits for a barrier)."""
    if rank == 0:
        request = comm.issend("sync", 1, tag=14)
        time.sleep(0.2)
        early = request.test()
        comm.barrier()
        return early, request.wait(), bool(request)
    if rank == 1:
        comm.barrier()
        return comm.probe(source=0, tag=14, status=status), status_of(status), comm.recv(source=0, tag=14)
    comm.barrier()
    return None


case("issend_waits", synchronous_send_waits_for_the_match)


def probes():
    if rank == 1:
        comm.send(b"probed", 0, tag=15)
        comm.send(b"taken", 0, tag=16)
        return None
    if rank != 0:
        return None
    seen = comm.probe(source=MPI.ANY_SOURCE, tag=15, status=status), status_of(status)
    again = comm.iprobe(source=1, tag=15, status=status), status_of(status)
    nothing = comm.iprobe(source=1, tag=99)
    message = comm.mprobe(source=1, tag=16, status=status)
    taken = status_of(status), message.recv()
    return seen, again, nothing, comm.recv(source=1, tag=15), taken


case("probe", probes)


def completions():
    """Receives matched by synchronous sends before the barrier are complete after it."""
    if rank == 0:
        requests = [comm.irecv(source=1, tag=20 + i) for i in range(4)]
        pending = comm.irecv(source=1, tag=29)
        comm.barrier()
        comm.barrier()
        statuses = []
        out = [MPI.Request.testany([pending]), MPI.Request.testsome([pending]), MPI.Request.testall([pending])]
        out += [pending.test(), MPI.Request.Testany([pending]), MPI.Request.Testsome([pending])]
        out.append(MPI.Request.waitany(requests, status))
        out.append(status_of(status))
        out.append(MPI.Request.testany(requests, status))
        out.append(MPI.Request.waitsome(requests, statuses))
        out.append([status_of(s) for s in statuses])
        out += [[bool(r) for r in requests], MPI.Request.waitall(requests), MPI.Request.testall(requests)]
        out += [MPI.Request.waitany(requests), MPI.Request.testany(requests), MPI.Request.Waitany(requests)]
        out += [MPI.Request.waitsome(requests), MPI.Request.testsome(requests), MPI.Request.Waitsome(requests)]
        out += [MPI.Request.Testsome(requests), MPI.Request.Testall(requests), MPI.Request.Waitall(requests)]
        out += [requests[0].wait(), requests[0].Wait(), requests[0].test(), requests[0].Get_status(status)]
        pending.Cancel()
        out += [pending.wait(status), status_of(status), bool(pending)]
        return out
    if rank == 1:
        comm.barrier()
        for i in range(4):
            comm.ssend(f"m{i}", 0, tag=20 + i)
        comm.barrier()
        return None
    comm.barrier()
    comm.barrier()
    return None


case("completions", completions)


def truncated():
    """A receive buffer smaller than the message: ERR_TRUNCATE from the wait."""
    send = comm.isend("x" * 50, right, 30)
    try:
        return comm.irecv(bytearray(8), source=left, tag=30).wait()
    finally:
        send.wait()


case("truncated", truncated)


# ---- communicators
def duplicates():
    dup = comm.Dup()
    if rank == 0:
        dup.send("on dup", 1, tag=1)
        comm.send("on world", 1, tag=1)
    got_world = comm.recv(source=0, tag=MPI.ANY_TAG) if rank == 1 else None
    got_dup = dup.recv(source=0, tag=MPI.ANY_TAG) if rank == 1 else None
    out = (dup.rank, dup.size, dup.Get_name(), dup.allreduce(rank), got_world, got_dup, dup == comm)
    dup.Free()
    return (*out, dup == MPI.COMM_NULL)


case("dup", duplicates)


def splits():
    halves = comm.Split(rank % 2, -rank)
    out = (halves.rank, halves.size, halves.allgather(rank), halves.bcast(rank, root=halves.size - 1))
    others = comm.Split(MPI.UNDEFINED if rank == 0 else 7, rank)
    out += (others == MPI.COMM_NULL,)
    if others != MPI.COMM_NULL:
        out += (others.rank, others.allreduce(rank), others.scan(rank))
    clone = comm.Clone()
    return (*out, clone.size, clone.exscan(1))


case("split", splits)
case("compare", lambda: [comm.Compare(c) for c in (comm, comm.Dup(), comm.Split(0, -rank), comm.Split(rank % 2))])
case("compare_names", lambda: (MPI.IDENT, MPI.CONGRUENT, MPI.SIMILAR, MPI.UNEQUAL))


def freed():
    dup = comm.Dup()
    dup.Free()
    return dup.Get_size()


case("freed_used", freed)
case("comm_null_used", lambda: MPI.COMM_NULL.Get_rank())
case("world_after_free", lambda: comm.bcast("still works"))
case("float_rank_and_tag", lambda: (comm.send("f", dest=float(right), tag=48.0), comm.recv(source=left, tag=48.9)))
case("tag_overflow", lambda: comm.send(1, dest=right, tag=2**31))


def truncated_in_waitall():
    """A failing request among several: ERR_IN_STATUS, its status holds ERR_TRUNCATE."""
    sends = [comm.isend("y" * 60, right, 49), comm.isend("z", right, 50)]
    receives = [comm.irecv(bytearray(8), source=left, tag=49), comm.irecv(source=left, tag=50)]
    statuses = [MPI.Status(), MPI.Status()]
    try:
        MPI.Request.Waitall(receives, statuses)
        outcome = "no error"
    except MPI.Exception as exc:
        outcome = exc.Get_error_class()
    MPI.Request.waitall(sends)
    return outcome, [MPI.Get_error_class(s.Get_error()) for s in statuses], [bool(r) for r in receives]


case("truncated_in_waitall", truncated_in_waitall)


def capitalised_probes():
    comm.Send(np.arange(3.0), right, tag=51)
    comm.send(np.arange(2.0), right, tag=52)
    found = comm.Probe(left, 51, status), status_of(status)
    got = np.zeros(3)
    message = comm.Mprobe(left, 51, status)
    message.Recv(got)
    late = comm.improbe(left, 52)
    while late is None:
        late = comm.improbe(left, 52)
    return found, got.tolist(), bool(message), late.recv().tolist()


case("capitalised_probes", capitalised_probes)

# ---- names mpi4py programs and mpi4py's own tests use (vendor checks, null handles, properties)
case("vendor", lambda: (type(MPI.get_vendor()[0]).__name__, len(MPI.get_vendor()[1])))
case("null_handles", lambda: [bool(h) for h in (MPI.OP_NULL, MPI.DATATYPE_NULL, MPI.INFO_NULL, MPI.MESSAGE_NULL)])
case("message_no_proc", lambda: (bool(MPI.MESSAGE_NO_PROC), comm.mprobe(MPI.PROC_NULL) == MPI.MESSAGE_NO_PROC))
case("keyvals", lambda: (MPI.BSEND_OVERHEAD, MPI.UNIVERSE_SIZE, MPI.WTIME_IS_GLOBAL))
case("errhandler", lambda: (comm.Get_errhandler() == MPI.ERRORS_RETURN, comm.Set_errhandler(MPI.ERRORS_RETURN)))
case("errhandlers", lambda: MPI.ERRORS_RETURN == MPI.ERRORS_ARE_FATAL)
case(
    "datatype_properties",
    lambda: [
        (t.size, t.extent, t.lb, t.ub, t.name, t.typestr)
        for t in (MPI.BYTE, MPI.CHAR, MPI.INT, MPI.LONG, MPI.DOUBLE, MPI.C_BOOL, MPI.C_DOUBLE_COMPLEX, MPI.DOUBLE_INT)
    ],
)
case("status_properties", lambda: [(s.source, s.tag, s.error, s.count, s.cancelled) for s in [MPI.Status()]])
case("status_of_an_int", lambda: MPI.Status(123))
case("exception_error_class", lambda: MPI.Exception(MPI.ERR_TAG).error_class)
case("alloc_mem", lambda: (memoryview(MPI.Alloc_mem(16)).nbytes, MPI.Free_mem(MPI.Alloc_mem(8))))
case("get_address", lambda: [MPI.Get_address(a) == a.ctypes.data for a in [np.zeros(3)]])
# Null and predefined handles: the error classes MPICH gives.
case("free_request_null", lambda: MPI.REQUEST_NULL.Free())
case("cancel_request_null", lambda: MPI.REQUEST_NULL.Cancel())
case("free_predefined_op", lambda: MPI.MAX.Free())
case("free_op_null", lambda: MPI.OP_NULL.Free())
case("free_predefined_datatype", lambda: MPI.INT.Free())
case("datatype_null_size", lambda: MPI.DATATYPE_NULL.Get_size())
case("recv_message_null", lambda: MPI.MESSAGE_NULL.recv())
case("recv_message_no_proc_twice", lambda: (MPI.MESSAGE_NO_PROC.recv(), MPI.MESSAGE_NO_PROC.recv()))
case("compare_null_null", lambda: MPI.Comm.Compare(MPI.COMM_NULL, MPI.COMM_NULL))
case("compare_world_null", lambda: comm.Compare(MPI.COMM_NULL))
case("comm_null_name", lambda: MPI.COMM_NULL.Get_name())


# ---- object receives given a size, empty messages, request arrays with nothing active
def self_message(receive, send):
    request = receive()
    send()
    return request.wait()


case("irecv_int_proc_null", lambda: comm.irecv(0, MPI.PROC_NULL).wait())
case("irecv_int_size", lambda: self_message(lambda: comm.irecv(512, rank, 92), lambda: comm.send("x" * 10, rank, 92)))
case("irecv_int_small", lambda: self_message(lambda: comm.irecv(16, rank, 93), lambda: comm.send("x" * 99, rank, 93)))


def recv_buf_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = comm.recv(bytearray(0), MPI.PROC_NULL)
    return value, [(w.category.__name__, str(w.message)) for w in caught]


case("recv_buf_warns", recv_buf_warns)


def empty_buffer_message():
    send = comm.Isend([None, 0, MPI.BYTE], rank, 94)
    value = comm.recv(None, rank, 94)
    send.Wait()
    return value


case("empty_buffer_message", empty_buffer_message)
nulls = [MPI.REQUEST_NULL] * 3
case("some_of_nulls", lambda: (MPI.Request.Waitsome(nulls), MPI.Request.Testsome(nulls), MPI.Request.waitsome(nulls)))


def some_of_completed():
    done = comm.isend(1, rank, 95)
    comm.recv(None, rank, 95)
    done.wait()
    return MPI.Request.Waitsome([done, MPI.REQUEST_NULL]), MPI.Request.testsome([done])


case("some_of_completed", some_of_completed)


def waitall_into_a_tuple():
    statuses = (MPI.Status(), MPI.Status())
    request = comm.irecv(None, rank, 96)
    comm.send(1, rank, 96)
    return MPI.Request.Waitall([request, MPI.REQUEST_NULL], statuses), [status_of(s) for s in statuses]


case("waitall_into_a_tuple", waitall_into_a_tuple)
case("pickled_ops", lambda: [pickle.loads(pickle.dumps(o)) is o for o in (MPI.MAX, MPI.SUM, MPI.MINLOC, MPI.OP_NULL)])

comm.barrier()
out = Path(sys.argv[2])
(out / f"rank{rank}.json").write_text(json.dumps(got, indent=1))
