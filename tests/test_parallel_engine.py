"""The engine on a real multi-rank communicator, at whatever size pytest was launched with.

The same tests run on mpi4py's COMM_WORLD (``mpiexec -n 2|4 python -m pytest --with-mpi``,
from tests/test_mpi_launch.py) and on lambda_shim's TcpComm (``python -m lambda_shim.launch
-n 2|4 -- python -m pytest -p no:mpi``, from tests/test_shim.py). A plain ``pytest`` run skips
them (pytest-mpi's ``mpi`` mark).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc.comm import SelfComm
from cai_hpc.engine import RunConfig, run
from cai_hpc.metrics import distributed_median, regression_metrics
from cai_hpc.synth import synthesize


@pytest.fixture(scope="module")
def world():
    if os.environ.get("CAI_HPC_JOB_ID"):  # started by lambda_shim.launch
        from lambda_shim.tcpcomm import TcpComm

        return TcpComm.from_env()
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture(scope="module")
def shared_dir(world):
    """A directory every rank sees: made by rank 0, its name broadcast."""
    path = Path(tempfile.mkdtemp(prefix="cai-hpc-mpi-")) if world.rank == 0 else None
    path = world.bcast(path, root=0)
    if world.rank == 0:
        synthesize(path / "data", 301, 1.0, seed=5)  # 301 rows: no rank count divides it
    world.barrier()
    yield path
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def config(data: Path, out: Path, **kwargs) -> RunConfig:
    return RunConfig(data=data, out=out, batch_size=32, threads=1, progress=False, **kwargs)


@pytest.mark.mpi(min_size=2)
def test_engine_matches_a_one_process_run(world, shared_dir) -> None:
    parallel = run(world, config(shared_dir / "data", shared_dir / "par"))
    world.barrier()
    if world.rank != 0:
        assert parallel is None
        return
    single = run(SelfComm(), config(shared_dir / "data", shared_dir / "one"))
    assert parallel["world_size"] == world.size and parallel["backend"] == getattr(world, "backend", "mpi")
    counts = [r["samples"] for r in parallel["ranks"]]
    assert sum(counts) == 301 and max(counts) - min(counts) <= 1
    for key, value in single["metrics"].items():
        assert parallel["metrics"][key] == pytest.approx(value, rel=1e-6), key
    for path in sorted((shared_dir / "one" / "predictions").glob("*.h5")):
        with h5py.File(path) as a, h5py.File(shared_dir / "par" / "predictions" / path.name) as b:
            np.testing.assert_allclose(b["redshift_pred"][:], a["redshift_pred"][:], atol=1e-5, rtol=0)
            np.testing.assert_array_equal(b["object_id"][:], a["object_id"][:])


@pytest.mark.mpi(min_size=2)
def test_more_ranks_than_samples(world, shared_dir) -> None:
    summary = run(world, config(shared_dir / "data", shared_dir / "tiny", limit=1))
    if world.rank == 0:
        assert [r["samples"] for r in summary["ranks"]] == [1] + [0] * (world.size - 1)
        assert summary["metrics"]["labelled"] == 1


@pytest.mark.mpi(min_size=2)
def test_distributed_metrics_equal_numpy_on_the_union(world) -> None:
    rng = np.random.default_rng(100 + world.rank)
    n = [0, 5, 1, 17][world.rank % 4]  # uneven, and one rank with nothing
    true = rng.uniform(0.01, 0.4, n)
    pred = true + rng.normal(0, 0.05, n)
    everything = world.allgather((pred, true))
    all_pred = np.concatenate([p for p, _ in everything])
    all_true = np.concatenate([t for _, t in everything])
    assert distributed_median(world, pred - true) == np.median(all_pred - all_true)
    mine = regression_metrics(world, pred, true)
    ref = regression_metrics(SelfComm(), all_pred, all_true)
    for key, value in ref.items():
        assert mine[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
