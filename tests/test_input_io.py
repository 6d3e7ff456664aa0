"""How infer reads its input: without file locks, every byte once, planned by every rank, and
bad rows met mid-stream ending the job in one line that every rank agrees on."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc.cli import main
from cai_hpc.comm import SelfComm
from cai_hpc.engine import RunConfig, run
from cai_hpc.job import planned_job
from cai_hpc.shards import SAMPLE_BYTES, scan_dataset
from cai_hpc.storage import Location
from tests.conftest import MPIEXEC, cai_hpc, moto_server, requires_infra, skip_or_fail
from tests.plans import planning_dataset, serial_job

PLAN_SUITE = Path(__file__).with_name("test_parallel_input.py")

# Every lock a process asks for fails with ENOLCK, as on NFS without a lock daemon.
NO_LOCKS_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
int flock(int fd, int op) { (void)fd; (void)op; errno = ENOLCK; return -1; }
int fcntl(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    if (cmd == F_SETLK || cmd == F_SETLKW || cmd == F_OFD_SETLK || cmd == F_OFD_SETLKW) { errno = ENOLCK; return -1; }
    static int (*real)(int, int, ...);
    if (!real) real = (int (*)(int, int, ...))dlsym(RTLD_NEXT, "fcntl");
    return real(fd, cmd, arg);
}
"""


@pytest.fixture(scope="module")
def no_locks(tmp_path_factory) -> dict[str, str]:
    """The environment of a process on a filesystem whose locks all fail."""
    gcc = shutil.which("gcc")
    if gcc is None:
        skip_or_fail("no gcc to build the lock-failing shim")
    where = tmp_path_factory.mktemp("nolocks")
    (where / "nolocks.c").write_text(NO_LOCKS_C)
    subprocess.run([gcc, "-shared", "-fPIC", "-o", where / "nolocks.so", where / "nolocks.c", "-ldl"], check=True)
    # The native kernels' build lock is another matter (issue 21, item 4): torch's kernels here.
    return os.environ | {"LD_PRELOAD": str(where / "nolocks.so"), "CAI_HPC_NATIVE": "0"}


def test_infer_runs_where_file_locks_fail(no_locks, small_dataset, tmp_path) -> None:
    probe = "import h5py, sys; h5py.File(sys.argv[1], 'r')"  # HDF5's default: lock
    refused = subprocess.run(
        [sys.executable, "-c", probe, small_dataset / "shard-00000.h5"], env=no_locks, capture_output=True, text=True
    )
    assert "unable to lock file" in refused.stderr  # the shim works: a locking open fails
    out = tmp_path / "out"
    result = cai_hpc("infer", "--data", str(small_dataset), "--out", str(out), "--limit", "96", "-q", env=no_locks)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 96 and len(list((out / "predictions").glob("*.h5"))) == 2


