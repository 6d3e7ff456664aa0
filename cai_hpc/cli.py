"""The ``cai-hpc`` command line. ``python -m cai_hpc`` alone runs ``infer`` on a small
synthetic sample, made once and cached under ``data/``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from cai_hpc.errors import InputError
from cai_hpc.resources import DEFAULT_BATCH_SIZE

COMMANDS = (
    "infer",
    "synth",
    "convert",
    "convert-checkpoint",
    "plot",
    "bench",
    "build-kernels",
    "cloud",
    "catalog",
    "pca",
)
SAMPLE_SAMPLES = 2048
SAMPLE_SHARD_MB = 10.0
log = logging.getLogger("cai_hpc")
ABORT_GRACE_S = 0.5


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv.insert(0, "infer")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO,
        format="cai-hpc: %(message)s",
    )
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug", "s3transfer"):  # -v is about cai-hpc
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command in ("infer", "pca"):
        return run_collective(args)
    # Commands that start processes of their own unwind on SIGTERM, so they can stop them.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"cai-hpc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one line for the user; -v shows the traceback
        if args.verbose:
            traceback.print_exc()
        print(f"cai-hpc: error: {_unexpected(exc)}", file=sys.stderr)
        return 1


def _unexpected(exc: Exception) -> str:
    """An unforeseen error as one line: its type and the first line of its message (some,
    such as torch.compile's, run to many lines of hints; -v prints everything)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_collective(args: argparse.Namespace) -> int:
    """Run a job of every rank (``args.collective``: infer, pca) on this process's
    communicator, owning what happens on failure.

    An error every rank agreed on is reported once and all ranks exit with its code; any
    other error is reported by the rank that hit it, which then aborts the whole job so no
    rank is left waiting in a collective.
    """
    from cai_hpc.comm import get_comm

    try:
        comm = get_comm(args.backend)
    except InputError as exc:
        print(f"cai-hpc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a communicator that cannot wire up: one line
        print(f"cai-hpc: error: {_unexpected(exc)}", file=sys.stderr)
        return 1
    rank, size = comm.Get_rank(), comm.Get_size()
    where = f"rank {rank}: " if size > 1 else ""
    try:
        summary = args.collective(comm, args)
    except InputError as exc:
        if exc.agreed and rank != 0:
            return exc.exit_code
        print(f"cai-hpc: error: {'' if exc.agreed else where}{exc}", file=sys.stderr, flush=True)
        code, abort = exc.exit_code, not exc.agreed
    except Exception as exc:  # noqa: BLE001 - this is the one place that ends the job
        if args.verbose:
            traceback.print_exc()
        print(f"cai-hpc: error: {where}{_unexpected(exc)}", file=sys.stderr, flush=True)
        code, abort = 1, True
    else:
        if summary is not None:
            args.report(summary, args.out)
        return 0
    if abort and size > 1:
        # mpiexec forwards a rank's stderr on its own time and stops when the job is aborted:
        # a moment first, so that the line above reaches the user (CI once saw it lost).
        time.sleep(ABORT_GRACE_S)
        comm.Abort(code)
    return code


def _infer(comm: Any, args: argparse.Namespace) -> dict | None:
    from cai_hpc.engine import RunConfig, dry_run, run

    data = args.data or _sample_dataset(comm)
    config = RunConfig(
        data=data,
        out=args.out,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        threads=args.threads,
        limit=args.limit,
        overwrite=args.overwrite,
        device=args.device,
        precision=args.precision,
        compare_fp32=args.compare_fp32,
        compile=args.compile,
        seed=args.seed,
        progress=not args.quiet,
        validate=args.validate,
        embeddings=args.embeddings,
    )
    if args.dry_run:
        text = dry_run(comm, config)
        if text is not None:
            print(text, flush=True)
        return None
    return run(comm, config)


def _sample_dataset(comm: Any) -> Path:
    """The embedded sample: made once by rank 0 under the checkout's data/ (or a user cache)."""
    repo_data = Path(__file__).resolve().parents[1] / "data"
    root = repo_data if (repo_data / "README.md").is_file() else Path.home() / ".cache" / "cai-hpc"
    sample = root / "sample"
    if comm.Get_rank() == 0 and not any(sample.glob("*.h5")):
        from cai_hpc.synth import synthesize

        log.info("making the embedded sample dataset (%d galaxies) in %s", SAMPLE_SAMPLES, sample)
        synthesize(sample, SAMPLE_SAMPLES, SAMPLE_SHARD_MB, seed=0)
    comm.barrier()
    return sample


def _report(summary: dict, out: str | Path) -> None:
    m, tp, t = summary["metrics"], summary["throughput"], summary["timing"]
    log.info(
        "%d samples on %d rank(s) in %.2f s wall (%.1f samples/s); summary: %s",
        summary["samples"],
        summary["world_size"],
        t["wall_s"],
        tp["samples_per_s"],
        f"{str(out).rstrip('/')}/summary.json",
    )
    if m:
        log.info(
            "MAE %.4f  NMAD %.4f  bias %+.4f  R2 %.3f  outliers %.2f%%",
            m["mae"],
            m["nmad"],
            m["bias"],
            m["r2"] if m["r2"] is not None else float("nan"),
            100 * m["outlier_frac"],
        )


def cmd_synth(args: argparse.Namespace) -> int:
    from cai_hpc.synth import synthesize

    shards = synthesize(args.out, args.samples, args.shard_mb, args.seed)
    log.info("wrote %d samples in %d shards to %s", args.samples, shards, args.out)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from cai_hpc.ingest import TableColumns, convert

    columns = TableColumns(args.table, args.mag_columns, args.redshift_column, args.id_column)
    shards = convert(args.sources, args.out, args.shard_mb, columns)
    log.info("wrote %d shards to %s", shards, args.out)
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from cai_hpc.checkpoint import convert_checkpoint

    tensors = convert_checkpoint(args.src, args.dst)
    log.info("wrote %s (%d tensors, loaded into AstroMAE with strict checking)", args.dst, tensors)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from cai_hpc.plot import plot

    log.info("wrote %s", plot(args.out, args.to))
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from cai_hpc import native

    levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    try:
        built = native.build_ahead(args.out, levels)
    except native.UnavailableError as exc:
        raise InputError(f"build-kernels: {exc}") from None
    for level, library in zip(levels, built, strict=True):
        print(f"{level}: {library}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from cai_hpc.bench import (
        block_step_profile,
        end_to_end,
        format_block_profile,
        format_end_to_end,
        format_profile,
        format_table,
        kernel_table,
        reference_model,
        shape_gemm_gflops,
        stage_profile,
    )
    from cai_hpc.fast import fuse
    from cai_hpc.native import TOKENS
    from cai_hpc.resources import cpu_has_bf16, usable_cores
    from cai_hpc.shards import scan_dataset

    if args.what == "compare":
        from cai_hpc.compare import compare, format_rows

        if args.data is None:
            raise InputError("bench compare needs --data DIR (a directory of shards, e.g. from cai-hpc synth)")
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.repeats < 1:
            raise InputError(f"--repeats must be at least 1, got {args.repeats}")
        rows = compare(
            args.data,
            args.to,
            args.batch_size,
            args.max_ranks,
            progress=not args.quiet,
            repeats=args.repeats,
            nodes=args.nodes,
            functions=args.functions,
        )
        print(format_rows(rows))
        log.info("wrote %s/runs.csv, runs.json and compare.png", args.to)
        return 0

    if args.data is not None:
        scan_dataset(args.data)  # a bad dataset stops the run before minutes of measuring
    if args.precision == "bf16" and cpu_has_bf16() is False:
        log.warning("this CPU has no bf16 instructions: bfloat16 is emulated here, so expect it slower than fp32")
    threads = args.threads or list(range(1, usable_cores() + 1))
    if args.compile:
        compiles = len(threads) * len(args.batch_sizes)
        log.info("--compile: each of the %d rows compiles first (14-28 s each); fewer --batch-sizes cut that", compiles)
    if args.precision == "fp32" and not args.compile:
        from cai_hpc.fast import kernel_choice

        kernel_choice()  # logs which kernels the ViT blocks run on, and why
    rows = kernel_table(args.batch_sizes, threads, args.seconds, args.precision, args.compile)
    print(format_table(rows), flush=True)
    best = max(rows, key=lambda r: r["samples_per_s"])
    torch.set_num_threads(best["threads"])
    if not args.compile:  # a compiled model is one graph: its stages cannot be timed apart
        stages = stage_profile(fuse(reference_model(), args.precision), best["batch"], args.seconds)
        print(format_profile(stages, best["threads"], best["batch"]), flush=True)
    if args.data is not None:
        result = end_to_end(args.data, best["threads"], best["batch"], args.precision, args.seconds, args.compile)
        print(format_end_to_end(result, args.data), flush=True)
    if args.precision == "fp32" and not args.compile:  # where the ViT's time goes, step by step
        steps = block_step_profile(fuse(reference_model()), best["batch"], args.seconds)
        shapes = shape_gemm_gflops(best["batch"] * TOKENS, args.seconds)
        print(format_block_profile(steps, shapes, best["gemm_gflops"], best["batch"]))
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from cai_hpc import __version__

    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bar")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")

    parser = argparse.ArgumentParser(prog="cai-hpc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cai-hpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infer", parents=[common], help="predict redshifts for a dataset of shards")
    p.add_argument("--data", help="directory or s3:// prefix of .h5 shards (default: the embedded sample)")
    p.add_argument("--out", default="out", help="output directory or s3:// prefix (default: ./out)")
    p.add_argument("--checkpoint", type=Path, help="AstroMAE weights (.safetensors); default: seeded random weights")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="default: %(default)s")
    p.add_argument(
        "--threads", type=int, help="threads per rank (default: SLURM_CPUS_PER_TASK, else cores / local ranks)"
    )
    p.add_argument("--limit", type=int, help="use only the first N samples of the dataset")
    p.add_argument("--overwrite", action="store_true", help="redo shards whose predictions are already complete")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "self", "mpi", "tcp"], help="communicator (default: auto)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: image branches in bfloat16 (CPUs with bf16 instructions, GPUs)",
    )
    p.add_argument(
        "--compare-fp32",
        action="store_true",
        help="with --precision bf16: also run float32 and report max/mean |Δz| in the summary",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first (14-28 s, counted in startup_s; pays on long bf16 runs)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights when no checkpoint is given")
    p.add_argument(
        "--validate",
        default="stream",
        choices=["stream", "full"],
        help="stream: check rows as they are read, once (a bad shard stops the run, shards already "
        "finished stay and a rerun resumes); full: read every row first, so bad input writes nothing",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (rows and shards per rank, threads, memory and time estimates) and write nothing",
    )
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="also write each sample's joint feature vector (the regression head's input) to the predictions",
    )
    p.set_defaults(collective=_infer, report=_report)

    p = sub.add_parser("synth", parents=[common], help="make a synthetic survey")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--shard-mb", type=float, default=25.0, help="shard size in MB (10^6 bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_synth)

    p = sub.add_parser(
        "convert", parents=[common], help="turn .pt TensorDatasets, FITS cubes, .npy/.npz or plain HDF5 into shards"
    )
    p.add_argument("sources", type=Path, nargs="+", metavar="SRC", help="see README: convert")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shard-mb", type=float, default=25.0)
    p.add_argument("--table", type=Path, help="FITS or CSV table of magnitudes (and redshift, ids), row per image")
    p.add_argument(
        "--mag-columns",
        type=_name_list,
        default=["mag_u", "mag_g", "mag_r", "mag_i", "mag_z"],
        help="the table's u,g,r,i,z magnitude columns (default: mag_u,mag_g,mag_r,mag_i,mag_z)",
    )
    p.add_argument("--redshift-column", help="the table's redshift column (default: unlabelled)")
    p.add_argument("--id-column", help="the table's integer object-id column (default: none)")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("convert-checkpoint", parents=[common], help="reference .pt checkpoint -> safetensors")
    p.add_argument("src", type=Path, metavar="IN")
    p.add_argument("dst", type=Path, metavar="OUT")
    p.set_defaults(handler=cmd_convert_checkpoint)

    p = sub.add_parser("plot", parents=[common], help="predicted-vs-true density plot and Δz histogram")
    p.add_argument("out", type=Path, metavar="OUT", help="an infer output directory")
    p.add_argument("--to", type=Path, help="PNG path (default: OUT/redshift.png)")
    p.set_defaults(handler=cmd_plot)

    p = sub.add_parser("bench", parents=[common], help="benchmarks")
    p.add_argument(
        "what",
        choices=["kernel", "compare"],
        help="kernel: GEMM rate, model samples/s and efficiency; compare: laptop vs HPC vs cloud runs",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--threads", type=_int_list, help="thread counts (default: 1..cores)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="kernel: measure the torch.compile'd model")
    p.add_argument(
        "--data",
        type=Path,
        help="kernel: also run infer on these shards at the best setting; compare: the shards every run reads",
    )
    p.add_argument("--to", type=Path, default=Path("bench-compare"), help="compare: where rows and plots go")
    p.add_argument("--batch-size", type=int, default=128, help="compare: the batch size of every run")
    p.add_argument("--max-ranks", type=int, help="compare: most ranks (default: the cores)")
    p.add_argument("--repeats", type=int, default=3, help="compare: passes over every run, interleaved (default: 3)")
    p.add_argument("--nodes", type=int, default=8, help="compare: HPC nodes of the projection (default: 8)")
    p.add_argument("--functions", type=int, default=517, help="compare: Lambda functions of the projection")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser(
        "build-kernels", parents=[common], help="build the native kernels ahead of time (for nodes without a compiler)"
    )
    p.add_argument("--out", type=Path, help="directory for CAI_HPC_KERNELS_DIR (default: the kernel cache)")
    p.add_argument(
        "--levels",
        default="native",
        help="comma-separated among native, x86-64-v3, x86-64-v4, portable (default: %(default)s, this CPU)",
    )
    p.set_defaults(handler=cmd_build_kernels)

    _cloud_parser(sub, common)
    _astro_parser(sub, common)
    return parser


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if len(names) != 5 or not all(names):
        raise argparse.ArgumentTypeError(f"expected five comma-separated column names (u,g,r,i,z), got {text!r}")
    return names


