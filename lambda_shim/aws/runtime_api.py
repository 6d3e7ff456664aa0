"""A small, real AWS Lambda Runtime API on localhost, so that handlers run under the real runtime client.

AWS's own runtime interface client (``awslambdaric``) is what runs a Python handler inside a Lambda
sandbox: it long-polls ``GET /2018-06-01/runtime/invocation/next``, calls the handler, and posts the
result or the error back. Serving that same HTTP API from a thread of our own lets tests and the local
emulation of a cloud run exercise the code path of the cloud (cold start, warm reuse, context, error
reporting, timeouts) without AWS::

    with RuntimeAPI() as api:
        env = {**os.environ, "AWS_LAMBDA_RUNTIME_API": api.address}
        proc = subprocess.Popen(runtime_client_command("my_module.handler"), env=env, cwd=task_root)
        print(api.invoke({"rank": 0}, timeout_s=60).result(timeout=120))

What the runtime client needs from its environment:

* ``AWS_LAMBDA_RUNTIME_API`` = :attr:`RuntimeAPI.address` (``host:port``, no scheme). It is read when
  awslambdaric is imported, so it must be in the process's environment from the start.
* The handler module on ``sys.path``. awslambdaric imports it with ``importlib.import_module`` and does
  not read ``LAMBDA_TASK_ROOT`` (Lambda puts the task root on ``PYTHONPATH``); with ``python -m`` the
  working directory is on ``sys.path``, so run the client in the task root or set ``PYTHONPATH``.
* Not ``AWS_LAMBDA_MAX_CONCURRENCY`` (that switches awslambdaric to a multi-concurrency mode that wants
  a socket of the platform's) and not ``_LAMBDA_TELEMETRY_LOG_FD``; the handler's logs then go to stdout.
* Optional: ``AWS_LAMBDA_FUNCTION_NAME``, ``AWS_LAMBDA_FUNCTION_MEMORY_SIZE`` ... fill in the context.

Things the client relies on that are easy to get wrong: the event's ``Content-Type`` must be exactly
``application/json`` (with a charset parameter the handler gets raw bytes instead of a decoded event),
and ``Lambda-Runtime-Deadline-Ms`` must be present (without it ``get_remaining_time_in_millis()`` is 0).
The client (libcurl underneath) keeps one HTTP/1.1 connection for all its calls, so the server keeps
connections alive and, on close, shuts them down itself rather than wait for clients to hang up.

Only IPv4 addresses are served (the runtime client is given ``host:port`` without brackets).
"""

from __future__ import annotations

import collections
import json
import logging
import select
import socket
import socketserver
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any

__all__ = ["Invocation", "InvocationError", "RuntimeAPI", "runtime_client_command"]

log = logging.getLogger(__name__)

DEFAULT_FUNCTION_ARN = "arn:aws:lambda:us-east-1:000000000000:function:cai-hpc-rank"
API_PREFIX = "/2018-06-01/runtime"
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
TIMED_OUT = "Sandbox.Timedout"  # Lambda's own errorType for a function that outlived its timeout
STOPPED = "Runtime.Stopped"  # ours: the API went away before the invocation finished
_PEER_CHECK_S = 0.5  # how often a waiting /next notices that its runtime client has gone


class InvocationError(RuntimeError):
    """An invocation that did not produce a result: the handler raised, init failed, or it timed out.

    ``error_type`` and ``message`` are Lambda's ``errorType`` and ``errorMessage`` (for a handler's
    exception: its class name and ``str()``), ``stack_trace`` the frames the runtime client reported.
    ``str()`` is one line, ``"RankFailedError: rank 3: ..."``, so it fits a log line or a table cell.
    """

    def __init__(self, error_type: str, message: str, stack_trace: list[str] | None = None) -> None:
        self.error_type = error_type
        self.message = message
        self.stack_trace = list(stack_trace or [])
        one_line = " / ".join(line.strip() for line in message.splitlines() if line.strip())
        super().__init__(f"{error_type}: {one_line}" if one_line else error_type)

    def copy(self) -> InvocationError:
        """A fresh instance, so that one cause raised by several invocations keeps separate tracebacks."""
        return InvocationError(self.error_type, self.message, self.stack_trace)


