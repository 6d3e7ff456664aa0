"""Every predefined reduction operator in allreduce, reduce, scan and exscan, on Python
objects and on buffers of the types each operator is defined for; Op handles and
Reduce_local."""

from __future__ import annotations

import array
import pickle
from typing import Any

import numpy as np
from harness import Suite

ARITHMETIC = ("SUM", "PROD", "MAX", "MIN")
LOGICAL = ("LAND", "LOR", "LXOR")
BITWISE = ("BAND", "BOR", "BXOR")
LOCATION = ("MAXLOC", "MINLOC")
SPECIAL = ("REPLACE", "NO_OP")  # defined for accumulate only in MPI; mpi4py's objects fold them


def run(s: Suite) -> None:
    MPI, comm, rank, last = s.MPI, s.comm, s.rank, s.last  # noqa: N806 - the name mpi4py programs use
    pick = [3, -1, 4, 1, -5]
    values = {
        **dict.fromkeys(ARITHMETIC, pick[rank % 5]),
        **dict.fromkeys(LOGICAL, [1, 0, 2, 1, 0][rank % 5]),
        **dict.fromkeys(BITWISE, [0b1101, 0b0111, 0b1011, 0b0110, 0b1110][rank % 5]),
        **dict.fromkeys(LOCATION, ([3, 1, 3, 0, 1][rank % 5], rank)),  # ties: the lower rank wins
        **dict.fromkeys(SPECIAL, rank * 10),
    }
    for name, value in values.items():
        op = getattr(MPI, name)
        s.case(f"allreduce.{name}")(lambda op=op, value=value: comm.allreduce(value, op=op))
        s.case(f"reduce.{name}")(lambda op=op, value=value: comm.reduce(value, op=op, root=last))
        s.case(f"scan.{name}")(lambda op=op, value=value: comm.scan(value, op=op))
        s.case(f"exscan.{name}")(lambda op=op, value=value: comm.exscan(value, op=op))

    # Buffers: int32 for every operator but the location ones (pairs of int32: MPI.TWOINT);
    # REPLACE and NO_OP are refused in reductions (ERR_OP: case_errors).
    v = pick[rank % 5]
    arrays = {
        **dict.fromkeys(ARITHMETIC, np.array([v, 2 * v, -v, rank], dtype=np.int32)),
        **dict.fromkeys(LOGICAL, np.array([v > 0, rank % 2, 0, 1], dtype=np.int32)),
        **dict.fromkeys(BITWISE, np.array([values["BAND"], rank, 0xFF, 1 << rank], dtype=np.int32)),
    }
    for name, send in arrays.items():
        op = getattr(MPI, name)

        @s.case(f"Allreduce.{name}")
        def allreduce(op: Any = op, send: Any = send) -> Any:
            recv = np.full_like(send, -7)
            comm.Allreduce(send, recv, op=op)
            return recv

        @s.case(f"Reduce.{name}")
        def reduce(op: Any = op, send: Any = send) -> Any:
            recv = np.full_like(send, -7)
            comm.Reduce(send, recv, op=op, root=last)
            return recv

        @s.case(f"Scan.{name}")
        def scan(op: Any = op, send: Any = send) -> Any:
            recv = np.full_like(send, -7)
            comm.Scan(send, recv, op=op)
            return recv

        @s.case(f"Exscan.{name}")
        def exscan(op: Any = op, send: Any = send) -> Any:
            recv = np.full_like(send, -7)
            comm.Exscan(send, recv, op=op)
            return recv if rank > 0 else None  # undefined on rank 0

    pairs = np.array([[values["MAXLOC"][0], rank], [-rank, rank], [7, rank]], dtype=np.int32)
    for name in LOCATION:
        op = getattr(MPI, name)

        @s.case(f"Allreduce.{name}")
        def allreduce_pairs(op: Any = op) -> Any:
            recv = np.full_like(pairs, -7)
            comm.Allreduce([pairs, MPI.TWOINT], [recv, MPI.TWOINT], op=op)
            return recv

        @s.case(f"Reduce.{name}")
        def reduce_pairs(op: Any = op) -> Any:
            recv = np.full_like(pairs, -7)
            comm.Reduce([pairs, MPI.TWOINT], [recv, MPI.TWOINT], op=op, root=0)
            return recv

        @s.case(f"Scan.{name}")
        def scan_pairs(op: Any = op) -> Any:
            recv = np.full_like(pairs, -7)
            comm.Scan([pairs, 3, MPI.TWOINT], [recv, 3, MPI.TWOINT], op=op)
            return recv

    # The other (value, index) pair types, as numpy structured arrays laid out as C structs.
    pair_types = {
        "FLOAT_INT": np.dtype([("v", "f4"), ("i", "i4")], align=True),
        "DOUBLE_INT": np.dtype([("v", "f8"), ("i", "i4")], align=True),
        "LONG_INT": np.dtype([("v", "i8"), ("i", "i4")], align=True),
        "SHORT_INT": np.dtype([("v", "i2"), ("i", "i4")], align=True),
    }
    for type_name, dtype in pair_types.items():
        for name in LOCATION:

            @s.case(f"Allreduce.{name}.{type_name}")
            def allreduce_pair_type(name: str = name, type_name: str = type_name, dtype: Any = dtype) -> Any:
                send = np.zeros(2, dtype=dtype)
                send["v"], send["i"] = [values["MAXLOC"][0], -rank], rank
                recv = np.zeros(2, dtype=dtype)
                datatype = getattr(MPI, type_name)
                comm.Allreduce([send, datatype], [recv, datatype], op=getattr(MPI, name))
                return recv["v"].tolist(), recv["i"].tolist()

    # Other element types: floats, complex, bytes, booleans.
    typed = {
        "SUM.float64": (np.array([rank + 0.5, -2.0 * rank]), "SUM"),
        "MAX.float32": (np.array([rank - 1.5, 2.0], dtype=np.float32), "MAX"),
        "PROD.complex128": (np.array([1 + 1j * rank, 2.0]), "PROD"),
        "MIN.int64": (np.array([-(2**40) * rank, 2**40], dtype=np.int64), "MIN"),
        "BXOR.uint8": (np.array([rank, 255 - rank], dtype=np.uint8), "BXOR"),
        "LOR.bool": (np.array([rank == 1, False]), "LOR"),
        "LAND.bool": (np.array([True, rank != 1]), "LAND"),
        "SUM.int8": (np.array([rank, -rank], dtype=np.int8), "SUM"),
        "SUM.uint16": (np.array([rank, 1000], dtype=np.uint16), "SUM"),
    }
    for key, (send, name) in typed.items():

        @s.case(f"Allreduce.{key}")
        def allreduce_typed(send: Any = send, name: str = name) -> Any:
            recv = np.zeros_like(send)
            comm.Allreduce(send, recv, op=getattr(MPI, name))
            return recv

    # User operators (Op.Create) on buffers: a commutative one, and one that does not commute
    # (2x2 integer matrix products), which MPI applies in rank order.
    def add(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
        out = np.frombuffer(inoutbuf, dtype=np.int32)
        out += np.frombuffer(inbuf, dtype=np.int32)

    def matmul(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
        out = np.frombuffer(inoutbuf, dtype=np.int64).reshape(2, 2)
        out[...] = np.frombuffer(inbuf, dtype=np.int64).reshape(2, 2) @ out

    matrix = np.array([[rank + 1, 1], [1, 0]], dtype=np.int64)

    @s.case("user.commutative")
    def user_commutative() -> Any:
        op = MPI.Op.Create(add, commute=True)
        recv = np.zeros(2, dtype=np.int32)
        comm.Allreduce(np.array([rank, 1], dtype=np.int32), recv, op=op)
        commutes = op.Is_commutative()
        op.Free()
        return recv, commutes

    @s.case("user.noncommutative")
    def user_noncommutative() -> Any:
        op = MPI.Op.Create(matmul, commute=False)
        every, prefix, at_root = np.zeros_like(matrix), np.zeros_like(matrix), np.zeros_like(matrix)
        comm.Allreduce(matrix, every, op=op)
        comm.Scan(matrix, prefix, op=op)
        comm.Reduce(matrix, at_root, op=op, root=last)
        commutes = op.Is_commutative()
        op.Free()
        return every, prefix, at_root, commutes

    # Op handles and local reductions.
    @s.case("handles")
    def op_handles() -> Any:
        user = MPI.Op.Create(matmul, commute=True)
        copy = MPI.Op(user)
        seen = [MPI.Op() == MPI.OP_NULL, bool(MPI.Op()), MPI.Op(MPI.SUM) == MPI.SUM, MPI.Op(MPI.SUM) is MPI.SUM]
        seen += [user == copy, user != copy, user == MPI.SUM, user.is_predefined, copy.Is_commutative()]
        seen += [s.attempt(lambda: hash(MPI.SUM)), s.attempt(lambda: MPI.Op(5)), MPI.Op(MPI.MAX)(2, 3)]
        seen += [s.attempt(lambda: MPI.OP_NULL(None, None)), s.attempt(lambda: MPI.OP_NULL(None))]
        user.Free()
        seen += [user == MPI.OP_NULL, bool(user), s.attempt(user.Free), s.attempt(MPI.OP_NULL.Free)]
        again = pickle.loads(pickle.dumps(MPI.Op(MPI.MIN)))
        return seen, again == MPI.MIN, again is MPI.MIN, pickle.loads(pickle.dumps(MPI.MIN)) is MPI.MIN

    @s.case("Reduce_local")
    def reduce_local() -> Any:
        results = []
        for name in (*ARITHMETIC, "BAND", "BOR", "BXOR", "LAND"):
            inout = np.array([rank, 5, -2, 7], dtype=np.int32)
            getattr(MPI, name).Reduce_local(np.array([1, 6, -3, 7], dtype=np.int32), inout)
            results.append((name, inout))
        pairs = np.zeros(2, dtype=np.dtype([("v", "f8"), ("i", "i4")], align=True))
        pairs["v"], pairs["i"] = [1.0, 2.0], [rank, rank]
        other = np.zeros_like(pairs)
        other["v"], other["i"] = [1.0, 3.0], [9, 9]
        MPI.MAXLOC.Reduce_local([other, MPI.DOUBLE_INT], [pairs, MPI.DOUBLE_INT])
        counted = np.arange(4.0)
        MPI.PROD.Reduce_local([np.full(4, 2.0), 2, MPI.DOUBLE], [counted, 2, MPI.DOUBLE])
        return results, pairs["v"].tolist(), pairs["i"].tolist(), counted

    @s.case("Reduce_local.user")
    def reduce_local_user() -> Any:
        op = MPI.Op.Create(matmul, commute=False)
        inout = matrix.copy()
        op.Reduce_local(np.array([[1, 1], [0, 1]], dtype=np.int64), inout)
        op.Free()
        return inout

    @s.case("Reduce_local.errors")
    def reduce_local_errors() -> Any:
        a, b = np.arange(3.0), np.ones(3)
        return [
            s.attempt(lambda: MPI.SUM.Reduce_local([a, 2], [b, 3])),
            s.attempt(lambda: MPI.SUM.Reduce_local([a, MPI.DOUBLE], [np.ones(3, "i"), MPI.INT])),
            s.attempt(lambda: MPI.SUM.Reduce_local(a, np.ones(4))),
            s.attempt(lambda: MPI.LAND.Reduce_local(a, b)),
            s.attempt(lambda: MPI.MAXLOC.Reduce_local(a, b)),
            s.attempt(lambda: MPI.SUM.Reduce_local(MPI.IN_PLACE, b)),
            s.attempt(lambda: MPI.OP_NULL.Reduce_local(a, b)),
            s.attempt(lambda: MPI.SUM.Reduce_local(a, b"abc")),
            b,
        ]

    # What a user operator gets on buffers: byte buffers (len in bytes) over the entries, whose
    # slices take any buffer of as many bytes; and the datatype of the entries.
    def add_into(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
        seen.append((len(inbuf), len(inoutbuf), datatype == MPI.INT, memoryview(inoutbuf).nbytes))
        total = np.frombuffer(inbuf, dtype=np.int32) + np.frombuffer(inoutbuf, dtype=np.int32)
        inoutbuf[:] = array.array("i", total.tolist()) if len(seen) % 2 else total.tobytes()

    seen: list = []

    @s.case("user.buffers")
    def user_buffers() -> Any:
        op = MPI.Op.Create(add_into, commute=True)
        every = np.zeros(3, dtype=np.int32)
        comm.Allreduce(np.array([rank, 1, -rank], dtype=np.int32), every, op=op)
        local = np.array([5, 6, 7], dtype=np.int32)
        op.Reduce_local(np.array([1, 1, 1], dtype=np.int32), local)
        op.Free()
        return every, local, sorted(set(seen))
