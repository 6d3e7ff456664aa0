"""``bench compare``: which runs it makes, what one run reports, and what it writes. (The
mpiexec and cloud --local commands are tested on their own in test_mpi_launch and test_cloud;
the whole sweep is a benchmark, run by hand.)"""

from __future__ import annotations

import csv
import json

import pytest

from cai_hpc.checkpoint import save_weights
from cai_hpc.compare import BATCH_SWEEP, Row, _run, _write, plan_runs
from tests.conftest import cai_hpc


@pytest.mark.parametrize(("shards", "cores"), [(9, 2), (7, 4), (3, 8), (1, 2)])
def test_every_run_fits_the_cores_and_shares_the_batch_size(shards, cores) -> None:
    runs = plan_runs(shards, cores, None, 128, ["laptop", "hpc", "cloud"])
    assert all(1 <= ranks <= min(cores, shards) and used <= shards for _, _, ranks, used, _ in runs)
    assert {b for sweep, *_, b in runs if sweep != "batch"} == {128}
    by_ranks = {(backend, ranks) for sweep, backend, ranks, used, _ in runs if sweep == "ranks" and used == shards}
    top = min(cores, shards)
    assert ("laptop", 1) in by_ranks and ("hpc", top) in by_ranks and ("cloud", top) in by_ranks
    assert {b for sweep, *_, b in runs if sweep == "batch"} | {128} == set(BATCH_SWEEP)


def test_max_ranks_caps_the_sweep() -> None:
    assert max(ranks for _, _, ranks, _, _ in plan_runs(16, 8, 2, 128, ["laptop", "cloud"])) == 2


def test_a_run_is_a_real_command_and_its_row_is_its_summary(small_dataset, golden_model, tmp_path) -> None:
    save_weights(golden_model, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    row = _run("batch", "laptop", 1, 1, 64, small_dataset, tmp_path / "w.safetensors", out, None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["checkpoint"] == "w.safetensors" and summary["batch_size"] == 64
    assert (row.backend, row.ranks, row.threads, row.samples) == ("laptop", 1, 1, summary["samples"])
    assert row.samples_per_s == round(summary["throughput"]["samples_per_s"], 1)
    assert row.command_s > row.wall_s > 0


def test_rows_and_plots_are_written(tmp_path) -> None:
    rows = [
        Row(sweep, backend, ranks, 2 // ranks, batch, 4, samples, samples / 400, 400.0, 4.0, 0.1 * ranks, 9.0)
        for sweep, backend, ranks, used, batch in plan_runs(4, 2, None, 128, ["laptop", "hpc", "cloud"])
        for samples in [used * 100]
    ]
    _write(rows, tmp_path)
    with (tmp_path / "runs.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0].keys() >= {"backend", "ranks", "threads", "samples_per_s", "comm_s"}
    assert json.loads((tmp_path / "runs.json").read_text())["runs"][3]["backend"] == rows[3].backend
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_needs_data() -> None:
    result = cai_hpc("bench", "compare")
    assert result.returncode == 2 and "needs --data" in result.stderr
