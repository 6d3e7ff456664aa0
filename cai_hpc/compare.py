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

``--repeats N`` runs the whole plan N times, one pass after another (interleaved, so a change
in the machine's load falls on every row alike); the plots show each row's median with its
minimum and maximum as bars. A projection panel extrapolates from the measured per-rank rates
and cold starts to a laptop, N HPC nodes and N Lambda functions over data sizes up to beyond
the published reference points, with the cost of each.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from cai_hpc.checkpoint import build_model, save_weights
from cai_hpc.records import BITS_PER_SAMPLE
from cai_hpc.resources import usable_cores
from cai_hpc.shards import list_shards

BATCH_SWEEP = (32, 64, 128, 256, 512, 1024)
BYTES_PER_SAMPLE = BITS_PER_SAMPLE // 8
# Published reference: 12.6 GB of SDSS cut-outs (AstroMAE, the paper the project started from).
REFERENCE_GB = 12.6
REFERENCE_POINTS = (("Lambda, 517 functions", 28.0), ("HPC GPU", 141.0), ("HPC CPUs", 1793.0), ("laptop", 6283.0))
NODE_HOUR_USD = 2.0  # assumed price of one HPC node-hour (cloud on-demand order of magnitude)
FUNCTION_MEMORY_MB = 4096  # the Lambda size the projection bills


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
    repeat: int = 0  # which pass of --repeats made this row


def median_rows(rows: list[Row]) -> list[tuple[Row, dict[str, tuple[float, float]]]]:
    """One row per distinct run (the first pass's, with the medians of its repeats), and the
    (min, max) over the repeats of every timed field."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.sweep, r.backend, r.ranks, r.threads, r.batch, r.shards), []).append(r)
    merged = []
    for same in groups.values():
        spread = {}
        values = asdict(same[0])
        for key in ("wall_s", "samples_per_s", "startup_s", "comm_s", "command_s"):
            got = [getattr(r, key) for r in same]
            values[key] = float(statistics.median(got))
            spread[key] = (min(got), max(got))
        merged.append((Row(**values), spread))
    return merged


def compare(
    data: Path,
    to: Path,
    batch: int,
    max_ranks: int | None = None,
    progress: bool = True,
    repeats: int = 3,
    nodes: int = 8,
    functions: int = 517,
) -> list[Row]:
    """Run the three sweeps ``repeats`` times, interleaved; write ``runs.csv``, ``runs.json``
    and the plots (with the projection to ``nodes`` HPC nodes and ``functions`` Lambda
    functions) into ``to``."""
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
        for repeat, i in interleaved(len(plan), repeats):
            sweep, backend, ranks, count, b = plan[i]
            subset = _subset(shards, count, work)
            out = work / f"out-{repeat}-{i}"
            row = _run(sweep, backend, ranks, cores // ranks, b, subset, checkpoint, out, mpiexec)
            row.repeat = repeat
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
            if progress:
                print(
                    f"[{len(rows)}/{len(plan) * repeats}] {backend} {ranks}x{row.threads} batch {b}, "
                    f"{row.samples} samples: {row.samples_per_s:.0f} samples/s, command {row.command_s:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    _write(rows, to, nodes, functions)
    return rows


def interleaved(runs: int, repeats: int) -> list[tuple[int, int]]:
    """(repeat, run) in the order they are made: every run once per pass, pass after pass."""
    return [(repeat, i) for repeat in range(repeats) for i in range(runs)]


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


def _write(rows: list[Row], to: Path, nodes: int = 8, functions: int = 517) -> None:
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
    record = {"machine": machine, "runs": [asdict(r) for r in rows]}
    curves = projection(rows, nodes, functions)
    record["projection"] = {
        k: {"rate": v["rate"], "cold_s": v["cold_s"], "label": v["label"]} for k, v in curves.items()
    }
    (to / "runs.json").write_text(json.dumps(record, indent=2))
    _plot(rows, to, curves)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else "unknown"


def projection(rows: list[Row], nodes: int, functions: int) -> dict[str, dict]:
    """Per setup: the measured rate of one unit (samples/s of the laptop, of this machine as one
    HPC node, of one emulated Lambda rank) and cold start (median ``startup_s``), the units,
    and what the setup costs per second; ``time(S) = cold_s + S / (units * rate)``."""
    from lambda_shim.aws.cost import PRICES

    best = {}
    for row, _ in median_rows(rows):
        if row.sweep == "ranks" and (row.backend not in best or row.ranks > best[row.backend].ranks):
            best[row.backend] = row
    setups = {
        "laptop": ("laptop", 1, 0.0),
        "hpc": (f"HPC, {nodes} nodes like this machine", nodes, nodes * NODE_HOUR_USD / 3600),
        "cloud": (
            f"Lambda, {functions} functions of {FUNCTION_MEMORY_MB} MB",
            functions,
            functions * FUNCTION_MEMORY_MB / 1024 * PRICES["lambda_gb_s"],
        ),
    }
    curves = {}
    for backend, (label, units, usd_per_s) in setups.items():
        if backend in best:
            row = best[backend]
            rate = row.samples_per_s / (row.ranks if backend == "cloud" else 1)
            curves[backend] = {"label": label, "rate": rate, "cold_s": row.startup_s, "units": units}
            curves[backend]["usd_per_s"] = usd_per_s
    return curves


def projected_seconds(curve: dict, gigabytes: np.ndarray) -> np.ndarray:
    samples = gigabytes * 1e9 / BYTES_PER_SAMPLE
    return curve["cold_s"] + samples / (curve["units"] * curve["rate"])


def _plot(rows: list[Row], to: Path, curves: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = median_rows(rows)
    backends = sorted({r.backend for r, _ in merged}, key=["laptop", "hpc", "cloud"].index)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.6))
    (ranks_ax, size_ax, batch_ax), (time_ax, cost_ax, note_ax) = axes

    def draw(ax: Any, points: list[tuple[Row, dict]], x: str, y: str, label: str) -> None:
        points = sorted(points, key=lambda p: getattr(p[0], x))
        mid = [getattr(r, y) for r, _ in points]
        low = [m - spread[y][0] for (_, spread), m in zip(points, mid, strict=True)]
        high = [spread[y][1] - m for (_, spread), m in zip(points, mid, strict=True)]
        ax.errorbar([getattr(r, x) for r, _ in points], mid, yerr=[low, high], fmt="o-", capsize=3, label=label)

    for backend in backends:
        mine = [(r, sp) for r, sp in merged if r.backend == backend]
        by_ranks = [(r, sp) for r, sp in mine if r.sweep == "ranks"]
        draw(ranks_ax, by_ranks, "ranks", "samples_per_s", backend)
        top = max(r.ranks for r, _ in by_ranks)
        by_size = [(r, sp) for r, sp in mine if r.sweep == "size" or (r.sweep == "ranks" and r.ranks == top)]
        draw(size_ax, by_size, "samples", "wall_s", f"{backend} ({top} rank{'s' if top > 1 else ''})")
    sweep = [(r, sp) for r, sp in merged if r.backend == "laptop" and r.ranks == 1 and r.sweep in ("batch", "ranks")]
    draw(batch_ax, sweep, "batch", "samples_per_s", "laptop (1 rank)")
    batch_ax.set_xscale("log", base=2)
    repeats = len({r.repeat for r in rows})
    for ax, title, xlabel, ylabel in (
        (ranks_ax, "throughput vs ranks", "ranks (ranks x threads = cores)", "samples/s (job wall)"),
        (size_ax, "time vs data size", "samples", "job wall time (s)"),
        (batch_ax, "batch-size sweep", "batch size", "samples/s (job wall)"),
    ):
        ax.set_title(f"{title} (median of {repeats}, min-max bars)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()

    gigabytes = np.logspace(-2, 2, 60)
    for curve in curves.values():
        seconds = projected_seconds(curve, gigabytes)
        time_ax.plot(gigabytes, seconds, "--", label=f"{curve['label']} (projection)")
        if curve["usd_per_s"] > 0:
            cost_ax.plot(gigabytes, seconds * curve["usd_per_s"], "--", label=f"{curve['label']} (projection)")
    for label, seconds in REFERENCE_POINTS:
        time_ax.plot([REFERENCE_GB], [seconds], "k*", ms=9)
        time_ax.annotate(f"published: {label}, {seconds:,.0f} s", (REFERENCE_GB, seconds), fontsize=7,
                         xytext=(-150, 2), textcoords="offset points")  # fmt: skip
    for ax, title, ylabel in (
        (time_ax, "PROJECTION: time vs data size", "seconds"),
        (cost_ax, f"PROJECTION: cost vs data size (laptop free; node-hour {NODE_HOUR_USD:g} USD assumed)", "USD"),
    ):
        ax.set(xscale="log", yscale="log", xlabel=f"data size (GB, {BYTES_PER_SAMPLE:,} bytes per sample)")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:  # no cost line when only the laptop (free) ran
            ax.legend(fontsize=7, loc="lower right")
    note_ax.axis("off")
    lines = ["Projection from this machine's medians:", "time = cold start + samples / (units x rate)", ""]
    lines += [f"{c['label']}: {c['rate']:.0f} samples/s per unit, cold {c['cold_s']:.1f} s" for c in curves.values()]
    lines += ["", "Stars: published reference runs on 12.6 GB.", "Lambda units: one emulated rank each."]
    note_ax.text(0, 1, "\n".join(lines), va="top", fontsize=8, family="monospace")
    fig.tight_layout()
    fig.savefig(to / "compare.png", dpi=110)
    plt.close(fig)


def format_rows(rows: list[Row]) -> str:
    head = "sweep   backend  ranks x thr  batch  samples  wall s  samples/s  startup s  comm s  command s  repeat"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.sweep:7s} {r.backend:7s} {r.ranks:5d} x {r.threads:<3d} {r.batch:6d} {r.samples:8d} "
            f"{r.wall_s:7.2f} {r.samples_per_s:10.1f} {r.startup_s:10.2f} {r.comm_s:7.3f} {r.command_s:10.1f} "
            f"{r.repeat:7d}"
        )
    return "\n".join(lines)
