"""The cloud path on this machine: moto's S3 server, awslambdaric runtime clients running the
handler against a local Runtime API, the rendezvous server, and the state machine file run
by the local workflow. Compared with the HPC path (mpiexec) on the same shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc.errors import InputError
from lambda_shim.aws import gang, handler, sandbox
from lambda_shim.aws.cloud import JobFailedError, make_plan, progress_line, start
from lambda_shim.aws.cost import PRICES, estimate_cost
from lambda_shim.aws.local import BUCKET, LocalCloud
from lambda_shim.aws.workflow import load_definition
from tests.conftest import MPIEXEC, cai_hpc, missing_modules, moto_server, requires_infra

pytestmark = requires_infra(missing_modules("moto.server", "awslambdaric", hint="both are in the test extras"))
NO_AWS = {  # an environment in which boto3's chain finds nothing, quickly
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **extra}


def _predictions(out: Path) -> dict[str, np.ndarray]:
    return {p.name: h5py.File(p)["redshift_pred"][:] for p in sorted((out / "predictions").glob("*.h5"))}


@requires_infra(None if MPIEXEC else "no mpiexec (pip install -e '.[test]')")
@pytest.mark.timeout(400)
@pytest.mark.parametrize("ranks", [2, 4])
def test_local_cloud_run_matches_mpiexec(ranks, small_dataset, tmp_path) -> None:
    cloud = cai_hpc(
        "cloud", "run", "--local", "-n", str(ranks), "--data", str(small_dataset), "--out", str(tmp_path / "cloud"),
        "--batch-size", "32", "-q",
    )  # fmt: skip
    assert cloud.returncode == 0, cloud.stderr
    assert ("no Lambda-like sandbox" in cloud.stderr) == (sandbox.unavailable() is not None)
    hpc = subprocess.run(
        [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "cai_hpc", "infer", "--backend", "mpi", "-q",
         "--data", str(small_dataset), "--out", str(tmp_path / "hpc"), "--batch-size", "32", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert hpc.returncode == 0, hpc.stderr
    c = json.loads((tmp_path / "cloud" / "summary.json").read_text())
    h = json.loads((tmp_path / "hpc" / "summary.json").read_text())
    assert (c["backend"], c["world_size"], c["samples"]) == ("tcp", ranks, 300)
    assert c["metrics"].keys() == h["metrics"].keys()
    for key, value in h["metrics"].items():
        assert c["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    cloud_pred, hpc_pred = _predictions(tmp_path / "cloud"), _predictions(tmp_path / "hpc")
    assert cloud_pred.keys() == hpc_pred.keys() and len(cloud_pred) == 7
    for name, values in hpc_pred.items():
        np.testing.assert_allclose(cloud_pred[name], values, atol=1e-5, rtol=0)
    # The bill covers every rank and Summarize, from the ranks' own records.
    assert c["cloud"]["lambda_requests"] == ranks + 1
    assert c["cloud"]["lambda_gb_s"] > 0 and c["cloud"]["usd"]["total"] > 0
    # Each link counted once, by mode; never direct on (emulated) Lambda; and per rank.
    assert set(c["links"]) <= {"punch", "relay"} and sum(c["links"].values()) >= ranks - 1, c["links"]
    assert all(r["links"] and set(r["links"]) <= {"punch", "relay"} for r in c["ranks"]), c["ranks"]
    assert sum(sum(r["links"].values()) for r in c["ranks"]) == 2 * sum(c["links"].values())


@pytest.fixture(scope="module")
def local_cloud():
    """Two warm rank functions, and a reserved concurrency of three: the third environment is
    one Lambda has not started yet."""
    with LocalCloud(2, timeout_s=300, concurrency=3) as cloud:
        yield cloud


def _job_objects(cloud: LocalCloud, prefix: str) -> list[str]:
    listing = cloud.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


@pytest.mark.timeout(60)
def test_more_ranks_than_the_functions_concurrency_are_refused_before_anything_starts(local_cloud, small_dataset):
    data = local_cloud.upload(small_dataset, "gang-data")
    plan = local_cloud.plan(data, f"s3://{BUCKET}/gang-refused", model=None, ranks=4, threads=1)
    invoked = local_cloud.rank_api.invoked
    with pytest.raises(
        InputError, match="needs 4 ranks running at once but cai-hpc-rank has ReservedConcurrentExecutions 3"
    ):
        local_cloud.run(plan)
    assert not _job_objects(local_cloud, "gang-refused/")  # not even the Map's items were written
    assert local_cloud.rank_api.invoked == invoked  # no rank was invoked


@pytest.mark.timeout(200)
def test_ranks_that_never_start_fail_within_the_deadline_naming_them(local_cloud, small_dataset) -> None:
    data = local_cloud.upload(small_dataset, "gang-data")
    plan = local_cloud.plan(data, f"s3://{BUCKET}/gang-never", model=None, ranks=3, threads=1, cold_start_s=8)
    assert plan.connect_timeout_s == 8 and {e["connect_timeout_s"] for e in plan.events} == {8}
    t0 = time.monotonic()
    with pytest.raises(JobFailedError) as failed:
        local_cloud.run(plan)  # two environments for three ranks: rank 2 is throttled until the end
    took = time.monotonic() - t0
    why = str(failed.value)
    assert "\n" not in why
    assert why.startswith("1 of 3 ranks never started within the 8 s connect deadline (ranks 2); likely cause: "), why
    assert "Lambda throttled rank(s) 2 (Lambda.TooManyRequestsException)" in why
    billed = float(why.split("Lambda time billed: ")[1].split(" s measured")[0])
    bound = 3 * (8 + gang.COLD_START_S)
    assert f"at most {bound:.0f} s" in why and 2 * 8 <= billed <= bound  # ranks 0 and 1 waited out the deadline
    assert took < 8 + gang.COLD_START_S  # not the 310 s of retries: the failed Map stops them
    # Rank 2's retry is aborted while it waits, or, when an environment the failed ranks freed
    # takes it first (a race Lambda has too), that one late attempt fails with the job.
    events = local_cloud.workflow.events
    assert "Rank: aborted" in events or events.count("Rank: failed RankFailedError") == 3, events
    assert not _job_objects(local_cloud, "gang-never/predictions/")


def test_a_failure_names_as_throttled_only_the_ranks_that_never_started() -> None:
    cause = "job j: 2 of 6 ranks never arrived before the deadline: 2, 5"
    # Rank 3 was throttled once and then started in time: it is not why the job failed.
    why = gang.explain_failure(cause, 6, 8, 2048, throttled=[2, 3, 5])
    assert "likely cause: Lambda throttled rank(s) 2, 5 (" in why, why
    why = gang.explain_failure(cause, 6, 8, 2048, throttled=[3])
    assert "likely cause: Lambda did not start them in time" in why, why


@pytest.mark.timeout(300)
def test_ranks_started_late_but_within_the_deadline_finish(local_cloud, small_dataset) -> None:
    data = local_cloud.upload(small_dataset, "gang-data")
    plan = local_cloud.plan(data, f"s3://{BUCKET}/gang-late", model=None, ranks=3, batch_size=64, threads=1)
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(local_cloud.run(plan)), daemon=True)
    job.start()
    deadline = time.monotonic() + 60
    while local_cloud.throttled_ranks != [2] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert local_cloud.throttled_ranks == [2]  # no environment for rank 2 yet
    local_cloud.start_rank_functions(1)  # Lambda's scaling catches up: a third environment starts
    job.join(timeout=240)
    assert outcome.get("samples") == 300 and outcome["world_size"] == 3
    assert "Rank: retry 1 after Lambda.TooManyRequestsException" in local_cloud.workflow.events
    assert not local_cloud.throttled_ranks


def _listing(cloud: LocalCloud, prefix: str) -> dict[str, tuple[str, str]]:
    pages = cloud.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: (o["ETag"], str(o["LastModified"])) for page in pages for o in page.get("Contents", [])}


def _descendants(pid: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = set(), [pid]
    while todo:
        parent_pid = todo.pop()
        kids = {child for child, parent in parents.items() if parent == parent_pid}
        todo += kids - found
        found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(200)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_local_cloud_run_and_every_process_it_started(stop, small_dataset, tmp_path) -> None:
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "cai_hpc", "cloud", "run", "--local", "-n", "2", "--data", str(small_dataset),
         "--out", str(out), "-q"],
        stderr=subprocess.PIPE, text=True, env=_clean_env(), start_new_session=True,
    )  # fmt: skip
    try:
        started: set[int] = set()
        deadline = time.monotonic() + 60
        while len(started) < 4 and time.monotonic() < deadline:  # 2 ranks, summarize, rendezvous
            started |= _descendants(run.pid)
            time.sleep(0.05)
        assert len(started) >= 4 and run.poll() is None
        run.send_signal(stop)  # to the leader only: a terminal's Ctrl-C would reach the whole group
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 128 + stop
    said = f"cai-hpc: stopped by {stop.name}; stopping the emulated functions and servers"
    assert stderr.strip().splitlines() == [said]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in started if _alive(pid)]
    assert not out.exists()  # nothing fetched from a job that did not finish


@pytest.mark.timeout(300)
def test_a_retried_rank_returns_its_record_and_changes_nothing(local_cloud, small_dataset) -> None:
    data = local_cloud.upload(small_dataset, "retry-data")
    plan = local_cloud.plan(data, f"s3://{BUCKET}/retry-out", model=None, ranks=2, batch_size=64, threads=1)
    first = local_cloud.run(plan)
    assert first["samples"] == 300 and first["world_size"] == 2
    before = _listing(local_cloud, "retry-out/")
    assert sum(k.startswith("retry-out/predictions/") for k in before) == 7
    summary = local_cloud.s3.get_object(Bucket=BUCKET, Key="retry-out/summary.json")["Body"].read()

    record = json.loads(local_cloud.s3.get_object(Bucket=BUCKET, Key="retry-out/ranks/rank-00001.json")["Body"].read())
    again = local_cloud.invoke_rank(plan.events[1])  # the same event, through the runtime client
    assert again == record
    assert _listing(local_cloud, "retry-out/") == before  # no second set of outputs, nothing rewritten
    assert local_cloud.s3.get_object(Bucket=BUCKET, Key="retry-out/summary.json")["Body"].read() == summary


@pytest.mark.timeout(120)
def test_handler_errors_are_one_line_and_name_the_rank(local_cloud, small_dataset) -> None:
    data = local_cloud.upload(small_dataset, "err-data")
    plan = local_cloud.plan(data, f"s3://{BUCKET}/err-out", model=None, ranks=2, threads=1)
    event = dict(plan.events[0])

    from lambda_shim.aws.workflow import TaskError

    with pytest.raises(TaskError) as missing:
        local_cloud.invoke_rank({k: v for k, v in event.items() if k != "job"})
    assert missing.value.error == "RankFailedError" and "rank 0: event field(s) missing: job" in missing.value.cause

    # The server's address is the function's configuration: an event naming another is refused.
    elsewhere = {**event, "job": "j-elsewhere", "world_size": 1, "rendezvous": "127.0.0.1:9"}
    with pytest.raises(TaskError) as moved:
        local_cloud.invoke_rank(elsewhere)
    assert moved.value.cause.startswith("rank 0: ") and "rendezvous" in moved.value.cause, moved.value.cause
    assert f"configured {local_cloud.rendezvous}" in moved.value.cause

    local_cloud.s3_secrets = __import__("boto3").client("secretsmanager")
    local_cloud.s3_secrets.create_secret(
        Name="wrong-secret", SecretString="not the server's secret, though long enough to be one"
    )
    impostor = {**event, "job": "j-impostor", "world_size": 1, "token_secret": "wrong-secret", "connect_timeout_s": 5}
    with pytest.raises(TaskError) as refused:
        local_cloud.invoke_rank(impostor)
    assert refused.value.cause.startswith("rank 0: the rendezvous server") and "refused our key" in refused.value.cause
    assert "\n" not in refused.value.cause
    assert not _listing(local_cloud, "err-out/")  # nothing written by any of them


@pytest.mark.timeout(120)
def test_a_rank_refuses_an_output_outside_s3_and_writes_nothing(local_cloud, small_dataset) -> None:
    # A function can write only /tmp (the sandbox holds emulated ones to that: test_sandbox.py);
    # the handler refuses any other place before it starts.
    data = local_cloud.upload(small_dataset, "sandbox-data")
    plan = local_cloud.plan(data, f"s3://{BUCKET}/sandbox-out", model=None, ranks=2, threads=1)
    outside = Path("/var/tmp") / f"cai-hpc-sandbox-{plan.job}"
    event = {**plan.events[0], "job": f"{plan.job}-local-out", "world_size": 1, "out": str(outside)}
    from lambda_shim.aws.workflow import TaskError

    with pytest.raises(TaskError) as refused:
        local_cloud.invoke_rank(event)
    assert (
        refused.value.cause.startswith("rank 0: ") and "out" in refused.value.cause and "s3://" in refused.value.cause
    )
    assert "\n" not in refused.value.cause
    assert not outside.exists()


@pytest.mark.timeout(300)
def test_a_corrupt_shard_fails_the_run_in_one_line_and_writes_nothing(small_dataset, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    victim = sorted(data.glob("*.h5"))[5]
    victim.write_bytes(victim.read_bytes()[:5000])
    result = cai_hpc("cloud", "run", "--local", "-n", "2", "--data", str(data), "--out", str(tmp_path / "out"), "-q")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cai-hpc: error:") and victim.name in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ S3 listings longer than a page
@pytest.fixture(scope="module")
def moto_s3():
    with moto_server():
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="many")
        yield s3


def _put_many(s3, keys: list[str], body: bytes) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket="many", Key=key, Body=body), keys))


@pytest.mark.timeout(300)
def test_planner_reads_every_listing_page(moto_s3) -> None:
    names = [f"survey/shard-{i:05d}.h5" for i in range(1500)]
    _put_many(moto_s3, [*names, "survey/README.txt", "survey/old/shard-99999.h5", "survey/.hidden.h5"], b"x" * 100)
    common = {"model": None, "rendezvous": "127.0.0.1:1", "token_secret": "s"}
    plan = make_plan("s3://many/survey", "s3://many/out", max_ranks=2000, **common)
    assert plan.world_size == 1500
    assert [e["shards"] for e in plan.events] == [[f"s3://many/{n}"] for n in names]
    assert {e["job"] for e in plan.events} == {plan.job} and [e["rank"] for e in plan.events] == list(range(1500))
    assert make_plan("s3://many/survey", "s3://many/out", shards_per_rank=2, **common).world_size == 750
    with pytest.raises(InputError, match="1500 ranks running at once but the deployment runs at most 1000"):
        make_plan("s3://many/survey", "s3://many/out", **common)


def test_checking_s3_shards_reads_their_headers_not_their_data(moto_s3, tmp_path) -> None:
    from cai_hpc import storage
    from cai_hpc.shards import inspect_shard, scan_dataset
    from cai_hpc.synth import synthesize

    synthesize(tmp_path / "d", 800, 8.0, seed=2)  # 8 MB shards: 390 rows each
    local = sorted((tmp_path / "d").glob("*.h5"))
    for path in local:
        moto_s3.upload_file(str(path), "many", f"big/{path.name}")
    moto_s3.put_object(Bucket="many", Key="big/zz-truncated.h5", Body=local[0].read_bytes()[:5000])
    storage.forget()
    with pytest.raises(InputError, match=r"zz-truncated\.h5: not a readable HDF5 file"):
        scan_dataset("s3://many/big")
    moto_s3.delete_object(Bucket="many", Key="big/zz-truncated.h5")
    infos = scan_dataset("s3://many/big")
    assert [(i.name, i.rows, i.labelled) for i in infos] == [(p.name, inspect_shard(p).rows, True) for p in local]
    assert sum(i.rows for i in infos) == 800
    assert not storage._fetched  # not one shard was downloaded whole
    # Reading data still fetches the whole object once, and later header checks use that copy.
    shard = storage.Location(f"s3://many/big/{local[0].name}")
    with shard.open_h5() as f:
        assert f["images"].shape[0] == infos[0].rows
    assert list(storage._fetched) == [str(shard)] and inspect_shard(shard).rows == infos[0].rows
    storage.forget()


def _put_rank_records(s3, prefix: str, world: int) -> None:
    """Rank records of job j (each billed 1.5 s at 2 GB) and rank 0's summary, under ``prefix``."""
    from concurrent.futures import ThreadPoolExecutor

    def put(rank: int) -> None:
        record = {"job": "j", "rank": rank, "shards": 1, "memory_mb": 2048, "duration_s": 1.0, "init_s": 0.5}
        s3.put_object(
            Bucket="many", Key=f"{prefix}/ranks/rank-{rank:05d}.json", Body=json.dumps(record | {"cold": True})
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(world)))
    s3.put_object(Bucket="many", Key=f"{prefix}/summary.json", Body=json.dumps({"samples": 7, "metrics": None}))


