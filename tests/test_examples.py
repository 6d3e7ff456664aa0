"""Programs written for mpi4py (tests/programs/examples) run unchanged under mpiexec and, with
only ``from mpi4py import MPI`` changed to ``from lambda_shim import MPI``, under
``python -m lambda_shim.launch``: every rank prints the same lines in the same order."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MPIEXEC, requires_infra

EXAMPLES = Path(__file__).with_name("programs") / "examples"
PROGRAMS = ("ring.py", "prefix_sum.py", "matvec.py")
MPI4PY_IMPORT = "from mpi4py import MPI\n"
SHIM_IMPORT = "from lambda_shim import MPI\n"
RUN_TIMEOUT_S = 120

pytestmark = requires_infra(None if MPIEXEC else "no mpiexec (pip install 'cai-hpc[mpi]')")


def clean_env() -> dict[str, str]:
    drop = ("PMI_", "MPI_LOCAL", "SLURM_", "CAI_HPC_", "RANK", "WORLD_SIZE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run(command: list[str]) -> subprocess.CompletedProcess:
    """The command in a session of its own: on a timeout every process it started is killed."""
    with subprocess.Popen(
        command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n[killed after {RUN_TIMEOUT_S} s]"
        return subprocess.CompletedProcess(command, proc.returncode, out, err)


def mpiexec_output(program: Path, ranks: int, tmp: Path) -> list[list[str]]:
    """Each rank's lines under mpiexec (one file per rank, so lines of different ranks cannot mix)."""
    pattern = tmp / "out.%r"
    result = run([MPIEXEC, "-outfile-pattern", str(pattern), "-n", str(ranks), sys.executable, str(program)])
    assert result.returncode == 0, result.stderr
    return [(tmp / f"out.{rank}").read_text().splitlines() for rank in range(ranks)]


def launch_output(program: Path, ranks: int) -> list[list[str]]:
    """Each rank's lines under lambda_shim.launch (which prefixes each line with ``[rank] ``)."""
    launch = [sys.executable, "-m", "lambda_shim.launch", "-n", str(ranks), "--"]
    result = run([*launch, sys.executable, str(program)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines: list[list[str]] = [[] for _ in range(ranks)]
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"\[(\d+)\] (.*)", line)
        assert match, f"a line without a rank: {line!r}"
        lines[int(match[1])].append(match[2])
    return lines


@pytest.mark.parametrize("ranks", [3, 4])
@pytest.mark.parametrize("name", PROGRAMS)
def test_mpi4py_program_runs_unchanged_on_lambda_shim(name, ranks, tmp_path) -> None:
    program = EXAMPLES / name
    source = program.read_text()
    assert source.count(MPI4PY_IMPORT) == 1 and "lambda_shim" not in source
    shimmed = tmp_path / name
    shimmed.write_text(source.replace(MPI4PY_IMPORT, SHIM_IMPORT))

    expected = mpiexec_output(program, ranks, tmp_path)
    assert all(expected), "every rank prints under mpiexec"
    assert launch_output(shimmed, ranks) == expected
