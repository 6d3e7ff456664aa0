"""Runs ``statemachine.asl.json`` on one machine, as Step Functions would, for the local emulation.

It interprets the part of the Amazon States Language our workflow uses (Task states that
invoke Lambda, a Distributed Map reading its items from S3 and writing its results there,
Retry and Catch, Fail, Succeed, Pass, JSONPath ``$.a.b``, and ``States.Format``; a Map run that
fails stops its children that wait to retry, as Step Functions aborts them) and refuses
anything else by name, so the file the cloud runs and the file CI runs cannot drift apart
unnoticed. Lambda functions are callables taking the payload; S3 is the boto3 client the
caller gives (moto's server in the emulation).
"""

from __future__ import annotations

import json
import random
import re
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

DEFINITION = Path(__file__).with_name("statemachine.asl.json")
LAMBDA_INVOKE = "arn:aws:states:::lambda:invoke"
COMMON = {"Type", "Comment", "Next", "End", "InputPath", "OutputPath", "ResultPath"}
ALLOWED = {
    "Task": COMMON | {"Resource", "Parameters", "Retry", "Catch", "TimeoutSeconds"},
    "Map": COMMON
    | {"ItemReader", "ItemProcessor", "MaxConcurrency", "MaxConcurrencyPath", "ToleratedFailurePercentage"}
    | {"ResultWriter", "Catch", "Label"},
    "Pass": COMMON | {"Result", "Parameters"},
    "Fail": {"Type", "Comment", "Error", "Cause", "ErrorPath", "CausePath"},
    "Succeed": {"Type", "Comment", "InputPath", "OutputPath"},
}
Function = Callable[[Any], Any]
ABORTED = "States.Aborted"  # a child execution stopped because its Map run failed


class TaskError(Exception):
    """A state's error, named as Step Functions names it (``error``) with its ``cause``."""

    def __init__(self, error: str, cause: str) -> None:
        super().__init__(f"{error}: {cause}")
        self.error, self.cause = error, cause


def load_definition(substitutions: dict[str, str], path: Path = DEFINITION) -> dict[str, Any]:
    """The state machine with its ``${Name}`` placeholders filled in, as CloudFormation does."""
    text = path.read_text()
    missing = sorted(set(re.findall(r"\$\{(\w+)\}", text)) - set(substitutions))
    if missing:
        raise ValueError(f"{path.name}: no value for {', '.join(missing)}")
    return json.loads(re.sub(r"\$\{(\w+)\}", lambda m: substitutions[m.group(1)], text))


