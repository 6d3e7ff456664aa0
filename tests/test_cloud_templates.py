"""The AWS deployment files of lambda_shim: the SAM template, the state machine and the Dockerfile.

Nothing here talks to AWS or runs docker: cfn-lint checks the template (and the state machine
definition, inlined into a plain CloudFormation template so that its schema rule sees it), and the
rest reads the files and checks that they agree with each other.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_modules, skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "lambda_shim" / "aws"
TEMPLATE = SHIM / "template.yaml"
ASL = SHIM / "statemachine.asl.json"
DOCKERFILE = SHIM / "Dockerfile"

# Errors of the lambda:invoke integration that a rank may be retried on: throttling (the function
# never ran) and Lambda's service and client errors (it may have run, or may still be running; a
# retry that finds the rank's record returns it). An error the rank raised itself is never
# retried: a rank that ran and failed cannot rejoin its communicator.
INVOCATION_ERRORS = {
    "Lambda.ServiceException",
    "Lambda.TooManyRequestsException",
    "Lambda.SdkClientException",
    "Lambda.AWSLambdaException",
}
HANDLERS = {"RankFunction": "lambda_shim.aws.handler.handler", "SummarizeFunction": "lambda_shim.aws.handler.summarize"}
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
    assert rank["Retry"], "a throttled invocation (the function never ran) should be retried"
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
    assert params["Architecture"]["AllowedValues"] == ["x86_64", "arm64"]
    functions = resources(template, "AWS::Serverless::Function")
    assert set(functions) == set(HANDLERS)
    for name, fn in functions.items():
        props = fn["Properties"]
        assert props["PackageType"] == "Image"
        assert props["ImageUri"] == {"Ref": "ImageUri"}
        assert props["ImageConfig"]["Command"] == [HANDLERS[name]]
        assert props["Timeout"] == 900
        assert props["Architectures"] == [{"Ref": "Architecture"}]
    rank = functions["RankFunction"]["Properties"]
    assert rank["MemorySize"] == {"Ref": "MemorySize"}
    assert rank["EphemeralStorage"]["Size"] >= 1024
    assert functions["SummarizeFunction"]["Properties"]["MemorySize"] == 1024
    secret_policies = [p for p in rank["Policies"] if "AWSSecretsManagerGetSecretValuePolicy" in p]
    assert secret_policies == [{"AWSSecretsManagerGetSecretValuePolicy": {"SecretArn": {"Ref": "TokenSecret"}}}]
    assert rank["Environment"]["Variables"]["CAI_HPC_TOKEN_SECRET"] == {"Ref": "TokenSecret"}


def test_rank_concurrency_is_reserved_only_when_asked(template):
    """Reserved concurrency 0 would throttle every invocation: 0 means no reservation."""
    param = template["Parameters"]["RankReservedConcurrency"]
    assert (param["Default"], param["MinValue"]) == (0, 0)
    rank = template["Resources"]["RankFunction"]["Properties"]
    reserved = rank["ReservedConcurrentExecutions"]["Fn::If"]
    assert reserved == ["HasReservedConcurrency", {"Ref": "RankReservedConcurrency"}, {"Ref": "AWS::NoValue"}]
    assert template["Conditions"]["HasReservedConcurrency"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "RankReservedConcurrency"}, 0]}]
    }


def test_bucket_and_secret(template):
    bucket = template["Resources"]["ResultsBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values()) and len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    secret = template["Resources"]["TokenSecret"]
    assert secret["Type"] == "AWS::SecretsManager::Secret"
    assert "Name" not in secret["Properties"], "a fixed name collides between two stacks of a region"
    generate = secret["Properties"]["GenerateSecretString"]
    assert generate["PasswordLength"] == 64 and generate["ExcludePunctuation"] is True


def test_outputs_hold_every_deployment_fact(template):
    from lambda_shim.aws.cloud import STACK_OUTPUTS

    outputs = {name: out["Value"] for name, out in template["Outputs"].items()}
    assert set(STACK_OUTPUTS) <= set(outputs), (
        f"cloud run reads outputs the template lacks: {set(STACK_OUTPUTS) - set(outputs)}"
    )
    assert outputs["StateMachineArn"] == {"Ref": "InferenceStateMachine"}
    assert outputs["ResultsBucketName"] == {"Ref": "ResultsBucket"}
    assert outputs["TokenSecretArn"] == {"Ref": "TokenSecret"}
    for name in ("MaxRanks", "MemorySize", "Architecture", "RunPrefix"):
        assert outputs[name] == {"Ref": name}
    rank_env = template["Resources"]["RankFunction"]["Properties"]["Environment"]["Variables"]
    assert outputs["RendezvousAddress"] == rank_env["CAI_HPC_RENDEZVOUS"], (
        "the functions reach the server of the output"
    )
    assert outputs["RendezvousAddress"]["Fn::If"][1] == {"Fn::Sub": "${RendezvousInstance.PublicIp}:${RendezvousPort}"}


def statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(resource, statement) of every inline policy statement of the template."""
    found = []
    for name, res in template["Resources"].items():
        props = res.get("Properties", {})
        for policy in props.get("Policies", []):
            document = policy.get("PolicyDocument", policy)
            found += [(name, s) for s in document.get("Statement", [])]
    return found


