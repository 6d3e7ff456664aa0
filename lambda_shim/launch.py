"""Start N ranks of a command on this machine, wired together by a private rendezvous server.

    python -m lambda_shim.launch -n 4 -- python -m cai_hpc infer --backend tcp --data DIR

The launcher makes a fresh job id and master secret, starts ``lambda_shim.rendezvous`` on a
free loopback port (the master secret goes to it through a pipe: it is never written to disk,
so the ranks cannot read it), and starts the ranks with RANK, WORLD_SIZE, CAI_HPC_RENDEZVOUS,
CAI_HPC_JOB_ID and CAI_HPC_TOKEN_FILE (the key of this job only, in a 0600 file, never on a
command line). Their output is
streamed with a ``[rank]`` prefix; the exit code is the worst of the ranks'. If one rank
fails, the others get ``--grace`` seconds to notice before they are stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from lambda_shim.transport import MODES
from lambda_shim.wire import job_key, new_secret

SERVER_START_S = 30.0


def _stream(prefix: str, pipe, out) -> None:
    for line in iter(pipe.readline, b""):
        out.buffer.write(prefix.encode() + line)
        out.flush()


def start_server(
    workdir: Path,
    secret_file: Path | None = None,
    verbose: bool = False,
    secret: str | None = None,
    options: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str]:
    """A rendezvous server on a free loopback port, its master secret read from
    ``secret_file`` or given as ``secret`` (through its standard input); returns (process,
    "host:port"). ``options`` are more of the server's flags (its caps)."""
    ready = workdir / "rendezvous.addr"
    ready.unlink(missing_ok=True)  # never mistake an earlier server's address for this one's
    env = {k: v for k, v in os.environ.items() if k not in ("CAI_HPC_TOKEN", "CAI_HPC_TOKEN_FILE")}
    if secret is None:
        env["CAI_HPC_TOKEN_FILE"] = str(secret_file)
    cmd = [
        sys.executable,
        "-m",
        "lambda_shim.rendezvous",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--ready-file",
        str(ready),
    ]
    cmd += [*options, *(["--secret-stdin"] if secret is not None else [])]
    proc = subprocess.Popen(cmd + (["-v"] if verbose else []), env=env, stdin=subprocess.PIPE)
    proc.stdin.write(f"{secret or ''}\n".encode())
    proc.stdin.close()
    deadline = time.monotonic() + SERVER_START_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the rendezvous server did not start")
        time.sleep(0.05)
    return proc, ready.read_text().strip()


def launch(ranks: int, command: list[str], mode: str = "auto", grace: float = 30.0, verbose: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="cai-hpc-launch-") as tmp:
        workdir = Path(tmp)
        master = new_secret()
        job_id = uuid.uuid4().hex
        token_file = workdir / "job.token"
        token_file.touch(mode=0o600)
        token_file.write_text(job_key(bytes.fromhex(master), job_id).hex())
        server, address = start_server(workdir, verbose=verbose, secret=master)
        del master  # the ranks get the job's key only
        procs = []
        try:
            for rank in range(ranks):
                env = {
                    **os.environ,
                    "RANK": str(rank),
                    "WORLD_SIZE": str(ranks),
                    "CAI_HPC_RENDEZVOUS": address,
                    "CAI_HPC_JOB_ID": job_id,
                    "CAI_HPC_TOKEN_FILE": str(token_file),
                    "CAI_HPC_CONNECT": mode,
                }
                env.pop("CAI_HPC_TOKEN", None)
                proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for pipe, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                    threading.Thread(target=_stream, args=(f"[{rank}] ", pipe, out), daemon=True).start()
                procs.append(proc)
            return _wait_all(procs, grace)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            server.terminate()
            server.wait(timeout=10)


def _wait_all(procs: list[subprocess.Popen], grace: float) -> int:
    """Wait for every rank; once one fails, the rest have ``grace`` seconds, then are killed."""
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            worst = max(codes, key=abs)
            return 128 - worst if worst < 0 else worst  # killed by a signal: 128 + its number
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambda_shim.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--ranks", type=int, required=True)
    parser.add_argument(
        "--mode",
        default=os.environ.get("CAI_HPC_CONNECT") or "auto",
        choices=MODES,
        help="how ranks connect (default: $CAI_HPC_CONNECT if set, else auto)",
    )
    parser.add_argument("--grace", type=float, default=30.0, help="seconds the others get after one rank fails")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the rendezvous server")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each rank runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.ranks < 1:
        parser.error("give -n N (N >= 1) and a command after --")
    if args.mode not in MODES:  # a default from the environment is not checked by argparse
        parser.error(f"CAI_HPC_CONNECT={args.mode!r}: choose one of {', '.join(MODES)}")
    try:
        return launch(args.ranks, command, args.mode, args.grace, args.verbose)
    except (OSError, RuntimeError) as exc:  # a command that cannot start, a server that did not
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