def _astro_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("catalog", parents=[common], help="a run's predictions as one FITS, Parquet or CSV table")
    p.add_argument("run", metavar="RUN", help="an infer output directory or s3:// prefix")
    p.add_argument("--to", type=Path, required=True, help="catalog.fits, catalog.parquet or catalog.csv")
    p.set_defaults(handler=cmd_catalog)

    p = sub.add_parser("pca", parents=[common], help="principal components of a run's embeddings, across ranks")
    p.add_argument("run", metavar="RUN", help="an infer --embeddings output directory or s3:// prefix")
    p.add_argument("--components", "-k", type=int, required=True, help="how many components")
    p.add_argument("--out", help="where the results go (default: RUN/pca)")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "self", "mpi", "tcp"], help="communicator (default: auto)"
    )
    p.set_defaults(collective=_pca, report=_report_pca)


def cmd_catalog(args: argparse.Namespace) -> int:
    from cai_hpc.catalog import write_catalog

    rows = write_catalog(args.run, args.to)
    log.info("wrote %s (%d rows)", args.to, rows)
    return 0


def _pca(comm: Any, args: argparse.Namespace) -> dict | None:
    from cai_hpc.pca import pca

    args.out = args.out or f"{str(args.run).rstrip('/')}/pca"
    return pca(comm, args.run, args.out, args.components)


