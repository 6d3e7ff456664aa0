"""mpi4py's nonblocking collectives on lambda_shim: the call returns at once and the request
completes with the collective, so NBX (issend + iprobe + Ibarrier + Test loop) terminates, and
every I* call, and the persistent point-to-point requests, give mpi4py+MPICH's results (real
ranks under ``lambda_shim.launch``, compared with the same program under ``mpiexec``)."""

from __future__ import annotations

import ast
import sys

import pytest

from tests.test_mpi_api import PROGRAMS, clean_env, launch, mpi4py_reference, results

# A rank stuck in a wait fails within this many seconds instead of hanging the test.
BOUNDED = clean_env(CAI_HPC_OP_TIMEOUT="60")


@pytest.fixture(scope="module")
def mpi4py_results(tmp_path_factory) -> list[dict[str, str]]:
    return mpi4py_reference("nonblocking.py", tmp_path_factory.mktemp("nonblocking-mpi4py"))


@pytest.mark.parametrize("mode", ["direct", "relay"])
def test_nonblocking_collectives_give_what_mpi4py_gives(mode, mpi4py_results, tmp_path) -> None:
    result = launch(3, sys.executable, str(PROGRAMS / "nonblocking.py"), "shim", str(tmp_path), mode=mode, env=BOUNDED)
    assert result.returncode == 0, result.stderr[-3000:]
    shim = results(tmp_path, 3)
    for rank in range(3):
        differ = {k: (v, shim[rank].get(k)) for k, v in mpi4py_results[rank].items() if shim[rank].get(k) != v}
        assert not differ, f"rank {rank}: case: (mpi4py, shim): {differ}"
        assert shim[rank].keys() == mpi4py_results[rank].keys()
    # What mpi4py+MPICH gave, spelled out, so that the comparison cannot pass on two failures.
    rank0, rank2 = shim[0], shim[2]
    assert ast.literal_eval(rank0["nbx"]) == [(1, [1, 1]), (2, [2, 2, 2])]
    assert ast.literal_eval(rank2["nbx"]) == [(1, [1, 1])]
    assert rank0["ibarrier_returns_before_the_others_arrive"] == "(False, False)"
    got = ast.literal_eval(rank2["each_collective"])
    assert got["bcast"] == [0, 1, 2, 3] and got["gatherv"] == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert got["scatter"] == [40, 50] and got["scatterv"] == [3.0, 4.0, 5.0]
    assert got["allgather"] == [0, 1, 4] and got["allgatherv"] == [0, 1, 1, 2, 2, 2]
    assert got["alltoall"] == [2, 102, 202] and got["alltoallv"] == [3, 4, 5, 103, 104, 105, 203, 204, 205]
    assert got["reduce"] == [3.0, 4.5, -3.0] and got["allreduce"] == [0, 8, 27] and got["allreduce_max"] == [2.0, 0.0]
    assert got["rsb"] == [15, 18] and got["rs"] == [18, 24, 30]
    assert got["scan"] == [6, 8] and got["exscan"] == [3, 2] and got["inplace"] == [6, 6]
    assert ast.literal_eval(rank0["each_collective"])["gather"] == [0, 0, 1, 1, 2, 2]
    assert rank0["all_null"] == "True" and rank0["status_errors"] == "{0}"
    assert rank2["mixed_with_point_to_point"] == "([7, 8], [1])"
    assert rank0["bad_arguments"] == "([('Exception', 7), ('Exception', 9), ('ValueError', None)], [3])"
    assert shim[1]["failure_raised_by_wait"] == "(('Wait raised MPI.Exception', None), [3])"
    seen, after, inactive, freed = ast.literal_eval(shim[1]["persistent"])
    assert seen == [([0, step], 0, 5, 2) for step in range(3)]
    assert after == (True, False, True) and inactive == (-2, -1) and freed == [True, True, True]
