"""``bench compare``: which runs it makes, what one run reports, and what it writes. (The
mpiexec and cloud --local commands are tested on their own in test_mpi_launch and test_cloud;
the whole sweep is a benchmark, run by hand.)"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cai_hpc import compare as compare_module
from cai_hpc.checkpoint import save_weights
from cai_hpc.compare import (
    BATCH_SWEEP,
    BYTES_PER_SAMPLE,
    Row,
    _run,
    _write,
    interleaved,
    median_rows,
    plan_runs,
    projected_seconds,
    projection,
)
from cai_hpc.synth import synthesize
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


# ------------------------------------------------------------------ --repeats and the projection
def test_repeats_are_interleaved_pass_after_pass() -> None:
    assert interleaved(3, 2) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def _row(backend: str, ranks: int, samples_per_s: float, startup_s: float, repeat: int, sweep: str = "ranks") -> Row:
    return Row(sweep, backend, ranks, 2 // ranks, 128, 4, 400, 400 / samples_per_s, samples_per_s, startup_s, 0.1,
               9.0, repeat)  # fmt: skip


def test_medians_and_spreads_of_the_repeats() -> None:
    rows = [_row("laptop", 1, v, 3.0 + v / 100, i) for i, v in enumerate((100.0, 500.0, 200.0))]
    rows.append(_row("hpc", 2, 300.0, 2.0, 0))
    merged = dict((r.backend, (r, spread)) for r, spread in median_rows(rows))
    laptop, spread = merged["laptop"]
    assert laptop.samples_per_s == 200.0 and spread["samples_per_s"] == (100.0, 500.0)
    assert laptop.startup_s == 5.0 and merged["hpc"][0].samples_per_s == 300.0


def test_projection_scales_the_measured_rates() -> None:
    rows = [_row("laptop", 1, 100.0, 3.0, 0), _row("hpc", 1, 90.0, 2.0, 0), _row("hpc", 2, 180.0, 2.5, 0)]
    rows += [_row("cloud", 2, 160.0, 4.0, r) for r in range(3)]
    curves = projection(rows, nodes=8, functions=517)
    assert (curves["hpc"]["rate"], curves["hpc"]["units"], curves["hpc"]["cold_s"]) == (180.0, 8, 2.5)
    assert (curves["cloud"]["rate"], curves["cloud"]["units"]) == (80.0, 517)  # one rank is one function
    samples = 12.6e9 / BYTES_PER_SAMPLE
    assert projected_seconds(curves["cloud"], np.array([12.6]))[0] == pytest.approx(4.0 + samples / (517 * 80))
    assert projected_seconds(curves["laptop"], np.array([12.6]))[0] == pytest.approx(3.0 + samples / 100)
    assert curves["laptop"]["usd_per_s"] == 0 and curves["cloud"]["usd_per_s"] > 0


@pytest.mark.timeout(600)
def test_a_tiny_compare_runs_every_row_n_times_and_plots_medians(tmp_path, monkeypatch) -> None:
    """The real loop on 24 galaxies, cut to two laptop rows so it stays short."""
    synthesize(tmp_path / "data", 24, 1.0, seed=2)
    plan = [("ranks", "laptop", 1, 1, 16), ("batch", "laptop", 1, 1, 8)]
    monkeypatch.setattr(compare_module, "plan_runs", lambda *a: plan)
    rows = compare_module.compare(tmp_path / "data", tmp_path / "c", 16, progress=False, repeats=2)
    assert [(r.repeat, r.batch) for r in rows] == [(0, 16), (0, 8), (1, 16), (1, 8)]
    record = json.loads((tmp_path / "c" / "runs.json").read_text())
    assert len(record["runs"]) == 4 and record["projection"]["laptop"]["rate"] > 0
    assert (tmp_path / "c" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeats_must_be_positive() -> None:
    result = cai_hpc("bench", "compare", "--data", ".", "--repeats", "0")
    assert result.returncode == 2 and "--repeats must be at least 1" in result.stderr