def _report_pca(result: dict, out: str | Path) -> None:
    ratio = result["explained_variance_ratio"]
    log.info(
        "%d components of %d samples x %d features explain %.1f%% of the variance; wrote %s",
        len(ratio),
        result["samples"],
        result["features"],
        100 * sum(ratio),
        out,
    )


def _cloud_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cloud", parents=[common], help="run on AWS Lambda + Step Functions (or emulate it locally)")
    verbs = p.add_subparsers(dest="verb", required=True)
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--data", required=True, help="s3:// prefix of .h5 shards (with --local: a directory)")
    job.add_argument("--out", required=True, help="s3:// prefix for the outputs (with --local: a directory)")
    job.add_argument("--model", help="s3:// URI of a .safetensors checkpoint (with --local: a file); default: random")
    size = job.add_mutually_exclusive_group()
    size.add_argument("--ranks", type=int, help="ranks (Lambda functions); default: one per shard")
    size.add_argument("--shards-per-rank", type=int, help="whole shards per rank")
    job.add_argument(
        "--stack",
        help="CloudFormation stack of lambda_shim/aws/template.yaml: every deployment fact comes from its outputs",
    )
    job.add_argument("--max-ranks", type=int, help="without --stack: ranks the deployment runs at once (default 1000)")
    job.add_argument(
        "--memory-mb",
        type=int,
        help="function memory, sets its vCPUs (default 4096); with --stack the deployed MemorySize, which a run "
        "does not change (redeploy with MemorySize=N)",
    )
    job.add_argument("--rendezvous", default="", help="without --stack: host:port of the rendezvous server")
    job.add_argument("--token-secret", help="without --stack: Secrets Manager name or ARN of its secret")
    job.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    job.add_argument("--threads", type=int, help="threads per rank (default: the function's vCPUs)")
    job.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    job.add_argument("--rate", type=float, default=270.0, help="samples/s per vCPU assumed by the cost estimate")

    v = verbs.add_parser("plan", parents=[common, job], help="print the plan and its cost estimate (writes nothing)")
    v.set_defaults(handler=cmd_cloud_plan)
    v = verbs.add_parser("run", parents=[common, job], help="start a job and follow it to its summary")
    v.add_argument("--state-machine", help="ARN of the deployed state machine (lambda_shim/aws/template.yaml)")
    v.add_argument("--dry-run", action="store_true", help="print the plan and its cost estimate, start nothing")
    v.add_argument("--local", action="store_true", help="emulate the whole cloud path on this machine")
    v.add_argument("-n", "--local-ranks", type=int, default=2, help="with --local: ranks (functions)")
    v.set_defaults(handler=cmd_cloud_run)
    v = verbs.add_parser("status", parents=[common], help="one progress line for an execution")
    v.add_argument("execution", help="execution ARN (printed by cloud run)")
    v.set_defaults(handler=cmd_cloud_status)
    v = verbs.add_parser("fetch", parents=[common], help="copy summary.json and predictions to a directory")
    v.add_argument("--out", required=True, help="the run's s3:// output prefix")
    v.add_argument("--to", type=Path, required=True, help="local directory")
    v.add_argument("--summary-only", action="store_true")
    v.set_defaults(handler=cmd_cloud_fetch)


