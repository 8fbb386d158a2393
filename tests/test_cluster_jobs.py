"""The jobs on a two-node Ray cluster, submitted with `ray job submit --working-dir .` exactly as the README says:
the working dir's upload leaves out what git ignores, each job's JSON summary is its last log line, and the build's
add tasks run on both nodes."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import s3fs

from tests.helpers import REPO, free_port, synthetic_rows, write_config, write_tsv
from tests.localray import LocalRay

pytestmark = pytest.mark.reliability
BIN = str(Path(sys.executable).parent)  # an activated virtualenv: `python` and `ray` are the project's


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node on this machine, one CPU and one custom resource each (`node_a`, `node_b`)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # Ray's sockets need a short path
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    head = LocalRay(temp_dir, num_cpus=1, dashboard_port=free_port(), resources={"node_a": 1}, env=env)
    try:
        head.start()
        head.add_node(num_cpus=1, resources={"node_b": 1})
        yield head, env
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster, *entrypoint: str) -> tuple[str, str]:
    """`ray job submit --working-dir . -- <entrypoint>` from the repository; (the submit output, the job's logs).
    A cluster just started may not have its job agent up yet ("No available agent to submit job, please try again
    later"): nothing was submitted then, so that is retried for a minute."""
    head, env = cluster
    address = f"http://127.0.0.1:{head.dashboard_port}"
    deadline = time.monotonic() + 60
    while True:
        job_id = f"test-{uuid.uuid4().hex[:8]}"
        done = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", "."]
            + ["--", *entrypoint],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if "No available agent to submit job" not in done.stderr + done.stdout or time.monotonic() > deadline:
            break
        time.sleep(2)
    logs = subprocess.run(
        ["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr, logs


def summary_of(logs: str) -> dict:
    last = logs.rstrip().splitlines()[-1]
    return json.loads(last)


def test_the_upload_leaves_out_what_git_ignores(cluster):
    _, logs = submit(cluster, "python", "-c", "import json, os; print(json.dumps(sorted(os.listdir('.'))))")
    listed = set(summary_of(logs))
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert listed == {path.split("/")[0] for path in tracked}  # what git tracks, nothing else
    assert not {".venv", ".demo", ".pytest_cache", ".ruff_cache", "__pycache__", ".git"} & listed


def test_jobs_submitted_to_two_nodes_build_on_both(cluster, tmp_path, tiny_models, s3_endpoint, s3_bucket):
    rows = synthetic_rows(600, words=20)
    config = write_config(
        tmp_path / "cluster.yaml",
        {
            "storage": {"root": f"s3://{s3_bucket}/root", "options": {"endpoint_url": s3_endpoint}},
            "ingest": {"input": str(write_tsv(tmp_path / "psgs.tsv", rows)), "snapshot": "s1", "shard_rows": 100},
            "encode": {"model": tiny_models["ctx"], "pooling": "dpr", "max_length": 32},
            "index": {"factory": "IVF4,PQ16x8", "nprobe": 4, "queries": 100, "min_recall": 0.5, "segment_vectors": 200},
        },
    )
    summaries = {}
    for job in ("ingest", "encode", "build_index"):
        _, logs = submit(cluster, "python", "-m", f"jobs.{job}", "--config", str(config))
        summaries[job] = summary_of(logs)  # the job's last log line
        assert summaries[job]["job"] == job
    assert summaries["ingest"]["rows"] == 600 and summaries["encode"]["rows"] == 600
    built = summaries["build_index"]
    assert built["vectors"] == 600 and built["segments"] == 3 and built["mode"] == "full"
    assert built["add_nodes"] == 2  # one CPU per node: the add tasks ran on both
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    assert fs.cat_file(f"{s3_bucket}/root/indexes/LATEST").decode().strip() == built["version"]
