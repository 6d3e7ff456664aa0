"""``cai-hpc bench compare``: the same shards through a laptop, HPC and cloud run, side by side.

Every run is a real command in a fresh process: ``cai-hpc infer`` (laptop: one rank),
``mpiexec -n R ... infer --backend mpi`` (HPC) and ``cai-hpc cloud run --local -n R`` (cloud:
Lambda ranks emulated on this machine). Ranks x threads never exceed the cores, and every
run uses the same batch size, so the rows differ only in where the ranks run and how they
talk. Three sweeps: throughput against ranks (whole dataset), time against data size (the
first shards of the dataset, at the most ranks), and the reference's batch-size sweep on
one rank. Every run loads the same checkpoint (seeded random weights, written once), as a
real job would, rather than initialising a model. Each run's ``summary.json`` gives the row;
the command's own wall time is kept too (for the cloud it includes starting the emulated
services and uploading the shards and the checkpoint).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from cai_hpc.checkpoint import build_model, save_weights
from cai_hpc.resources import usable_cores
from cai_hpc.shards import list_shards

BATCH_SWEEP = (32, 64, 128, 256, 512, 1024)


@dataclass
class Row:
    sweep: str
    backend: str  # laptop | hpc | cloud
    ranks: int
    threads: int
    batch: int
    shards: int
    samples: int
    wall_s: float  # the job's wall time (summary.json), start barrier to summary
    samples_per_s: float
    startup_s: float
    comm_s: float
    command_s: float  # the whole command, process start to exit


def compare(data: Path, to: Path, batch: int, max_ranks: int | None = None, progress: bool = True) -> list[Row]:
    """Run the three sweeps; write ``runs.csv``, ``runs.json`` and the plots into ``to``."""
    shards = list_shards(data)
    cores = usable_cores()
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    backends = ["laptop", "hpc", "cloud"] if mpiexec else ["laptop", "cloud"]
    plan = plan_runs(len(shards), cores, max_ranks, batch, backends)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cai-hpc-compare-") as tmp:
        work = Path(tmp)
        checkpoint = work / "model.safetensors"
        save_weights(build_model(None, seed=0)[0], checkpoint)
        for i, (sweep, backend, ranks, count, b) in enumerate(plan, 1):
            subset = _subset(shards, count, work)
            row = _run(sweep, backend, ranks, cores // ranks, b, subset, checkpoint, work / f"out-{i}", mpiexec)
            rows.append(row)
            if progress:
                print(
                    f"[{i}/{len(plan)}] {backend} {ranks}x{row.threads} batch {b}, {row.samples} samples: "
                    f"{row.samples_per_s:.0f} samples/s, command {row.command_s:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    _write(rows, to)
    return rows


def plan_runs(
    shards: int, cores: int, max_ranks: int | None, batch: int, backends: list[str]
) -> list[tuple[str, str, int, int, int]]:
    """(sweep, backend, ranks, shards used, batch size) of every run: throughput against
    ranks (powers of two up to the cores, whole dataset), time against data size (a quarter,
    a half and all of the shards, at the most ranks) and the batch-size sweep on one rank."""
    top = max(1, min(max_ranks or cores, cores, shards))
    rank_counts = sorted({2**k for k in range(top.bit_length()) if 2**k <= top} | {top})
    sizes = sorted({max(top, shards // 4), max(top, shards // 2), shards})
    runs = []
    for backend in backends:
        most = 1 if backend == "laptop" else top
        runs += [("ranks", backend, r, shards, batch) for r in ([1] if backend == "laptop" else rank_counts)]
        runs += [("size", backend, most, size, batch) for size in sizes[:-1]]
    return runs + [("batch", "laptop", 1, shards, b) for b in BATCH_SWEEP if b != batch]


def _subset(shards: list, count: int, work: Path) -> Path:
    """A dataset of the first ``count`` shards (links, no copies)."""
    where = work / f"data-{count}"
    if not where.exists():
        where.mkdir()
        for shard in shards[:count]:
            (where / shard.name).symlink_to(Path(shard).resolve())
    return where


def _run(
    sweep: str,
    backend: str,
    ranks: int,
    threads: int,
    batch: int,
    data: Path,
    checkpoint: Path,
    out: Path,
    mpiexec: str | None,
) -> Row:
    common = ["--data", str(data), "--out", str(out), "--batch-size", str(batch), "--threads", str(threads), "-q"]
    me = [sys.executable, "-m", "cai_hpc"]
    infer = ["infer", "--checkpoint", str(checkpoint), *common]
    if backend == "laptop":
        command = [*me, *infer, "--backend", "self"]
    elif backend == "hpc":
        command = [mpiexec or "mpiexec", "-n", str(ranks), *me, *infer, "--backend", "mpi"]
    else:
        command = [*me, "cloud", "run", "--local", "-n", str(ranks), "--model", str(checkpoint), *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    returncode, stderr = _run_group(command, env, timeout_s=1800)
    command_s = time.perf_counter() - t0
    if returncode != 0:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{backend} with {ranks} rank(s) failed: {last}")
    summary = json.loads((out / "summary.json").read_text())
    timing = summary["timing"]
    return Row(
        sweep=sweep,
        backend=backend,
        ranks=ranks,
        threads=summary["threads_per_rank"],
        batch=batch,
        shards=summary["shards"],
        samples=summary["samples"],
        wall_s=round(timing["wall_s"], 3),
        samples_per_s=round(summary["throughput"]["samples_per_s"], 1),
        startup_s=round(timing["startup_s"], 3),
        comm_s=round(timing["comm_s"], 3),
        command_s=round(command_s, 3),
    )


def _run_group(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run a command in its own process group; if it overruns, or this process is stopped,
    the whole group goes (mpiexec's ranks, the emulated functions), not only its leader."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)  # lets cloud run --local stop its servers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return proc.returncode, stderr


def _write(rows: list[Row], to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    with (to / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    machine = {
        "cpu": _cpu_model(),
        "cores": usable_cores(),
        "arch": os.uname().machine,
        "python": sys.version.split()[0],
        "torch": version("torch"),
    }
    (to / "runs.json").write_text(json.dumps({"machine": machine, "runs": [asdict(r) for r in rows]}, indent=2))
    _plot(rows, to)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else "unknown"


def _plot(rows: list[Row], to: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r.backend for r in rows}, key=["laptop", "hpc", "cloud"].index)
    fig, (ranks_ax, size_ax, batch_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for backend in backends:
        mine = [r for r in rows if r.backend == backend]
        by_ranks = sorted((r for r in mine if r.sweep == "ranks"), key=lambda r: r.ranks)
        ranks_ax.plot([r.ranks for r in by_ranks], [r.samples_per_s for r in by_ranks], "o-", label=backend)
        top = max(r.ranks for r in by_ranks)
        by_size = sorted(
            (r for r in mine if r.sweep == "size" or (r.sweep == "ranks" and r.ranks == top)), key=lambda r: r.samples
        )
        label = f"{backend} ({top} rank{'s' if top > 1 else ''})"
        size_ax.plot([r.samples for r in by_size], [r.wall_s for r in by_size], "o-", label=label)
    sweep = sorted((r for r in rows if r.backend == "laptop" and r.ranks == 1 and r.sweep in ("batch", "ranks")),
                   key=lambda r: r.batch)  # fmt: skip
    batch_ax.plot([r.batch for r in sweep], [r.samples_per_s for r in sweep], "o-", label="laptop (1 rank)")
    batch_ax.set_xscale("log", base=2)
    for ax, title, xlabel, ylabel in (
        (ranks_ax, "throughput vs ranks", "ranks (ranks x threads = cores)", "samples/s (job wall)"),
        (size_ax, "time vs data size", "samples", "job wall time (s)"),
        (batch_ax, "batch-size sweep", "batch size", "samples/s (job wall)"),
    ):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(to / "compare.png", dpi=110)
    plt.close(fig)


def format_rows(rows: list[Row]) -> str:
    head = "sweep   backend  ranks x thr  batch  samples  wall s  samples/s  startup s  comm s  command s"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.sweep:7s} {r.backend:7s} {r.ranks:5d} x {r.threads:<3d} {r.batch:6d} {r.samples:8d} "
            f"{r.wall_s:7.2f} {r.samples_per_s:10.1f} {r.startup_s:10.2f} {r.comm_s:7.3f} {r.command_s:10.1f}"
        )
    return "\n".join(lines)
