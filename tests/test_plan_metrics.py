"""The partition plan, the distributed metrics and the one-rank communicator."""

from __future__ import annotations

import numpy as np
import pytest

from cai_hpc import comm as c
from cai_hpc.errors import InputError
from cai_hpc.metrics import distributed_median, regression_metrics
from cai_hpc.plan import plan_pieces, rank_bounds, shard_owners


@pytest.mark.parametrize(
    "rows, size", [([48] * 6 + [12], 1), ([48] * 6 + [12], 3), ([5, 1, 7], 4), ([2], 5), ([10, 10], 2)]
)
def test_plan_covers_every_row_once_and_balances_to_one_sample(rows, size) -> None:
    plan = plan_pieces(rows, size)
    assert len(plan) == size
    seen = [np.zeros(n, int) for n in rows]
    for pieces in plan:
        for p in pieces:
            seen[p.shard][p.start : p.stop] += 1
    assert all((s == 1).all() for s in seen)
    counts = [sum(p.rows for p in pieces) for pieces in plan]
    assert max(counts) - min(counts) <= 1
    # Global order: concatenating the ranks' pieces walks the dataset from start to end.
    walk = [(p.shard, r) for pieces in plan for p in pieces for r in range(p.start, p.stop)]
    assert walk == [(s, r) for s, n in enumerate(rows) for r in range(n)]
    assert sorted(shard_owners(plan)) == list(range(len(rows)))


def test_more_ranks_than_samples_leaves_some_ranks_empty() -> None:
    plan = plan_pieces([2], 5)
    assert [len(p) for p in plan] == [1, 1, 0, 0, 0]
    assert rank_bounds(2, 5, 4) == (2, 2)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001])
def test_distributed_median_is_numpys_median(n) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(size=n) * np.exp(rng.normal(size=n) * 5)
    x[::3] *= -1
    assert distributed_median(c.SelfComm(), x) == np.median(x)


def test_median_handles_ties_zeros_and_signed_zero() -> None:
    x = np.array([0.0, -0.0, 0.0, 1e-300, -1e-300, 5.0, 5.0])
    assert distributed_median(c.SelfComm(), x) == np.median(x)


def test_metrics_of_a_perfect_prediction() -> None:
    z = np.linspace(0.01, 0.5, 101)
    m = regression_metrics(c.SelfComm(), z, z)
    assert m == {"mae": 0, "mse": 0, "bias": 0, "nmad": 0, "r2": 1, "outlier_frac": 0, "labelled": 101}


def test_outliers_count_beyond_0_15_in_dz() -> None:
    true = np.zeros(4)
    pred = np.array([0.0, 0.1, 0.2, -0.3])
    assert regression_metrics(c.SelfComm(), pred, true)["outlier_frac"] == 0.5


def test_no_labels_anywhere_gives_none() -> None:
    assert regression_metrics(c.SelfComm(), np.empty(0), np.empty(0)) is None


def test_self_comm_follows_mpi4py_conventions() -> None:
    comm = c.SelfComm()
    assert (comm.rank, comm.size, comm.Get_rank(), comm.Get_size()) == (0, 1, 0, 1)
    assert comm.bcast({"a": 1}) == {"a": 1}
    assert comm.gather(5) == [5] and comm.allgather(5) == [5]
    assert comm.scatter([7]) == 7
    assert comm.reduce(3, op=c.MAX) == 3 and comm.allreduce(np.arange(3)).tolist() == [0, 1, 2]
    comm.send({"x": 1}, dest=0, tag=4)
    comm.send("second", dest=0, tag=2)
    status = c.Status()
    assert comm.recv(source=0, tag=2, status=status) == "second" and status.Get_tag() == 2
    assert comm.recv(source=c.ANY_SOURCE, tag=c.ANY_TAG) == {"x": 1}
    with pytest.raises(RuntimeError, match="no matching message"):
        comm.recv()
    send, recv = np.arange(4.0), np.zeros(4)
    comm.Allreduce(send, recv, op=c.SUM)
    assert recv.tolist() == [0, 1, 2, 3]
    gathered = np.zeros(4)
    comm.Gatherv(send, [gathered, [4]], root=0)
    assert gathered.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        comm.bcast(1, root=1)


def test_auto_backend_is_self_without_a_launcher(monkeypatch) -> None:
    for var in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(c.get_comm("auto"), c.SelfComm)
    assert c.launched_by_mpi({"PMI_RANK": "0"}) and c.launched_by_mpi({"SLURM_STEP_ID": "0"})


def test_a_world_smaller_than_the_launcher_started_is_refused() -> None:
    srun = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}
    c.check_world_size(4, srun)
    with pytest.raises(InputError, match="the launcher started 4 tasks but MPI sees a world of 1"):
        c.check_world_size(1, srun)
    # A batch script (no step) sees the job's task count: not a launch of this process.
    c.check_world_size(1, {"SLURM_NTASKS": "4"})
    with pytest.raises(InputError):
        c.check_world_size(1, {"PMI_SIZE": "2"})