@pytest.mark.timeout(300)
def test_summarize_reads_every_rank_record(moto_s3) -> None:
    world = 1001  # one more than an S3 listing page holds: rank 1000 is on the second page
    _put_rank_records(moto_s3, "run", world)
    event = {"job": "j", "out": "s3://many/run", "world_size": world, "memory_mb": 2048}
    t0 = time.perf_counter()
    digest = handler.summarize(event, None)
    took = time.perf_counter() - t0
    assert digest["samples"] == 7 and digest["job"] == "j"
    summary = json.loads(moto_s3.get_object(Bucket="many", Key="run/summary.json")["Body"].read())
    assert summary["cloud"]["lambda_requests"] == world + 1
    # 1.5 s billed at 2 GB for each rank, and Summarize's own time (no context here: 1 GB).
    assert world * 1.5 * 2 < summary["cloud"]["lambda_gb_s"] <= world * 1.5 * 2 + took + 0.001


def test_summarize_refuses_another_jobs_record_and_a_missing_one(moto_s3) -> None:
    _put_rank_records(moto_s3, "few", 3)
    event = {"job": "j", "out": "s3://many/few", "world_size": 3, "memory_mb": 2048}
    assert handler.summarize(event, None)["job"] == "j"
    moto_s3.put_object(Bucket="many", Key="few/ranks/rank-00003.json", Body=json.dumps({"job": "k", "rank": 3}))
    with pytest.raises(handler.RankFailedError, match="records of another job \\(k\\), not only j"):
        handler.summarize(event, None)
    moto_s3.delete_object(Bucket="many", Key="few/ranks/rank-00003.json")
    moto_s3.delete_object(Bucket="many", Key="few/ranks/rank-00001.json")
    with pytest.raises(handler.RankFailedError, match=r"1 of 3 rank records missing .*: 1"):
        handler.summarize(event, None)


