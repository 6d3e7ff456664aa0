"""The engine end to end on one process: predictions, summary, metrics, resume, limits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cai_hpc.checkpoint import build_model, save_weights
from cai_hpc.comm import SelfComm
from cai_hpc.engine import RunConfig, run
from cai_hpc.resources import cpu_has_bf16
from cai_hpc.shards import Columns, ShardReader, scan_dataset, write_shard

SUMMARY_KEYS = {
    "backend",
    "world_size",
    "samples",
    "precision",
    "device",
    "batch_size",
    "threads_per_rank",
    "metrics",
    "timing",
    "throughput",
    "ranks",
    "model",
    "versions",
}


def infer(data: Path, out: Path, **kwargs) -> dict:
    config = RunConfig(data=data, out=out, batch_size=kwargs.pop("batch_size", 64), threads=1, progress=False, **kwargs)
    return run(SelfComm(), config)


def read_predictions(out: Path) -> dict[str, dict[str, np.ndarray]]:
    files = {}
    for path in sorted((out / "predictions").glob("*.h5")):
        with h5py.File(path) as f:
            files[path.name] = {k: f[k][:] for k in f} | {"attrs": dict(f.attrs)}
    return files


def numpy_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    pred, true = pred.astype(np.float64), true.astype(np.float64)
    dz = (pred - true) / (1 + true)
    return {
        "mae": np.mean(np.abs(pred - true)),
        "mse": np.mean((pred - true) ** 2),
        "bias": np.mean(dz),
        "nmad": 1.4826 * np.median(np.abs(dz - np.median(dz))),
        "r2": 1 - np.sum((pred - true) ** 2) / np.sum((true - true.mean()) ** 2),
        "outlier_frac": np.mean(np.abs(dz) > 0.15),
    }


@pytest.fixture(scope="module")
def first_run(small_dataset: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "out"
    return out, infer(small_dataset, out)


def test_one_predictions_file_per_shard_in_sample_order(first_run, small_dataset) -> None:
    out, _ = first_run
    shards = scan_dataset(small_dataset)
    files = read_predictions(out)
    assert sorted(files) == [s.name for s in shards]
    model, _ = build_model(None, seed=0)
    for shard in shards:
        with ShardReader(shard) as r:
            cols = r.read(0, shard.rows)
        with torch.inference_mode():
            expected = model(torch.from_numpy(cols.images), torch.from_numpy(cols.magnitudes)).numpy()
        got = files[shard.name]
        np.testing.assert_allclose(got["redshift_pred"], expected, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got["object_id"], cols.object_id)
        np.testing.assert_array_equal(got["redshift"], cols.redshift)
        assert got["redshift_pred"].dtype == np.float32
        assert "random weights" in got["attrs"]["checkpoint"]
    assert not list(out.rglob(".*"))  # no temporary files left behind


def test_summary_follows_the_design_and_its_metrics_match_numpy(first_run) -> None:
    out, summary = first_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["backend"] == "self" and on_disk["world_size"] == 1 and on_disk["samples"] == 300
    assert on_disk["precision"] == "fp32" and on_disk["device"] == "cpu" and on_disk["threads_per_rank"] == 1
    assert set(on_disk["timing"]) == {"wall_s", "startup_s", "load_s", "infer_s", "write_s", "comm_s"}
    assert set(on_disk["throughput"]) == {"samples_per_s", "bits_per_s", "sum_rank_samples_per_s"}
    assert on_disk["throughput"]["bits_per_s"] == pytest.approx(on_disk["throughput"]["samples_per_s"] * 164_160)
    (rank,) = on_disk["ranks"]
    assert {"rank", "host", "samples", "infer_s", "samples_per_s", "peak_rss_mb"} <= set(rank)
    assert rank["samples"] == 300 and rank["peak_rss_mb"] > 100
    assert set(rank["startup_split"]) == {"imports_s", "build_s", "weights_s", "kernels_s", "first_batch_s"}
    assert all(v >= 0 for v in rank["startup_split"].values()) and rank["startup_split"]["build_s"] > 0
    # "native-<form>" (e.g. native-avx2) or "torch", and why
    assert rank["kernels"].split("-")[0] == ("native" if shutil.which(os.environ.get("CXX", "g++")) else "torch")
    assert rank["kernels_reason"]
    assert on_disk["model"]["parameters"] == 15_902_889
    assert 0.2 < on_disk["model"]["gflop_per_sample"] < 0.25
    assert "random weights" in on_disk["model"]["checkpoint"]

    files = read_predictions(out).values()
    pred = np.concatenate([f["redshift_pred"] for f in files])
    true = np.concatenate([f["redshift"] for f in files])
    for key, value in numpy_metrics(pred, true).items():
        assert on_disk["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_rerun_skips_complete_shards_and_keeps_whole_dataset_metrics(first_run, small_dataset) -> None:
    out, summary = first_run
    before = {p: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    again = infer(small_dataset, out)
    assert again["samples"] == 0 and again["skipped_shards"] == 7
    assert {p: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()} == before
    assert again["metrics"] == pytest.approx(summary["metrics"])


def test_a_damaged_predictions_file_is_redone(small_dataset, tmp_path) -> None:
    out = tmp_path / "out"
    infer(small_dataset, out)
    (out / "predictions" / "shard-00003.h5").write_bytes(b"half a file")
    again = infer(small_dataset, out)
    assert again["samples"] == 48 and again["skipped_shards"] == 6
    assert len(read_predictions(out)["shard-00003.h5"]["redshift_pred"]) == 48


def test_overwrite_redoes_everything(first_run, small_dataset) -> None:
    out, summary = first_run
    again = infer(small_dataset, out, overwrite=True)
    assert again["samples"] == 300 and again["skipped_shards"] == 0
    assert again["metrics"] == pytest.approx(summary["metrics"], rel=1e-6)


def test_limit_takes_the_first_samples_and_a_later_full_run_completes_the_cut_shard(small_dataset, tmp_path) -> None:
    out = tmp_path / "out"
    summary = infer(small_dataset, out, limit=100)
    assert summary["samples"] == 100 and summary["metrics"]["labelled"] == 100
    files = read_predictions(out)
    assert sorted(files) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert len(files["shard-00002.h5"]["redshift_pred"]) == 4
    full = infer(small_dataset, out)
    assert full["samples"] == 300 - 96 and full["skipped_shards"] == 2
    assert len(read_predictions(out)["shard-00002.h5"]["redshift_pred"]) == 48


@pytest.mark.parametrize("batch_size", [1, 7, 48, 1000])
def test_predictions_do_not_depend_on_batch_size(first_run, small_dataset, tmp_path, batch_size) -> None:
    out, _ = first_run
    other = tmp_path / "out"
    infer(small_dataset, other, batch_size=batch_size, limit=None if batch_size > 1 else 60)
    ref = read_predictions(out)
    for name, got in read_predictions(other).items():
        rows = len(got["redshift_pred"])
        np.testing.assert_allclose(got["redshift_pred"], ref[name]["redshift_pred"][:rows], atol=1e-5, rtol=0)


def test_unlabelled_data_gives_null_metrics(small_dataset, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with ShardReader(scan_dataset(small_dataset)[0]) as r:
        cols = r.read(0, 48)
    write_shard(data / "a.h5", Columns(cols.images, cols.magnitudes, None, None))
    summary = infer(data, tmp_path / "out")
    assert summary["metrics"] is None
    assert set(read_predictions(tmp_path / "out")["a.h5"]) == {"redshift_pred", "attrs"}


def test_a_checkpoint_is_used_and_named(small_dataset, tmp_path, golden_model) -> None:
    save_weights(golden_model, tmp_path / "astromae.safetensors")
    summary = infer(small_dataset, tmp_path / "out", checkpoint=tmp_path / "astromae.safetensors", limit=48)
    assert summary["model"]["checkpoint"] == "astromae.safetensors"
    assert summary["model"]["parameters"] == 15_902_889  # counted on the checkpoint's tensors
    got = read_predictions(tmp_path / "out")["shard-00000.h5"]
    with ShardReader(scan_dataset(small_dataset)[0]) as r:
        cols = r.read(0, 48)
    with torch.inference_mode():
        expected = golden_model(torch.from_numpy(cols.images), torch.from_numpy(cols.magnitudes)).numpy()
    np.testing.assert_allclose(got["redshift_pred"], expected, atol=1e-5, rtol=0)
    assert got["attrs"]["checkpoint"] == "astromae.safetensors"


def test_predictions_made_with_other_weights_are_redone(small_dataset, tmp_path, golden_model) -> None:
    out = tmp_path / "out"
    infer(small_dataset, out, limit=96)
    save_weights(golden_model, tmp_path / "astromae.safetensors")
    again = infer(small_dataset, out, limit=96, checkpoint=tmp_path / "astromae.safetensors")
    assert again["skipped_shards"] == 0 and again["samples"] == 96
    files = read_predictions(out)
    assert {f["attrs"]["checkpoint"] for f in files.values()} == {"astromae.safetensors"}
    assert {f["attrs"]["weights"] for f in files.values()} != {"random-seed-0/fp32"}
    assert infer(small_dataset, out, limit=96, seed=1)["skipped_shards"] == 0  # other random weights


def test_a_limited_rerun_keeps_complete_files_and_scores_only_its_rows(first_run, small_dataset) -> None:
    out, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    limited = infer(small_dataset, out, limit=100)
    assert limited["samples"] == 0 and limited["skipped_shards"] == 3
    assert limited["metrics"]["labelled"] == 100
    assert {p: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()} == before


def test_bf16_run_reports_its_error_against_float32(small_dataset, tmp_path, caplog) -> None:
    summary = infer(small_dataset, tmp_path / "out", precision="bf16", compare_fp32=True, limit=96)
    # Asked for bf16 on a CPU that only emulates it, the user hears so.
    warned = any("no bf16 instructions" in r.getMessage() for r in caplog.records)
    assert warned == (cpu_has_bf16() is False)
    assert summary["precision"] == "bf16"
    error = summary["precision_error"]
    assert error["against"] == "fp32" and 0 < error["mean_abs_dz"] <= error["max_abs_dz"] <= 5e-3
    assert infer(small_dataset, tmp_path / "out32", limit=96)["precision_error"] is None
    # float32 does not take the bfloat16 predictions for its own
    assert infer(small_dataset, tmp_path / "out", limit=96)["skipped_shards"] == 0


def test_a_compiled_run_predicts_what_eager_does_and_counts_its_compile_in_startup(
    first_run, small_dataset, tmp_path, monkeypatch
) -> None:
    torch._dynamo.reset()
    # One compile for the whole run: neither the short last batch (300 = 128 + 128 + 44) nor
    # the reader's tensors may make Dynamo compile again.
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    summary = infer(small_dataset, tmp_path / "out", batch_size=128, compile=True)
    ref = read_predictions(first_run[0])
    got = read_predictions(tmp_path / "out")
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(got[name]["redshift_pred"], ref[name]["redshift_pred"], atol=1e-5, rtol=0)
    rank = summary["ranks"][0]
    assert 0 < rank["startup_split"]["compile_s"] < rank["startup_s"]
    assert summary["compile"] is True and first_run[1]["compile"] is False