def test_a_lock_forced_on_is_reported_as_a_lock_not_as_corruption(no_locks, small_dataset, tmp_path) -> None:
    env = no_locks | {"HDF5_USE_FILE_LOCKING": "TRUE"}  # the site asks HDF5 to lock whatever the program says
    result = cai_hpc("infer", "--data", str(small_dataset), "--out", str(tmp_path / "out"), "-q", env=env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert str(small_dataset / "shard-00000.h5") in line
    assert "the filesystem refused a file lock" in line and "HDF5_USE_FILE_LOCKING=TRUE" in line, line
    assert "corrupt" not in line
    assert not (tmp_path / "out").exists()


class CountingFile(io.RawIOBase):
    """A file HDF5 reads through Python, counting the bytes it gets."""

    def __init__(self, path: Path, counts: Counter) -> None:
        self._file, self._path, self._counts = open(path, "rb", buffering=0), path, counts

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self._counts[self._path.name] += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


@contextmanager
def _header_through_h5py(self: Location):
    with self.open_h5(header_only=True) as f:
        yield f.id


@pytest.fixture
def count_reads(monkeypatch):
    """Bytes read from the files of a directory, per file name, by every h5py open (headers
    too: the same metadata reads as the C-level open planning uses, routed through h5py.File)."""
    real = h5py.File
    opened: list[CountingFile] = []
    monkeypatch.setattr(Location, "h5_header", _header_through_h5py)

    def watch(data: Path) -> Counter:
        counts: Counter = Counter()

        def counting(name, mode="r", **kwargs):
            if mode == "r" and isinstance(name, (str, os.PathLike)) and Path(name).parent == data:
                opened.append(CountingFile(Path(name), counts))
                name = opened[-1]
            return real(name, mode, **kwargs)

        monkeypatch.setattr(h5py, "File", counting)
        return counts

    yield watch
    for f in opened:
        f.close()


def _sizes(data: Path) -> tuple[int, int]:
    """(bytes of the rows themselves, bytes of the files) of a dataset."""
    rows = sum(s.rows for s in scan_dataset(data))
    return rows * SAMPLE_BYTES, sum(p.stat().st_size for p in data.glob("*.h5"))


def infer(data: Path, out: Path, **kwargs) -> dict | None:
    config = RunConfig(data=data, out=out, batch_size=kwargs.pop("batch_size", 40), threads=1, progress=False, **kwargs)
    return run(SelfComm(), config)


def test_a_run_reads_every_input_byte_once(count_reads, small_dataset, tmp_path) -> None:
    rows_bytes, file_bytes = _sizes(small_dataset)
    counts = count_reads(small_dataset)
    summary = infer(small_dataset, tmp_path / "out")
    assert summary["samples"] == 300
    # Every row once; HDF5's own metadata (a few KiB a file) at most twice: the header check
    # and the read each open the file.
    assert rows_bytes <= sum(counts.values()) <= file_bytes + (file_bytes - rows_bytes)
    assert sorted(counts) == sorted(p.name for p in small_dataset.glob("*.h5"))


def test_validate_full_reads_the_rows_twice_and_a_dry_run_only_headers(count_reads, small_dataset, tmp_path) -> None:
    rows_bytes, file_bytes = _sizes(small_dataset)
    counts = count_reads(small_dataset)
    infer(small_dataset, tmp_path / "out", validate="full")
    assert sum(counts.values()) >= 2 * rows_bytes  # what --validate full costs, and says it does
    counts.clear()
    assert main(["infer", "--data", str(small_dataset), "--out", str(tmp_path / "dry"), "--dry-run", "-q"]) == 0
    assert 0 < sum(counts.values()) <= file_bytes - rows_bytes


def test_dry_run_prints_the_plan_and_writes_nothing(small_dataset, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["infer", "--data", str(small_dataset), "--out", str(out), "--dry-run", "--threads", "2", "-q"])
    assert code == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()
    assert "300 samples in 7 shard(s) to do (0 already done) on 1 rank(s) x 2 thread(s), batch 128" in text
    (row,) = [line.split() for line in text.splitlines() if line.split()[:1] == ["0"]]
    assert row[:5] == ["0", "300", "7", "0", "7"]  # rank, rows, shards, split, writes
    assert float(row[5]) > 500 and float(row[6]) > 0  # memory MB, time s
    # After a partial run, the dry run shows what is left.
    infer(small_dataset, out, limit=96)
    made = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["infer", "--data", str(small_dataset), "--out", str(out), "--dry-run", "-q"]) == 0
    assert "204 samples in 5 shard(s) to do (2 already done)" in capsys.readouterr().out
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == made


def test_planning_on_one_rank_is_the_serial_plan(tmp_path) -> None:
    data, out = planning_dataset(tmp_path)
    for limit in (None, 1, 38, 60):
        for overwrite in (False, True):
            weights = "random-seed-0/fp32"
            got = planned_job(SelfComm(), Location(data), Location(out), weights, limit, overwrite)
            assert got == serial_job(data, out, weights, limit, overwrite, 1), (limit, overwrite)


