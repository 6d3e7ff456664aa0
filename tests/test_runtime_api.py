"""lambda_shim.aws.runtime_api: AWS's real runtime client (awslambdaric) runs our handlers against it."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lambda_shim.aws.runtime_api import InvocationError, RuntimeAPI, runtime_client_command
from tests.conftest import missing_modules, requires_infra

pytestmark = requires_infra(missing_modules("awslambdaric", hint="the runtime client is in the test extras"))

PROGRAMS = Path(__file__).with_name("programs")
START_S = 30.0  # a cold start on a busy machine
RESULT_S = 30.0
STOP_S = 10.0  # a killed client to exit


def within(*waits: float) -> pytest.MarkDecorator:
    """The test's timeout: the waits inside it (its fixture's included) plus 30 s, so that a wait
    that runs out fails with its own message before pytest-timeout ends the test."""
    return pytest.mark.timeout(sum(waits) + 30)


StartClient = Callable[..., subprocess.Popen]


def client_env(address: str) -> dict[str, str]:
    """This environment minus anything Lambda-ish, plus the API address, as a sandbox would have."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_LAMBDA_", "_LAMBDA_", "AWS_EXECUTION_"))}
    return env | {"AWS_LAMBDA_RUNTIME_API": address, "AWS_LAMBDA_FUNCTION_NAME": "cai-hpc-rank"}


@pytest.fixture
def api() -> Iterator[RuntimeAPI]:
    with RuntimeAPI() as server:
        yield server


@pytest.fixture
def start_client(api: RuntimeAPI, tmp_path: Path) -> Iterator[StartClient]:
    """Start runtime-client processes on echo_handler; all are killed after the test."""
    procs: list[subprocess.Popen] = []

    def start(handler: str = "echo_handler.handler", wait: bool = True) -> subprocess.Popen:
        with open(tmp_path / f"client-{len(procs)}.log", "wb") as out:
            proc = subprocess.Popen(
                runtime_client_command(handler), env=client_env(api.address), cwd=PROGRAMS, stdout=out, stderr=out
            )
        procs.append(proc)
        if wait:
            assert api.wait_idle(len(procs), START_S), logs(tmp_path)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=STOP_S)


def logs(tmp_path: Path) -> str:
    return "\n".join(f"{p.name}:\n{p.read_text(errors='replace')}" for p in sorted(tmp_path.glob("client-*.log")))


@within(START_S, RESULT_S, STOP_S)
def test_round_trip_and_context(api: RuntimeAPI, start_client: StartClient) -> None:
    start_client()
    event = {"rank": 3, "shard": "s-003.npz", "nested": [1.5, None, "ẑ"]}
    invocation = api.invoke(event, timeout_s=20)
    out = invocation.result(timeout=RESULT_S)
    assert invocation.done()
    assert out["event"] == event
    assert out["request_id"] == invocation.request_id
    assert out["function_arn"] == api.function_arn
    assert 0 < out["remaining_ms"] <= 20_000
    # the handler's clock plus what it had left is the deadline the server sent (to the truncated ms)
    assert invocation.deadline_ms - 1000 < out["seen_ms"] + out["remaining_ms"] <= invocation.deadline_ms + 1


@within(START_S, RESULT_S, RESULT_S, STOP_S)
def test_handler_exception_becomes_invocation_error(api: RuntimeAPI, start_client: StartClient) -> None:
    start_client()
    invocation = api.invoke({"raise": "rank 3: shard s-003.npz is corrupt"}, timeout_s=20)
    with pytest.raises(InvocationError) as caught:
        invocation.result(timeout=RESULT_S)
    error = caught.value
    assert error.error_type == "RankFailedError"
    assert error.message == "rank 3: shard s-003.npz is corrupt"
    assert str(error) == "RankFailedError: rank 3: shard s-003.npz is corrupt"
    assert any("echo_handler.py" in frame for frame in error.stack_trace)
    # the client survives a handler's exception and serves the next invocation
    assert api.invoke({"after": "error"}, timeout_s=20).result(timeout=RESULT_S)["calls"] == 2


@within(START_S, START_S, RESULT_S, RESULT_S, STOP_S, STOP_S)
def test_two_clients_serve_concurrent_invocations(api: RuntimeAPI, start_client: StartClient) -> None:
    start_client()
    start_client()
    invocations = [api.invoke({"rank": rank, "sleep": 1.0}, timeout_s=20) for rank in range(2)]
    outs = [invocation.result(timeout=RESULT_S) for invocation in invocations]
    assert [out["event"]["rank"] for out in outs] == [0, 1]
    assert outs[0]["pid"] != outs[1]["pid"]
    assert len({invocation.request_id for invocation in invocations}) == 2


