"""``slurm/infer.sbatch`` submitted to a real Slurm (the one-node cluster .ci/run starts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_hpc.comm import SelfComm
from cai_hpc.engine import RunConfig, run
from tests.conftest import requires_infra

REPO = Path(__file__).resolve().parents[1]
NODE = socket.gethostname().split(".")[0]  # the local cluster's one node


def _slurm_is_up() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on this machine (apt-get install slurmd slurmctld slurm-client munge)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"no Slurm controller answers (start one: slurm/local-cluster.sh start): {probe.stderr.strip()}"
    return None


pytestmark = requires_infra(_slurm_is_up())


# The scripts' settings, from the test only: a developer's or CI's own must not leak in.
SCRIPT_SETTINGS = (
    "SCRATCH",
    "CAI_HPC_DIR",
    "DATA",
    "OUT",
    "CHECKPOINT",
    "BATCH_SIZE",
    "SRUN_MPI",
    "MODULES",
    "EXTRA_ARGS",
)


def environment(**env: str) -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI_", "MPI_LOCAL", "SLURM_JOB")) and k not in SCRIPT_SETTINGS
    }
    return keep | {"VENV": sys.prefix, **env}


def submit(tmp_path: Path, *what: str, **env: str) -> subprocess.CompletedProcess:
    """``sbatch --wait`` two one-CPU tasks running ``what`` (a script, or --wrap=...)."""
    return subprocess.run(
        [
            "sbatch",
            "--wait",
            "--ntasks=2",
            "--cpus-per-task=1",
            f"--chdir={tmp_path}",
            f"--output={tmp_path}/job.out",
            *what,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(**env),
    )


def infer_sbatch(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return submit(tmp_path, str(REPO / "slurm" / "infer.sbatch"), BATCH_SIZE="40", **env)


def job_log(tmp_path: Path) -> str:
    return (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""


@pytest.fixture(scope="module")
def one_process(small_dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one") / "out"
    return run(SelfComm(), RunConfig(small_dataset, out, batch_size=40, threads=1, progress=False))["metrics"]


def assert_same_metrics(summary: dict, reference: dict) -> None:
    for key, value in reference.items():
        assert summary["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_infer_sbatch_runs_two_ranks_on_scratch_and_a_resubmission_resumes(small_dataset, one_process, tmp_path):
    scratch = tmp_path / "scratch"
    result = infer_sbatch(tmp_path, DATA=str(small_dataset), SCRATCH=str(scratch))
    assert result.returncode == 0, result.stderr + job_log(tmp_path)
    # Named for the data, not the job: the same submission finds the same directory.
    out = scratch / "cai-hpc" / f"infer-{small_dataset.name}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "mpi" and summary["world_size"] == 2
    assert summary["threads_per_rank"] == 1 and summary["skipped_shards"] == 0
    job = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    assert summary["slurm"]["job_id"] == job and summary["slurm"]["nodelist"] == NODE
    assert_same_metrics(summary, one_process)

    again = infer_sbatch(tmp_path, DATA=str(small_dataset), SCRATCH=str(scratch))
    assert again.returncode == 0, again.stderr + job_log(tmp_path)
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["skipped_shards"] == summary["shards"] == 7
    assert resumed["slurm"]["job_id"] != job
    assert_same_metrics(resumed, one_process)


def test_without_data_the_sample_is_made_on_scratch_not_in_the_checkout(tmp_path) -> None:
    checkout_sample = REPO / "data" / "sample"
    before = sorted(checkout_sample.iterdir()) if checkout_sample.exists() else None
    result = infer_sbatch(tmp_path, SCRATCH=str(tmp_path / "scratch"), EXTRA_ARGS="--limit 40 -q")
    assert result.returncode == 0, result.stderr + job_log(tmp_path)
    work = tmp_path / "scratch" / "cai-hpc"
    summary = json.loads((work / "infer-sample" / "summary.json").read_text())
    assert summary["samples"] == 40 and summary["data"] == str(work / "sample")
    assert list((work / "sample").glob("*.h5"))
    assert (sorted(checkout_sample.iterdir()) if checkout_sample.exists() else None) == before
    assert not list(work.glob("sample.tmp-*"))


def test_mpiexec_inside_an_allocation_runs_its_own_world(small_dataset, one_process, tmp_path) -> None:
    # Hydra starts its proxy through srun: the ranks see a one-task Slurm step and a PMI world of 2.
    mpiexec = Path(sys.executable).with_name("mpiexec")
    infer = f"infer --backend mpi -q --data {small_dataset} --out {tmp_path / 'out'} --batch-size 40 --threads 1"
    result = submit(tmp_path, f"--wrap={mpiexec} -n 2 {sys.executable} -m cai_hpc {infer}")
    assert result.returncode == 0, result.stderr + job_log(tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["backend"] == "mpi" and summary["world_size"] == 2
    job = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    # The ranks belong to step 0, the one srun step that Hydra started.
    assert summary["slurm"] == {"job_id": job, "step_id": "0", "nodelist": NODE, "restart_count": "0"}
    assert_same_metrics(summary, one_process)


def test_ranks_that_cannot_see_each_other_are_refused(small_dataset, tmp_path) -> None:
    # srun --mpi=none gives MPICH no PMI: every task would be a lone rank 0 doing the whole job.
    result = infer_sbatch(tmp_path, DATA=str(small_dataset), OUT=str(tmp_path / "out"), SRUN_MPI="none")
    assert result.returncode != 0
    log = job_log(tmp_path)
    assert "the launcher started 2 tasks but MPI sees a world of 1: srun gave the tasks no MPI" in log
    assert not (tmp_path / "out").exists()


def job_state(job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    return re.search(r"JobState=(\S+)", shown.stdout).group(1)


def task_pids(job: str, task: int) -> list[int]:
    """The processes of task ``task`` of ``job``'s steps (not the batch script's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            cmdline = (proc / "cmdline").read_text()
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(task) and "cai_hpc" in cmdline:
            if "SLURM_STEP_ID" in env:
                pids.append(int(proc.name))
    return pids


