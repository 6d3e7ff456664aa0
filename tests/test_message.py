"""lambda_shim.message reads buffer specs as mpi4py does: the same specs go through mpi4py+MPICH
(one rank, in a subprocess: a send to self, a receive from self) and through our parser, and must
give the same bytes, the same buffer contents and the same exception classes."""

from __future__ import annotations

import array  # noqa: F401 - the spec expressions use it
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch  # the spec expressions use it too (DLPack buffers)

from lambda_shim import message as M
from lambda_shim.constants import IN_PLACE
from lambda_shim.errors import ERR_COUNT, MPIException
from tests.conftest import missing_modules, skip_or_fail

# (buffer expression, spec over the buffer `b`): read as a send.
SEND_SPECS = [
    ("np.arange(4.0)", "b"),
    ("np.arange(4.0)", "[b, 2]"),
    ("np.arange(4.0)", "(b, 2)"),
    ("np.arange(4.0)", "[b, MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, 'd']"),
    ("np.arange(4.0)", "[b, 'i']"),
    ("np.arange(4.0)", "[b, 2, MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, 3, MPI.INT]"),
    ("np.arange(4.0)", "[b, (2, 1), MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, [2, 1], MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, (2, 1)]"),
    ("np.arange(4.0)", "[b, [1, 3]]"),
    ("np.arange(4.0)", "[b, 1, 2, MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, 0, 4, MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, np.int64(2)]"),
    ("np.arange(4.0)", "[b, True]"),
    ("np.arange(4.0)", "[b, 2.0]"),
    ("np.arange(4.0)", "[b, -1]"),
    ("np.arange(4.0)", "[b, (1, -1), MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, (1, 5), MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, (1, 2, 3), MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, [1], 2, MPI.DOUBLE]"),
    ("np.arange(4.0)", "[b, 2, 'zz']"),
    ("np.arange(4.0)", "[b, 2, 5]"),
    ("np.arange(4.0)", "[b, np.float64]"),
    ("np.arange(4.0)", "[b, 2, np.dtype('d')]"),
    ("np.arange(4.0)", "[b]"),
    ("np.arange(4.0)", "[]"),
    ("np.arange(4.0)", "[b, 1, 0, MPI.DOUBLE, 1]"),
    ("np.arange(4.0)", "5"),
    ("np.arange(4.0)", "'text'"),
    ("np.arange(4.0)", "None"),
    ("np.arange(12.0).reshape(3, 4)", "[b, 5]"),
    ("np.asfortranarray(np.arange(6.0).reshape(2, 3))", "b"),
    ("np.arange(16.0).reshape(4, 4)[:, 1]", "b"),
    ("np.arange(4, dtype='>f8')", "b"),
    ("np.zeros(2, dtype=[('a', 'f8'), ('b', 'i4')])", "b"),
    ("np.zeros(2, dtype=[('a', 'f8'), ('b', 'i4')])", "[b, MPI.BYTE]"),
    ("np.array(3.5)", "b"),
    ("np.float32(2.5)", "b"),
    ("np.zeros(0)", "b"),
    ("np.array([True, False, True])", "b"),
    ("np.arange(6, dtype=np.int16)", "[b, (2, 2), MPI.SHORT]"),
    ("np.arange(3, dtype=np.complex128)", "[b, 2]"),
    ("np.arange(4, dtype=np.uint64)", "[b, 1, 1, MPI.UINT64_T]"),
    ("bytearray(b'abcdefgh')", "b"),
    ("bytearray(b'abcdefgh')", "[b, MPI.INT]"),
    ("bytearray(b'abcdefgh')", "[b, 1, MPI.INT]"),
    ("bytearray(b'abcdefg')", "[b, MPI.INT]"),
    ("b'hello'", "b"),
    ("b'hello'", "[b, 2, 1, MPI.BYTE]"),
    ("array.array('i', [1, 2, 3])", "b"),
    ("array.array('q', [1, 2, 3])", "[b, 2]"),
    ("array.array('d', [1, 2, 3])", "[b, (1, 2), MPI.DOUBLE]"),
    ("memoryview(b'abcd')", "b"),
    ("memoryview(b'abcdef')[::2]", "b"),
    ("memoryview(bytearray(16)).cast('d')", "[b, 1]"),
    ("None", "[b, 0, MPI.INT]"),
    ("None", "[b, MPI.INT]"),
    ("None", "[b, 1, MPI.INT]"),
    ("None", "[b, 1]"),
    ("MPI.BOTTOM", "[b, 0, MPI.INT]"),
    ("None", "MPI.IN_PLACE"),
    ("torch.arange(4, dtype=torch.float32)", "b"),
    ("torch.arange(4, dtype=torch.int64)", "[b, (2, 1), MPI.LONG]"),
    ("torch.arange(16.0).reshape(4, 4)[:, 1]", "b"),
]