def test_s3_access_is_least_privilege(template):
    """Reads anywhere in the stack's bucket (and the read-only buckets), writes only under the run
    prefix, and nothing the code never does (it deletes nothing and sets no ACL or lifecycle)."""
    for name, res in template["Resources"].items():
        for policy in res.get("Properties", {}).get("Policies", []):
            assert not [k for k in policy if k.startswith("S3")], f"{name}: a SAM S3 policy grants delete: {policy}"
    allowed = {
        "s3:GetObject",
        "s3:PutObject",
        "s3:ListBucket",
        "s3:ListMultipartUploadParts",
        "s3:AbortMultipartUpload",
    }
    writes = {"s3:PutObject", "s3:AbortMultipartUpload"}
    run_prefix = {"Fn::Sub": "${ResultsBucket.Arn}/${RunPrefix}*"}
    seen = set()
    for name, statement in statements(template):
        action = statement["Action"]
        actions = {a for a in ([action] if isinstance(action, str) else action) if a.startswith("s3:")}
        seen |= actions
        assert actions <= allowed, f"{name} may {actions - allowed}"
        if actions & writes:
            assert statement["Resource"] == run_prefix, f"{name} writes outside the run prefix: {statement['Resource']}"
        if "ReadOnlyBuckets" in json.dumps(statement["Resource"]):
            assert actions <= {"s3:GetObject", "s3:ListBucket"}, f"{name} may {actions} on the read-only buckets"
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= seen
    reads = [s for n, s in statements(template) if n == "RankFunction" and s["Action"] == ["s3:GetObject"]]
    assert len(reads) == 1 and "ReadOnlyBuckets" in json.dumps(reads[0]["Resource"]), "ranks read the read-only buckets"


