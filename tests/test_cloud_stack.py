"""`cloud plan|run --stack NAME`: every deployment fact from the stack's outputs, read from moto's
CloudFormation server (a plain template carrying lambda_shim/aws/template.yaml's outputs: moto does not
run the SAM transform), and plans the stack's roles could not carry out refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cai_hpc.errors import InputError
from lambda_shim.aws.cloud import STACK_OUTPUTS, read_stack
from tests.conftest import missing_modules, moto_server, requires_infra

pytestmark = requires_infra(missing_modules("moto.server", hint="moto[server] is in the test extras"))

BUCKET = "stack-bucket"
FACTS = {
    "StateMachineArn": "arn:aws:states:us-east-1:123456789012:stateMachine:demo-inference",
    "RunPrefix": "runs/",
    "ReadOnlyBuckets": "survey-public,models-public",
    "RendezvousAddress": "198.51.100.7:7777",
    "TokenSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:TokenSecret-AbCdEf",
    "MaxRanks": "3",
    "MemorySize": "3538",
    "Architecture": "arm64",
}


def stack_template(outputs: dict[str, str]) -> str:
    body = {key: {"Value": value} for key, value in outputs.items()}
    body["ResultsBucketName"] = {"Value": {"Ref": "ResultsBucket"}}
    resources = {"ResultsBucket": {"Type": "AWS::S3::Bucket", "Properties": {"BucketName": BUCKET}}}
    return json.dumps({"AWSTemplateFormatVersion": "2010-09-09", "Resources": resources, "Outputs": body})


@pytest.fixture(scope="module")
def aws(small_dataset):
    """A moto server holding stack `demo` (every output) and stack `old` (no MaxRanks output), and
    the small dataset's shards under s3://stack-bucket/data/."""
    with moto_server():
        import boto3

        cfn = boto3.client("cloudformation")
        cfn.create_stack(StackName="demo", TemplateBody=stack_template(FACTS))
        old = {k: v for k, v in FACTS.items() if k != "MaxRanks"}
        cfn.create_stack(StackName="old", TemplateBody=stack_template(old).replace(BUCKET, "old-bucket"))
        s3 = boto3.client("s3")
        for shard in sorted(small_dataset.glob("*.h5")):
            s3.upload_file(str(shard), BUCKET, f"data/{shard.name}")
        yield s3


def cloud(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cai_hpc", "cloud", *args], capture_output=True, text=True, timeout=300, env=os.environ
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cai-hpc: error:"), result.stderr
    return lines[0]


def test_every_deployment_fact_comes_from_the_outputs(aws) -> None:
    deployment = read_stack("demo")
    assert deployment.state_machine == FACTS["StateMachineArn"]
    assert deployment.bucket == BUCKET and deployment.run_prefix == "runs/"
    assert deployment.read_only_buckets == ("survey-public", "models-public")
    assert deployment.rendezvous == FACTS["RendezvousAddress"]
    assert deployment.token_secret == FACTS["TokenSecretArn"]
    assert (deployment.max_ranks, deployment.memory_mb, deployment.architecture) == (3, 3538, "arm64")
    assert set(STACK_OUTPUTS) == set(FACTS) | {"ResultsBucketName"}


def test_a_plan_with_the_stack_uses_its_facts(aws) -> None:
    where = ["--data", f"s3://{BUCKET}/data/", "--out", f"s3://{BUCKET}/runs/r1/"]
    result = cloud("plan", "--stack", "demo", *where, "--ranks", "3")
    assert result.returncode == 0, result.stderr
    assert "7 shards" in result.stdout and "3 ranks, 2-3 shards each" in result.stdout
    assert "3538 MB (2 vCPU, arm64) per function" in result.stdout
    # The stack's MaxRanks (3) bounds the plan: one rank per shard (the default) is refused.
    line = one_line_error(cloud("plan", "--stack", "demo", *where))
    assert "7 ranks running at once but the deployment runs at most 3" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "s3://elsewhere/data/"], "--data s3://elsewhere/data/: stack demo's functions read only"),
        (["--model", "s3://elsewhere/m.safetensors"], "--model s3://elsewhere/m.safetensors: stack demo's"),
        (["--out", f"s3://{BUCKET}/outputs/r1/"], f"stack demo's functions write only under s3://{BUCKET}/runs/"),
        (["--out", "s3://elsewhere/runs/r1/"], f"write only under s3://{BUCKET}/runs/"),
        (["--memory-mb", "4096"], "ranks have 3538 MB; redeploy with --parameter-overrides MemorySize=4096"),
        (["--rendezvous", "203.0.113.1:7000"], "--stack gives every deployment fact: drop --rendezvous"),
    ],
)
def test_what_the_roles_cannot_reach_is_refused_before_anything_is_written(aws, args, message) -> None:
    job = {"--data": f"s3://{BUCKET}/data/", "--out": f"s3://{BUCKET}/runs/r1/"}
    extra = list(args)
    for flag in list(job):
        if flag in extra:
            job.pop(flag)
    argv = [x for kv in job.items() for x in kv] + extra
    line = one_line_error(cloud("run", "--stack", "demo", *argv))
    assert message in line, line
    written = aws.list_objects_v2(Bucket=BUCKET, Prefix="runs/").get("KeyCount", 0)
    assert written == 0, "a refused plan wrote its items"