def _plan_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "ranks": args.ranks,
        "shards_per_rank": args.shards_per_rank,
        "max_ranks": 1000 if args.max_ranks is None else args.max_ranks,
        "memory_mb": 4096 if args.memory_mb is None else args.memory_mb,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "precision": args.precision,
        "rate": args.rate,
    }


def _aws_plan(args: argparse.Namespace) -> Any:
    from lambda_shim.aws.cloud import make_plan

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.stack is None:
        return make_plan(
            args.data,
            args.out,
            model=args.model,
            rendezvous=args.rendezvous or "unset:0",
            token_secret=args.token_secret or "cai-hpc/rendezvous",
            **_plan_options(args),
        )
    from lambda_shim.aws.cloud import read_stack

    facts = ("max_ranks", "token_secret", "state_machine", "rendezvous")
    given = [f"--{name.replace('_', '-')}" for name in facts if getattr(args, name, None)]
    if given:
        raise InputError(f"--stack gives every deployment fact: drop {', '.join(given)}")
    deployment = read_stack(args.stack)
    if args.memory_mb is not None and args.memory_mb != deployment.memory_mb:
        raise InputError(
            f"--memory-mb {args.memory_mb}: stack {args.stack}'s ranks have {deployment.memory_mb} MB; "
            f"redeploy with --parameter-overrides MemorySize={args.memory_mb} to change it"
        )
    deployment.check_reach(args.data, args.out, args.model)
    options = {**_plan_options(args), "max_ranks": deployment.max_ranks, "memory_mb": deployment.memory_mb}
    plan = make_plan(
        args.data,
        args.out,
        model=args.model,
        rendezvous=deployment.rendezvous,
        token_secret=deployment.token_secret,
        architecture=deployment.architecture,
        **options,
    )
    plan.state_machine = deployment.state_machine
    return plan


