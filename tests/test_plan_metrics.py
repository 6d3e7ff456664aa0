"""The partition plan, the distributed metrics (on one rank, and on two over loopback) and the
one-rank communicator."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cai_hpc import comm as c
from cai_hpc.errors import InputError
from cai_hpc.metrics import distributed_median, regression_metrics
from cai_hpc.plan import Piece, plan_pieces, rank_bounds, shard_owners


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


def test_split_shards_belong_to_the_rank_that_reads_their_first_row() -> None:
    # 13 rows over 4 ranks: ranks get 4, 3, 3, 3 (global 0:4, 4:7, 7:10, 10:13). Shard 0 is
    # global 0:5, shard 1 is 5:6, shard 2 is 6:13 (read by ranks 1, 2 and 3).
    plan = plan_pieces([5, 1, 7], 4)
    assert plan == [
        [Piece(0, 0, 4)],
        [Piece(0, 4, 5), Piece(1, 0, 1), Piece(2, 0, 1)],
        [Piece(2, 1, 4)],
        [Piece(2, 4, 7)],
    ]
    assert shard_owners(plan) == {0: 0, 1: 1, 2: 1}  # not the last reader (1, 1, 3)
    assert shard_owners(plan_pieces([3, 9], 3)) == {0: 0, 1: 0}  # rank 0 reads 0:4: shard 1's row 0
    assert [rank_bounds(13, 4, r) for r in range(4)] == [(0, 4), (4, 7), (7, 10), (10, 13)]


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


def test_metrics_worked_by_hand() -> None:
    # z = 0, 1, 1, 3, 0 and ẑ chosen so that every residual is exact in binary:
    #   ẑ − z = 0.5, 1.125, 1.25, 4, 0;  Δz = (ẑ − z)/(1 + z) = 0.5, 0.5625, 0.625, 1, 0.
    # median Δz = 0.5625; |Δz − 0.5625| = 0.0625, 0, 0.0625, 0.4375, 0.5625, whose median is
    # 0.0625, so NMAD = 1.4826 × 0.0625 (without the centring it would be 1.4826 × 0.5625).
    # SS_res = 0.25 + 1.265625 + 1.5625 + 16 + 0 = 19.078125; mean z = 1, SS_tot = 6.
    true = np.array([0.0, 1.0, 1.0, 3.0, 0.0])
    pred = np.array([0.5, 2.125, 2.25, 7.0, 0.0])
    m = regression_metrics(c.SelfComm(), pred, true)
    assert m == {
        "mae": pytest.approx(6.875 / 5, rel=1e-15),
        "mse": pytest.approx(19.078125 / 5, rel=1e-15),
        "bias": pytest.approx(2.6875 / 5, rel=1e-15),
        "nmad": pytest.approx(0.0926625, rel=1e-15),
        "r2": pytest.approx(1 - 19.078125 / 6, rel=1e-15),
        "outlier_frac": 0.8,
        "labelled": 5,
    }


def test_nmad_of_an_even_count_centres_on_the_mean_of_the_middle_pair() -> None:
    # Δz = 0, 0.5, 1, 1.25 (z = 0): median 0.75; |Δz − 0.75| = 0.75, 0.25, 0.25, 0.5, median 0.375
    # (centred on the lower middle value 0.5 it would be 0.5; not centred, 0.75).
    pred = np.array([0.0, 0.5, 1.0, 1.25])
    m = regression_metrics(c.SelfComm(), pred, np.zeros(4))
    assert m["nmad"] == pytest.approx(1.4826 * 0.375, rel=1e-15)
    assert m["r2"] is None  # every z is the same: SS_tot = 0


def test_float32_inputs_are_summed_in_float64() -> None:
    # The engine hands over float32 predictions and labels; the metrics are float64 sums of them.
    rng = np.random.default_rng(3)
    true = rng.uniform(0.0, 0.7, 10_001).astype(np.float32)
    pred = (true + rng.normal(0.0, 0.05, true.size)).astype(np.float32)
    m = regression_metrics(c.SelfComm(), pred, true)
    t, p = true.astype(np.float64), pred.astype(np.float64)
    dz = (p - t) / (1 + t)
    assert m["mae"] == pytest.approx(np.abs(p - t).mean(), rel=1e-12)
    assert m["mse"] == pytest.approx(np.square(p - t).mean(), rel=1e-12)
    assert m["bias"] == pytest.approx(dz.mean(), rel=1e-12)
    assert m["nmad"] == 1.4826 * np.median(np.abs(dz - np.median(dz)))
    assert distributed_median(c.SelfComm(), pred) == np.median(p)


def test_r2_of_labels_spread_less_than_one() -> None:
    # z = 0, 0.5: SS_tot = 2 × 0.25² = 0.125; ẑ = 0.25 both: SS_res = 0.125, so R² = 0.
    assert regression_metrics(c.SelfComm(), np.array([0.25, 0.25]), np.array([0.0, 0.5]))["r2"] == 0.0


def test_the_median_of_nothing_is_nan() -> None:
    assert np.isnan(distributed_median(c.SelfComm(), np.empty(0)))


def test_a_dz_of_exactly_0_15_is_not_an_outlier() -> None:
    just_above = np.nextafter(0.15, 1.0)
    pred = np.array([0.15, -0.15, just_above, -just_above, 0.0])
    assert regression_metrics(c.SelfComm(), pred, np.zeros(5))["outlier_frac"] == 2 / 5


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


def _on_two_ranks(rendezvous, work: list) -> list:
    """Run ``work[r](comm)`` as rank r of a real two-rank TcpComm job (threads of this process,
    loopback); returns their results. A rank that raises leaves the job at once, so the other
    fails fast instead of waiting for it, and the first error is raised here."""
    from lambda_shim.tcpcomm import ShimConfig, TcpComm
    from lambda_shim.wire import job_key

    master, address = rendezvous
    host, _, port = address.rpartition(":")
    job = uuid.uuid4().hex

    def rank(r: int):
        config = ShimConfig(r, 2, job, job_key(master, job), (host, int(port)), mode="direct", connect_timeout=30)
        with TcpComm(config) as comm:
            return work[r](comm)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(rank, r) for r in range(2)]
        return [f.result(timeout=60) for f in futures]


# z = 0, 0.5, 1 and ẑ = 0.25, 0.5, 1.75, every residual exact in binary:
#   ẑ − z = 0.25, 0, 0.75 (sum 1, squares 0.625); Δz = 0.25, 0, 0.375 (sum 0.625);
#   median Δz = 0.25; |Δz − 0.25| = 0, 0.25, 0.125, median 0.125, so NMAD = 1.4826 × 0.125;
#   mean z = 0.5, SS_tot = 0.5, R² = 1 − 0.625/0.5 = −0.25; |Δz| > 0.15 for 0.25 and 0.375.
_TRUE = np.array([0.0, 0.5, 1.0])
_PRED = np.array([0.25, 0.5, 1.75])
_BY_HAND = {
    "mae": 1 / 3,
    "mse": 0.625 / 3,
    "bias": 0.625 / 3,
    "nmad": 1.4826 * 0.125,
    "r2": -0.25,
    "outlier_frac": 2 / 3,
    "labelled": 3,
}


@pytest.mark.parametrize("split", [0, 1, 3], ids=["rank 0 has no labels", "both have labels", "rank 1 has no labels"])
def test_metrics_over_two_ranks_are_those_of_the_union_even_with_a_rank_holding_no_labels(rendezvous, split) -> None:
    # Rank 0 holds the first `split` samples, rank 1 the rest: every rank gets the union's metrics.
    def work(part: slice):
        return lambda comm: regression_metrics(comm, _PRED[part], _TRUE[part])

    assert _on_two_ranks(rendezvous, [work(slice(0, split)), work(slice(split, None))]) == [_BY_HAND, _BY_HAND]


def test_a_median_over_two_ranks_with_one_holding_nothing_is_the_others_median(rendezvous) -> None:
    def median_of(values: np.ndarray):
        return lambda comm: distributed_median(comm, values)

    got = _on_two_ranks(rendezvous, [median_of(np.empty(0)), median_of(np.array([3.0, -1.0, 2.0, 7.0]))])
    assert got == [2.5, 2.5]
