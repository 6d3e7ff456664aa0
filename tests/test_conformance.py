"""lambda_shim against mpi4py: the conformance suite (tests/programs/conformance) runs under
mpiexec and under ``python -m lambda_shim.launch`` with the same arguments, at 3, 4 and 5 ranks
and in every connection mode; every call's result, status and exception class must be the
same on every rank. A failure lists every differing key at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MPIEXEC, requires_infra

SUITE = Path(__file__).with_name("programs") / "conformance" / "suite.py"
SIZES = (3, 4, 5)
MODES = ("auto", "punch", "direct", "relay")
RUN_TIMEOUT_S = 300  # one whole run of the suite; a hang ends the run, what came before is compared
OP_TIMEOUT_S = "60"  # the shim's bound on one blocking call, so a call that never completes is recorded

pytestmark = requires_infra(None if MPIEXEC else "no mpiexec (pip install 'cai-hpc[mpi]')")


def clean_env() -> dict[str, str]:
    drop = ("PMI_", "MPI_LOCAL", "SLURM_", "CAI_HPC_", "RANK", "WORLD_SIZE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run_bounded(command: list[str], env: dict[str, str]) -> tuple[int | None, str]:
    """(exit code, or None if it ran out of time; the tail of its output). The command runs in
    a session of its own, so on a timeout every process it started is killed with it."""
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
            return proc.returncode, out[-4000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return None, out[-4000:]


def read_records(out: Path, size: int) -> dict[int, dict[str, str]]:
    """Each rank's ``key -> repr(value)``; ``END`` is there only if the rank finished the suite."""
    records = {}
    for rank in range(size):
        path = out / f"rank{rank}.txt"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        records[rank] = dict(line.split("\t", 1) if "\t" in line else (line, "") for line in lines)
    return records


def differences(reference: dict[int, dict[str, str]], records: dict[int, dict[str, str]]) -> list[str]:
    missing = "<not recorded>"
    lines = []
    for rank, expected in reference.items():
        got = records.get(rank, {})
        for key in [*expected, *(k for k in got if k not in expected)]:
            want, have = expected.get(key, missing), got.get(key, missing)
            if want != have:
                lines.append(f"rank {rank} {key}:\n    mpi4py      {want[:400]}\n    lambda_shim {have[:400]}")
    return lines


@pytest.fixture(scope="module")
def mpi_records(tmp_path_factory) -> dict[int, dict[int, dict[str, str]]]:
    """The suite under mpiexec, once per size: the reference."""
    results = {}
    for size in SIZES:
        out = tmp_path_factory.mktemp(f"conformance-mpi-{size}")
        code, tail = run_bounded([MPIEXEC, "-n", str(size), sys.executable, str(SUITE), "mpi", str(out)], clean_env())
        assert code == 0, f"the suite failed under mpiexec -n {size}: {tail}"
        results[size] = read_records(out, size)
    return results


@pytest.mark.parametrize("size", SIZES)
def test_suite_runs_cleanly_on_mpi4py(size, mpi_records) -> None:
    """The suite is sound: under mpi4py every rank finishes, every call outside the ``errors``
    section succeeds, and every bad call of that section raises on some rank."""
    records = mpi_records[size]
    assert all("END" in record for record in records.values())
    unexpected = [
        f"rank {rank} {key}: {value}"
        for rank, record in records.items()
        for key, value in record.items()
        if value.startswith("('raised'") and not key.startswith("errors.")
    ]
    assert not unexpected, "\n".join(unexpected)
    checks = {"errors.section_dup", "errors.section_barrier", "errors.section_free", "errors.nothing_pending"}
    bad_calls = [key for key in records[0] if key.startswith("errors.") and key not in checks]
    silent = [key for key in bad_calls if not any("'raised'" in r[key] for r in records.values())]
    assert len(bad_calls) > 40 and not silent, silent
    assert all(r["errors.nothing_pending"] == "False" for r in records.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_lambda_shim_gives_what_mpi4py_gives(size, mode, mpi_records, tmp_path) -> None:
    env = clean_env() | {"CAI_HPC_OP_TIMEOUT": OP_TIMEOUT_S}
    launch = [sys.executable, "-m", "lambda_shim.launch", "-n", str(size), "--mode", mode, "--"]
    code, tail = run_bounded([*launch, sys.executable, str(SUITE), "tcp", str(tmp_path)], env)
    diffs = differences(mpi_records[size], read_records(tmp_path, size))
    ended = "ran out of time" if code is None else f"exit code {code}"
    if diffs or code != 0:
        pytest.fail(
            f"{len(diffs)} differences from mpi4py at {size} ranks, mode {mode} ({ended}):\n"
            + "\n".join(diffs)
            + f"\n--- output of the run (tail) ---\n{tail}",
            pytrace=False,
        )
