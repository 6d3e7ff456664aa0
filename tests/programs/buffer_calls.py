"""Every buffer call of mpi4py's Intracomm with the spec forms mpi4py programs write, on mpi4py
(``mpi``) or lambda_shim (``shim``); each rank writes what it got as JSON to OUT/rank<r>.json, to
be compared between the two. Run under mpiexec or ``python -m lambda_shim.launch``."""

from __future__ import annotations

import array
import json
import sys
from pathlib import Path

import numpy as np

if sys.argv[1] == "mpi":
    from mpi4py import MPI
else:
    from lambda_shim import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
last = size - 1
got: dict[str, object] = {}


def outcome(name: str, call) -> None:
    """The exception class (and MPI error class) a call raises, or 'ok'."""
    try:
        call()
        got[name] = "ok"
    except MPI.Exception as exc:
        got[name] = ["MPI.Exception", exc.Get_error_class()]
    except (ValueError, TypeError, KeyError, BufferError, OverflowError) as exc:
        got[name] = [type(exc).__name__]


# ---- Bcast: counts and displacements honoured
for label, spec in {
    "count": lambda a: [a, 2],
    "count_type": lambda a: [a, 2, MPI.DOUBLE],
    "count_displ": lambda a: [a, (2, 1), MPI.DOUBLE],
    "four": lambda a: [a, 1, 3, MPI.DOUBLE],
    "whole": lambda a: a,
}.items():
    a = np.ones(4) if rank == last else np.zeros(4)
    comm.Bcast(spec(a), root=last)
    got[f"Bcast_{label}"] = a.tolist()
b = bytearray(b"hello" if rank == 0 else b"xxxxx")
comm.Bcast(b)
got["Bcast_bytearray"] = b.decode()
ia = array.array("i", [7, 8, 9] if rank == 1 else [0, 0, 0])
comm.Bcast([ia, 2, MPI.INT], root=1)
got["Bcast_array_array"] = ia.tolist()
m2 = np.arange(6.0).reshape(2, 3) * (rank == 0)
comm.Bcast(memoryview(m2), root=0)
got["Bcast_memoryview_2d"] = m2.tolist()

# ---- reductions
s = np.array([rank + 1.0, -rank, 5.0, 9.0])
r = np.full(4, -7.0)
comm.Allreduce([s, 2, MPI.DOUBLE], [r, 2, MPI.DOUBLE])
got["Allreduce_count"] = r.tolist()
for op in ("SUM", "PROD", "MAX", "MIN"):
    r = np.zeros(3, dtype=np.int64)
    comm.Allreduce(np.array([rank + 1, 2 - rank, 3], dtype=np.int64), r, op=getattr(MPI, op))
    got[f"Allreduce_int_{op}"] = r.tolist()
for op in ("LAND", "LOR", "LXOR"):
    r = np.zeros(3, dtype=bool)
    comm.Allreduce(np.array([True, rank == 0, rank % 2 == 1]), r, op=getattr(MPI, op))
    got[f"Allreduce_bool_{op}"] = r.tolist()
for op in ("BAND", "BOR", "BXOR"):
    r = np.zeros(2, dtype=np.uint8)
    comm.Allreduce(np.array([0xF0 | rank, 1 << rank], dtype=np.uint8), r, op=getattr(MPI, op))
    got[f"Allreduce_bits_{op}"] = r.tolist()
pair = np.dtype([("v", "f8"), ("i", "i4")], align=True)
for op in ("MAXLOC", "MINLOC"):
    r = np.zeros(2, dtype=pair)
    mine = np.array([(float(rank % 2), rank), (-rank, rank)], dtype=pair)
    comm.Allreduce([mine, MPI.DOUBLE_INT], [r, MPI.DOUBLE_INT], op=getattr(MPI, op))
    got[f"Allreduce_{op}"] = [[float(v), int(i)] for v, i in r.tolist()]