def cmd_cloud_plan(args: argparse.Namespace) -> int:
    print(_aws_plan(args).describe(args.rate))
    return 0


def cmd_cloud_run(args: argparse.Namespace) -> int:
    if args.local:
        from lambda_shim.aws.local import run_local

        if args.ranks is not None or args.shards_per_rank is not None:
            raise InputError("with --local, -n N sets the ranks (--ranks and --shards-per-rank are for AWS runs)")
        if args.stack is not None:
            raise InputError("--local emulates its own deployment: drop --stack")

        options = _plan_options(args)
        options.pop("ranks")
        summary = run_local(
            args.local_ranks,
            Path(args.data),
            Path(args.out),
            checkpoint=Path(args.model) if args.model else None,
            verbose=args.verbose,
            **options,
        )
        _report(summary, args.out)
        return 0
    from lambda_shim.aws import cloud

    plan = _aws_plan(args)
    print(plan.describe(args.rate))
    if args.dry_run:
        return 0
    state_machine = plan.state_machine or args.state_machine
    if not state_machine or not (args.stack or args.rendezvous):
        raise InputError("cloud run needs --stack NAME (or --state-machine ARN and --rendezvous host:port)")
    execution = cloud.start(plan, state_machine)
    print(f"execution {execution}", flush=True)
    state = cloud.follow(execution, plan.memory_mb, architecture=plan.architecture)
    if state["status"] != "SUCCEEDED":
        from lambda_shim.aws.gang import explain_failure

        cause = f"{state['status']}: {state.get('error')}: {state.get('cause')}"
        raise cloud.JobFailedError(explain_failure(cause, plan.world_size, plan.connect_timeout_s, plan.memory_mb))
    summary = json.loads((plan.out / "summary.json").read_bytes())
    _report(summary, str(plan.out))
    return 0


def cmd_cloud_status(args: argparse.Namespace) -> int:
    from lambda_shim.aws import cloud

    print(cloud.progress_line(cloud.status(args.execution)))
    return 0


def cmd_cloud_fetch(args: argparse.Namespace) -> int:
    from lambda_shim.aws import cloud

    summary = cloud.fetch(args.out, args.to, predictions=not args.summary_only)
    _report(summary, args.to)
    return 0
