"""The buffer collectives with every message-spec form mpi4py reads ([buf], [buf, count],
[buf, count, type], [buf, (count, displ), type], [buf, count, displ, type], [buf, type];
vectors as [buf, counts], [buf, counts, type], [buf, (counts, displs), type],
[buf, counts, displs, type]), buffers that are not numpy arrays, and IN_PLACE."""

from __future__ import annotations

import array
from typing import Any

import numpy as np
from harness import Suite


def run(s: Suite) -> None:
    MPI, comm, rank, size, last = s.MPI, s.comm, s.rank, s.size, s.last  # noqa: N806 - the name mpi4py programs use
    dbl = MPI.DOUBLE
    counts = [r + 1 for r in range(size)]
    displs = [sum(counts[:r]) for r in range(size)]
    total = sum(counts)

    # Bcast: only the spec's part of the buffer is sent and written.
    bcast_specs = {
        "plain": lambda a: a,
        "count": lambda a: [a, 2],
        "count_type": lambda a: [a, 2, dbl],
        "count_displ_type": lambda a: [a, (2, 1), dbl],
        "count_displ_type4": lambda a: [a, 2, 1, dbl],
        "type": lambda a: [a, dbl],
        "byte": lambda a: [a, 8, MPI.BYTE],
        "memoryview": lambda a: memoryview(a)[1:3],
    }
    for name, spec in bcast_specs.items():
        for root in (0, last):

            @s.case(f"Bcast.{name}.root{'0' if root == 0 else '_last'}")
            def bcast(spec: Any = spec, root: int = root) -> Any:
                a = np.arange(1.0, 5.0) if rank == root else np.zeros(4)
                comm.Bcast(spec(a), root=root)
                return a

    foreign = {
        "bytearray": lambda: bytearray(b"hello!") if rank == 1 else bytearray(6),
        "bytearray_count": lambda: [bytearray(b"hello!") if rank == 1 else bytearray(6), 3],
        "array_i": lambda: array.array("i", [1, -2, 3] if rank == 1 else [0, 0, 0]),
        "array_d": lambda: array.array("d", [0.5, 1.5] if rank == 1 else [0.0, 0.0]),
        "memoryview_bytearray": lambda: memoryview(bytearray(b"abcdef" if rank == 1 else 6))[2:5],
        "memoryview_cast": lambda: memoryview(bytearray(16) if rank != 1 else bytearray(range(16))).cast("i"),
        "int32": lambda: np.arange(3, dtype=np.int32) * (rank == 1),
        "float32": lambda: np.arange(3, dtype=np.float32) * (rank == 1),
        "complex128": lambda: np.array([1 + 2j, -1j]) * (rank == 1),
        "bool": lambda: np.array([True, False, True]) & (rank == 1),
        "uint8": lambda: np.arange(250, 253, dtype=np.uint8) * (rank == 1),
        "int16_2d": lambda: np.arange(6, dtype=np.int16).reshape(2, 3) * (rank == 1),
    }
    for name, make in foreign.items():

        @s.case(f"Bcast.buffer.{name}")
        def bcast_buffer(make: Any = make) -> Any:
            buf = make()
            comm.Bcast(buf, root=1)
            return buf[0] if isinstance(buf, list) else buf

    # Reduce / Allreduce: counts limit what is written; IN_PLACE.
    @s.case("Allreduce.count")
    def allreduce_count() -> Any:
        recv = np.full(4, -1.0)
        comm.Allreduce([np.full(4, rank + 1.0), 2, dbl], [recv, 2, dbl], op=MPI.SUM)
        return recv

    @s.case("Allreduce.in_place")
    def allreduce_in_place() -> Any:
        buf = np.array([rank, 1, -rank], dtype=np.int64)
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return buf

    @s.case("Allreduce.in_place_spec")
    def allreduce_in_place_spec() -> Any:
        buf = np.array([rank, 1.0, -rank])
        comm.Allreduce(MPI.IN_PLACE, [buf, 2, dbl], op=MPI.SUM)
        return buf

    @s.case("Allreduce.array_array")
    def allreduce_array() -> Any:
        recv = array.array("i", [0, 0])
        comm.Allreduce(array.array("i", [rank, 1]), recv, op=MPI.SUM)
        return recv

    @s.case("Reduce.count")
    def reduce_count() -> Any:
        recv = np.full(3, -1.0)
        comm.Reduce([np.full(3, rank + 1.0), 2, dbl], [recv, 2, dbl], op=MPI.SUM, root=last)
        return recv

    @s.case("Reduce.in_place")
    def reduce_in_place() -> Any:
        buf = np.array([rank + 1.0, 2.0])
        comm.Reduce(MPI.IN_PLACE if rank == 0 else buf, buf if rank == 0 else None, op=MPI.PROD, root=0)
        return buf if rank == 0 else None

    # Gather / Scatter / Allgather / Alltoall.
    @s.case("Gather.plain")
    def gather_plain() -> Any:
        recv = np.full(2 * size, -1, dtype=np.int32) if rank == last else None
        comm.Gather(np.array([rank, -rank], dtype=np.int32), recv, root=last)
        return recv

    @s.case("Gather.specs")
    def gather_specs() -> Any:
        recv = np.full(size + 2, -1.0) if rank == 0 else None
        comm.Gather([np.array([rank + 0.5, 9.0]), 1, dbl], [recv, 1, dbl] if rank == 0 else None, root=0)
        return recv

    @s.case("Gather.in_place")
    def gather_in_place() -> Any:
        recv = np.full(size, -1.0)
        recv[rank] = rank * 2.0
        comm.Gather(MPI.IN_PLACE if rank == 1 else recv[rank : rank + 1], recv if rank == 1 else None, root=1)
        return recv if rank == 1 else None

    @s.case("Scatter.plain")
    def scatter_plain() -> Any:
        send = np.arange(3 * size, dtype=np.int64) if rank == 0 else None
        recv = np.zeros(3, dtype=np.int64)
        comm.Scatter(send, recv, root=0)
        return recv

    @s.case("Scatter.specs")
    def scatter_specs() -> Any:
        send = [np.arange(2.0 * size + 1), 2, dbl] if rank == last else None
        recv = np.full(3, -1.0)
        comm.Scatter(send, [recv, 2, dbl], root=last)
        return recv

    @s.case("Scatter.in_place")
    def scatter_in_place() -> Any:
        buf = np.arange(size, dtype=np.float32) + 10
        comm.Scatter(buf if rank == 0 else None, MPI.IN_PLACE if rank == 0 else buf[:1], root=0)
        return buf

    @s.case("Allgather.plain")
    def allgather_plain() -> Any:
        recv = np.zeros(size, dtype=np.int16)
        comm.Allgather(np.array([rank * 3], dtype=np.int16), recv)
        return recv

    @s.case("Allgather.in_place")
    def allgather_in_place() -> Any:
        buf = np.full(2 * size, -1.0)
        buf[2 * rank : 2 * rank + 2] = [rank, -rank]
        comm.Allgather(MPI.IN_PLACE, buf)
        return buf

    @s.case("Allgather.bytearray")
    def allgather_bytearray() -> Any:
        recv = bytearray(size)
        comm.Allgather(bytearray([65 + rank]), recv)
        return recv

    @s.case("Alltoall.plain")
    def alltoall_plain() -> Any:
        recv = np.zeros(2 * size, dtype=np.int32)
        comm.Alltoall(np.arange(2 * size, dtype=np.int32) + 100 * rank, recv)
        return recv

    @s.case("Alltoall.specs")
    def alltoall_specs() -> Any:
        recv = np.full(size + 1, -1.0)
        comm.Alltoall([np.arange(float(size)) + 10 * rank, 1, dbl], [recv, 1, dbl])
        return recv

    @s.case("Alltoall.in_place")
    def alltoall_in_place() -> Any:
        buf = np.arange(size, dtype=np.int64) + 10 * rank
        comm.Alltoall(MPI.IN_PLACE, buf)
        return buf

    # The v-forms: every spec form of the vector side.
    def vector(buf: Any, form: str) -> Any:
        return {
            "counts_displs_type": [buf, counts, displs, dbl],
            "tuple_type": [buf, (counts, displs), dbl],
            "tuple_none_type": [buf, (counts, None), dbl],
            "counts_type": [buf, counts, dbl],
            "counts": [buf, counts],
            "counts_none_displs": [buf, counts, None, dbl],
        }[form]

    forms = ("counts_displs_type", "tuple_type", "tuple_none_type", "counts_type", "counts", "counts_none_displs")
    for form in forms:

        @s.case(f"Gatherv.{form}")
        def gatherv(form: str = form) -> Any:
            recv = np.full(total + 1, -1.0) if rank == 0 else None
            comm.Gatherv(np.full(rank + 1, float(rank)), vector(recv, form) if rank == 0 else None, root=0)
            return recv

        @s.case(f"Scatterv.{form}")
        def scatterv(form: str = form) -> Any:
            send = vector(np.arange(total + 1.0), form) if rank == last else None
            recv = np.full(rank + 2, -1.0)
            comm.Scatterv(send, [recv, rank + 1, dbl], root=last)
            return recv

        @s.case(f"Allgatherv.{form}")
        def allgatherv(form: str = form) -> Any:
            recv = np.full(total + 1, -1.0)
            comm.Allgatherv([np.full(rank + 2, rank + 0.25), rank + 1, dbl], vector(recv, form))
            return recv

    @s.case("Gatherv.send_specs")
    def gatherv_send_specs() -> Any:
        recv = np.full(size, -1.0) if rank == 0 else None
        one = [np.array([rank + 1.0, 7.0]), 1, dbl]
        comm.Gatherv(one, [recv, [1] * size, list(range(size)), dbl] if rank == 0 else None, root=0)
        return recv

    @s.case("Gatherv.recv_type_only")
    def gatherv_type_only() -> Any:
        recv = np.full(size, -1.0) if rank == 0 else None
        comm.Gatherv([np.array([rank * 1.5]), dbl], [recv, dbl] if rank == 0 else None, root=0)
        return recv

    @s.case("Gatherv.recv_plain")
    def gatherv_plain() -> Any:
        recv = np.full(2 * size, -1, dtype=np.int32) if rank == 0 else None
        comm.Gatherv(np.array([rank, rank], dtype=np.int32), recv, root=0)
        return recv

    @s.case("Gatherv.displs_reversed")
    def gatherv_reversed() -> Any:
        recv = np.full(total, -1.0) if rank == last else None
        rev = [total - displs[r] - counts[r] for r in range(size)]
        comm.Gatherv(np.full(rank + 1, rank + 0.5), [recv, counts, rev, dbl] if rank == last else None, root=last)
        return recv

    @s.case("Gatherv.in_place")
    def gatherv_in_place() -> Any:
        recv = np.full(total, -1.0)
        mine = recv[displs[rank] : displs[rank] + counts[rank]]
        mine[:] = rank
        comm.Gatherv(MPI.IN_PLACE if rank == 0 else mine, [recv, counts, displs, dbl] if rank == 0 else None, root=0)
        return recv if rank == 0 else None

    @s.case("Scatterv.in_place")
    def scatterv_in_place() -> Any:
        buf = np.arange(float(total))
        send = [buf, counts, displs, dbl] if rank == 0 else None
        recv = MPI.IN_PLACE if rank == 0 else np.zeros(rank + 1)
        comm.Scatterv(send, recv, root=0)
        return buf if rank == 0 else recv

    @s.case("Allgatherv.in_place")
    def allgatherv_in_place() -> Any:
        buf = np.full(total, -1, dtype=np.int64)
        buf[displs[rank] : displs[rank] + counts[rank]] = rank
        comm.Allgatherv(MPI.IN_PLACE, [buf, counts, displs, MPI.INT64_T])
        return buf

    @s.case("Allgatherv.array_array")
    def allgatherv_array() -> Any:
        recv = array.array("i", [-1] * total)
        comm.Allgatherv(array.array("i", [rank] * (rank + 1)), [recv, counts, displs, MPI.INT])
        return recv

    @s.case("Alltoallv.specs")
    def alltoallv_specs() -> Any:
        # rank r sends (d + 1) values to rank d; so it receives (r + 1) from each.
        send_counts = [d + 1 for d in range(size)]
        send_displs = [sum(send_counts[:d]) for d in range(size)]
        send = np.arange(float(sum(send_counts))) + 100 * rank
        recv = np.full(size * (rank + 1) + 1, -1.0)
        recv_counts = [rank + 1] * size
        recv_displs = [(rank + 1) * d for d in range(size)]
        comm.Alltoallv([send, (send_counts, send_displs), dbl], [recv, recv_counts, recv_displs, dbl])
        return recv

    @s.case("Alltoallv.counts_only")
    def alltoallv_counts_only() -> Any:
        send = np.arange(size, dtype=np.int32) + 10 * rank
        recv = np.full(size, -1, dtype=np.int32)
        comm.Alltoallv([send, [1] * size], [recv, [1] * size])
        return recv

    @s.case("Alltoallv.in_place")
    def alltoallv_in_place() -> Any:
        buf = np.arange(size, dtype=np.float64) + 10 * rank
        comm.Alltoallv(MPI.IN_PLACE, [buf, [1] * size, list(range(size)), dbl])
        return buf

    # Reduce_scatter(_block), Scan, Exscan.
    @s.case("Reduce_scatter_block.plain")
    def reduce_scatter_block() -> Any:
        recv = np.zeros(2, dtype=np.int32)
        comm.Reduce_scatter_block(np.arange(2 * size, dtype=np.int32) * (rank + 1), recv, op=MPI.SUM)
        return recv

    @s.case("Reduce_scatter_block.in_place")
    def reduce_scatter_block_in_place() -> Any:
        buf = np.arange(float(size)) + rank
        comm.Reduce_scatter_block(MPI.IN_PLACE, buf, op=MPI.MAX)
        return buf[:1]

    @s.case("Reduce_scatter.counts")
    def reduce_scatter() -> Any:
        recv = np.full(rank + 2, -1.0)
        comm.Reduce_scatter(np.arange(float(total)) * (rank + 1), [recv, rank + 1, dbl], recvcounts=counts, op=MPI.SUM)
        return recv

    @s.case("Reduce_scatter.default_counts")
    def reduce_scatter_default() -> Any:
        recv = np.zeros(1, dtype=np.int64)
        comm.Reduce_scatter(np.arange(size, dtype=np.int64) + rank, recv, op=MPI.SUM)
        return recv

    @s.case("Reduce_scatter.in_place")
    def reduce_scatter_in_place() -> Any:
        buf = np.arange(float(total)) - rank
        comm.Reduce_scatter(MPI.IN_PLACE, buf, recvcounts=counts, op=MPI.MIN)
        return buf[: rank + 1]

    @s.case("Scan.plain")
    def scan_plain() -> Any:
        recv = np.zeros(2)
        comm.Scan(np.array([rank + 1.0, -1.0]), recv, op=MPI.SUM)
        return recv

    @s.case("Scan.in_place")
    def scan_in_place() -> Any:
        buf = np.array([rank + 1, 2], dtype=np.int64)
        comm.Scan(MPI.IN_PLACE, buf, op=MPI.PROD)
        return buf

    @s.case("Exscan.plain")
    def exscan_plain() -> Any:
        recv = np.full(2, -1.0)
        comm.Exscan([np.array([rank + 1.0, 5.0]), 1, dbl], [recv, 1, dbl], op=MPI.SUM)
        return recv if rank > 0 else None

    @s.case("Exscan.in_place")
    def exscan_in_place() -> Any:
        buf = np.array([rank + 1, -rank], dtype=np.int32)
        comm.Exscan(MPI.IN_PLACE, buf, op=MPI.MAX)
        return buf if rank > 0 else None

    # Empty messages, and vectors where some ranks give nothing.
    @s.case("zero_length.collectives")
    def zero_length_collectives() -> Any:
        empty = np.zeros(0)
        comm.Bcast(empty, root=last)
        comm.Allreduce(empty, np.zeros(0), op=MPI.SUM)
        recv = np.zeros(0)
        comm.Allgather(empty, recv)
        comm.Alltoall(empty, recv)
        return recv

    @s.case("zero_length.vectors")
    def zero_length_vectors() -> Any:
        odd = [r % 2 * (r + 1) for r in range(size)]  # even ranks give nothing
        offsets = [sum(odd[:r]) for r in range(size)]
        recv = np.full(sum(odd) + 1, -1.0)
        comm.Allgatherv(np.full(odd[rank], rank + 0.5), [recv, odd, offsets, dbl])
        gathered = np.full(sum(odd), -1.0) if rank == 0 else None
        comm.Gatherv(np.full(odd[rank], float(rank)), [gathered, odd, offsets, dbl] if rank == 0 else None, root=0)
        mine = np.full(odd[rank] + 1, -1.0)
        send = [np.arange(float(sum(odd))), odd, offsets, dbl] if rank == last else None
        comm.Scatterv(send, [mine, odd[rank], dbl], root=last)
        return recv, gathered, mine

    @s.case("zero_length.alltoallv")
    def zero_length_alltoallv() -> Any:
        # rank r sends r values to each rank d > r, nothing to the others.
        send_counts = [rank if d > rank else 0 for d in range(size)]
        recv_counts = [src if rank > src else 0 for src in range(size)]
        send = np.full(sum(send_counts), float(rank))
        recv = np.full(sum(recv_counts) + 1, -1.0)
        comm.Alltoallv([send, send_counts], [recv, recv_counts])
        return recv

    @s.case("large.collectives")
    def large_collectives() -> Any:
        n = 2**20  # 8 MB of int64 per rank
        buf = np.arange(n, dtype=np.int64) if rank == last else np.zeros(n, dtype=np.int64)
        comm.Bcast(buf, root=last)
        total = np.zeros(n, dtype=np.int64)
        comm.Allreduce(buf * (rank + 1), total, op=MPI.SUM)
        gathered = np.zeros(size * 2**16, dtype=np.int64)
        comm.Allgather(buf[rank * 2**16 : (rank + 1) * 2**16], gathered)
        return int(buf.sum()), int(total.sum()), int(total[-1]), bool(np.array_equal(gathered, buf[: size * 2**16]))

    @s.case("keywords")
    def keywords() -> Any:
        one = np.full(1, float(rank))
        every = np.zeros(size)
        got = []
        buf = np.full(2, float(rank))
        comm.Bcast(buf=buf, root=last)
        got.append(buf.copy())
        comm.Reduce(sendbuf=one, recvbuf=buf[:1], op=MPI.SUM, root=0)
        comm.Allreduce(sendbuf=one, recvbuf=buf[1:], op=MPI.MAX)
        got.append(buf.copy())
        comm.Gather(sendbuf=one, recvbuf=every if rank == 0 else None, root=0)
        got.append(every.copy())
        comm.Gatherv(sendbuf=one, recvbuf=[every, [1] * size, list(range(size)), dbl] if rank == 1 else None, root=1)
        got.append(every.copy())
        comm.Scatter(sendbuf=every if rank == 0 else None, recvbuf=one, root=0)
        comm.Scatterv(sendbuf=[every, [1] * size] if rank == 0 else None, recvbuf=one, root=0)
        comm.Allgather(sendbuf=one, recvbuf=every)
        comm.Allgatherv(sendbuf=one, recvbuf=[every, [1] * size])
        comm.Alltoall(sendbuf=np.arange(float(size)), recvbuf=every)
        got.append(every.copy())
        comm.Alltoallv(sendbuf=[np.arange(float(size)) * rank, [1] * size], recvbuf=[every, [1] * size])
        got.append(every.copy())
        comm.Reduce_scatter(sendbuf=np.arange(float(size)), recvbuf=one, recvcounts=[1] * size, op=MPI.SUM)
        comm.Reduce_scatter_block(sendbuf=np.arange(float(size)), recvbuf=one, op=MPI.MAX)
        got.append(one.copy())
        comm.Scan(sendbuf=np.full(1, 2.0), recvbuf=one, op=MPI.PROD)
        comm.Exscan(sendbuf=np.full(1, 2.0), recvbuf=buf[:1], op=MPI.SUM)
        return [*got, one, buf[1:] if rank == 0 else buf]

    datatypes = ("BYTE", "CHAR", "SIGNED_CHAR", "UNSIGNED_CHAR", "SHORT", "UNSIGNED_SHORT", "INT", "UNSIGNED")
    datatypes += ("LONG", "UNSIGNED_LONG", "LONG_LONG", "FLOAT", "DOUBLE", "LONG_DOUBLE", "C_BOOL", "BOOL", "WCHAR")
    datatypes += ("INT8_T", "INT16_T", "INT32_T", "INT64_T", "UINT8_T", "UINT16_T", "UINT32_T", "UINT64_T")
    datatypes += ("C_FLOAT_COMPLEX", "C_DOUBLE_COMPLEX", "COMPLEX", "DOUBLE_COMPLEX", "AINT", "OFFSET", "COUNT")
    datatypes += ("FLOAT_INT", "DOUBLE_INT", "LONG_INT", "TWOINT", "SHORT_INT")

    @s.case("datatypes.size_extent")
    def datatype_sizes() -> Any:
        def describe(t: Any) -> Any:
            return t.Get_size(), t.Get_extent(), t.size, t.extent

        return {name: s.attempt(lambda name=name: describe(getattr(MPI, name))) for name in datatypes}

    @s.case("datatypes.names")
    def datatype_names() -> Any:
        return {name: s.attempt(lambda name=name: getattr(MPI, name).Get_name()) for name in datatypes}

    @s.case("Barrier")
    def barrier() -> Any:
        return comm.Barrier()