def test_rendezvous_server(template):
    res = template["Resources"]
    created = {n for n, r in res.items() if r.get("Condition") == "CreateRendezvous"}
    assert created == {"RendezvousSecurityGroup", "RendezvousRole", "RendezvousInstanceProfile", "RendezvousInstance"}
    assert template["Parameters"]["DeployRendezvous"]["Default"] == "true"
    instance = res["RendezvousInstance"]["Properties"]
    arm, x86 = instance["ImageId"]["Fn::If"][1:]
    assert arm == "{{resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64}}"
    assert x86 == "{{resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64}}"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    (ingress,) = res["RendezvousSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert ingress["FromPort"] == ingress["ToPort"] == {"Ref": "RendezvousPort"}
    assert ingress["CidrIp"] == {"Ref": "RendezvousIngressCidr"} and ingress["IpProtocol"] == "tcp"
    role = res["RendezvousRole"]["Properties"]
    granted = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
    secret = [s for s in granted if s["Action"] == "secretsmanager:GetSecretValue"]
    assert secret == [
        {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": {"Ref": "TokenSecret"}}
    ]
    assert all(s["Resource"] != "*" for s in granted if s["Action"] != "ecr:GetAuthorizationToken")
    script = instance["UserData"]["Fn::Base64"]["Fn::Sub"][0]
    assert "-m lambda_shim.rendezvous --host 0.0.0.0 --port ${RendezvousPort}" in script
    assert "Restart=always" in script and "systemctl enable --now cai-hpc-rendezvous.service" in script
    assert "-e CAI_HPC_TOKEN_FILE=/run/secret" in script, "the secret reaches the server as a file"
    assert "CAI_HPC_TOKEN=" not in script and "umask 077" in script
    (rule,) = template["Rules"].values()
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "DeployRendezvous"}, "false"]}
    assert rule["Assertions"][0]["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "RendezvousAddress"}, ""]}]}


def test_sam_transform_passes_cfn_lint(tmp_path, template, asl, monkeypatch):
    """What `sam deploy` hands CloudFormation: the template through the SAM translator (the state
    machine's definition inline, as after `sam package`), linted as plain CloudFormation."""
    missing = missing_modules("samtranslator.translator.translator", hint="aws-sam-translator is in the test extras")
    if missing is not None:
        skip_or_fail(missing)
    from samtranslator.parser.parser import Parser
    from samtranslator.translator import translator

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the translator builds ARNs for a region
    sam = json.loads(json.dumps(template))
    machine = sam["Resources"]["InferenceStateMachine"]["Properties"]
    del machine["DefinitionUri"]
    machine["Definition"] = asl
    plain = translator.Translator(managed_policy_map={}, sam_parser=Parser()).translate(sam, parameter_values={})
    kinds = {r["Type"] for r in plain["Resources"].values()}
    assert {"AWS::Lambda::Function", "AWS::StepFunctions::StateMachine", "AWS::EC2::Instance"} <= kinds
    rank = plain["Resources"]["RankFunction"]["Properties"]
    assert rank["Architectures"] == [{"Ref": "Architecture"}]
    path = tmp_path / "translated.json"
    path.write_text(json.dumps(plain, indent=1))
    done = run_cfn_lint(path)
    assert done.returncode == 0, f"cfn-lint exit {done.returncode}:\n{done.stdout}{done.stderr}"


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

# The C library of each Lambda base image the Dockerfile may start from (AWS's table of Lambda
# runtimes: python3.11 runs on Amazon Linux 2, python3.12 and python3.13 on Amazon Linux 2023).
# Every architecture of an image has the same level.
BASE_GLIBC = {
    "public.ecr.aws/lambda/python:3.11": (2, 26),
    "public.ecr.aws/lambda/python:3.12": (2, 34),
    "public.ecr.aws/lambda/python:3.13": (2, 34),
}
ARCHITECTURES = ("x86_64", "aarch64")  # the template's Architecture values x86_64 and arm64
INDEX = "https://pypi.org/simple/"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def stages(steps: list[tuple[str, str]]) -> list[tuple[str, str | None, list[tuple[str, str]]]]:
    """(image, stage name, instructions) of each FROM, in order."""
    found = []
    for op, arg in steps:
        if op == "FROM":
            image, _, name = arg.partition(" AS ")
            found.append((image.strip(), name.strip() or None, []))
        elif found:
            found[-1][2].append((op, arg))
    return found


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The default of every ARG that declares one (what a plain build uses)."""
    return dict(arg.split("=", 1) for op, arg in steps if op == "ARG" and "=" in arg)


def final_base(steps: list[tuple[str, str]]) -> str:
    """The image the final stage starts from, through the stages it names, ARGs filled in."""
    args = arg_defaults(steps)
    by_name = {name: image for image, name, _ in stages(steps) if name}
    image = stages(steps)[-1][0]
    while image in by_name:
        image = by_name[image]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def manylinux_platforms(glibc: tuple[int, int], arch: str) -> list[str]:
    """Every platform tag pip accepts on a glibc of this level (as packaging computes them on the
    machine itself; pip's --platform takes them one by one)."""
    major, minor = glibc
    oldest = 5 if arch == "x86_64" else 17
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, oldest - 1, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{legacy[m]}_{arch}" for m in legacy if oldest <= m <= minor and (m == 17 or arch == "x86_64")]
    return [*tags, f"linux_{arch}"]


def image_requirements(steps: list[tuple[str, str]]) -> list[str]:
    """What the image installs: the pinned torch and torchvision, then the package's dependencies
    with its `aws` extra (from setup.cfg, as pip reads them from /build)."""
    import configparser

    args = arg_defaults(steps)
    runs = " ".join(arg for _, _, body in stages(steps) for op, arg in body if op == "RUN")
    assert '"/build[aws]"' in runs, "the image installs the package with its aws extra"
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    wanted = cfg["options"]["install_requires"].split() + cfg["options.extras_require"]["aws"].split()
    return [f"torch=={args['TORCH_VERSION']}", f"torchvision=={args['TORCHVISION_VERSION']}", *wanted]


def resolve(requirements: list[str], python: str, glibc: tuple[int, int], arch: str, tmp: Path) -> subprocess.Popen:
    """pip's resolution of the requirements for a CPython of this version on this platform, binary
    wheels only, against the package index (a dry run: nothing is installed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PIP_FIND_LINKS", "PIP_NO_INDEX")}
    # This machine's pip configuration caps torch at the release on its disk and adds a local
    # wheel directory: neither says anything about the index the image installs from.
    env["PIP_CONFIG_FILE"] = os.devnull
    # The index serves no separate metadata files (PEP 658) for these wheels: fast-deps reads each
    # wheel's metadata with HTTP range requests instead of downloading it (GBs for PyPI's CUDA
    # torch), and pip >= 24 ends a dry run before fetching the rest.
    assert int(importlib.metadata.version("pip").split(".")[0]) >= 24, "needs pip>=24 (setup.cfg, test extra)"
    platforms = [arg for tag in manylinux_platforms(glibc, arch) for arg in ("--platform", tag)]
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--use-feature=fast-deps",
        "--target", str(tmp / f"target-{arch}"), "--report", str(tmp / f"report-{arch}.json"),
        "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
        "--abi", f"cp{python.replace('.', '')}", *platforms, "--index-url", INDEX, *requirements,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def index_reachable() -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(INDEX + "pip/", method="HEAD"), timeout=15):
            return True
    except OSError:
        return False


def test_dockerfile_base_is_a_known_lambda_image():
    base = final_base(dockerfile_instructions())
    assert base in BASE_GLIBC, f"{base}: not a Lambda base of known glibc (add it to BASE_GLIBC)"


@pytest.mark.slow
def test_image_dependencies_install_on_its_base_as_wheels(tmp_path):
    """The whole dependency set resolves to wheels for the base's Python and glibc, on both
    architectures: what `pip install` in the image will find, with no compiler to fall back on.

    Torch comes from PyPI here (the image takes the PyTorch CPU index, out of reach from CI): the
    same versions with the same platform tags. PyPI's Linux torch also pulls CUDA packages the
    image does not have; they resolve for both platforms too. pip evaluates environment markers
    for the interpreter running it, not for --platform/--python-version; no marker in the set
    differs between the two for what decides the platform."""
    steps = dockerfile_instructions()
    base = final_base(steps)
    python = base.rpartition(":")[2]
    glibc = BASE_GLIBC[base]
    if not index_reachable():
        skip_or_fail(f"the package index {INDEX} is unreachable")
    requirements = image_requirements(steps)
    running = {arch: resolve(requirements, python, glibc, arch, tmp_path) for arch in ARCHITECTURES}
    failed = {}
    for arch, proc in running.items():
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            failed[arch] = out.strip().splitlines()[-2:]
    assert not failed, f"{base} (Python {python}, glibc {glibc[0]}.{glibc[1]}): {failed}"
    for arch in ARCHITECTURES:
        report = json.loads((tmp_path / f"report-{arch}.json").read_text())
        names = {item["metadata"]["name"].lower() for item in report["install"]}
        assert {"torch", "torchvision", "numpy", "h5py", "awslambdaric"} <= names
        wheels = [item["download_info"]["url"].rpartition("/")[2] for item in report["install"]]
        assert all(w.endswith(".whl") for w in wheels), wheels


def test_dockerfile_handlers_are_the_templates(template):
    steps = dockerfile_instructions()
    cmds = [json.loads(arg) for op, arg in stages(steps)[-1][2] if op == "CMD"]
    assert cmds == [[HANDLERS["RankFunction"]]]
    commands = {
        fn["Properties"]["ImageConfig"]["Command"][0]
        for fn in resources(template, "AWS::Serverless::Function").values()
    }
    assert commands == set(HANDLERS.values())


def test_dockerfile_installs_cpu_torch_wheels_before_the_source():
    steps = dockerfile_instructions()
    (deps,) = [body for _, name, body in stages(steps) if name == "deps"]
    env = " ".join(arg for op, arg in deps if op == "ENV")
    assert "PIP_ONLY_BINARY=:all:" in env, "every pip run takes wheels only"
    runs = [arg for op, arg in deps if op == "RUN"]
    torch = next(arg for arg in runs if "download.pytorch.org/whl/cpu" in arg)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch
    args = arg_defaults(steps)
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == ("2.14.1", "0.29.1")
    torch_step = deps.index(("RUN", torch))
    copies = [i for i, (op, _) in enumerate(deps) if op == "COPY"]
    assert torch_step < min(copies), "torch must be installed before anything is copied in"
    assert not any(op == "COPY" and arg.split()[0] in ("cai_hpc", "lambda_shim") for op, arg in deps), (
        "the dependency stage holds no source, so editing it does not reinstall the dependencies"
    )


def test_dockerfile_ships_prebuilt_kernels_for_each_architecture():
    steps = dockerfile_instructions()
    (kernels,) = [body for _, name, body in stages(steps) if name == "kernels"]
    build = next(arg for op, arg in kernels if op == "RUN" and "build-kernels" in arg)
    assert "--out /opt/cai-hpc/kernels" in build
    assert "arm64|aarch64) default=portable" in build and "default=x86-64-v3,x86-64-v4" in build
    assert ("ARG", "TARGETARCH") in kernels
    final = stages(steps)[-1][2]
    assert ("COPY", "--from=kernels /opt/cai-hpc/kernels /opt/cai-hpc/kernels") in final
    assert ("ENV", "CAI_HPC_KERNELS_DIR=/opt/cai-hpc/kernels") in final


def test_handler_module_defines_the_template_handlers():
    """The handler module must define what the template names."""
    module = SHIM / "handler.py"
    defined = {node.name for node in ast.parse(module.read_text()).body if isinstance(node, ast.FunctionDef)}
    for handler in HANDLERS.values():
        mod, func = handler.rsplit(".", 1)
        assert mod == "lambda_shim.aws.handler"
        assert func in defined, f"{module} defines no top-level {func}()"
