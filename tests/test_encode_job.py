"""The encode job end to end on the session's Ray, against the S3 API server, with real faults."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import s3fs

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import REPO, run_job, write_config
from kit.localray import marked_processes
from kit.poll import until
from pipeline.models.text_encoder import EncoderSettings, TextEncoder
from pipeline.store.shards import embedding_matrix
from pipeline.store.storage import parquet_bytes, read_parquet_bytes, sha256_hex
from tests.conftest import RAY_TEMP_DIRS

pytestmark = pytest.mark.ray
ROWS = synthetic_rows(600, words=30)


@pytest.fixture
def corpus(tmp_path, tiny_models, s3_endpoint, s3_bucket, s3_client, ray_address):
    """An ingested snapshot on S3 and a config that encodes it with the tiny DPR context encoder (jobs run on the
    session's Ray)."""
    source = write_tsv(tmp_path / "psgs_w100.tsv.gz", ROWS)
    s3_client.upload_file(str(source), s3_bucket, "in/psgs_w100.tsv.gz")
    config = write_config(
        tmp_path / "c.yaml",
        {
            "storage": {"root": f"s3://{s3_bucket}/root", "options": {"endpoint_url": s3_endpoint}},
            "ingest": {"input": f"s3://{s3_bucket}/in/psgs_w100.tsv.gz", "snapshot": "snap", "shard_rows": 25},
            "encode": {"model": tiny_models["ctx"], "pooling": "dpr", "max_length": 64, "max_attempts": 5},
        },
    )
    assert run_job("ingest", config).returncode == 0
    return config


def _fs(endpoint):
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def _read_output(fs, url):
    """(manifest, ids, vectors, names of every object under the output)."""
    path = url.removeprefix("s3://")
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{path}/_manifest.json"))
    ids, vectors = [], []
    for entry in manifest["files"]:
        data = fs.cat_file(f"{path}/{entry['name']}")
        assert sha256_hex(data) == entry["sha256"]
        table = read_parquet_bytes(data)
        ids += table.column("id").to_pylist()
        vectors.append(embedding_matrix(table))
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return manifest, ids, np.concatenate(vectors), names


def test_encode_end_to_end_exactly_once_and_exact(corpus, tiny_models, s3_endpoint):
    run = run_job("encode", corpus)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    assert summary["job"] == "encode" and summary["status"] == "ok"
    assert (summary["rows"], summary["reused"], summary["shards"], summary["dim"]) == (600, 0, 24, 32)
    assert summary["passages_per_s"] > 0 and summary["output"].endswith(summary["fingerprint"])
    assert "encode" in run.stderr  # progress bar
    manifest, ids, vectors, names = _read_output(_fs(s3_endpoint), summary["output"])
    assert ids == [pid for pid, _, _ in ROWS]  # every id exactly once, in passage order
    assert names == sorted([f["name"] for f in manifest["files"]] + ["_manifest.json", "_progress.json"])
    assert manifest["fingerprint"] == summary["fingerprint"] and manifest["dim"] == 32
    encoder = TextEncoder(EncoderSettings(tiny_models["ctx"], "dpr", max_length=64), device="cpu")
    reference = encoder.encode([t for _, _, t in ROWS], [x for _, x, _ in ROWS])
    assert np.abs(vectors - reference).max() <= 1e-5

    again = run_job("encode", corpus)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.summary["rows"], again.summary["reused"], again.summary["encoded_shards"]) == (0, 600, 0)


def _start_encode(config, *overrides):
    sets = [arg for item in overrides for arg in ("--set", item)]
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.encode", "--config", str(config), *sets],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def _progress(fs, bucket):
    fs.invalidate_cache()
    found = fs.glob(f"{bucket}/root/embeddings/snap/*/_progress.json")
    return json.loads(fs.cat_file(found[0])) if found else []


def _wait_for(condition, timeout=120.0, interval=0.05):
    return until(condition, timeout, interval)


@pytest.mark.reliability
def test_resume_after_the_driver_is_killed(corpus, s3_endpoint, s3_bucket):
    fs = _fs(s3_endpoint)
    job = _start_encode(corpus)
    _wait_for(lambda: len(_progress(fs, s3_bucket)) >= 2)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    done = _progress(fs, s3_bucket)
    assert 2 <= len(done) < 24, "the run must be stopped part-way"
    assert not fs.glob(f"{s3_bucket}/root/embeddings/snap/*/_manifest.json")
    fs.invalidate_cache()

    resumed = run_job("encode", corpus)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.summary["encoded_shards"] == 24 - len(done)
    assert resumed.summary["reused"] == sum(e["rows"] for e in done)
    manifest, ids, _, _ = _read_output(fs, resumed.summary["output"])
    assert ids == [pid for pid, _, _ in ROWS]

    # identical to an uninterrupted run: same shard bytes
    fs.rm(resumed.summary["output"].removeprefix("s3://"), recursive=True)
    clean = run_job("encode", corpus)
    assert clean.returncode == 0 and clean.summary["encoded_shards"] == 24
    clean_manifest, _, _, _ = _read_output(fs, clean.summary["output"])
    assert [f["sha256"] for f in clean_manifest["files"]] == [f["sha256"] for f in manifest["files"]]