# (buffer expression, spec over `b`, bytes received): read as a receive; the buffer after it.
RECV_SPECS = [
    ("np.zeros(4)", "b", 16),
    ("np.zeros(4)", "[b, 2]", 16),
    ("np.zeros(4)", "[b, (1, 2), MPI.DOUBLE]", 8),
    ("np.zeros(4)", "[b, 1, 3, MPI.DOUBLE]", 8),
    ("np.zeros(4)", "[b, 2, MPI.INT]", 8),
    ("np.zeros((2, 3), order='F')", "b", 24),
    ("bytearray(8)", "[b, (1, 1), MPI.INT]", 4),
    ("array.array('h', [0] * 4)", "[b, 2, 1, MPI.SHORT]", 4),
    ("memoryview(bytearray(8))", "b", 5),
    ("b'abcd'", "b", 4),
    ("np.zeros(4)[::2]", "b", 8),
    ("torch.zeros(4, dtype=torch.float64)", "[b, 1, 2, MPI.DOUBLE]", 8),
]

# Buffers whose datatype is inferred from their format.
INFERRED = [
    *[f"np.zeros(2, dtype='{c}')" for c in ["b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "f", "d", "g", "F", "D"]],
    *[f"np.zeros(2, dtype='{c}')" for c in ["G", "?", "e", "S1", "U1", "i1", "u1", "i8", "u8"]],
    *[f"array.array('{c}', [0, 0])" for c in "bBhHiIlLqQfd"],
    "bytearray(4)",
    "b'abcd'",
    "memoryview(bytearray(16)).cast('d')",
    "memoryview(bytearray(16)).cast('c')",
    *[f"torch.zeros(2, dtype=torch.{t})" for t in ["float32", "float64", "int64", "int32", "int8", "uint8", "bool"]],
]

REFERENCE = r"""
import array, json, sys
import numpy as np
import torch
from mpi4py import MPI
c = MPI.COMM_WORLD
cases = json.load(open(sys.argv[1]))

def raw(b):
    return b.numpy() if isinstance(b, torch.Tensor) else b

def failure(exc):
    code = exc.Get_error_class() if isinstance(exc, MPI.Exception) else None
    return ["error", "MPI.Exception" if code is not None else type(exc).__name__, code]

def send(buf, spec):
    b = eval(buf)
    try:
        req = c.Isend(eval(spec), 0)
    except Exception as exc:
        return failure(exc)
    out, status = bytearray(4096), MPI.Status()
    c.Recv(out, 0, 0, status)
    req.Wait()
    return ["ok", out[: status.Get_count()].hex()]

def recv(buf, spec, nbytes):
    b = eval(buf)
    try:
        req = c.Irecv(eval(spec), 0)
    except Exception as exc:
        return failure(exc)
    c.Send(bytes(range(1, nbytes + 1)), 0)
    req.Wait()
    return ["ok", memoryview(raw(b)).tobytes().hex()]

TYPES = [getattr(MPI, n) for n in dir(MPI) if isinstance(getattr(MPI, n), MPI.Datatype)]

def inferred(buf):
    # mpi4py checks that send and receive datatypes are the same object: the one that passes is
    # the inferred one (an op error still means the datatype matched).
    names = set()
    for t in TYPES:
        if t == MPI.DATATYPE_NULL:
            continue
        try:
            c.Allreduce(eval(buf), [bytearray(memoryview(raw(eval(buf))).nbytes), t], op=MPI.BOR)
        except ValueError:
            continue
        except MPI.Exception:
            pass
        names.add(t.Get_name())
    return sorted(names)

json.dump({
    "send": [send(*case) for case in cases["send"]],
    "recv": [recv(*case) for case in cases["recv"]],
    "inferred": [inferred(buf) for buf in cases["inferred"]],
}, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def mpi4py_results(tmp_path_factory) -> dict:
    if (missing := missing_modules("mpi4py", hint="pip install -e '.[test]'")) is not None:
        skip_or_fail(missing)
    tmp = tmp_path_factory.mktemp("mpi4py-specs")
    (tmp / "cases.json").write_text(json.dumps({"send": SEND_SPECS, "recv": RECV_SPECS, "inferred": INFERRED}))
    (tmp / "reference.py").write_text(REFERENCE)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("PMI_", "MPI_LOCAL"))}
    subprocess.run(
        [sys.executable, str(tmp / "reference.py"), str(tmp / "cases.json"), str(tmp / "out.json")],
        check=True,
        timeout=120,
        env=env,
    )
    return json.loads(Path(tmp / "out.json").read_text())


# The names the specs use, as lambda_shim.MPI has them (message's datatypes, constants' IN_PLACE).
MPI = SimpleNamespace(**M.DATATYPES, BOTTOM=M.BOTTOM, IN_PLACE=IN_PLACE)


def _failure(exc: Exception) -> list:
    if isinstance(exc, MPIException):
        return ["error", "MPI.Exception", exc.Get_error_class()]
    return ["error", type(exc).__name__, None]


def ours_send(buf: str, spec: str) -> list:
    b = eval(buf, globals(), {"MPI": M})
    try:
        msg = M.parse(eval(spec, globals(), {"MPI": MPI, "b": b}), readonly=True)
    except Exception as exc:  # noqa: BLE001 - compared with mpi4py's
        return _failure(exc)
    return ["ok", bytes(msg.payload()).hex()]


def ours_recv(buf: str, spec: str, nbytes: int) -> list:
    b = eval(buf, globals(), {"MPI": M})
    try:
        msg = M.parse(eval(spec, globals(), {"MPI": MPI, "b": b}), readonly=False)
    except Exception as exc:  # noqa: BLE001
        return _failure(exc)
    assert nbytes <= msg.nbytes
    msg.store(bytes(range(1, nbytes + 1)))
    return ["ok", memoryview(b.numpy() if isinstance(b, torch.Tensor) else b).tobytes().hex()]


@pytest.mark.parametrize("case", range(len(SEND_SPECS)), ids=[f"{b} {s}" for b, s in SEND_SPECS])
def test_send_specs_read_as_mpi4py(mpi4py_results, case):
    assert ours_send(*SEND_SPECS[case]) == mpi4py_results["send"][case]


@pytest.mark.parametrize("case", range(len(RECV_SPECS)), ids=[f"{b} {s}" for b, s, _ in RECV_SPECS])
def test_recv_specs_read_as_mpi4py(mpi4py_results, case):
    assert ours_recv(*RECV_SPECS[case]) == mpi4py_results["recv"][case]


@pytest.mark.parametrize("case", range(len(INFERRED)), ids=INFERRED)
def test_datatype_inferred_as_mpi4py(mpi4py_results, case):
    msg = M.parse(eval(INFERRED[case]), readonly=True)
    assert msg.datatype.Get_name() in mpi4py_results["inferred"][case]


def test_count_past_the_buffer_is_refused():
    """mpi4py passes it to MPI (which reads past the buffer); the shim refuses it."""
    with pytest.raises(ValueError, match="out of bounds"):
        M.parse([np.arange(4.0), 5], readonly=True)
    with pytest.raises(ValueError, match="out of bounds"):
        M.parse([np.arange(4.0), (3, 2), M.DOUBLE], readonly=False)
    with pytest.raises(ValueError, match="out of bounds"):  # a Gather's count is per rank
        M.parse([np.arange(4.0), 2], readonly=False, blocks=3)
    assert M.parse([np.arange(6.0), 2], readonly=False, blocks=3).count == 2


def test_predefined_datatypes_match_mpich():
    sizes = {
        "MPI_DOUBLE_INT": (12, 16),
        "MPI_SHORT_INT": (6, 8),
        "MPI_LONG_DOUBLE_INT": (20, 32),
        "MPI_2INT": (8, 8),
        "MPI_C_BOOL": (1, 1),
        "MPI_LONG_DOUBLE": (16, 16),
        "MPI_C_DOUBLE_COMPLEX": (16, 16),
    }
    for name, (size, extent) in sizes.items():
        t = M.BY_NAME[name]
        assert (t.Get_size(), t.Get_extent()) == (size, (0, extent))
    assert M.BOOL is M.C_BOOL and M.TWOINT.Get_name() == "MPI_2INT"
    assert M.LONG_LONG.Get_name() == "MPI_LONG_LONG_INT" and M.INT32_T is not M.INT


def test_pairs_are_packed_on_the_wire_and_unpacked_in_memory():
    layout = np.dtype([("v", "f8"), ("i", "i4")], align=True)
    values = np.array([(1.5, 7), (-2.0, 3)], dtype=layout)
    msg = M.parse([values, M.DOUBLE_INT], readonly=True)
    assert msg.count == 2 and msg.nbytes == 24
    wire = bytes(msg.payload())
    assert wire == np.array([(1.5, 7), (-2.0, 3)], dtype=[("v", "f8"), ("i", "i4")]).tobytes()
    back = np.zeros(2, dtype=layout)
    M.parse([back, M.DOUBLE_INT], readonly=False).store(wire)
    assert back.tolist() == values.tolist()


def test_vector_specs():
    buf = np.zeros(10)
    cases = {
        "even split, remainder first": (buf, [4, 3, 3], [0, 4, 7]),
        "datatype only": ([buf, M.DOUBLE], [4, 3, 3], [0, 4, 7]),
        "counts": ([buf, [1, 2, 3]], [1, 2, 3], [0, 1, 3]),
        "one count for all": ([buf, 2], [2, 2, 2], [0, 2, 4]),
        "tuple counts displs": ([buf, ([1, 2, 3], [7, 0, 1])], [1, 2, 3], [7, 0, 1]),
        "count and stride": ([buf, (2, 3), M.DOUBLE], [2, 2, 2], [0, 3, 6]),
        "four items": ([buf, [1, 1, 1], [0, 5, 9], "d"], [1, 1, 1], [0, 5, 9]),
        "numpy counts": ([buf, np.array([2, 2, 2])], [2, 2, 2], [0, 2, 4]),
    }
    for name, (spec, counts, displs) in cases.items():
        v = M.parse_vector(spec, readonly=False, blocks=3)
        assert (v.counts, v.displs) == (counts, displs), name
    with pytest.raises(ValueError, match="expecting 3 items, got 2"):
        M.parse_vector([buf, [1, 2]], readonly=False, blocks=3)
    with pytest.raises(TypeError):  # a 2-item list is counts in a vector spec: [[1], [2]] is not ints
        M.parse_vector([buf, [[1], [2], [3]]], readonly=False, blocks=3)
    with pytest.raises(TypeError):  # as mpi4py: the items are converted before the length is checked
        M.parse_vector([buf, ([1], [2]), None, None], readonly=False, blocks=3)
    with pytest.raises(MPIException) as info:
        M.parse_vector([buf, [1, -1, 1]], readonly=False, blocks=3)
    assert info.value.Get_error_class() == ERR_COUNT
    with pytest.raises(ValueError, match="out of bounds"):
        M.parse_vector([buf, [1, 1, 1], [0, 5, 10], M.DOUBLE], readonly=False, blocks=3)


def test_mpi4py_objects_are_accepted_when_the_program_uses_mpi4py():
    """Run in a subprocess: importing mpi4py.MPI starts MPI, which this process must not do."""
    if (missing := missing_modules("mpi4py", hint="pip install -e '.[test]'")) is not None:
        skip_or_fail(missing)
    program = (
        "import numpy as np\n"
        "from mpi4py import MPI\n"
        "from lambda_shim import message as M\n"
        "m = M.parse([np.arange(4.0), (2, 1), MPI.DOUBLE], readonly=True)\n"
        "assert m.datatype is M.DOUBLE and (m.offset, m.count) == (8, 2)\n"
        "assert M.parse([None, 0, MPI.INT], readonly=True).datatype is M.INT\n"
        "assert M.is_in_place(MPI.IN_PLACE) and M.is_bottom(MPI.BOTTOM)\n"
        "assert M.parse([bytearray(16), MPI.DOUBLE_INT], readonly=True).count == 1\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("PMI_", "MPI_LOCAL"))}
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip() == "ok", out.stderr


# Every combination of these items as a 2-, 3- and 4-item spec (simple: a send; vector: the send
# side of a one-rank Scatterv), read by mpi4py and by the shim.
ITEMS = {
    "simple": (
        [
            "np.arange(6.0)",
            "np.arange(6, dtype='i')",
            "bytearray(b'abcdefghijkl')",
            "array.array('h', range(6))",
            "None",
        ],
        ["None", "0", "1", "3", "-1", "2.0", "'x'", "(1, 2)", "[1, 2]", "(1,)", "np.int32(2)", "MPI.INT"],
        ["None", "0", "1", "5", "-1", "np.int64(2)"],
        ["None", "MPI.DOUBLE", "MPI.INT", "'d'", "'q'", "MPI.BYTE", "5", "MPI.SHORT"],
    ),
    "vector": (
        ["np.arange(6.0)", "np.arange(6, dtype='i')", "bytearray(b'abcdefghijkl')"],
        [
            "None",
            "[2]",
            "(2,)",
            "2",
            "[-1]",
            "[2, 1]",
            "[2.0]",
            "np.array([3])",
            "([1], [2])",
            "(1, 2)",
            "([1], 2)",
            "[[1], [2]]",
            "MPI.INT",
            "'d'",
        ],
        ["None", "[1]", "1", "[9]", "[-1]"],
        ["None", "MPI.DOUBLE", "MPI.INT", "'h'"],
    ),
}


def combinations(kind: str) -> list[tuple[str, str]]:
    bufs, counts, displs, types = ITEMS[kind]
    specs = []
    for b, c in itertools.product(bufs, counts):
        specs.append((b, f"[b, {c}]"))
        for t in types:
            specs.append((b, f"[b, {c}, {t}]"))
            specs += [(b, f"[b, {c}, {d}, {t}]") for d in displs]
    return specs


COMBINATIONS = r"""
import array, json, sys
import numpy as np
from mpi4py import MPI
c = MPI.COMM_SELF
cases = json.load(open(sys.argv[1]))

def outcome(call):
    try:
        return ["ok", call()]
    except MPI.Exception as exc:
        return ["error", "MPI.Exception", exc.Get_error_class()]
    except Exception as exc:
        return ["error", type(exc).__name__]

def send(b, spec):
    req = c.Isend(spec, 0)
    out, status = bytearray(4096), MPI.Status()
    c.Recv(out, 0, 0, status)
    req.Wait()
    return out[: status.Get_count()].hex()

def scatterv(b, spec):
    out = bytearray(4096)
    c.Scatterv(spec, [out, MPI.BYTE], root=0)
    return out.rstrip(b"\0").hex()

results = {}
for kind, call in (("simple", send), ("vector", scatterv)):
    results[kind] = []
    for buf, spec in cases[kind]:
        b = eval(buf)
        results[kind].append(outcome(lambda: call(b, eval(spec))))
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def combination_results(tmp_path_factory) -> dict:
    if (missing := missing_modules("mpi4py", hint="pip install -e '.[test]'")) is not None:
        skip_or_fail(missing)
    tmp = tmp_path_factory.mktemp("mpi4py-combinations")
    (tmp / "cases.json").write_text(json.dumps({kind: combinations(kind) for kind in ITEMS}))
    (tmp / "reference.py").write_text(COMBINATIONS)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("PMI_", "MPI_LOCAL"))}
    subprocess.run(
        [sys.executable, str(tmp / "reference.py"), str(tmp / "cases.json"), str(tmp / "out.json")],
        check=True,
        timeout=300,
        env=env,
    )
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("kind", list(ITEMS))
def test_every_combination_of_spec_items_reads_as_mpi4py(combination_results, kind):
    """Bytes or exception class, spec by spec; the one deliberate difference: a count or
    displacement past the end of the buffer, which mpi4py hands to MPI (out of bounds)."""
    differ = []
    for (buf, spec), theirs in zip(combinations(kind), combination_results[kind], strict=True):
        b = eval(buf, globals(), {"MPI": MPI})
        try:
            if kind == "simple":
                data = bytes(M.parse(eval(spec, globals(), {"MPI": MPI, "b": b}), readonly=True).payload())
            else:
                vector = M.parse_vector(eval(spec, globals(), {"MPI": MPI, "b": b}), readonly=True, blocks=1)
                data = bytes(vector.block(0).payload()).rstrip(b"\0")
            ours = ["ok", data.hex()]
        except MPIException as exc:
            ours = ["error", "MPI.Exception", exc.Get_error_class()]
        except Exception as exc:  # noqa: BLE001 - compared with mpi4py's
            if "out of bounds" in str(exc) and isinstance(exc, ValueError) and theirs[0] == "ok":
                continue
            ours = ["error", type(exc).__name__]
        if ours != theirs:
            differ.append((buf, spec, ours, theirs))
    assert not differ, differ[:10]


