"""The AWS deployment files of lambda_shim: the SAM template, the state machine and the Dockerfile.

Nothing here talks to AWS or runs docker: cfn-lint checks the template (and the state machine
definition, inlined into a plain CloudFormation template so that its schema rule sees it), and the
rest reads the files and checks that they agree with each other.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_modules, skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "lambda_shim"
TEMPLATE = SHIM / "template.yaml"
ASL = SHIM / "statemachine.asl.json"
DOCKERFILE = SHIM / "Dockerfile"

# Errors that the lambda:invoke integration raises when the function did not run (or its answer
# was lost before it got to Step Functions); nothing else may be retried, since a rank that ran
# and failed cannot rejoin its communicator.
INVOCATION_ERRORS = {
    "Lambda.ServiceException",
    "Lambda.TooManyRequestsException",
    "Lambda.SdkClientException",
    "Lambda.AWSLambdaException",
}
HANDLERS = {"RankFunction": "lambda_shim.handler.handler", "SummarizeFunction": "lambda_shim.handler.summarize"}
SUBSTITUTION = re.compile(r"\$\{([^}]*)\}")


def cfn_lint() -> list[str]:
    exe = Path(sys.executable).with_name("cfn-lint")
    found = str(exe) if exe.is_file() else shutil.which("cfn-lint")
    if found is None:
        skip_or_fail("cfn-lint is not installed (pip install cfn-lint)")
    return [found]


def run_cfn_lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*cfn_lint(), "--", str(path)], capture_output=True, text=True, timeout=300, cwd=ROOT)


def load_template() -> dict[str, Any]:
    """The template as plain data, CloudFormation's short tags turned into their long forms."""
    if (reason := missing_modules("yaml", hint="PyYAML comes with cfn-lint")) is not None:
        skip_or_fail(reason)
    import yaml

    class CfnLoader(yaml.SafeLoader):
        pass

    def construct(loader, suffix: str, node) -> dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if suffix == "GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}

    CfnLoader.add_multi_constructor("!", construct)
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


@pytest.fixture(scope="module")
def asl() -> dict[str, Any]:
    return json.loads(ASL.read_text())


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: res for name, res in template["Resources"].items() if res["Type"] == kind}


def state_machine(template: dict[str, Any]) -> dict[str, Any]:
    (machine,) = resources(template, "AWS::Serverless::StateMachine").values()
    return machine["Properties"]


def machines(definition: dict[str, Any], where: str = "top level"):
    """Every (where, StartAt/States block) of a definition: the top level, Map processors, Parallel branches."""
    yield where, definition
    for name, state in definition["States"].items():
        for key in ("ItemProcessor", "Iterator"):
            if key in state:
                yield from machines(state[key], f"{name}.{key}")
        for i, branch in enumerate(state.get("Branches", [])):
            yield from machines(branch, f"{name}.Branches[{i}]")


def all_states(definition: dict[str, Any]):
    for _, block in machines(definition):
        yield from block["States"].items()


def successors(state: dict[str, Any]) -> list[str]:
    nxt = [state["Next"]] if "Next" in state else []
    nxt += [catch["Next"] for catch in state.get("Catch", [])]
    nxt += [choice["Next"] for choice in state.get("Choices", [])]
    return nxt + ([state["Default"]] if "Default" in state else [])


# --- cfn-lint ---------------------------------------------------------------------------------


def test_template_passes_cfn_lint():
    done = run_cfn_lint(TEMPLATE)
    assert done.returncode == 0, f"cfn-lint exit {done.returncode}:\n{done.stdout}{done.stderr}"


def test_state_machine_definition_passes_cfn_lint(tmp_path, asl, template):
    """cfn-lint does not open a DefinitionUri file, but it checks an inline Definition against the
    States Language schema; the substitutions are given literal ARNs of the right shape."""
    subs = {
        name: f"arn:aws:lambda:us-east-1:123456789012:function:{name}"
        for name in state_machine(template)["DefinitionSubstitutions"]
    }
    inline = {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Resources": {
            "Machine": {
                "Type": "AWS::StepFunctions::StateMachine",
                "Properties": {
                    "StateMachineType": "STANDARD",
                    "RoleArn": "arn:aws:iam::123456789012:role/machine",
                    "Definition": asl,
                    "DefinitionSubstitutions": subs,
                },
            }
        },
    }
    path = tmp_path / "inline.json"
    path.write_text(json.dumps(inline, indent=1))
    done = run_cfn_lint(path)
    assert done.returncode == 0, f"cfn-lint exit {done.returncode}:\n{done.stdout}{done.stderr}"


# --- the state machine ------------------------------------------------------------------------


