"""A Lambda handler for tests/test_runtime_api.py, run by AWS's real runtime client (awslambdaric).

It echoes the event with what the handler saw of its context, so the test can compare that with
what the Runtime API sent. Event keys: ``sleep`` (seconds to take), ``raise`` (message of a
RankFailedError to raise instead of returning).
"""

from __future__ import annotations

import os
import time

CALLS = 0  # module state: it survives between invocations only if the process is reused (warm start)


class RankFailedError(RuntimeError):
    """A handler's own exception type, to see that its name reaches the caller as errorType."""


def handler(event: dict, context) -> dict:
    global CALLS
    CALLS += 1
    seen_ms = time.time() * 1000  # before the remaining time, so seen_ms + remaining_ms <= the deadline
    remaining_ms = context.get_remaining_time_in_millis()
    if event.get("raise"):
        raise RankFailedError(event["raise"])
    time.sleep(event.get("sleep", 0))
    return {
        "event": event,
        "request_id": context.aws_request_id,
        "function_arn": context.invoked_function_arn,
        "remaining_ms": remaining_ms,
        "seen_ms": seen_ms,
        "pid": os.getpid(),
        "calls": CALLS,
    }