ii = np.zeros(4, dtype=np.int32)
comm.Allreduce([np.array([rank * 3 % 4, rank, 1, 1], dtype=np.int32), MPI.TWOINT], [ii, MPI.TWOINT], op=MPI.MAXLOC)
got["Allreduce_2INT_MAXLOC"] = ii.tolist()
r = np.array([rank, 2.0 * rank])
comm.Allreduce(MPI.IN_PLACE, r, op=MPI.SUM)
got["Allreduce_in_place"] = r.tolist()
r = np.full(3, -1.0)
mine = [np.array([rank, 1.0, 2.0]), 2, MPI.DOUBLE]
comm.Reduce(mine, [r, 2, MPI.DOUBLE] if rank == last else None, op=MPI.SUM, root=last)
got["Reduce_root_last"] = r.tolist()
r = np.array([rank + 1.0, 1.0])
comm.Reduce(MPI.IN_PLACE if rank == 1 else r, r if rank == 1 else None, op=MPI.PROD, root=1)
got["Reduce_in_place"] = r.tolist()
r = np.zeros(2)
comm.Scan(np.array([rank + 1.0, 1.0]), r)
got["Scan"] = r.tolist()
r = np.full(2, -5.0)
comm.Exscan(np.array([rank + 1.0, 1.0]), r)
got["Exscan"] = r.tolist() if rank > 0 else None
r = np.array([rank + 1, 10 * rank], dtype=np.int64)
comm.Scan(MPI.IN_PLACE, r, op=MPI.MAX)
got["Scan_in_place_MAX"] = r.tolist()

# ---- gathers and scatters
counts = [i + 1 for i in range(size)]
displs = [sum(counts[:i]) + i for i in range(size)]
total = displs[-1] + counts[-1] + 1
mine = np.full(rank + 1, rank + 0.5)
g = np.full(total, -1.0)
comm.Gatherv(mine, [g, (counts, displs), MPI.DOUBLE], root=0)
got["Gatherv_counts_displs"] = g.tolist() if rank == 0 else None
g = np.full(sum(counts), -1.0)
comm.Gatherv([mine, MPI.DOUBLE], [g, counts], root=last)
got["Gatherv_counts"] = g.tolist() if rank == last else None
g = np.full(size, -1.0)
comm.Gatherv([mine, 1, MPI.DOUBLE], [g, MPI.DOUBLE], root=0)
got["Gatherv_type_only"] = g.tolist() if rank == 0 else None
g = np.full(2 * size, -1, dtype=np.int32)
comm.Gather(np.array([rank, -rank], dtype=np.int32), g, root=1)
got["Gather"] = g.tolist() if rank == 1 else None
g = np.full(size, float(rank))
comm.Gather(MPI.IN_PLACE if rank == 0 else np.array([rank * 10.0]), [g, 1, MPI.DOUBLE] if rank == 0 else None)
got["Gather_in_place"] = g.tolist() if rank == 0 else None
x = np.zeros(2)
comm.Scatter(np.arange(2.0 * size) if rank == 0 else None, x, root=0)
got["Scatter"] = x.tolist()
x = np.full(size, -1.0)
comm.Scatterv([np.arange(20.0), (counts, displs), MPI.DOUBLE] if rank == last else None, [x, rank + 1], root=last)
got["Scatterv"] = x.tolist()
a = np.full(2 * size, -1.0)
comm.Allgather(np.array([rank, rank * rank], dtype=float), a)
got["Allgather"] = a.tolist()
a = np.full(sum(counts), -1.0)
comm.Allgatherv(mine, [a, counts])
got["Allgatherv"] = a.tolist()
a = np.arange(sum(counts), dtype=float) * (rank + 1)
comm.Allgatherv(MPI.IN_PLACE, [a, counts])
got["Allgatherv_in_place"] = a.tolist()
t = np.arange(size, dtype=np.int64) + 100 * rank
u = np.zeros(size, dtype=np.int64)
comm.Alltoall(t, u)
got["Alltoall"] = u.tolist()
scounts = [(rank + j) % 2 + 1 for j in range(size)]
rcounts = [(j + rank) % 2 + 1 for j in range(size)]
sdispls = [2 * j for j in range(size)]
rdispls = [3 * j for j in range(size)]
t = np.arange(2.0 * size) + 10 * rank
u = np.full(3 * size, -1.0)
comm.Alltoallv([t, (scounts, sdispls), MPI.DOUBLE], [u, (rcounts, rdispls), MPI.DOUBLE])
got["Alltoallv"] = u.tolist()
x = np.zeros(2)
comm.Reduce_scatter_block(np.arange(2.0 * size) * (rank + 1), x)
got["Reduce_scatter_block"] = x.tolist()
x = np.full(rank + 1, -1.0)
comm.Reduce_scatter(np.arange(float(sum(counts))) + rank, x, counts, op=MPI.MAX)
got["Reduce_scatter"] = x.tolist()