def test_substitutions_match_the_template(asl, template):
    props = state_machine(template)
    assert (TEMPLATE.parent / props["DefinitionUri"]).resolve() == ASL
    assert props["Type"] == "STANDARD"
    used = set(SUBSTITUTION.findall(ASL.read_text()))
    declared = set(props["DefinitionSubstitutions"])
    assert used == declared, f"used but not declared: {used - declared}; declared but unused: {declared - used}"
    functions = resources(template, "AWS::Serverless::Function")
    for name, value in props["DefinitionSubstitutions"].items():
        assert value == {"Fn::GetAtt": [value["Fn::GetAtt"][0], "Arn"]}, f"{name} is not a function ARN: {value}"
        assert value["Fn::GetAtt"][0] in functions, f"{name} names {value['Fn::GetAtt'][0]}, not a function here"
    assert props["DefinitionSubstitutions"]["RankFunctionArn"]["Fn::GetAtt"][0] == "RankFunction"
    assert props["DefinitionSubstitutions"]["SummarizeFunctionArn"]["Fn::GetAtt"][0] == "SummarizeFunction"


def test_transitions_name_existing_states(asl):
    for where, block in machines(asl):
        states = block["States"]
        assert block["StartAt"] in states, f"{where}: StartAt {block['StartAt']!r} is not a state"
        for name, state in states.items():
            for target in successors(state):
                assert target in states, f"{where}: {name} goes to {target!r}, not a state of its block"
            terminal = state["Type"] in ("Fail", "Succeed", "Choice") or state.get("End") is True
            assert terminal != ("Next" in state), f"{where}: {name} needs exactly one of Next and End"
        reached, todo = set(), [block["StartAt"]]
        while todo:
            name = todo.pop()
            if name not in reached:
                reached.add(name)
                todo += successors(states[name])
        assert reached == set(states), f"{where}: unreachable states {set(states) - reached}"