def test_read_only_buckets_may_hold_the_data_and_model(aws) -> None:
    deployment = read_stack("demo")
    deployment.check_reach(
        "s3://survey-public/dr9/", f"s3://{BUCKET}/runs/a/", "s3://models-public/astromae.safetensors"
    )
    with pytest.raises(InputError, match="read only s3://stack-bucket and s3://survey-public and s3://models-public"):
        deployment.check_reach("s3://survey-publicX/dr9/", f"s3://{BUCKET}/runs/a/", None)


def test_a_stack_without_the_outputs_or_missing_is_one_line(aws) -> None:
    assert "stack old lacks the outputs MaxRanks" in one_line_error(
        cloud("plan", "--stack", "old", "--data", "s3://old-bucket/d/", "--out", "s3://old-bucket/runs/x/")
    )
    assert "stack nowhere: cannot read it" in one_line_error(
        cloud("plan", "--stack", "nowhere", "--data", "s3://b/d/", "--out", "s3://b/runs/x/")
    )


def test_arm64_is_priced_below_x86_64() -> None:
    """The same job on Graviton: the same GB-s at arm64's price (20 % less); requests, transitions
    and S3 cost the same."""
    from lambda_shim.aws.cost import LAMBDA_GB_S, estimate_cost, job_cost

    args = ([4800, 4800], 12, 3538, 100.0, 10.0)
    x86, arm = estimate_cost(*args), estimate_cost(*args, architecture="arm64")
    assert arm["lambda_gb_s"] == x86["lambda_gb_s"] == pytest.approx(2 * (10 + 4800 / 200) * 3538 / 1024, abs=1e-3)
    assert arm["usd"]["lambda"] == pytest.approx(0.8 * x86["usd"]["lambda"], rel=1e-3)
    assert arm["usd"]["lambda"] == pytest.approx(arm["lambda_gb_s"] * LAMBDA_GB_S["arm64"], rel=1e-3)
    assert (arm["usd"]["s3"], arm["usd"]["step_functions"]) == (x86["usd"]["s3"], x86["usd"]["step_functions"])
    records = [{"duration_s": 30.0, "init_s": 2.0, "memory_mb": 2048, "shards": 2, "cold": True}] * 2
    billed = job_cost(records, architecture="arm64")
    assert billed["architecture"] == "arm64"
    assert billed["usd"]["lambda"] == pytest.approx(128 * LAMBDA_GB_S["arm64"], rel=1e-3)


@pytest.mark.parametrize(("machine", "architecture"), [("aarch64", "arm64"), ("x86_64", "x86_64")])
def test_summarize_bills_at_the_price_of_the_architecture_it_runs_on(aws, monkeypatch, machine, architecture) -> None:
    from lambda_shim.aws import handler
    from lambda_shim.aws.cost import LAMBDA_GB_S

    record = {"job": "j", "rank": 0, "shards": 1, "memory_mb": 2048, "duration_s": 100.0, "init_s": 0.0}
    out = f"summaries/{machine}"
    aws.put_object(Bucket=BUCKET, Key=f"{out}/ranks/rank-00000.json", Body=json.dumps(record).encode())
    aws.put_object(Bucket=BUCKET, Key=f"{out}/summary.json", Body=json.dumps({"samples": 7, "metrics": None}))
    monkeypatch.setattr("platform.machine", lambda: machine)
    handler.summarize({"job": "j", "out": f"s3://{BUCKET}/{out}", "world_size": 1, "memory_mb": 2048}, None)
    summary = json.loads(aws.get_object(Bucket=BUCKET, Key=f"{out}/summary.json")["Body"].read())
    assert summary["cloud"]["architecture"] == architecture
    gb_s = summary["cloud"]["lambda_gb_s"]
    assert summary["cloud"]["usd"]["lambda"] == pytest.approx(gb_s * LAMBDA_GB_S[architecture], rel=1e-3)


def test_local_runs_take_no_stack(small_dataset, tmp_path) -> None:
    line = one_line_error(
        cloud("run", "--local", "--stack", "demo", "--data", str(small_dataset), "--out", str(tmp_path / "o"))
    )
    assert "--local emulates its own deployment: drop --stack" in line
    assert not (tmp_path / "o").exists()