# ------------------------------------------------------------------ the client without AWS
def test_the_s3_client_follows_the_endpoint_the_environment_names(monkeypatch) -> None:
    from cai_hpc import storage

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    first = storage._s3()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert storage._s3().meta.endpoint_url == "http://127.0.0.1:2" and first.meta.endpoint_url == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    assert storage._s3() is first


def test_the_estimate_counts_every_shard_and_the_spend_bound_counts_finished_ranks() -> None:
    bill = estimate_cost([100, 100], 6, memory_mb=1769, samples_per_s_per_vcpu=100.0, cold_start_s=1.0)
    assert bill["s3_requests"] == {"get": 2 * 6 + 2 + 2, "put": 6 + 2 + 2}
    assert bill["lambda_gb_s"] == pytest.approx(2 * 2.0 * 1769 / 1024, abs=1e-3)  # 2 ranks x (1 s cold + 1 s)
    state = {"status": "RUNNING", "started": time.time() - 100, "stopped": None}
    line = progress_line({**state, "ranks": {"total": 4, "running": 1, "succeeded": 3}}, memory_mb=1024)
    assert "ranks done 3/4, running 1" in line
    spent = float(line.split("$")[1].split()[0])
    assert spent == pytest.approx(4 * 100 * PRICES["lambda_gb_s"], rel=0.05)  # four ranks have run, 100 s each