# ---- point to point
right, left = (rank + 1) % size, (rank - 1) % size
st = MPI.Status()
box = np.zeros(5)
comm.Sendrecv([np.arange(3.0) + rank, 3, MPI.DOUBLE], right, 7, box, left, 7, st)
got["Sendrecv"] = [box.tolist(), st.Get_source(), st.Get_tag(), st.Get_count(MPI.DOUBLE), st.Get_count()]
ring = np.array([rank, rank * 2.0])
comm.Sendrecv_replace([ring, 1], right, 3, left, 3)
got["Sendrecv_replace"] = ring.tolist()
if rank == 0:
    comm.Send([np.arange(4, dtype=np.int32), 3, MPI.INT], 1, tag=11)
    comm.Ssend(bytearray(b"abc"), 1, tag=12)
    req = comm.Isend(np.array([1.5, 2.5]), last, tag=13)
    req.Wait()
elif rank == 1:
    st = MPI.Status()
    ibuf = np.full(5, -1, dtype=np.int32)
    comm.Recv([ibuf, MPI.INT], 0, 11, st)
    got["Recv"] = [ibuf.tolist(), st.Get_source(), st.Get_tag(), st.Get_count(MPI.INT), st.Get_count(MPI.BYTE)]
    sbuf = bytearray(4)
    comm.Recv(sbuf, MPI.ANY_SOURCE, MPI.ANY_TAG, st)
    got["Recv_any"] = [sbuf.decode("latin-1"), st.Get_source(), st.Get_tag(), st.Get_count()]
if rank == last:
    fbuf = np.zeros(3)
    req = comm.Irecv([fbuf, 2, MPI.DOUBLE], 0, 13)
    st = MPI.Status()
    req.Wait(st)
    got["Irecv"] = [fbuf.tolist(), st.Get_source(), st.Get_count(MPI.DOUBLE)]
st = MPI.Status()
comm.Recv(np.zeros(1), MPI.PROC_NULL, 5, st)
got["Recv_PROC_NULL"] = [st.Get_source(), st.Get_tag(), st.Get_count()]
comm.Send(12345, MPI.PROC_NULL)
comm.Barrier()

# ---- errors, raised on every rank before any message moves
outcome("Bcast_bad_root", lambda: comm.Bcast(np.zeros(2), root=size))
outcome("Reduce_bad_root", lambda: comm.Reduce(np.zeros(2), np.zeros(2), root=-3))
outcome("Allreduce_LAND_double", lambda: comm.Allreduce(np.ones(2), np.zeros(2), op=MPI.LAND))
outcome("Allreduce_SUM_bool", lambda: comm.Allreduce(np.ones(2, bool), np.zeros(2, bool), op=MPI.SUM))
outcome("Allreduce_MAXLOC_double", lambda: comm.Allreduce(np.ones(2), np.zeros(2), op=MPI.MAXLOC))
outcome("Allreduce_count_mismatch", lambda: comm.Allreduce(np.ones(2), np.zeros(3)))
outcome("Allreduce_type_mismatch", lambda: comm.Allreduce(np.ones(2), np.zeros(2, np.float32)))
outcome("Allreduce_same_buffer", lambda: comm.Allreduce(x := np.ones(2), x))
outcome("Bcast_readonly", lambda: comm.Bcast(b"abcd", root=size + 5))
outcome("Send_bad_spec", lambda: comm.Send([np.zeros(2), 1, 2, MPI.DOUBLE, 4], right))
outcome("Send_bad_tag", lambda: comm.Send(np.zeros(2), right, tag=-4))
outcome("Send_bad_dest", lambda: comm.Send(np.zeros(2), size + 2))
outcome("Send_tag_overflow", lambda: comm.Send(np.zeros(2), right, tag=2**31))
outcome("Gatherv_bad_counts", lambda: comm.Gatherv(np.zeros(1), [np.zeros(9), [1] * (size + 1)], root=rank))
outcome("Scatter_not_divisible", lambda: comm.Scatter(np.zeros(size + 1), np.zeros(1), root=rank))
outcome("Reduce_scatter_sum", lambda: comm.Reduce_scatter(np.zeros(size), np.zeros(1), [2] * size))
if rank == 0:
    comm.Send(np.arange(4.0), 1, tag=21)
    comm.Send(np.arange(3, dtype=np.int32), 1, tag=22)