def test_a_rank_killed_by_a_signal_ends_the_step(small_dataset, tmp_path) -> None:
    # As the OOM killer would: rank 1 gets SIGKILL while rank 0 runs on and then waits for it.
    # The job's own time limit (2 min) only bounds the test; the step must end well before.
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks=2",
            "--cpus-per-task=1",
            "--time=2",
            f"--chdir={tmp_path}",
            f"--output={tmp_path}/job.out",
            str(REPO / "slurm" / "infer.sbatch"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(DATA=str(small_dataset), OUT=str(tmp_path / "out"), BATCH_SIZE="8"),
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 120
        while not (victims := task_pids(job, 1)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert victims, "rank 1 never started: " + job_log(tmp_path)
        time.sleep(2)  # into the run, rank 0 past its start
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while job_state(job) in ("PENDING", "RUNNING", "COMPLETING") and time.monotonic() - killed < 60:
            time.sleep(0.5)
        ended_after = time.monotonic() - killed
        state = job_state(job)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    assert ended_after < 30, f"the step outlived its killed rank by {ended_after:.0f} s: " + job_log(tmp_path)
    assert state == "FAILED"
    assert not (tmp_path / "out" / "summary.json").exists()


def test_scaling_sbatch_prints_speedup_and_efficiency_over_repetitions(small_dataset, tmp_path) -> None:
    out = tmp_path / "study"
    result = submit(
        tmp_path,
        str(REPO / "slurm" / "scaling.sbatch"),
        DATA=str(small_dataset),
        OUT=str(out),
        BATCH_SIZE="32",
        EXTRA_ARGS="--limit 64",
    )
    log = job_log(tmp_path)
    assert result.returncode == 0, result.stderr + log
    header = "ranks cores reps startup_s run_s run_min run_max samples/s speedup efficiency step_s"
    lines = [line.split() for line in log.splitlines()]
    at = lines.index(header.split())
    one, two = (dict(zip(header.split(), map(float, row), strict=True)) for row in lines[at + 1 : at + 3])
    assert (one["ranks"], one["reps"], one["speedup"], one["efficiency"]) == (1, 3, 1.0, 1.0)
    assert (two["ranks"], two["cores"], two["reps"]) == (2, 2, 3)
    # The figures are those of the recorded runs: medians of the runs' wall time less startup.
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert sorted((int(r), int(p)) for r, p, _, _ in steps) == [(r, p) for r in (1, 2) for p in (1, 2, 3)]

    def run_s(ranks: int) -> float:
        times = []
        for r, p, start, end in steps:
            if int(r) == ranks:
                summary = json.loads((out / f"ranks-{r}" / f"rep-{p}" / "summary.json").read_text())
                assert summary["world_size"] == ranks and summary["samples"] == 64
                wall = summary["timing"]["wall_s"]
                times.append(max(wall - r["startup_s"] + r["startup_split"]["imports_s"] for r in summary["ranks"]))
                assert float(end) - float(start) > summary["timing"]["startup_s"] + times[-1]
        return statistics.median(times)

    assert two["run_s"] == pytest.approx(run_s(2), abs=0.006)
    assert two["speedup"] == pytest.approx(run_s(1) / run_s(2), abs=0.006)
    assert two["efficiency"] == pytest.approx(run_s(1) / run_s(2) / 2, abs=0.006)
    assert sorted(p.name for p in (out / "warmup").iterdir()) == ["ranks-1", "ranks-2"]