def test_an_aws_run_refuses_local_paths_before_touching_aws(small_dataset) -> None:
    plan = make_plan(str(small_dataset), "s3://b/o", model=None, rendezvous="h:1", token_secret="s")
    with pytest.raises(InputError, match=f"S3 only: {small_dataset} is not s3://"):
        start(plan, "arn:aws:states:us-east-1:1:stateMachine:m")


def test_plan_and_dry_run_need_no_aws(small_dataset) -> None:
    env = _clean_env(**NO_AWS)
    for verb in (["plan"], ["run", "--dry-run"]):
        result = cai_hpc("cloud", *verb, "--data", str(small_dataset), "--out", "s3://b/o", "--ranks", "3", env=env)
        assert result.returncode == 0, result.stderr
        assert "7 shards" in result.stdout and "3 ranks, 2-3 shards each" in result.stdout
        assert "$" in result.stdout and "estimate" in result.stdout
        assert f"within the {gang.COLD_START_S:.0f} s connect deadline" in result.stdout


def test_missing_credentials_is_one_line(tmp_path) -> None:
    env = _clean_env(**NO_AWS, AWS_DEFAULT_REGION="us-east-1")
    result = cai_hpc("cloud", "plan", "--data", "s3://some-bucket/survey", "--out", "s3://some-bucket/o", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no AWS credentials" in result.stderr, result.stderr


def test_too_many_ranks_for_the_deployment_is_refused(small_dataset) -> None:
    result = cai_hpc("cloud", "plan", "--data", str(small_dataset), "--out", "s3://b/o", "--max-ranks", "4")
    assert result.returncode == 2
    assert "7 ranks running at once but the deployment runs at most 4" in result.stderr
    assert "--shards-per-rank 2" in result.stderr


@pytest.mark.timeout(300)
def test_infer_reads_and_writes_s3_like_a_directory(moto_s3, small_dataset, tmp_path) -> None:
    from cai_hpc import storage
    from cai_hpc.comm import SelfComm
    from cai_hpc.engine import RunConfig, run

    for shard in sorted(small_dataset.glob("*.h5")):
        moto_s3.upload_file(str(shard), "many", f"ds/{shard.name}")
    options = {"batch_size": 64, "threads": 1, "progress": False}
    on_s3 = run(SelfComm(), RunConfig(data="s3://many/ds", out="s3://many/infer-out", **options))
    assert not storage._fetched  # each shard left memory once its predictions were written
    local = run(SelfComm(), RunConfig(data=small_dataset, out=tmp_path / "local", **options))
    assert on_s3["metrics"] == local["metrics"] and on_s3["samples"] == 300
    listing = moto_s3.list_objects_v2(Bucket="many", Prefix="infer-out/")["Contents"]
    assert sorted(o["Key"] for o in listing) == sorted(
        ["infer-out/summary.json"] + [f"infer-out/predictions/{p.name}" for p in small_dataset.glob("*.h5")]
    )
    again = run(SelfComm(), RunConfig(data="s3://many/ds", out="s3://many/infer-out", **options))
    assert (again["samples"], again["skipped_shards"]) == (0, 7)  # finished shards found on S3
    assert again["metrics"] == pytest.approx(local["metrics"])


# ------------------------------------------------------------------ gang start, without functions
def test_the_connect_deadline_grows_with_the_ranks_as_lambda_scales() -> None:
    definition = load_definition({"RankFunctionArn": "rank", "SummarizeFunctionArn": "summarize"})
    cold = gang.COLD_START_S
    # Lambda adds 1,000 environments per 10 s; the last rank gets in at the first throttle retry
    # after that (the state machine retries at 10, 30, 70, 150 and 310 s).
    expected = {1: cold, 1000: cold, 1001: cold + 10, 2001: cold + 30, 4001: cold + 70, 32_000: cold + 310}
    assert {n: gang.connect_deadline_s(n, definition) for n in expected} == expected
    with pytest.raises(
        InputError,
        match=r"32001 ranks need 320 s of Lambda's scaling .* for 310 s: use --ranks 32000 or fewer",
    ):
        gang.connect_deadline_s(32_001, definition)
    assert gang.rank_function(definition) == "rank"


def test_a_concurrency_below_the_ranks_is_refused_naming_the_quota() -> None:
    account = gang.Concurrency("cai-hpc-rank", reserved=None, unreserved=10, account=10)
    gang.check_concurrency(10, account)
    with pytest.raises(InputError) as pool:
        gang.check_concurrency(11, account)
    said = str(pool.value)
    assert (
        "\n" not in said
        and "needs 11 ranks running at once but the account's unreserved Lambda concurrency is 10" in said
    )
    assert "L-B99A9384" in said and "request-service-quota-increase" in said and "--ranks 10" in said
    reserved = gang.Concurrency("cai-hpc-rank", reserved=500)
    gang.check_concurrency(500, reserved)
    with pytest.raises(
        InputError,
        match=r"ReservedConcurrentExecutions 500: raise it .*put-function-concurrency --function-name cai-hpc-rank",
    ):
        gang.check_concurrency(501, reserved)


def test_an_aws_run_checks_the_deployed_rank_functions_concurrency_before_it_starts(moto_s3) -> None:
    import boto3

    _put_many(moto_s3, [f"gang/shard-{i}.h5" for i in range(3)], b"x" * 100)
    trust = json.dumps({"Version": "2012-10-17", "Statement": []})
    role = boto3.client("iam").create_role(RoleName="gang-test", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    functions = boto3.client("lambda")
    code = __import__("io").BytesIO()
    __import__("zipfile").ZipFile(code, "w").writestr("h.py", "")
    arn = functions.create_function(
        FunctionName="gang-rank", Role=role, Code={"ZipFile": code.getvalue()}, Runtime="python3.12", Handler="h.h"
    )["FunctionArn"]
    functions.put_function_concurrency(FunctionName="gang-rank", ReservedConcurrentExecutions=2)
    definition = load_definition({"RankFunctionArn": arn, "SummarizeFunctionArn": arn})
    machine = boto3.client("stepfunctions").create_state_machine(
        name="gang", definition=json.dumps(definition), roleArn=role
    )["stateMachineArn"]
    plan = make_plan("s3://many/gang", "s3://many/gang-out", model=None, rendezvous="127.0.0.1:1", token_secret="s")
    with pytest.raises(
        InputError, match="needs 3 ranks running at once but gang-rank has ReservedConcurrentExecutions 2"
    ):
        start(plan, machine)
    assert "Contents" not in moto_s3.list_objects_v2(Bucket="many", Prefix="gang-out/")  # nothing written


# ------------------------------------------------------------------ what one rank can hold and run
@pytest.fixture
def four_gib_of_shards(tmp_path) -> Path:
    """Four 1 GiB shard files, sparse: the planner reads only their sizes."""
    data = tmp_path / "big"
    data.mkdir()
    for i in range(4):
        with open(data / f"shard-{i}.h5", "wb") as f:
            f.truncate(2**30)
    return data


def test_a_rank_whose_shards_do_not_fit_beside_the_model_is_refused(four_gib_of_shards) -> None:
    result = cai_hpc(
        "cloud", "plan", "--data", str(four_gib_of_shards), "--out", "s3://b/o", "--ranks", "1", "--memory-mb", "2048"
    )  # fmt: skip
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "a rank would hold 4096 MB of shards but a 2048 MB function has 1024 MB" in line
    assert "--ranks 4 or more" in line
    plan = make_plan(
        str(four_gib_of_shards), "s3://b/o", model=None, rendezvous="h:1", token_secret="s", ranks=4, memory_mb=2048
    )
    assert plan.world_size == 4  # a shard per rank fits


def test_a_rank_that_would_outlive_lambdas_900_s_is_refused(four_gib_of_shards) -> None:
    from cai_hpc.shards import SAMPLE_BYTES

    common = {"model": None, "rendezvous": "h:1", "token_secret": "s", "memory_mb": 10240}
    samples = 4 * 2**30 // SAMPLE_BYTES
    # 5 vCPUs at 40 samples/s each: one rank needs ~1,050 s; two need ~530 s each.
    with pytest.raises(InputError, match=r"Lambda stops a function at 900 s: use --ranks 2 or more") as long:
        make_plan(str(four_gib_of_shards), "s3://b/o", ranks=1, rate=40.0, **common)
    assert f"({samples} samples at 200 samples/s" in str(long.value)
    assert make_plan(str(four_gib_of_shards), "s3://b/o", ranks=2, rate=40.0, **common).world_size == 2