def _encoder_actor_pids():
    """The encoder actors of the session's Ray (not those of any other Ray on the machine)."""
    pids = set()
    for pid in marked_processes(*map(str, RAY_TEMP_DIRS)):
        try:
            if "ray::EncoderActor" in " ".join(psutil.Process(pid).cmdline()):
                pids.add(pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.reliability
def test_encoder_actor_killed_twice_mid_run(corpus, s3_endpoint, s3_bucket):
    """Also runs the GPU layout's separate tokenizer actor, which CPU-only runs skip."""
    fs = _fs(s3_endpoint)
    job = _start_encode(corpus, "encode.tokenizer_actors=1")
    killed = []
    first = _wait_for(_encoder_actor_pids)
    _wait_for(lambda: len(_progress(fs, s3_bucket)) >= 1)
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    killed += first
    assert job.poll() is None
    second = _wait_for(lambda: _encoder_actor_pids() - set(killed))
    for pid in second:
        os.kill(pid, signal.SIGKILL)
    killed += second
    assert job.poll() is None
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1].startswith("{"), stdout[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert len(killed) >= 2 and summary["retried_shards"] >= 1
    manifest, ids, _, names = _read_output(fs, summary["output"])
    assert sorted(ids) == sorted(pid for pid, _, _ in ROWS) and len(ids) == len(set(ids)) == 600
    assert names == sorted([f["name"] for f in manifest["files"]] + ["_manifest.json", "_progress.json"])


@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["corrupt", "wrong schema"])
def test_bad_passage_shard_names_the_shard_and_lists_nothing(corpus, s3_endpoint, s3_bucket, damage):
    fs = _fs(s3_endpoint)
    directory = f"{s3_bucket}/root/passages/snap"
    manifest = json.loads(fs.cat_file(f"{directory}/_manifest.json"))
    entry = manifest["files"][5]
    if damage == "corrupt":
        fs.pipe_file(f"{directory}/{entry['name']}", b"PAR1 garbage")
        expected = "12 bytes, but the manifest lists"  # refused on its size, before it is downloaded
    else:
        import pyarrow as pa

        data = parquet_bytes(
            pa.table({"id": list(range(25)), "title": ["t"] * 25, "text": ["x"] * 25, "content_hash": ["h"] * 25})
        )
        fs.pipe_file(f"{directory}/{entry['name']}", data)
        entry.update(sha256=sha256_hex(data), bytes=len(data))
        fs.pipe_file(f"{directory}/_manifest.json", json.dumps(manifest).encode())
        expected = "column 'id' must be string (found int64)"
    run = run_job("encode", corpus)
    assert run.returncode == 1
    assert f"s3://{directory}/{entry['name']}: " in run.stderr and expected in run.stderr
    assert not fs.glob(f"{s3_bucket}/root/embeddings/snap/*/_manifest.json")


def test_actors_the_cluster_cannot_place_fail_the_job_saying_what_it_asked_for(corpus, s3_endpoint, s3_bucket):
    """Eight tokenizer actors of 1 CPU each on the session's 2-CPU Ray: Ray would wait for ever for the CPUs; the job
    fails after encode.start_timeout_s naming what it asked for and what the cluster has, and lists nothing."""
    run = run_job("encode", corpus, "encode.tokenizer_actors=8", "encode.start_timeout_s=5", timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "did not start within 5 s (encode.start_timeout_s)" in run.stderr
    assert "8 tokenizer actor(s) (1 CPU each)" in run.stderr and "the cluster has {'CPU': 2.0" in run.stderr
    assert not _fs(s3_endpoint).glob(f"{s3_bucket}/root/embeddings/snap/*/_manifest.json")


@pytest.mark.reliability
def test_bad_shards_are_quarantined_within_max_bad_shards(corpus, s3_endpoint, s3_bucket):
    """A corrupt, an empty and an oversized shard: skipped, listed, and the rest encoded; one more would fail."""
    import pyarrow as pa

    fs = _fs(s3_endpoint)
    directory = f"{s3_bucket}/root/passages/snap"
    manifest = json.loads(fs.cat_file(f"{directory}/_manifest.json"))
    corrupt, empty, oversized = (manifest["files"][i] for i in (3, 7, 11))
    fs.pipe_file(f"{directory}/{corrupt['name']}", b"PAR1" + b"\0" * (corrupt["bytes"] - 4))  # same size, bad bytes
    schema = pa.schema(
        [("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("content_hash", pa.string())]
    )
    for entry, table in (
        (empty, schema.empty_table()),
        (
            oversized,
            pa.table(
                {"id": ["big"], "title": ["t"], "text": [os.urandom(150_000).hex()], "content_hash": ["h"]},
                schema=schema,
            ),
        ),
    ):
        data = parquet_bytes(table)
        fs.pipe_file(f"{directory}/{entry['name']}", data)
        entry.update(sha256=sha256_hex(data), bytes=len(data), rows=table.num_rows)
    fs.pipe_file(f"{directory}/_manifest.json", json.dumps(manifest).encode())

    too_few = run_job("encode", corpus, "encode.max_bad_shards=2", "encode.max_shard_bytes=100KiB")
    assert too_few.returncode == 1 and "s3://" in too_few.summary["error"]
    run = run_job("encode", corpus, "encode.max_bad_shards=3", "encode.max_shard_bytes=100KiB")
    assert run.returncode == 0, run.stderr[-3000:]
    problems = {q["shard"]: q["problem"] for q in run.summary["quarantine"]}
    assert "checksum mismatch" in problems[corrupt["name"]]
    assert "shard has no rows" in problems[empty["name"]]
    assert "over the limit of 102400" in problems[oversized["name"]]
    assert all(f"s3://{directory}/{name}" in problem for name, problem in problems.items())
    output, ids, _, _ = _read_output(fs, run.summary["output"])
    assert {f["name"] for f in output["files"]} == {f["name"] for f in manifest["files"]} - set(problems)
    assert len(ids) == len(set(ids)) == 600 - 3 * 25 and output["quarantine"] == run.summary["quarantine"]