class _DLPackOnly:
    """Host memory offered only through DLPack (as mpi4py's test arrays are), its capsules kept."""

    def __init__(self, memory: np.ndarray) -> None:
        self.array = memory
        self.capsules: list[object] = []

    def __dlpack__(self, stream: object = None) -> object:
        assert stream is None, "a CPU consumer passes no stream (DLPack spec)"
        self.capsules.append(self.array.__dlpack__())
        return self.capsules[-1]

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.array.__dlpack_device__()


def test_dlpack_buffers_are_received_into_and_their_capsules_left_to_the_producer():
    import ctypes
    import gc

    is_valid = ctypes.pythonapi.PyCapsule_IsValid
    is_valid.restype, is_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
    target = np.zeros(4, np.int64)
    producer = _DLPackOnly(target)
    msg = M.parse([producer, 3], readonly=False)
    assert msg.datatype.Get_name() == "MPI_LONG"
    capsules = producer.capsules
    del producer
    gc.collect()
    msg.store(np.array([7, 8, 9], np.int64).tobytes())
    assert target.tolist() == [7, 8, 9, 0]
    # Not consumed: the producer's destructor still owns the tensor and frees it exactly once.
    assert [is_valid(c, b"dltensor") for c in capsules] == [1]
    readonly = np.arange(2.0)
    readonly.flags.writeable = False
    with pytest.raises(BufferError):  # numpy will not export it; never a crash or a silent write
        M.parse(_DLPackOnly(readonly), readonly=False)
    with pytest.raises(BufferError, match="not contiguous"):
        M.parse(torch.arange(16.0).reshape(4, 4)[:, 1], readonly=True)
