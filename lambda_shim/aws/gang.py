"""Gang start: every rank of a communicator must be running at once, or the job must fail fast.

A Distributed Map's ``MaxConcurrency`` is a ceiling, not a promise. Lambda runs a function's
invocations only up to its concurrency (its ``ReservedConcurrentExecutions`` if it has one,
else the account's unreserved pool, as small as 10 on a new account) and adds at most 1,000
execution environments per function every 10 s; an invocation beyond either is refused with
``TooManyRequestsException`` and the Map's Task retries it. So, before a job starts:

* the planned ranks must fit the function's concurrency (:func:`check_concurrency`), else the
  plan is refused in one line naming the quota and how to raise it;
* the state machine's retries of throttled invocations must last until Lambda's scaling lets
  the last rank in (:func:`start_window_s`, read from the definition that runs);
* every rank waits for the others only until the connect deadline (:func:`connect_deadline_s`:
  that window plus a cold start), so a job whose ranks cannot all start fails within it,
  naming the ranks that never came (:func:`explain_failure`), having billed at most
  ranks x (deadline + cold start) of Lambda time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cai_hpc.errors import InputError
from lambda_shim.aws.cost import PRICES

SCALE_STEP = 1000  # environments Lambda adds per function ...
SCALE_PERIOD_S = 10.0  # ... every this many seconds
COLD_START_S = 60.0  # the image, imports, model download: the most a rank may take to register
THROTTLED = "Lambda.TooManyRequestsException"
CONCURRENCY_QUOTA = "Concurrent executions (Service Quotas code L-B99A9384)"
NEVER_ARRIVED = re.compile(r"(\d+) of (\d+) ranks never arrived before the deadline: ([\d, .]+)")


def scaling_s(ranks: int) -> float:
    """How long after the first invocation Lambda's scaling rate lets the last of ``ranks`` in."""
    return SCALE_PERIOD_S * ((ranks - 1) // SCALE_STEP)


def throttle_retry(definition: dict[str, Any]) -> dict[str, Any]:
    """The Retry rule the rank Task applies to ``TooManyRequestsException``."""
    task = _rank_task(definition)
    for rule in task.get("Retry", []):
        if THROTTLED in rule["ErrorEquals"] or "States.ALL" in rule["ErrorEquals"]:
            return rule
    raise ValueError(f"the rank task does not retry {THROTTLED}")


def retry_times(rule: dict[str, Any]) -> list[float]:
    """When each retry of a rule happens, in seconds after the first attempt, at the latest
    (Step Functions' delays; a FULL jitter would only make them earlier)."""
    times, elapsed = [], 0.0
    for attempt in range(rule.get("MaxAttempts", 3)):
        delay = rule.get("IntervalSeconds", 1) * rule.get("BackoffRate", 2.0) ** attempt
        elapsed += min(delay, rule.get("MaxDelaySeconds", delay))
        times.append(elapsed)
    return times


def start_window_s(ranks: int, definition: dict[str, Any]) -> float:
    """By when every rank has been invoked successfully, if the concurrency holds them: the first
    retry at or after Lambda's scaling reaches the last rank. Refuses a plan the retries cannot cover."""
    needed = scaling_s(ranks)
    if needed == 0:
        return 0.0
    rule = throttle_retry(definition)
    if rule.get("JitterStrategy", "NONE") != "NONE":
        raise ValueError("throttled ranks must be retried without jitter, so that the retries span a known time")
    later = [t for t in retry_times(rule) if t >= needed]
    if not later:
        most = SCALE_STEP * (1 + int(retry_times(rule)[-1] // SCALE_PERIOD_S))
        raise InputError(
            f"{ranks} ranks need {needed:.0f} s of Lambda's scaling (1,000 environments per 10 s) but the state "
            f"machine retries a throttled rank for {retry_times(rule)[-1]:.0f} s: use --ranks {most} or fewer"
        )
    return later[0]


def connect_deadline_s(ranks: int, definition: dict[str, Any], cold_start_s: float = COLD_START_S) -> float:
    """How long a rank waits at the rendezvous for the others: the start window plus a cold start."""
    return start_window_s(ranks, definition) + cold_start_s


# ----------------------------------------------------------------------------- concurrency
@dataclass(frozen=True)
class Concurrency:
    """What Lambda lets the rank function run at once (from GetFunctionConcurrency and GetAccountSettings)."""

    function: str
    reserved: int | None  # ReservedConcurrentExecutions, None when the function has none
    unreserved: int | None = None  # the account's UnreservedConcurrentExecutions (read when not reserved)
    account: int | None = None  # the account's ConcurrentExecutions quota

    @property
    def limit(self) -> int | None:
        return self.reserved if self.reserved is not None else self.unreserved


def read_concurrency(lambda_client: Any, function: str) -> Concurrency:
    """The function's reserved concurrency; without one, the account's unreserved pool."""
    reserved = lambda_client.get_function_concurrency(FunctionName=function).get("ReservedConcurrentExecutions")
    name = function.split(":")[6] if function.startswith("arn:") else function
    if reserved is not None:
        return Concurrency(name, int(reserved))
    limits = lambda_client.get_account_settings()["AccountLimit"]
    return Concurrency(name, None, int(limits["UnreservedConcurrentExecutions"]), int(limits["ConcurrentExecutions"]))


def check_concurrency(ranks: int, concurrency: Concurrency) -> None:
    """Refuse, in one line naming the quota and how to raise it, ranks that cannot all run at once."""
    limit = concurrency.limit
    if limit is None or ranks <= limit:
        return
    if concurrency.reserved is not None:
        raise InputError(
            f"the plan needs {ranks} ranks running at once but {concurrency.function} has ReservedConcurrentExecutions "
            f"{limit}: raise it (the stack's reserved-concurrency parameter, or aws lambda put-function-concurrency "
            f"--function-name {concurrency.function} --reserved-concurrent-executions N; Lambda keeps 100 of the "
            f"account's concurrency unreserved), or use --ranks {limit}"
        )
    raise InputError(
        f"the plan needs {ranks} ranks running at once but the account's unreserved Lambda concurrency is {limit} "
        f"(quota {CONCURRENCY_QUOTA}: {concurrency.account}): ask for more in Service Quotas "
        f"(aws service-quotas request-service-quota-increase --service-code lambda --quota-code L-B99A9384 "
        f"--desired-value N), or use --ranks {limit}"
    )


def rank_function(definition: dict[str, Any]) -> str:
    """The rank function's name or ARN, as the state machine invokes it."""
    return _rank_task(definition)["Parameters"]["FunctionName"]


def _rank_task(definition: dict[str, Any]) -> dict[str, Any]:
    for state in definition["States"].values():
        if state["Type"] == "Map":
            processor = state["ItemProcessor"]
            return processor["States"][processor["StartAt"]]
    raise ValueError("the state machine has no Map of ranks")


# ----------------------------------------------------------------------------- failures
def explain_failure(
    cause: str,
    world_size: int,
    deadline_s: float,
    memory_mb: int,
    throttled: list[int] | None = None,
    billed_s: float | None = None,
    cold_start_s: float = COLD_START_S,
) -> str:
    """The failure of a job in one line. When ranks never started: which, the likely cause, and
    the Lambda time billed (measured when known, and its bound: a rank that started fails by its
    cold start plus the deadline). Any other failure keeps its cause, with the measured time."""
    measured = f"{billed_s:.1f} s measured, " if billed_s is not None else ""
    match = NEVER_ARRIVED.search(cause)
    if match is None:
        return f"{cause}; Lambda time billed: {billed_s:.1f} s" if billed_s is not None else cause
    bound = world_size * (deadline_s + cold_start_s)
    money = bound * memory_mb / 1024 * PRICES["lambda_gb_s"]
    spent = (
        f"Lambda time billed: {measured}at most {bound:.0f} s ({world_size} ranks x ({deadline_s:.0f} s deadline + "
        f"{cold_start_s:.0f} s cold start), ${money:.4f})"
    )
    missing, shown = int(match.group(1)), match.group(3).strip().rstrip(".").strip()
    if throttled and "." not in match.group(3):  # the whole list of missing ranks is known
        throttled = [r for r in throttled if str(r) in shown.replace(",", " ").split()]
    if throttled:
        why = (
            f"Lambda throttled rank(s) {', '.join(map(str, throttled[:20]))} ({THROTTLED}) until the deadline: "
            f"the rank function's or the account's concurrency was taken by others, or Lambda scaled too slowly"
        )
    else:
        why = (
            "Lambda did not start them in time: the account's concurrency is shared with other functions, "
            f"or they were throttled ({THROTTLED} in the Map run's failed items)"
        )
    return (
        f"{missing} of {world_size} ranks never started within the {deadline_s:.0f} s connect deadline "
        f"(ranks {shown}); likely cause: {why}; {spent}"
    )