needs_mpi = requires_infra(None if MPIEXEC else "no mpiexec (pip install 'cai-hpc[mpi]')")


def mpiexec(ranks: int, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "SLURM_"))}
    return subprocess.run(
        [MPIEXEC, "-n", str(ranks), sys.executable, *command], capture_output=True, text=True, timeout=timeout, env=env
    )


@needs_mpi
def test_distributed_planning_and_mid_stream_agreement_under_mpi() -> None:
    result = mpiexec(3, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", str(PLAN_SUITE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout


@needs_mpi
def test_bad_rows_on_one_rank_end_the_mpi_job_in_one_line_and_a_rerun_resumes(small_dataset, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    # 300 rows on 4 ranks: rank 2 reads rows 150-225; shard 4 (rows 192-240) is split, its
    # row 10 (global 202) is rank 2's; ranks 0 and 1 finish their shards meanwhile.
    with h5py.File(data / "shard-00004.h5", "a") as f:
        f["images"][10, 1, 2, 3] = np.inf
    out = tmp_path / "out"
    args = ("-m", "cai_hpc", "infer", "--backend", "mpi", "-q", "--batch-size", "16")
    t0 = time.monotonic()
    result = mpiexec(4, *args, "--data", str(data), "--out", str(out))
    assert time.monotonic() - t0 < 60
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cai-hpc: error")]
    assert errors == [f"cai-hpc: error: {data / 'shard-00004.h5'}: dataset 'images' holds NaN or inf (first at row 10)"]
    assert "Traceback" not in result.stderr
    assert not (out / "summary.json").exists() and not list(out.rglob(".*"))
    written = sorted(p.name for p in (out / "predictions").iterdir())
    assert written and "shard-00004.h5" not in written
    reference = tmp_path / "reference"
    assert main(["infer", "--data", str(small_dataset), "--out", str(reference), "-q", "--batch-size", "16"]) == 0
    for name in written:  # every file there is whole and right
        with h5py.File(out / "predictions" / name) as got, h5py.File(reference / "predictions" / name) as ref:
            assert got.attrs["rows"] == ref.attrs["rows"]
            np.testing.assert_allclose(got["redshift_pred"][:], ref["redshift_pred"][:], atol=1e-5, rtol=0)
            np.testing.assert_array_equal(got["object_id"][:], ref["object_id"][:])
    shutil.copy(small_dataset / "shard-00004.h5", data / "shard-00004.h5")
    result = mpiexec(4, *args, "--data", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_shards"] == len(written)
    assert summary["metrics"] == pytest.approx(json.loads((reference / "summary.json").read_text())["metrics"])
    assert len(list((out / "predictions").glob("*.h5"))) == 7


def test_an_s3_run_fetches_each_shard_once_and_checks_headers_on_byte_ranges(small_dataset, tmp_path) -> None:
    from cai_hpc import storage

    with moto_server():
        s3 = storage._s3()
        s3.create_bucket(Bucket="once")
        for shard in sorted(small_dataset.glob("*.h5")):
            s3.upload_file(str(shard), "once", f"ds/{shard.name}")
        whole, ranged = Counter(), Counter()

        def count(params, **_) -> None:
            if params["Key"].startswith("ds/"):
                target = ranged if "Range" in params else whole
                target[params["Key"]] += 1 if target is whole else _span(params["Range"])

        s3.meta.events.register("before-parameter-build.s3.GetObject", count)
        storage.forget()
        summary = run(SelfComm(), RunConfig("s3://once/ds", "s3://once/out", batch_size=40, threads=1, progress=False))
        assert summary["samples"] == 300
        assert whole == {f"ds/{p.name}": 1 for p in small_dataset.glob("*.h5")}  # each fetched once
        assert sum(ranged.values()) < 0.15 * _sizes(small_dataset)[1]  # headers: byte ranges, not the data
        assert not storage._fetched  # and no shard kept in memory after it was read


def _span(header: str) -> int:
    first, last = header.removeprefix("bytes=").split("-")
    return int(last) - int(first) + 1