@within(START_S, 20, STOP_S, STOP_S)
def test_timeout_fails_the_invocation(api: RuntimeAPI, start_client: StartClient) -> None:
    client = start_client()
    started = time.monotonic()
    invocation = api.invoke({"sleep": 30}, timeout_s=1.0)
    with pytest.raises(InvocationError) as caught:
        invocation.result(timeout=20)
    elapsed = time.monotonic() - started
    assert caught.value.error_type == "Sandbox.Timedout"
    assert str(caught.value) == "Sandbox.Timedout: Task timed out after 1.00 seconds"
    assert 1.0 <= elapsed < 10.0
    client.kill()  # as Lambda resets the sandbox
    client.wait(timeout=STOP_S)


@within(START_S, RESULT_S, RESULT_S, RESULT_S, STOP_S)
def test_warm_client_serves_invocations_in_turn(api: RuntimeAPI, start_client: StartClient) -> None:
    start_client()
    outs = [api.invoke({"step": step}, timeout_s=20).result(timeout=RESULT_S) for step in range(3)]
    assert [out["event"]["step"] for out in outs] == [0, 1, 2]
    assert [out["calls"] for out in outs] == [1, 2, 3]  # module state persisted: one warm process
    assert len({out["pid"] for out in outs}) == 1
    assert len({out["request_id"] for out in outs}) == 3


@within(RESULT_S, RESULT_S, STOP_S)
def test_init_error_fails_pending_and_later_invocations(api: RuntimeAPI, start_client: StartClient) -> None:
    pending = api.invoke({"rank": 0}, timeout_s=20)
    client = start_client("echo_handler.no_such_function", wait=False)
    with pytest.raises(InvocationError) as caught:
        pending.result(timeout=RESULT_S)
    assert caught.value.error_type == "Runtime.HandlerNotFound"
    assert client.wait(timeout=RESULT_S) != 0  # the runtime exits after reporting, as in Lambda
    assert api.init_error is not None and api.init_error.error_type == "Runtime.HandlerNotFound"
    later = api.invoke({"rank": 1})
    assert later.done()
    with pytest.raises(InvocationError, match="HandlerNotFound"):
        later.result(timeout=0)


@within(10, 10, 10)
def test_unknown_ids_and_paths_are_rejected(api: RuntimeAPI) -> None:
    host, port = api.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/2018-06-01/runtime/invocation/not-a-request/response", body=b"{}")
        response = conn.getresponse()
        assert response.status == 400
        assert json.loads(response.read())["errorType"] == "InvalidRequestID"
        conn.request("POST", "/2018-06-01/runtime/invocation/not-a-request/error", body=b"{}")
        response = conn.getresponse()
        assert response.status == 400
        response.read()
        conn.request("GET", "/2018-06-01/runtime/somewhere-else")
        response = conn.getresponse()
        assert response.status == 404
        response.read()
    finally:
        conn.close()


@within(START_S, RESULT_S, STOP_S)
def test_close_fails_open_invocations(api: RuntimeAPI, start_client: StartClient) -> None:
    start_client()
    running = api.invoke({"sleep": 30}, timeout_s=60)
    until = time.monotonic() + RESULT_S
    while running.deadline_ms is None:  # set when a client takes it
        assert time.monotonic() < until
        time.sleep(0.01)
    queued = api.invoke({"rank": 1}, timeout_s=60)  # the only client is busy
    api.close()
    for invocation in (running, queued):
        with pytest.raises(InvocationError, match=r"Runtime\.Stopped"):
            invocation.result(timeout=0)
    with pytest.raises(RuntimeError, match="closed"):
        api.invoke({})


@within(START_S, STOP_S, STOP_S)
def test_close_releases_waiting_clients(api: RuntimeAPI, start_client: StartClient) -> None:
    client = start_client()
    api.close()
    assert client.wait(timeout=STOP_S) != 0  # /next answered 500: the runtime exits, as Lambda asks


@within(START_S, STOP_S, RESULT_S, STOP_S, STOP_S)
def test_killed_client_is_not_handed_an_invocation(api: RuntimeAPI, start_client: StartClient) -> None:
    dead = start_client()
    dead.kill()
    dead.wait(timeout=STOP_S)
    invocation = api.invoke({"rank": 0}, timeout_s=20)  # the dead client's /next is still open on the server
    alive = start_client(wait=False)
    assert invocation.result(timeout=RESULT_S)["pid"] == alive.pid


@pytest.mark.timeout(60)
def test_an_invocation_without_a_free_client_is_throttled_not_queued(
    api: RuntimeAPI, start_client: StartClient
) -> None:
    assert api.try_invoke({"n": 0}, timeout_s=20) is None  # no client at all
    start_client()
    busy = api.try_invoke({"sleep": 1.0}, timeout_s=20)
    assert busy is not None
    assert api.try_invoke({"n": 1}, timeout_s=20) is None  # the one client is taken
    assert api.invoked == 1  # the throttled events were never queued
    assert busy.result(timeout=RESULT_S)["event"] == {"sleep": 1.0}
    assert 1.0 <= busy.duration_s < RESULT_S  # billed from the moment the client took it
    after = api.try_invoke({"n": 2}, timeout_s=20, wait_s=RESULT_S)  # free again once it answered
    assert after is not None and after.result(timeout=RESULT_S)["event"] == {"n": 2}