if rank == 1:
    outcome("Recv_truncated", lambda: comm.Recv(np.zeros(2), 0, 21))
    req = comm.Irecv([np.zeros(4, dtype=np.int32), 2, MPI.INT], 0, 22)
    outcome("Irecv_truncated_at_wait", req.Wait)
# A bad argument on some ranks only: the root's part goes out, the others raise.
outcome("Scatter_recv_None_off_root", lambda: comm.Scatter(np.arange(1.0 * size), None, root=0))
# Nothing of the failed calls is left in flight: the next collectives see only their own messages.
r = np.zeros(2)
comm.Allreduce(np.array([1.0, rank]), r)
got["Allreduce_after_errors"] = r.tolist()
g = np.zeros(size, dtype=np.int64)
comm.Allgather(np.array([rank * 7], dtype=np.int64), g)
got["Allgather_after_errors"] = g.tolist()
comm.Barrier()

# ---- more datatypes, spec forms and completion calls, each call's outcome recorded


def rec(name: str, call) -> None:
    """What a call returns, or the exception class (and MPI error class) it raises."""
    try:
        got[name] = call()
    except MPI.Exception as exc:
        got[name] = ["MPI.Exception", exc.Get_error_class()]
    except (ValueError, TypeError, KeyError, BufferError) as exc:
        got[name] = [type(exc).__name__]
    comm.Barrier()


def plain(a):
    """An array (or array.array) as JSON-able lists: pairs, complex and char entries too."""
    if isinstance(a, np.ndarray):
        if a.dtype.names:
            return [[float(x) for x in t] for t in a.tolist()]
        if a.dtype.kind == "c":
            return [[float(x.real), float(x.imag)] for x in a.ravel()]
        if a.dtype.kind == "S":
            return [x.decode("latin-1") for x in a.ravel()]
        return np.asarray(a, dtype=float if a.dtype.kind in "fg" else a.dtype).tolist()
    return list(a)


for code in ("i1", "u2", "f4", "c16", "?", "g", "i8", "u1"):

    def allred(code=code):
        x = (np.arange(4) + rank).astype(code) if code != "?" else np.array([rank % 2 == 0, True, False, rank == 1])
        r = np.zeros(4, dtype=x.dtype)
        op = MPI.LOR if code == "?" else MPI.SUM
        comm.Allreduce(x, r, op=op)
        return plain(r)

    rec(f"Allreduce_{code}", allred)

    def mx(code=code):
        x = (np.arange(4) * (rank + 1) % 5).astype(code)
        r = np.zeros(4, dtype=x.dtype)
        comm.Allreduce(x, r, op=MPI.MAX)
        return plain(r)

    rec(f"Allreduce_MAX_{code}", mx)

    def bc(code=code):
        x = (np.arange(5) + 1).astype(code) if rank == 1 else np.zeros(5, dtype=code)
        comm.Bcast([x, 3], root=1)
        return plain(x)

    rec(f"Bcast_{code}", bc)
for tname, vt in [
    ("FLOAT_INT", "f4"),
    ("SHORT_INT", "i2"),
    ("LONG_INT", "i8"),
    ("TWOINT", "i4"),
    ("LONG_DOUBLE_INT", "g"),
]:
    dt = np.dtype([("v", vt), ("i", "i4")], align=True)

    def loc(tname=tname, dt=dt):
        x = np.array([((rank * 5) % 3, rank), (-rank, 10 - rank), (1, rank)], dtype=dt)
        r = np.zeros(3, dtype=dt)
        comm.Allreduce([x, getattr(MPI, tname)], [r, getattr(MPI, tname)], op=MPI.MINLOC)
        s = np.zeros(3, dtype=dt)
        comm.Scan([x, getattr(MPI, tname)], [s, getattr(MPI, tname)], op=MPI.MAXLOC)
        return plain(r) + plain(s)

    rec(f"LOC_{tname}", loc)


def char_sum():
    x = np.array([b"a", b"b"], dtype="S1")
    r = np.zeros(2, dtype="S1")
    comm.Allreduce([x, MPI.CHAR], [r, MPI.CHAR], op=MPI.MAX)
    return plain(r)


