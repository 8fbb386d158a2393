"""The jobs on a two-node Ray cluster, submitted with `ray job submit --working-dir .` exactly as docs/cluster.md says:
the working dir's upload leaves out what git ignores, each job's JSON summary is its last log line, the build's
add tasks run on both nodes, and `serve deploy` places each index shard on the node its resources name."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
import requests
import s3fs
import yaml

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import REPO, free_port, write_config
from kit.localray import LocalRay
from kit.poll import until

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
    later"; on a busy 2-core machine for over a minute): nothing was submitted then, so that is retried for three
    minutes."""
    head, env = cluster
    address = f"http://127.0.0.1:{head.dashboard_port}"
    deadline = time.monotonic() + 180
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


@pytest.fixture(scope="module")
def built(cluster, tmp_path_factory, tiny_models, s3_endpoint):
    """ingest, encode and build_index submitted to the cluster: (the config, each job's summary, the bucket). The
    bucket is this module's own: the `s3_bucket` fixture resets the S3 server."""
    tmp = tmp_path_factory.mktemp("cluster-jobs")
    bucket = f"cluster-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    config = write_config(
        tmp / "cluster.yaml",
        {
            "storage": {"root": f"s3://{bucket}/root", "options": {"endpoint_url": s3_endpoint}},
            "ingest": {
                "input": str(write_tsv(tmp / "psgs.tsv", synthetic_rows(600, words=20))),
                "snapshot": "s1",
                "shard_rows": 100,
            },
            "encode": {"model": tiny_models["ctx"], "pooling": "dpr", "max_length": 32},
            "index": {"factory": "IVF4,PQ16x8", "nprobe": 4, "queries": 100, "min_recall": 0.5, "segment_vectors": 200},
            "serve": {
                "question_model": tiny_models["question"],
                "reader_model": None,
                "cache_dir": str(tmp / "cache"),
                "encoder_cpus": 0,
                "retriever_cpus": 0,
                "shards": 2,
                "shard_resources": [{"node_a": 0.5}, {"node_b": 0.5}],
            },
        },
    )
    summaries = {}
    for job in ("ingest", "encode", "build_index"):
        _, logs = submit(cluster, "python", "-m", f"jobs.{job}", "--config", str(config))
        summaries[job] = summary_of(logs)  # the job's last log line
    return config, summaries, bucket


def test_jobs_submitted_to_two_nodes_build_on_both(built, s3_endpoint):
    _, summaries, bucket = built
    assert [summaries[job]["job"] for job in ("ingest", "encode", "build_index")] == ["ingest", "encode", "build_index"]
    assert summaries["ingest"]["rows"] == 600 and summaries["encode"]["rows"] == 600
    built = summaries["build_index"]
    assert built["vectors"] == 600 and built["segments"] == 3 and built["mode"] == "full"
    assert built["add_nodes"] == 2  # one CPU per node: the add tasks ran on both
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    assert fs.cat_file(f"{bucket}/root/indexes/LATEST").decode().strip() == built["version"]


def test_serve_deploy_places_each_shard_on_the_node_its_resources_name(cluster, built, tmp_path):
    """`serve deploy` as docs/cluster.md says, with `serve.shards: 2` and a custom resource per shard: shard 0's
    replica runs on the node with `node_a`, shard 1's on the node with `node_b`, and the app answers from both."""
    head, env = cluster
    config, summaries, _ = built
    dashboard, port = f"http://127.0.0.1:{head.dashboard_port}", free_port()
    deploy = tmp_path / "serve.yaml"
    deploy.write_text(
        yaml.safe_dump(
            {
                "proxy_location": "HeadOnly",  # both nodes are this machine: one proxy, one port
                "http_options": {"host": "127.0.0.1", "port": port},
                "applications": [
                    {
                        "name": "qa",
                        "route_prefix": "/",
                        "import_path": "pipeline.serve.app:app",
                        "args": {"config": str(config)},
                    }
                ],
            }
        )
    )
    serve_cli = ["serve", "deploy", str(deploy), "--address", dashboard]
    done = subprocess.run(serve_cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    try:
        info = _wait_for_index(f"http://127.0.0.1:{port}", timeout=240)
        nodes = requests.get(f"{dashboard}/api/v0/nodes?detail=1", timeout=30).json()["data"]["result"]["result"]
        resources = {node["node_id"]: node["resources_total"] for node in nodes}
        assert info["index_version"] == summaries["build_index"]["version"] and info["vectors"] == 600
        shards = sorted(info["shards"], key=lambda s: s["shard"])
        assert "node_a" in resources[shards[0]["node"]] and "node_b" in resources[shards[1]["node"]]
        assert all(s["vectors"] > 0 for s in shards) and sum(s["vectors"] for s in shards) == 600
        answer = requests.post(
            f"http://127.0.0.1:{port}/v1/search", json={"questions": ["passage one"], "k": 10}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        [hits] = answer.json()["results"]
        assert len(hits) == 10 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    finally:
        subprocess.run(["serve", "shutdown", "-y", "--address", dashboard], env=env, capture_output=True, timeout=120)


def _wait_for_index(url: str, timeout: float) -> dict:
    """/v1/index once the app answers it (replicas load the models and the index first; meanwhile the proxy is not
    listening yet, or holds the request)."""

    def answered() -> dict | None:
        response = requests.get(f"{url}/v1/index", timeout=10)
        return response.json() if response.status_code == 200 else None

    return until(answered, timeout, 2, f"{url}/v1/index")
