"""The whole cloud path on one machine: ``cai-hpc cloud run --local -n N``.

Real parts wherever they can run here: S3 and Secrets Manager are moto's server (a real HTTP
AWS API on loopback), the ranks are N processes of AWS's own runtime client (``awslambdaric``)
running ``lambda_shim.aws.handler.handler`` against a local Lambda Runtime API, they meet at the
rendezvous server and talk over TcpComm, and ``statemachine.asl.json`` itself is what runs,
through ``lambda_shim.aws.workflow``. Each function runs in a Lambda-like sandbox
(``lambda_shim.aws.sandbox``: read-only root, a sized /tmp, a non-root user, no /dev/shm, its
memory and thread limits, Lambda's environment) where bubblewrap can run. What is not real: one
machine instead of a fleet (the ranks share its cores), loopback instead of Lambda's network,
and no Step Functions service.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

from cai_hpc.errors import InputError
from cai_hpc.resources import usable_cores
from lambda_shim.aws import gang
from lambda_shim.aws.cloud import JobFailedError, Plan, execution_input, fetch, make_plan, write_items
from lambda_shim.aws.runtime_api import InvocationError, RuntimeAPI, runtime_client_command
from lambda_shim.aws.sandbox import Sandbox, unavailable
from lambda_shim.aws.workflow import LocalWorkflow, TaskError, load_definition
from lambda_shim.launch import start_server
from lambda_shim.wire import new_secret

BUCKET = "cai-hpc-local"
TOKEN_SECRET = "cai-hpc/rendezvous"
ACCOUNT = "123456789012"  # moto's
REGION = "us-east-1"
RANK_ARN = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:cai-hpc-rank"
SUMMARIZE_ARN = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:cai-hpc-summarize"
COLD_START_WAIT_S = 120.0
FREE_WAIT_S = 2.0  # a runtime client that just answered is polling again within this
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class LocalCloud:
    """moto's S3, Secrets Manager and Lambda, a rendezvous server, and warm pools of runtime
    clients for the rank and summarize functions. Use as a context manager; everything stops on exit.

    ``ranks`` runtime clients serve the rank function; its reserved concurrency (in moto's Lambda,
    checked before a job starts, as ``cloud run`` checks AWS) is ``concurrency``, by default the
    same. An invocation that finds no free client is throttled, as Lambda throttles one that finds
    no free environment, and the state machine's Retry decides what follows; a concurrency above
    the clients imitates environments that Lambda has not started yet (``start_rank_functions``
    starts more)."""

    def __init__(
        self,
        ranks: int,
        memory_mb: int = 4096,
        timeout_s: float = 900.0,
        verbose: bool = False,
        sandbox: bool = True,
        concurrency: int | None = None,
    ) -> None:
        self.ranks = ranks
        self.concurrency = ranks if concurrency is None else concurrency
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self.verbose = verbose
        self.sandboxed = sandbox
        self._stack: list[Any] = []
        self._procs: list[tuple[subprocess.Popen, threading.Thread]] = []
        self._sandboxes: list[Sandbox] = []
        self._clients = 0  # runtime clients of the rank function
        self._throttled: set[int] = set()  # ranks whose last invocation was throttled
        # Ranks throttled at any time in this job: a retry that gets through after the ranks
        # that did start gave up at their deadline still started too late.
        self._throttled_in_job: set[int] = set()
        self._invocations: list[Any] = []  # the rank invocations of the current job
        self._saved_env: dict[str, str | None] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCloud:
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            self._start()
        except BaseException:
            self.__exit__(None)
            raise
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Stop the functions first: that fails their open invocations, so the workflow's
        waits end at once and the unwinding that follows has nothing left to wait for."""
        name = signal.Signals(signum).name
        print(f"cai-hpc: stopped by {name}; stopping the emulated functions and servers", file=sys.stderr, flush=True)
        self._stop_functions()
        raise SystemExit(128 + signum)

    def _start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._tmp = tempfile.TemporaryDirectory(prefix="cai-hpc-cloud-")
        work = Path(self._tmp.name)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.env = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "local-emulation",
            "AWS_SECRET_ACCESS_KEY": "local-emulation",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }
        for key, value in self.env.items():  # this process talks to the same endpoint
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        self.s3 = _boto("s3")
        self.s3.create_bucket(Bucket=BUCKET)
        master = new_secret()
        _boto("secretsmanager").create_secret(Name=TOKEN_SECRET, SecretString=master)
        self._create_rank_function()
        secret_file = work / "server.secret"
        secret_file.touch(mode=0o600)
        secret_file.write_text(master)
        self._server, self.rendezvous = start_server(work, secret_file, self.verbose)
        why = unavailable() if self.sandboxed else None
        if why is not None:
            print(
                f"cai-hpc: no Lambda-like sandbox here ({why}); the functions run as plain processes", file=sys.stderr
            )
            self.sandboxed = False
        self.rank_api = RuntimeAPI(function_arn=RANK_ARN).start()
        self.summarize_api = RuntimeAPI(function_arn=SUMMARIZE_ARN).start()
        self.start_rank_functions(self.ranks)
        self._spawn(self.summarize_api, "lambda_shim.aws.handler.summarize", "cai-hpc-summarize", "[summarize] ", 1024)

    def _create_rank_function(self) -> None:
        """The rank function in moto's Lambda, with its reserved concurrency (the code runs here)."""
        trust = {"Version": "2012-10-17", "Statement": []}
        role = _boto("iam").create_role(RoleName="cai-hpc-rank", AssumeRolePolicyDocument=json.dumps(trust))
        code = io.BytesIO()
        with zipfile.ZipFile(code, "w") as archive:
            archive.writestr("emulated.txt", "the code runs in lambda_shim.aws.local's runtime clients")
        functions = _boto("lambda")
        functions.create_function(
            FunctionName=RANK_ARN.rpartition(":")[2],
            Role=role["Role"]["Arn"],
            Code={"ZipFile": code.getvalue()},
            Runtime="python3.12",
            Handler="lambda_shim.aws.handler.handler",
            MemorySize=self.memory_mb,
            Timeout=int(self.timeout_s),
        )
        functions.put_function_concurrency(
            FunctionName=RANK_ARN.rpartition(":")[2], ReservedConcurrentExecutions=self.concurrency
        )

    @property
    def throttled_ranks(self) -> list[int]:
        """Ranks of the current job whose last invocation was throttled (they wait to retry)."""
        return sorted(r for r in self._throttled if isinstance(r, int))

    def start_rank_functions(self, count: int) -> None:
        """Start ``count`` more runtime clients of the rank function (each a cold start)."""
        for _ in range(count):
            self._spawn(self.rank_api, "lambda_shim.aws.handler.handler", "cai-hpc-rank", f"[rank fn {self._clients}] ")
            self._clients += 1

    def _spawn(self, api: RuntimeAPI, handler: str, name: str, prefix: str, memory_mb: int | None = None) -> None:
        memory_mb = memory_mb or self.memory_mb
        # The rendezvous address is part of the function's configuration, as the template sets it.
        lambda_env = {**self.env, "CAI_HPC_RENDEZVOUS": self.rendezvous, "AWS_LAMBDA_RUNTIME_API": api.address}
        lambda_env["PYTHONUNBUFFERED"] = "1"
        command = runtime_client_command(handler)
        if self.sandboxed:
            sandbox = Sandbox(name, memory_mb)
            self._sandboxes.append(sandbox)
            env, command = None, sandbox.command(command, sandbox.environment(lambda_env))
        else:
            env = {
                **os.environ,
                **lambda_env,
                "AWS_LAMBDA_FUNCTION_NAME": name,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
            }
            for var in ("CAI_HPC_TOKEN", "CAI_HPC_TOKEN_FILE", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                env.pop(var, None)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=self._stream, args=(proc, prefix), daemon=True)
        reader.start()
        self._procs.append((proc, reader))

    def _stream(self, proc: subprocess.Popen, prefix: str) -> None:
        for line in iter(proc.stdout.readline, b""):
            if self.verbose:
                sys.stderr.buffer.write(prefix.encode() + line)
                sys.stderr.flush()

    def _stop_functions(self) -> None:
        for proc, _ in self._procs:
            proc.kill()
        for api in (getattr(self, "rank_api", None), getattr(self, "summarize_api", None)):
            if api is not None:
                api.close()

    def __exit__(self, *exc: object) -> None:
        self._stop_functions()
        for proc, reader in self._procs:
            proc.wait(timeout=30)
            reader.join(timeout=10)  # it reads to the end of the dead process's output
            proc.stdout.close()
        for sandbox in self._sandboxes:
            sandbox.close()
        server = getattr(self, "_server", None)
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        if getattr(self, "_moto", None) is not None:
            self._moto.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)

    # ------------------------------------------------------------------ use
    def upload(self, local: Path, prefix: str) -> str:
        """Copy the ``.h5`` files of a directory (or one file) to ``s3://BUCKET/prefix/``."""
        files = [local] if local.is_file() else sorted(p for p in local.glob("*.h5") if not p.name.startswith("."))
        if not files:
            raise InputError(f"{local}: no .h5 shards in this directory")
        for path in files:
            self.s3.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
        return f"s3://{BUCKET}/{prefix}/{files[0].name}" if local.is_file() else f"s3://{BUCKET}/{prefix}"

    def plan(self, data: str, out: str, **options: Any) -> Plan:
        return make_plan(
            data, out, rendezvous=self.rendezvous, token_secret=TOKEN_SECRET, memory_mb=self.memory_mb, **options
        )

    def invoke_rank(self, event: dict[str, Any]) -> Any:
        """One invocation of the rank function, as the Map's Task makes it: throttled when no
        runtime client is free."""
        invocation = self.rank_api.try_invoke(event, self.timeout_s, FREE_WAIT_S)
        rank = event.get("rank") if isinstance(event, dict) else None
        if invocation is None:
            self._throttled.add(rank)
            self._throttled_in_job.add(rank)
            raise TaskError(gang.THROTTLED, "Rate Exceeded. (no free environment of the rank function)")
        self._throttled.discard(rank)
        self._invocations.append(invocation)
        return self._result(invocation)

    def run(self, plan: Plan) -> dict[str, Any]:
        """Execute the state machine on the plan; return Summarize's output. A plan whose ranks
        the rank function cannot all run at once is refused before anything starts."""
        definition = load_definition({"RankFunctionArn": RANK_ARN, "SummarizeFunctionArn": SUMMARIZE_ARN})
        gang.check_concurrency(plan.world_size, gang.read_concurrency(_boto("lambda"), gang.rank_function(definition)))
        if not self.rank_api.wait_idle(self._clients, COLD_START_WAIT_S):
            raise RuntimeError(
                f"the {self._clients} local rank functions did not start within {COLD_START_WAIT_S:.0f} s"
            )
        self._invocations = []
        functions = {
            RANK_ARN: self.invoke_rank,
            SUMMARIZE_ARN: lambda payload: self._result(self.summarize_api.invoke(payload, self.timeout_s)),
        }
        self.workflow = LocalWorkflow(definition, functions, self.s3)
        try:
            return self.workflow.run(execution_input(plan, write_items(plan)))
        except TaskError as exc:
            billed = sum(invocation.duration_s for invocation in self._invocations)
            why = gang.explain_failure(
                f"{exc.error}: {exc.cause}",
                plan.world_size,
                plan.connect_timeout_s,
                plan.memory_mb,
                sorted(r for r in self._throttled_in_job if isinstance(r, int)),
                billed,
            )
            raise JobFailedError(why) from None
        finally:
            self._throttled.clear()
            self._throttled_in_job.clear()

    def _result(self, invocation: Any) -> Any:
        try:
            return invocation.result(timeout=self.timeout_s + 60)
        except InvocationError as exc:
            raise TaskError(exc.error_type, exc.message) from None


def _boto(service: str) -> Any:
    import boto3

    return boto3.client(service)


def run_local(
    ranks: int,
    data: Path,
    out: Path,
    checkpoint: Path | None = None,
    verbose: bool = False,
    threads: int | None = None,
    memory_mb: int = 4096,
    **options: Any,
) -> dict[str, Any]:
    """``cloud run --local``: upload, plan one rank per group of shards, run, fetch into ``out``.
    ``memory_mb`` is what the functions report, are billed for and, in the sandbox, may use.

    ``out`` is written only after the job succeeded, so a failed run leaves nothing there."""
    if threads is None:  # ranks x threads within the cores, as on any shared node
        threads = max(1, usable_cores() // ranks)
    with LocalCloud(ranks, memory_mb=memory_mb, verbose=verbose) as cloud:
        data_uri = cloud.upload(data, "data")
        model = cloud.upload(checkpoint, "models") if checkpoint is not None else None
        plan = cloud.plan(
            data_uri, f"s3://{BUCKET}/runs/{data.name}", model=model, ranks=ranks, threads=threads, **options
        )
        cloud.run(plan)
        return fetch(str(plan.out), out)