rec("CHAR_MAX", char_sum)


def gather_simple_displ():
    r = np.full(2 * size + 3, -1.0)
    comm.Gather(np.array([rank, rank + 0.5]), [r, (2, 1), MPI.DOUBLE] if rank == 0 else None, root=0)
    return plain(r)


rec("Gather_count_displ", gather_simple_displ)


def scatter_inplace():
    s = np.arange(3.0 * size) if rank == 1 else np.full(3, -1.0)
    comm.Scatter([s, 3, MPI.DOUBLE] if rank == 1 else None, MPI.IN_PLACE if rank == 1 else s, root=1)
    return plain(s)


rec("Scatter_in_place", scatter_inplace)


def gatherv_stride():
    r = np.full(3 * size, -1.0)
    comm.Gatherv([np.array([rank + 1.0, 9.0]), 1, MPI.DOUBLE], [r, (1, 3), MPI.DOUBLE], root=size - 1)
    return plain(r)


rec("Gatherv_stride", gatherv_stride)


def scatterv_default():
    s = np.arange(2.0 * size + 1)
    x = np.full(3, -1.0)
    comm.Scatterv(s if rank == 0 else None, [x, 2 + (rank == 0)], root=0)
    return plain(x)


rec("Scatterv_even_split", scatterv_default)


def allgather_inplace_type():
    r = np.arange(size, dtype=np.int32) * 0 + rank * 3
    comm.Allgather(MPI.IN_PLACE, [r, MPI.INT])
    return plain(r)


rec("Allgather_in_place_type", allgather_inplace_type)


def alltoall_count():
    s = np.arange(2 * size, dtype=np.int32) + 100 * rank
    r = np.full(2 * size, -1, dtype=np.int32)
    comm.Alltoall([s, 1, MPI.INT], [r, 1, MPI.INT])
    return plain(r)


rec("Alltoall_count1", alltoall_count)


def alltoall_inplace():
    r = np.arange(size, dtype=np.int64) + 10 * rank
    comm.Alltoall(MPI.IN_PLACE, r)
    return plain(r)


rec("Alltoall_in_place", alltoall_inplace)


def alltoallv_inplace():
    r = np.arange(2 * size, dtype=np.float64) + 10 * rank
    comm.Alltoallv(MPI.IN_PLACE, [r, 2])
    return plain(r)


rec("Alltoallv_in_place", alltoallv_inplace)


def rsb_inplace():
    r = np.arange(2.0 * size) + rank
    comm.Reduce_scatter_block(MPI.IN_PLACE, r)
    return plain(r)


rec("Reduce_scatter_block_in_place", rsb_inplace)


def rs_inplace():
    counts = [1] * size
    r = np.arange(1.0 * size) * (rank + 1)
    comm.Reduce_scatter(MPI.IN_PLACE, r, counts)
    return plain(r)


rec("Reduce_scatter_in_place", rs_inplace)


def rs_nocounts():
    r = np.zeros(2)
    comm.Reduce_scatter(np.arange(2.0 * size), r)
    return plain(r)


rec("Reduce_scatter_no_counts", rs_nocounts)


def exscan_inplace():
    r = np.array([rank + 1, 2], dtype=np.int32)
    comm.Exscan(MPI.IN_PLACE, r, op=MPI.PROD)
    return plain(r) if rank > 0 else None


rec("Exscan_in_place", exscan_inplace)


def waitall():
    bufs = [np.zeros(2) for _ in range(size)]
    reqs = [comm.Irecv(bufs[p], p, 5) for p in range(size)]
    sreqs = [comm.Isend(np.array([rank, p], dtype=float), p, 5) for p in range(size)]
    sts = [MPI.Status() for _ in reqs]
    MPI.Request.Waitall(reqs, sts)
    MPI.Request.Waitall(sreqs)
    return [plain(b) for b in bufs] + [[s.Get_source(), s.Get_count(MPI.DOUBLE)] for s in sts]


rec("Irecv_Waitall", waitall)


def waitany():
    b = np.zeros(1, dtype=np.int64)
    req = comm.Irecv(b, (rank - 1) % size, 6)
    comm.Issend(np.array([rank], dtype=np.int64), (rank + 1) % size, 6).Wait()
    idx = MPI.Request.Waitany([req])
    return [idx, plain(b)]