def test_ranks_is_a_distributed_map_over_an_s3_array(asl):
    ranks = asl["States"]["Ranks"]
    assert asl["StartAt"] == "Ranks"
    assert ranks["Type"] == "Map"
    assert ranks["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
    reader = ranks["ItemReader"]
    assert reader["Resource"] == "arn:aws:states:::s3:getObject"
    assert reader["ReaderConfig"]["InputType"] == "JSON"
    assert reader["Parameters"] == {"Bucket.$": "$.items.bucket", "Key.$": "$.items.key"}
    assert "ItemSelector" not in ranks and "Parameters" not in ranks, "each item is the rank's whole event"
    assert ranks["MaxConcurrencyPath"] == "$.world_size"
    assert "MaxConcurrency" not in ranks
    assert ranks["ToleratedFailurePercentage"] == 0
    writer = ranks["ResultWriter"]
    assert writer["Resource"] == "arn:aws:states:::s3:putObject"
    assert writer["Parameters"] == {"Bucket.$": "$.results.bucket", "Prefix.$": "$.results.prefix"}


def test_summary_reads_what_the_map_left_of_the_input(asl):
    ranks = asl["States"]["Ranks"]
    summarize = asl["States"][ranks["Next"]]
    assert summarize["Type"] == "Task" and summarize.get("End") is True
    assert summarize["Resource"] == "arn:aws:states:::lambda:invoke"
    assert summarize["Parameters"]["FunctionName"] == "${SummarizeFunctionArn}"
    payload = summarize["Parameters"]["Payload"]
    assert payload == {"job.$": "$.job", "out.$": "$.out", "world_size.$": "$.world_size", "memory_mb.$": "$.memory_mb"}
    assert summarize["OutputPath"] == "$.Payload"
    # The Map's result goes beside the execution input, not over it or over a field the summary reads.
    result = ranks["ResultPath"]
    assert isinstance(result, str) and result != "$"
    for path in payload.values():
        assert not (path == result or path.startswith(result + ".") or result.startswith(path + "."))
    for catch in ranks.get("Catch", []):
        assert asl["States"][catch["Next"]]["Type"] == "Fail"


def test_rank_task_invokes_the_rank_function_with_the_item(asl):
    processor = asl["States"]["Ranks"]["ItemProcessor"]
    rank = processor["States"][processor["StartAt"]]
    assert rank["Type"] == "Task" and rank.get("End") is True
    assert rank["Resource"] == "arn:aws:states:::lambda:invoke"
    assert rank["Parameters"] == {"FunctionName": "${RankFunctionArn}", "Payload.$": "$"}
    assert rank["OutputPath"] == "$.Payload"
    assert rank["Retry"], "a throttled or lost invocation (the function never ran) should be retried"
    assert "Catch" not in rank, "a failed rank must fail the Map"


def test_retries_only_invocation_errors(asl):
    for name, state in all_states(asl):
        for retrier in state.get("Retry", []):
            errors = set(retrier["ErrorEquals"])
            assert errors <= INVOCATION_ERRORS, f"{name} retries {errors - INVOCATION_ERRORS}"
            assert 1 <= retrier.get("MaxAttempts", 3) <= 5
            assert retrier.get("BackoffRate", 2.0) > 1


# --- the template -----------------------------------------------------------------------------


def test_functions(template):
    params = template["Parameters"]
    assert params["MemorySize"]["Default"] == 4096
    assert (params["MemorySize"]["MinValue"], params["MemorySize"]["MaxValue"]) == (128, 10240)
    assert params["MaxRanks"]["Default"] == 1000
    assert params["TokenSecretName"]["Default"] == "cai-hpc/rendezvous"
    functions = resources(template, "AWS::Serverless::Function")
    assert set(functions) == set(HANDLERS)
    for name, fn in functions.items():
        props = fn["Properties"]
        assert props["PackageType"] == "Image"
        assert props["ImageUri"] == {"Ref": "ImageUri"}
        assert props["ImageConfig"]["Command"] == [HANDLERS[name]]
        assert props["Timeout"] == 900
        assert props["Architectures"] == ["x86_64"]
    rank = functions["RankFunction"]["Properties"]
    assert rank["MemorySize"] == {"Ref": "MemorySize"}
    assert rank["EphemeralStorage"]["Size"] >= 1024
    assert functions["SummarizeFunction"]["Properties"]["MemorySize"] == 1024
    secret_policies = [p for p in rank["Policies"] if "AWSSecretsManagerGetSecretValuePolicy" in p]
    assert secret_policies == [{"AWSSecretsManagerGetSecretValuePolicy": {"SecretArn": {"Ref": "TokenSecret"}}}]


def test_bucket_and_secret(template):
    bucket = template["Resources"]["ResultsBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values()) and len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    secret = template["Resources"]["TokenSecret"]
    assert secret["Type"] == "AWS::SecretsManager::Secret"
    assert secret["Properties"]["Name"] == {"Ref": "TokenSecretName"}
    generate = secret["Properties"]["GenerateSecretString"]
    assert generate["PasswordLength"] == 64 and generate["ExcludePunctuation"] is True
    outputs = {name: out["Value"] for name, out in template["Outputs"].items()}
    assert outputs["StateMachineArn"] == {"Ref": "InferenceStateMachine"}
    assert outputs["ResultsBucketName"] == {"Ref": "ResultsBucket"}
    assert outputs["RankFunctionName"] == {"Ref": "RankFunction"}
    assert outputs["SummarizeFunctionName"] == {"Ref": "SummarizeFunction"}
    assert outputs["TokenSecretName"] == {"Ref": "TokenSecretName"}


def test_state_machine_may_run_its_own_child_executions(template):
    props = state_machine(template)
    name = props["Name"]["Fn::Sub"]
    statements = [s for p in props["Policies"] if "Statement" in p for s in p["Statement"]]
    by_action: dict[str, list[str]] = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        resource = statement["Resource"]
        text = resource.get("Fn::Sub", "") if isinstance(resource, dict) else resource
        for action in statement["Action"]:
            by_action.setdefault(action, []).append(text)
    assert any(r.endswith(f":stateMachine:{name}") for r in by_action["states:StartExecution"])
    for action in ("states:DescribeExecution", "states:StopExecution"):
        assert any(r.endswith(f":execution:{name}/*") for r in by_action[action]), action
    for action in ("s3:GetObject", "s3:PutObject"):
        assert action in by_action
    invoked = {p["LambdaInvokePolicy"]["FunctionName"]["Ref"] for p in props["Policies"] if "LambdaInvokePolicy" in p}
    assert invoked == set(HANDLERS)


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_handlers_are_the_templates(template):
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "public.ecr.aws/lambda/python:3.11")
    cmds = [json.loads(arg) for op, arg in steps if op == "CMD"]
    assert cmds == [[HANDLERS["RankFunction"]]]
    commands = {
        fn["Properties"]["ImageConfig"]["Command"][0]
        for fn in resources(template, "AWS::Serverless::Function").values()
    }
    assert commands == set(HANDLERS.values())


def test_dockerfile_installs_cpu_torch_before_the_source():
    steps = dockerfile_instructions()
    runs = [arg for op, arg in steps if op == "RUN"]
    torch = next(i for i, arg in enumerate(runs) if "download.pytorch.org/whl/cpu" in arg)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch]
    args = dict(arg.split("=", 1) for op, arg in steps if op == "ARG")
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == ("2.14.1", "0.29.1")
    copies = [i for i, (op, _) in enumerate(steps) if op == "COPY"]
    source = [i for i, (op, arg) in enumerate(steps) if op == "COPY" and arg.split()[0] in ("cai_hpc", "lambda_shim")]
    torch_step = steps.index(("RUN", runs[torch]))
    assert source and torch_step < min(copies), "torch must be installed before anything is copied in"
    deps_install = next(i for i, (op, arg) in enumerate(steps) if op == "RUN" and "[aws]" in arg)
    assert deps_install < min(source), "the dependency layer must come before the source"


def test_handler_module_defines_the_template_handlers():
    """The handler module must define what the template names."""
    module = SHIM / "handler.py"
    defined = {node.name for node in ast.parse(module.read_text()).body if isinstance(node, ast.FunctionDef)}
    for handler in HANDLERS.values():
        mod, func = handler.rsplit(".", 1)
        assert mod == "lambda_shim.handler"
        assert func in defined, f"{module} defines no top-level {func}()"