class Invocation:
    """One queued event and, later, its outcome: a future that a runtime client's post completes.

    ``deadline_ms`` is the ``Lambda-Runtime-Deadline-Ms`` the runtime client got (epoch milliseconds),
    ``None`` while the invocation still waits for a client.
    """

    def __init__(self, body: bytes, timeout_s: float) -> None:
        self.request_id = str(uuid.uuid4())
        self.timeout_s = timeout_s
        self.deadline_ms: int | None = None
        self._body = body
        self._expires: float | None = None  # time.monotonic() of the deadline, while handed out
        self._taken: float | None = None  # time.monotonic() when a runtime client took it
        self._ended: float | None = None  # ... and when its outcome came
        self._finished = threading.Event()
        self._value: Any = None
        self._error: InvocationError | None = None

    def result(self, timeout: float | None = None) -> Any:
        """The handler's return value (decoded JSON), or raise its InvocationError.

        Raises TimeoutError if the outcome is not known within ``timeout`` seconds; the invocation
        itself goes on (its own deadline is ``timeout_s`` from the moment a client took it).
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"invocation {self.request_id} has no outcome after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        """Whether the outcome (result or error) is known."""
        return self._finished.is_set()

    @property
    def duration_s(self) -> float:
        """Seconds from a client taking it to its outcome (so far): what Lambda bills; 0 if never taken."""
        if self._taken is None:
            return 0.0
        return (self._ended or time.monotonic()) - self._taken

    def _settle(self, value: Any = None, error: InvocationError | None = None) -> None:
        self._value, self._error = value, error
        self._expires = None
        self._ended = time.monotonic()
        self._finished.set()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running" if self._expires is not None else "queued"
        return f"<Invocation {self.request_id} {state}>"


def runtime_client_command(handler: str) -> list[str]:
    """The command that runs AWS's runtime client on ``handler`` ("module.function"), as Lambda does.

    Start it with ``AWS_LAMBDA_RUNTIME_API`` in its environment and the handler's module importable
    (see the module docstring); it serves invocations until it is killed or the API goes away.
    """
    return [sys.executable, "-m", "awslambdaric", handler]


def _peer_closed(sock: socket.socket) -> bool:
    """Whether a runtime client waiting for /next has hung up (it sends nothing else while it waits)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class RuntimeAPI:
    """The Runtime API of one Lambda function, served on ``host:port`` for any number of runtime clients.

    :meth:`invoke` queues an event; the next client polling ``/next`` takes it, and its deadline
    (``timeout_s``, Lambda's function timeout) starts then. A client that misses the deadline fails
    the invocation with ``Sandbox.Timedout``; killing that client is the caller's job, as Lambda
    would reset the sandbox. A retry is just another :meth:`invoke` (with a new request id); a late
    post for an id that is over (answered, timed out) gets Lambda's 400 ``InvalidRequestID``, which
    makes awslambdaric exit. A client that hung up while it waited on ``/next`` (killed) is never
    handed an invocation. An init error is kept: no client of this code can start, so queued and
    later invocations fail with it. Use as a context manager: the server runs between enter and
    exit, and invocations still open at exit fail with ``Runtime.Stopped``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, function_arn: str = DEFAULT_FUNCTION_ARN) -> None:
        self.host = host
        self.port = port
        self.function_arn = function_arn
        self._cond = threading.Condition()
        self._queue: collections.deque[Invocation] = collections.deque()
        self._running: dict[str, Invocation] = {}
        self._connections: set[socket.socket] = set()
        self._idle = 0
        self.invoked = 0  # events accepted by invoke (throttled ones are not)
        self._init_error: InvocationError | None = None
        self._closed = False
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> RuntimeAPI:
        """Bind and serve in background threads (what ``with`` does)."""
        if self._server is not None or self._closed:
            raise RuntimeError("a RuntimeAPI starts once")
        self._server = _Server((self.host, self.port), _Handler)
        self._server.api = self
        self._threads = [
            threading.Thread(target=self._server.serve_forever, args=(0.1,), name="runtime-api", daemon=True),
            threading.Thread(target=self._watch_deadlines, name="runtime-api-deadlines", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        """Stop serving; fail what is still open, answer waiting /next calls with 500 and hang up."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            stop = InvocationError(STOPPED, "the runtime API stopped before the invocation finished")
            for invocation in [*self._queue, *self._running.values()]:
                invocation._settle(error=stop.copy())
            self._queue.clear()
            self._running.clear()
            self._cond.notify_all()
        if self._server is None:
            return
        self._server.shutdown()
        with self._cond:
            connections = list(self._connections)
        for sock in connections:  # kept-alive connections would otherwise keep their threads reading
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> RuntimeAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """``host:port`` of the running server, the value of ``AWS_LAMBDA_RUNTIME_API``."""
        if self._server is None:
            raise RuntimeError("the RuntimeAPI is not started")
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    @property
    def init_error(self) -> InvocationError | None:
        """The first init error a runtime client reported (it then exits), if any."""
        return self._init_error

    # -- the caller's side -----------------------------------------------------------------------

    def invoke(self, event: Any, timeout_s: float = 900.0) -> Invocation:
        """Queue ``event`` (JSON-serialisable) for the next runtime client that polls; returns its future.

        After an init error the invocation fails at once with that error, as Lambda serves an init
        error in response to the invoke.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        invocation = Invocation(json.dumps(event).encode(), timeout_s)
        with self._cond:
            if self._closed:
                raise RuntimeError("the RuntimeAPI is closed")
            self.invoked += 1
            if self._init_error is not None:
                invocation._settle(error=self._init_error.copy())
            else:
                self._queue.append(invocation)
                self._cond.notify_all()
        return invocation

    def try_invoke(self, event: Any, timeout_s: float = 900.0, wait_s: float = 0.0) -> Invocation | None:
        """Like :meth:`invoke`, but only when a runtime client is free to take the event (waiting
        up to ``wait_s`` for one, say one that is posting its last answer); None otherwise. That is
        how Lambda answers a synchronous invoke: a function with no free concurrency is throttled
        (``TooManyRequestsException``), its event is not queued."""
        with self._cond:
            free = self._cond.wait_for(
                lambda: self._idle > len(self._queue) or self._init_error is not None or self._closed, wait_s
            )
            return self.invoke(event, timeout_s) if free else None

    def wait_idle(self, clients: int, timeout: float) -> bool:
        """Wait until ``clients`` runtime clients are polling /next (their cold start is over).

        Returns False if that did not happen within ``timeout`` seconds.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._idle >= clients, timeout)

    # -- the runtime clients' side (called from handler threads) ---------------------------------

    def _take(self, sock: socket.socket) -> Invocation | None:
        """Block until an invocation is queued and hand it out, or None: closed, or the client hung up."""
        with self._cond:
            self._idle += 1
            self._cond.notify_all()
            try:
                while not self._closed and not _peer_closed(sock):
                    if self._queue:
                        invocation = self._queue.popleft()
                        invocation._taken = time.monotonic()
                        invocation._expires = invocation._taken + invocation.timeout_s
                        invocation.deadline_ms = int((time.time() + invocation.timeout_s) * 1000)
                        self._running[invocation.request_id] = invocation
                        return invocation
                    self._cond.wait(_PEER_CHECK_S)
                return None
            finally:
                self._idle -= 1
                self._cond.notify_all()  # the deadline watcher learns of a new deadline

    def _requeue(self, invocation: Invocation) -> None:
        """Put back an invocation whose /next reply could not be sent: its client never got it."""
        with self._cond:
            if self._running.pop(invocation.request_id, None) is invocation:
                invocation._expires = invocation._taken = None
                invocation.deadline_ms = None
                self._queue.appendleft(invocation)
                self._cond.notify_all()

    def _finish(self, request_id: str, value: Any = None, error: InvocationError | None = None) -> bool:
        """Settle a handed-out invocation; False if ``request_id`` is not one (unknown, over or timed out)."""
        with self._cond:
            invocation = self._running.pop(request_id, None)
            if invocation is None:
                return False
            invocation._settle(value, error)
            self._cond.notify_all()
            return True

    def _fail_init(self, error: InvocationError) -> None:
        """Record an init error and fail the queued invocations with it: no client of this code can start."""
        with self._cond:
            if self._init_error is None:
                self._init_error = error
            while self._queue:
                self._queue.popleft()._settle(error=error.copy())
            self._cond.notify_all()

    def _watch_deadlines(self) -> None:
        """Fail handed-out invocations at their deadline, so that a hung handler never hangs the caller."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for request_id, invocation in list(self._running.items()):
                    if invocation._expires is not None and invocation._expires <= now:
                        del self._running[request_id]
                        message = f"Task timed out after {invocation.timeout_s:.2f} seconds"
                        invocation._settle(error=InvocationError(TIMED_OUT, message))
                expiries = [i._expires for i in self._running.values() if i._expires is not None]
                self._cond.wait(max(0.0, min(expiries) - now) if expiries else None)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """One thread per connection (a /next call blocks its thread); threads never hold up exit."""

    daemon_threads = True
    allow_reuse_address = True
    api: RuntimeAPI

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A runtime client killed mid-request is routine here, not worth a traceback on stderr.
        log.debug("runtime API connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """The HTTP side: routes the four endpoints awslambdaric uses onto the RuntimeAPI."""

    protocol_version = "HTTP/1.1"  # the client's posts reuse its /next connection
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.api._cond:
            self.server.api._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.api._cond:
            self.server.api._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path != f"{API_PREFIX}/invocation/next":
            self._error(404, "UnknownPath", f"no such endpoint: GET {self.path}")
            return
        api = self.server.api
        invocation = api._take(self.connection)
        if invocation is None:
            self._error(500, STOPPED, "the runtime API is shutting down; the runtime should exit")
            self.close_connection = True
            return
        headers = {
            "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
            "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": api.function_arn,
            "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};Sampled=0",
        }
        try:
            self._send(200, invocation._body, headers)
        except OSError:
            api._requeue(invocation)
            raise

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = self.path.removeprefix(API_PREFIX + "/").split("/")
        api = self.server.api
        if parts == ["init", "error"]:
            api._fail_init(self._parse_error(body))
            self._send(202, b'{"status":"OK"}')
        elif len(parts) == 3 and parts[0] == "invocation" and parts[2] in ("response", "error"):
            if parts[2] == "response":
                settled = api._finish(parts[1], value=self._parse_result(body))
            else:
                settled = api._finish(parts[1], error=self._parse_error(body))
            if settled:
                self._send(202, b'{"status":"OK"}')
            else:
                self._error(400, "InvalidRequestID", f"Invalid request ID: {parts[1]}")
        else:
            self._error(404, "UnknownPath", f"no such endpoint: POST {self.path}")

    def _parse_result(self, body: bytes) -> Any:
        """The handler's return value: JSON as awslambdaric marshals it; bytes it returned stay bytes."""
        if self.headers.get_content_type() != "application/json":
            return body
        try:
            return json.loads(body)
        except ValueError:
            return body

    def _parse_error(self, body: bytes) -> InvocationError:
        """Lambda's error document, falling back on the error-type header if the body is not one."""
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            doc = {"errorMessage": body.decode(errors="replace")}
        error_type = doc.get("errorType") or self.headers.get(ERROR_TYPE_HEADER) or "Unhandled"
        trace = doc.get("stackTrace")
        frames = [str(frame) for frame in trace] if isinstance(trace, list) else []
        return InvocationError(str(error_type), str(doc.get("errorMessage") or ""), frames)

    def _error(self, status: int, error_type: str, message: str) -> None:
        body = json.dumps({"errorMessage": message, "errorType": error_type}).encode()
        try:
            self._send(status, body)
        except OSError:
            self.close_connection = True

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")  # exactly this, or awslambdaric passes bytes on
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