rec("Irecv_Waitany_Issend", waitany)


def irecv_partial():
    b = bytearray(3)
    req = comm.Irecv(b, MPI.ANY_SOURCE, 8)
    comm.Send(b"xyz"[: rank % 3 + 1], (rank + 1) % size, 8)
    st = MPI.Status()
    req.Wait(st)
    return [b.decode("latin-1"), st.Get_count(), st.Get_source()]


rec("Irecv_bytearray_partial", irecv_partial)


def sendrecv_pn():
    b = np.full(2, -1.0)
    st = MPI.Status()
    comm.Sendrecv(np.ones(2), MPI.PROC_NULL, 0, b, MPI.PROC_NULL, 0, st)
    return [plain(b), st.Get_source(), st.Get_tag(), st.Get_count()]


rec("Sendrecv_PROC_NULL", sendrecv_pn)


def bcast_types():
    x = array.array("d", [rank, rank])
    comm.Bcast([x, MPI.DOUBLE], root=size - 1)
    return list(x)


rec("Bcast_array_double", bcast_types)


def bcast_mv():
    x = bytearray(b"q" * 6) if rank == 0 else bytearray(6)
    comm.Bcast([memoryview(x)[1:5], 2, 1, MPI.BYTE], root=0)
    return x.decode("latin-1")


rec("Bcast_memoryview_slice", bcast_mv)


def reduce_pn_root_err():
    comm.Reduce(np.ones(2), np.zeros(2), root=MPI.PROC_NULL)


rec("Reduce_root_PROC_NULL", reduce_pn_root_err)


def scatter_recv_none_nonroot():
    x = np.zeros(1)
    comm.Scatter(np.arange(1.0 * size), x, root=0)
    return plain(x)


rec("Scatter_root_sendbuf_everywhere", scatter_recv_none_nonroot)


def bad_op():
    comm.Allreduce(np.ones(2), np.zeros(2), op=MPI.REPLACE)


rec("Allreduce_REPLACE", bad_op)


def bxor_float():
    comm.Reduce(np.ones(2), np.zeros(2), op=MPI.BXOR, root=0)


rec("Reduce_BXOR_float", bxor_float)


def gatherv_negcount():
    comm.Gatherv(np.ones(1), [np.zeros(9), [1] * (size - 1) + [-1]], root=rank)


rec("Gatherv_neg_count", gatherv_negcount)


def float_tag():
    b = np.zeros(1)
    comm.Sendrecv(np.ones(1), rank, 1.5, b, rank, 1)  # mpi4py's C int arguments truncate floats
    return plain(b)


rec("Sendrecv_float_tag", float_tag)


def np_root():
    x = np.arange(2.0) if rank == 1 else np.zeros(2)
    comm.Bcast(x, root=np.int64(1))
    return plain(x)


rec("Bcast_numpy_root", np_root)


def reduce_count0():
    r = np.full(2, 3.0)
    comm.Allreduce([np.ones(2), 0, MPI.DOUBLE], [r, 0, MPI.DOUBLE])
    return plain(r)


rec("Allreduce_count0", reduce_count0)


def bcast_none():
    comm.Bcast([None, 0, MPI.INT], root=0)
    return "done"


rec("Bcast_None_count0", bcast_none)


def compose(inbuf, inoutbuf, datatype) -> None:
    """A user operator that is associative but does not commute: affine maps x -> a*x + b as
    (a, b) pairs, the lower ranks' map applied first."""
    low, high = np.frombuffer(inbuf, dtype=np.float64), np.frombuffer(inoutbuf, dtype=np.float64)
    high[:] = [low[0] * high[0], high[0] * low[1] + high[1]]


def user_ops():
    op = MPI.Op.Create(compose, commute=False)
    mine = np.array([rank + 2.0, rank + 1.0])
    r, a, s = np.zeros(2), np.zeros(2), np.zeros(2)
    comm.Reduce(mine, r, op=op, root=last)
    comm.Allreduce(mine, a, op=op)
    comm.Scan(mine, s, op=op)
    return [r.tolist() if rank == last else None, a.tolist(), s.tolist()]


rec("user_op_not_commuting", user_ops)

Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps(got, sort_keys=True))
