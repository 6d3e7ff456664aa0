"""lambda_shim's buffer API against mpi4py+MPICH, with real ranks: tests/programs/buffer_calls.py
makes every capitalised buffer call of mpi4py's Intracomm with the spec forms mpi4py programs
write (counts, displacements, datatypes, IN_PLACE, vector forms, bytearray/array.array/
memoryview buffers, bad specs), under ``mpiexec`` with mpi4py and under ``lambda_shim.launch``
with only the import changed; each rank's results must be the same."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lambda_shim import message as M
from lambda_shim.buffers import OPERATORS, reducer
from lambda_shim.errors import ERR_OP, MPIException
from tests.conftest import missing_modules, skip_or_fail

PROGRAM = Path(__file__).with_name("programs") / "buffer_calls.py"
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
RANKS = [3, 4]
LAUNCH = [sys.executable, "-m", "lambda_shim.launch"]


def clean_env() -> dict[str, str]:
    drop = ("PMI_", "MPI_LOCAL", "SLURM_", "CAI_HPC_", "RANK", "WORLD_SIZE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def results(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def run_shim(ranks: int, out: Path, mode: str = "auto") -> list[dict]:
    done = subprocess.run(
        [*LAUNCH, "-n", str(ranks), "--mode", mode, "--", sys.executable, str(PROGRAM), "shim", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return results(out, ranks)


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> dict[int, list[dict]]:
    runs = {}
    for ranks in RANKS:
        out = tmp_path_factory.mktemp(f"shim{ranks}")
        runs[ranks] = run_shim(ranks, out)
    return runs


@pytest.fixture(scope="module")
def mpi(tmp_path_factory) -> dict[int, list[dict]]:
    if MPIEXEC is None:
        skip_or_fail("no mpiexec to compare with")
    if (missing := missing_modules("mpi4py", hint="pip install -e '.[test]'")) is not None:
        skip_or_fail(missing)
    runs = {}
    for ranks in RANKS:
        out = tmp_path_factory.mktemp(f"mpi{ranks}")
        done = subprocess.run(
            [MPIEXEC, "-n", str(ranks), sys.executable, str(PROGRAM), "mpi", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env=clean_env(),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[ranks] = results(out, ranks)
    return runs


@pytest.mark.parametrize("ranks", RANKS)
def test_every_buffer_call_gives_what_mpi4py_gives(shim, mpi, ranks):
    for rank in range(ranks):
        mine, theirs = shim[ranks][rank], mpi[ranks][rank]
        differ = {
            k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)
        }
        assert not differ, f"rank {rank} (shim, mpi4py): {differ}"


def test_counts_and_displacements_touch_only_their_entries(shim):
    """The issue's cases, as MPI defines them (no mpiexec needed to check these)."""
    for got in shim[3][:-1]:  # the last rank is the root of these broadcasts
        assert got["Bcast_count"] == [1.0, 1.0, 0.0, 0.0]
        assert got["Bcast_count_displ"] == [0.0, 1.0, 1.0, 0.0]
    for got in shim[3]:
        assert got["Allreduce_count"] == [6.0, -3.0, -7.0, -7.0]
        assert got["Allgatherv"] == [0.5, 1.5, 1.5, 2.5, 2.5, 2.5]
    assert shim[3][0]["Gatherv_counts_displs"] == [0.5, -1.0, 1.5, 1.5, -1.0, 2.5, 2.5, 2.5, -1.0]
    assert shim[3][1]["Recv"] == [[0, 1, 2, -1, -1], 0, 11, 3, 12]


def test_bad_arguments_raise_mpi4pys_classes_on_every_rank_before_anything_moves(shim):
    for got in shim[4]:
        assert got["Bcast_bad_root"] == ["MPI.Exception", 7]  # ERR_ROOT
        assert got["Allreduce_LAND_double"] == ["MPI.Exception", 9]  # ERR_OP
        assert got["Allreduce_count_mismatch"] == ["ValueError"]
        assert got["Send_bad_spec"] == ["ValueError"]
        # the failed calls left nothing behind: the collectives after them are right
        assert got["Allreduce_after_errors"] == [4.0, 6.0]
        assert got["Allgather_after_errors"] == [0, 7, 14, 21]
    # a bad argument on some ranks only (Scatter's recvbuf None off the root): the collectives
    # after it still match across ranks (checked above)
    assert [got["Scatter_recv_None_off_root"] for got in shim[4]] == ["ok"] + [["TypeError"]] * 3
    assert shim[4][1]["Recv_truncated"] == ["MPI.Exception", 14]  # ERR_TRUNCATE
    assert shim[4][1]["Irecv_truncated_at_wait"] == ["MPI.Exception", 14]


@pytest.mark.parametrize("mode", ["punch", "relay"])
def test_buffer_calls_in_other_connection_modes(shim, mode, tmp_path):
    assert run_shim(3, tmp_path, mode=mode) == shim[3]


OP_MATRIX = r"""
import json, sys
from mpi4py import MPI
comm = MPI.COMM_SELF
ops = json.loads(sys.argv[1])
allowed = {}
for name in json.loads(sys.argv[2]):
    t = getattr(MPI, name)
    allowed[name] = []
    for op in ops:
        try:
            comm.Allreduce([bytearray(t.extent), 1, t], [bytearray(t.extent), 1, t], op=getattr(MPI, op))
        except MPI.Exception:
            continue
        allowed[name].append(op)
print(json.dumps(allowed))
"""


def test_operators_are_defined_on_the_datatypes_mpich_defines_them_on():
    """Each predefined operator on each predefined datatype: allowed, or ERR_OP, as in MPICH."""
    if (missing := missing_modules("mpi4py", hint="pip install -e '.[test]'")) is not None:
        skip_or_fail(missing)
    names = sorted(set(M.DATATYPES) - {"INT_INT"})
    done = subprocess.run(
        [sys.executable, "-c", OP_MATRIX, json.dumps(list(OPERATORS)), json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    mpich = json.loads(done.stdout)
    for name in names:
        ours = []
        for op in OPERATORS:
            try:
                reducer(SimpleNamespace(name=op), M.DATATYPES[name])
            except MPIException as exc:
                assert exc.Get_error_class() == ERR_OP
                continue
            ours.append(op)
        assert ours == mpich[name], name