class LocalWorkflow:
    """One execution at a time of a state machine against local functions and an S3 client."""

    def __init__(self, definition: dict[str, Any], functions: dict[str, Function], s3: Any) -> None:
        self.definition = definition
        self.functions = functions
        self.s3 = s3
        self.execution = ""
        self.events: list[str] = []  # "state: outcome" lines, like the console's history
        self._lock = threading.Lock()
        self._abort = threading.Event()  # set when a Map run fails: its children stop retrying

    def run(self, data: Any) -> Any:
        """Run to the end; return the output, or raise TaskError as the execution's failure."""
        self.execution = uuid.uuid4().hex[:12]
        self._abort = threading.Event()
        return self._machine(self.definition, data)

    # ----------------------------------------------------------------- states
    def _machine(self, machine: dict[str, Any], data: Any) -> Any:
        name = machine["StartAt"]
        while True:
            state = machine["States"][name]
            kind = state["Type"]
            extra = set(state) - ALLOWED.get(kind, set())
            if kind not in ALLOWED or extra:
                raise ValueError(f"state {name}: the local workflow does not run {kind} {sorted(extra)}")
            if kind == "Fail":
                self._note(name, "failed")
                error = state.get("Error") or _path(data, state.get("ErrorPath", "$.Error"))
                cause = state.get("Cause") or _value(data, state.get("CausePath", "$.Cause"))
                raise TaskError(str(error), str(cause))
            effective = _path(data, state.get("InputPath", "$"))
            try:
                result = self._state(name, state, effective)
            except TaskError as exc:
                handler = _matching(state.get("Catch", []), exc.error)
                if handler is None:
                    raise
                self._note(name, f"caught {exc.error}")
                data = _put(data, handler.get("ResultPath", "$"), {"Error": exc.error, "Cause": exc.cause})
                name = handler["Next"]
                continue
            if kind in ("Task", "Map", "Pass"):
                data = _put(data, state.get("ResultPath", "$"), result)
            data = _path(data, state.get("OutputPath", "$"))
            if kind == "Succeed" or state.get("End"):
                return data
            name = state["Next"]

    def _state(self, name: str, state: dict[str, Any], data: Any) -> Any:
        kind = state["Type"]
        if kind == "Pass":
            return _parameters(state["Parameters"], data) if "Parameters" in state else state.get("Result", data)
        if kind == "Succeed":
            return data
        if kind == "Task":
            return self._task(name, state, data)
        return self._map(name, state, data)

    def _task(self, name: str, state: dict[str, Any], data: Any) -> Any:
        if state["Resource"] != LAMBDA_INVOKE:
            raise ValueError(f"state {name}: the local workflow only runs {LAMBDA_INVOKE}")
        params = _parameters(state.get("Parameters", {"Payload.$": "$"}), data)
        function = self.functions.get(params["FunctionName"])
        if function is None:
            raise TaskError("Lambda.ResourceNotFoundException", f"no function {params['FunctionName']}")
        attempts: dict[int, int] = {}
        while True:
            try:
                payload = function(params.get("Payload"))
                self._note(name, "succeeded")
                return {"Payload": payload, "StatusCode": 200, "ExecutedVersion": "$LATEST"}
            except TaskError as exc:
                retry = _matching(state.get("Retry", []), exc.error)
                index = state.get("Retry", []).index(retry) if retry else -1
                attempts[index] = attempts.get(index, 0) + 1
                if retry is None or attempts[index] > retry.get("MaxAttempts", 3):
                    self._note(name, f"failed {exc.error}")
                    raise
                wait = retry.get("IntervalSeconds", 1) * retry.get("BackoffRate", 2.0) ** (attempts[index] - 1)
                if retry.get("JitterStrategy") == "FULL":
                    wait = random.uniform(0, wait)
                self._note(name, f"retry {attempts[index]} after {exc.error}")
                if self._abort.wait(min(wait, retry.get("MaxDelaySeconds", wait))):
                    self._note(name, "aborted")
                    raise TaskError(
                        ABORTED, f"the Map run failed while this item waited to retry {exc.error}"
                    ) from None

    def _map(self, name: str, state: dict[str, Any], data: Any) -> Any:
        reader = state["ItemReader"]
        if reader.get("Resource") != "arn:aws:states:::s3:getObject" or reader["ReaderConfig"]["InputType"] != "JSON":
            raise ValueError(f"state {name}: the local workflow reads items only from a JSON object in S3")
        where = _parameters(reader["Parameters"], data)
        items = json.loads(self.s3.get_object(Bucket=where["Bucket"], Key=where["Key"])["Body"].read())
        limit = state.get("MaxConcurrency") or (
            _path(data, state["MaxConcurrencyPath"]) if "MaxConcurrencyPath" in state else 0
        )
        workers = min(len(items), int(limit)) if limit else len(items)
        processor = state["ItemProcessor"]
        tolerated = state.get("ToleratedFailurePercentage", 0)
        failures = 0

        def child(item: Any) -> tuple[bool, Any]:
            nonlocal failures
            try:
                return True, self._machine(processor, item)
            except TaskError as exc:
                with self._lock:  # past the tolerance the Map run fails and stops its other children
                    failures += 1
                    if 100 * failures / len(items) > tolerated:
                        self._abort.set()
                return False, {"Error": exc.error, "Cause": exc.cause}

        with ThreadPoolExecutor(max(1, workers)) as pool:
            outcomes = list(pool.map(child, items))
        failed = [out for ok, out in outcomes if not ok]
        run = f"{self.execution}/{name}"
        result: Any = [out for _, out in outcomes]
        if "ResultWriter" in state:
            target = _parameters(state["ResultWriter"]["Parameters"], data)
            prefix = f"{target['Prefix'].rstrip('/')}/{run}"
            for label, rows in (("SUCCEEDED", [o for ok, o in outcomes if ok]), ("FAILED", failed)):
                body = json.dumps(rows).encode()
                self.s3.put_object(Bucket=target["Bucket"], Key=f"{prefix}/{label}_0.json", Body=body)
            result = {"MapRunArn": run, "ResultWriterDetails": {"Bucket": target["Bucket"], "Key": prefix}}
        if failed and 100 * len(failed) / len(items) > tolerated:
            first = next((f for f in failed if f["Error"] != ABORTED), failed[0])
            self._note(name, f"failed: {len(failed)} of {len(items)} items")
            raise TaskError(
                "States.ExceedToleratedFailureThreshold",
                f"{len(failed)} of {len(items)} items failed; first: {first['Error']}: {first['Cause']}",
            )
        self._note(name, f"succeeded: {len(items)} items")
        return result

    def _note(self, name: str, outcome: str) -> None:
        with self._lock:
            self.events.append(f"{name}: {outcome}")


# --------------------------------------------------------------------- JSONPath and friends
def _matching(rules: list[dict[str, Any]], error: str) -> dict[str, Any] | None:
    for rule in rules:
        names = rule["ErrorEquals"]
        if error in names or "States.ALL" in names or ("States.TaskFailed" in names and error != "States.Timeout"):
            return rule
    return None


def _path(data: Any, path: str | None) -> Any:
    """``$`` or ``$.a.b``; ``None`` (a JSON null path) gives an empty object, as ASL does."""
    if path is None:
        return {}
    if path == "$":
        return data
    if not path.startswith("$."):
        raise ValueError(f"the local workflow only reads paths like $.a.b, not {path!r}")
    for part in path[2:].split("."):
        if not isinstance(data, dict) or part not in data:
            raise TaskError("States.Runtime", f"the path {path!r} matches nothing in the input")
        data = data[part]
    return data


def _put(data: Any, path: str | None, value: Any) -> Any:
    """ResultPath: ``$`` replaces the input, ``null`` keeps it, ``$.a.b`` sets a field."""
    if path is None:
        return data
    if path == "$":
        return value
    out = dict(data) if isinstance(data, dict) else {}
    node = out
    parts = path[2:].split(".")
    for part in parts[:-1]:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[parts[-1]] = value
    return out


def _value(data: Any, expression: str) -> Any:
    """A path, or the one intrinsic function our definition uses: ``States.Format``."""
    match = re.fullmatch(r"States\.Format\('((?:[^'\\]|\\.)*)',\s*(.+)\)", expression)
    if not match:
        return _path(data, expression)
    template, args = match.group(1), [_path(data, a.strip()) for a in match.group(2).split(",")]
    for arg in args:
        template = template.replace("{}", str(arg), 1)
    return template


def _parameters(template: Any, data: Any) -> Any:
    """Parameters / ItemSelector: keys ending in ``.$`` take their value from the input."""
    if isinstance(template, dict):
        return {
            (k[:-2] if k.endswith(".$") else k): (_value(data, v) if k.endswith(".$") else _parameters(v, data))
            for k, v in template.items()
        }
    if isinstance(template, list):
        return [_parameters(v, data) for v in template]
    return template
