"""Fault injection: an S3 API that fails, drops and truncates; secrets that must never leak. (More scenarios live
beside the stage they exercise, tagged `reliability` too: killed actors and drivers in test_encode_job, tampered
indexes in test_index and test_serve, hostile HTTP and overload in test_serve.)"""

import json
import os

import pytest

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import run_job, write_config
from pipeline.store.manifests import EmbeddingManifest, IndexManifest, PassageManifest
from pipeline.store.storage import Storage
from tests.conftest import FAKE_CREDENTIALS, RAY_TEMP_DIRS
from tests.faults import FaultyS3Proxy

pytestmark = [pytest.mark.reliability, pytest.mark.ray]
ROWS = synthetic_rows(500, words=30)


def _config(tmp_path, bucket, endpoint, tiny_models, **options):
    return write_config(
        tmp_path / "c.yaml",
        {
            "storage": {"root": f"s3://{bucket}/root", "options": {"endpoint_url": endpoint, **options}},
            "ingest": {"input": str(write_tsv(tmp_path / "p.tsv", ROWS)), "snapshot": "s1", "shard_rows": 100},
            "encode": {"model": tiny_models["ctx"], "pooling": "dpr", "max_length": 64},
            "index": {"factory": "IVF4,PQ32x8", "nprobe": 4, "queries": 40, "min_recall": 0.5},
        },
    )


def _listed_objects_are_whole(storage: Storage) -> int:
    """Every object any manifest lists is there with the listed size and sha256; returns how many were checked."""
    checked = 0
    for manifest_path in storage.fs.glob(storage.path("**/*manifest.json")):
        directory = manifest_path.rsplit("/", 1)[0].removeprefix(storage.root_path + "/")
        model = {"passages": PassageManifest, "embeddings": EmbeddingManifest, "indexes": IndexManifest}
        manifest = storage.read_manifest(
            directory, model[directory.split("/")[0]], name=manifest_path.rsplit("/", 1)[1]
        )
        for entry in manifest.files:  # an index version names its files relative to indexes/ (shared segments)
            storage.read_verified("indexes" if manifest.kind == "index" else directory, entry)
            checked += 1
    return checked


def test_jobs_ride_out_s3_faults_and_manifests_list_only_whole_objects(
    tmp_path, s3_endpoint, s3_bucket, tiny_models, ray_address
):
    with FaultyS3Proxy(s3_endpoint, rate=0.15, seed=11) as proxy:
        config = _config(tmp_path, s3_bucket, proxy.url, tiny_models)
        for job in ("ingest", "encode", "build_index"):
            run = run_job(job, config)
            assert run.returncode == 0, f"{job}: {run.stderr[-3000:]}"
    assert sum(proxy.injected.values()) >= 8 and {"500", "503", "drop", "truncate"} <= set(proxy.injected), (
        proxy.injected
    )
    storage = Storage(f"s3://{s3_bucket}/root", {"endpoint_url": s3_endpoint})
    assert run.summary["vectors"] == 500
    assert _listed_objects_are_whole(storage) >= 5 + 5 + 2


def test_a_lasting_s3_outage_fails_clearly_and_publishes_nothing(tmp_path, s3_endpoint, s3_bucket, tiny_models):
    with FaultyS3Proxy(s3_endpoint, rate=1.0, seed=5) as proxy:
        config = _config(
            tmp_path,
            s3_bucket,
            proxy.url,
            tiny_models,
            config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"}},
        )
        run = run_job("ingest", config)
    assert run.returncode == 1
    error = run.summary["error"]
    assert f"s3://{s3_bucket}/root/passages/s1/" in error and "failed after retries with backoff" in error, error
    storage = Storage(f"s3://{s3_bucket}/root", {"endpoint_url": s3_endpoint})
    assert storage.read_manifest("passages/s1", PassageManifest) is None and not storage.exists("passages/LATEST")


def test_secrets_never_reach_logs_summaries_manifests_or_errors(
    tmp_path, s3_endpoint, s3_bucket, tiny_models, ray_address
):
    """The S3 keys are in every job's environment; none of what the jobs write or print may contain them."""
    secrets = [value for key, value in FAKE_CREDENTIALS.items() if key != "AWS_DEFAULT_REGION"]
    assert all(os.environ[key] == FAKE_CREDENTIALS[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    config = _config(tmp_path, s3_bucket, s3_endpoint, tiny_models)
    outputs = []
    for job in ("ingest", "encode", "build_index"):
        run = run_job(job, config)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs += [run.stdout, run.stderr]
    failed = run_job("ingest", config, "storage.root=s3://no-such-bucket-here/x", "ingest.snapshot=s2")
    assert failed.returncode == 1
    outputs += [failed.stdout, failed.stderr]
    refused = run_job("ingest", config, f"storage.options.aws_secret_access_key={secrets[1]}")
    assert refused.returncode == 2 and "looks like a credential" in refused.stderr
    outputs += [refused.stdout, refused.stderr]  # the refusal names the key, never its value

    from pipeline.config import load_config

    outputs.append(load_config(config).model_dump_json())
    storage = Storage(f"s3://{s3_bucket}/root", {"endpoint_url": s3_endpoint})
    outputs += [
        storage.fs.cat_file(path).decode("utf-8", "replace")
        for path in storage.fs.find(storage.root_path)
        if path.endswith(".json") or "LATEST" in path
    ]
    scanned = 0
    for temp_dir in RAY_TEMP_DIRS:
        for path in temp_dir.rglob("*"):
            if path.is_file() and path.suffix in (".log", ".out", ".err", ".txt", ".json", ""):
                outputs.append(path.read_text("utf-8", "replace"))
                scanned += 1
    assert scanned > 10  # the Ray session's logs (workers, raylet, GCS, dashboard, Serve) were read
    for text in outputs:
        for secret in secrets:
            assert secret not in text
    assert json.loads(failed.stdout.strip().splitlines()[-1])["status"] == "error"


def test_bad_rows_are_quarantined_within_max_bad_rows(tmp_path):
    """Row-level problems are skipped and listed (file, line, problem) up to ingest.max_bad_rows; one more fails
    the run naming that row, and nothing is published."""
    lines = [
        '{"id": "1", "title": "A", "text": "good one"}',
        '{"id": "2", "title": "B", "text": ""}',
        "{not json",
        '{"id": "4", "title": "D", "text": "good two"}',
        '{"id": "5", "title": "E"}',
        '{"id": "6", "title": "F", "text": "good three"}',
    ]
    source = tmp_path / "p.jsonl"
    source.write_text("\n".join(lines) + "\n")
    config = write_config(
        tmp_path / "c.yaml",
        {"storage": {"root": str(tmp_path / "store")}, "ingest": {"input": str(source), "snapshot": "q1"}},
    )
    strict = run_job("ingest", config, "ingest.max_bad_rows=2")
    assert strict.returncode == 1 and f"{source}, line 5: missing field(s) text" in strict.summary["error"]
    assert not (tmp_path / "store" / "passages" / "q1" / "_manifest.json").exists()
    run = run_job("ingest", config, "ingest.max_bad_rows=3")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.summary["rows"] == 3 and run.summary["bad_rows"] == 3
    assert [(q["file"], q["line"]) for q in run.summary["quarantine"]] == [(str(source), n) for n in (2, 3, 5)]
    assert "empty text" in run.summary["quarantine"][0]["problem"]
    manifest = Storage(str(tmp_path / "store")).read_manifest("passages/q1", PassageManifest)
    assert manifest.quarantine == run.summary["quarantine"] and manifest.rows == 3
