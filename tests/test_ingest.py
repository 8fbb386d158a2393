"""The ingest job end to end, run as a user runs it, against a local path and the S3 API server."""

import json

import pytest
import s3fs

from kit.corpora import synthetic_rows, write_jsonl, write_parquet, write_tsv
from kit.jobs import run_job, write_config
from pipeline.ingest.corpus import content_hash
from pipeline.store.storage import read_parquet_bytes, sha256_hex
from tests.conftest import FAKE_CREDENTIALS

ROWS = synthetic_rows(1_000) + [("1001", 'He said ""hi"" and\tleft', "Quotes"), ("1002", "東京 🙂", "Ünïcode")]


def read_snapshot(fs, directory):
    """(manifest, rows) exactly as a downstream reader sees them: only what the manifest lists, verified."""
    manifest = json.loads(fs.cat_file(f"{directory}/_manifest.json"))
    rows = []
    for entry in manifest["files"]:
        data = fs.cat_file(f"{directory}/{entry['name']}")
        assert sha256_hex(data) == entry["sha256"] and len(data) == entry["bytes"]
        table = read_parquet_bytes(data)
        assert table.num_rows == entry["rows"]
        rows += table.to_pylist()
    return manifest, rows


def assert_same_passages(rows, expected):
    assert [r["id"] for r in rows] == [pid for pid, _, _ in expected]
    assert [(r["title"], r["text"]) for r in rows] == [(title, text) for _, text, title in expected]
    assert all(r["content_hash"] == content_hash(r["title"], r["text"]) for r in rows)


@pytest.fixture
def local_config(tmp_path):
    return write_config(
        tmp_path / "config.yaml",
        {"storage": {"root": str(tmp_path / "store")}, "ingest": {"snapshot": "s1", "shard_rows": 300}},
    )


def test_ingest_tsv_gz_to_local_path(tmp_path, local_config):
    source = write_tsv(tmp_path / "psgs_w100.tsv.gz", ROWS)
    run = run_job("ingest", local_config, f"ingest.input={source}")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["job"] == "ingest" and summary["status"] == "ok"
    assert summary["rows"] == len(ROWS) and summary["shards"] == 4
    assert summary["output"] == str(tmp_path / "store" / "passages" / "s1")
    assert summary["seconds"] >= 0
    import fsspec

    manifest, rows = read_snapshot(fsspec.filesystem("file"), summary["output"])
    assert manifest["rows"] == len(ROWS) and manifest["snapshot"] == "s1"
    assert [f["name"] for f in manifest["files"]] == [f"part-00000-0000{i}.parquet" for i in range(4)]
    assert_same_passages(rows, ROWS)
    assert (tmp_path / "store" / "passages" / "LATEST").read_text().strip() == "s1"
    assert "ingest" in run.stderr  # the progress bar


def test_ingest_tsv_gz_to_s3(tmp_path, s3_endpoint, s3_bucket, s3_client):
    source = write_tsv(tmp_path / "psgs_w100.tsv.gz", ROWS)
    s3_client.upload_file(str(source), s3_bucket, "incoming/psgs_w100.tsv.gz")
    config = write_config(
        tmp_path / "c.yaml",
        {"storage": {"root": "s3://placeholder"}, "ingest": {"snapshot": "2026-11-26", "shard_rows": 400}},
    )
    run = run_job(
        "ingest",
        config,
        f"storage.root=s3://{s3_bucket}/dpr",
        f"storage.options.endpoint_url={s3_endpoint}",
        f"ingest.input=s3://{s3_bucket}/incoming/psgs_w100.tsv.gz",
    )
    assert run.returncode == 0, run.stderr
    assert run.summary["output"] == f"s3://{s3_bucket}/dpr/passages/2026-11-26"
    assert run.summary["rows"] == len(ROWS) and run.summary["shards"] == 3
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    manifest, rows = read_snapshot(fs, f"{s3_bucket}/dpr/passages/2026-11-26")
    assert_same_passages(rows, ROWS)
    assert manifest["source"]["files"][0]["url"] == f"s3://{s3_bucket}/incoming/psgs_w100.tsv.gz"
    everything = run.stdout + run.stderr + json.dumps(manifest)
    for secret in (FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"]):
        assert secret not in everything


def test_rerun_reuses_and_a_changed_source_is_refused(tmp_path, local_config):
    source = write_tsv(tmp_path / "p.tsv", ROWS[:10])
    first = run_job("ingest", local_config, f"ingest.input={source}")
    again = run_job("ingest", local_config, f"ingest.input={source}")
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert first.summary["reused"] is False and again.summary["reused"] is True
    assert again.summary["rows"] == 10
    write_tsv(source, ROWS[:11])
    changed = run_job("ingest", local_config, f"ingest.input={source}")
    assert changed.returncode == 1
    assert "already published" in changed.stderr and "s1" in changed.stderr


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: write_tsv(d / "dup.tsv", ROWS[:500] + [ROWS[3]]), "line 502: duplicate id '4'"),
        (lambda d: write_tsv(d / "empty.tsv", ROWS[:450] + [("x9", " ", "T")]), "line 452: empty text"),
        (
            lambda d: (
                (d / "bad.tsv").write_bytes(b"id\ttext\ttitle\n" + b'1\t"a"\tT\n' * 1 + b'2\t"\xff"\tT\n')
                and d / "bad.tsv"
            ),
            "line 3: not UTF-8",
        ),
        (
            lambda d: write_tsv(d / "nocol.tsv", ROWS[:3]).write_text("id\ttext\n1\tx\n") and d / "nocol.tsv",
            "line 1: missing column(s) title",
        ),
    ],
)
@pytest.mark.reliability
def test_bad_input_fails_clearly_and_lists_nothing(tmp_path, local_config, make, problem):
    source = make(tmp_path)
    run = run_job("ingest", local_config, f"ingest.input={source}")
    assert run.returncode == 1
    assert f"{source}, {problem}" in run.stderr
    assert run.summary["status"] == "error" and problem in run.summary["error"]
    snapshot = tmp_path / "store" / "passages" / "s1"
    assert not (snapshot / "_manifest.json").exists()
    assert not (tmp_path / "store" / "passages" / "LATEST").exists()


def test_failed_run_then_fixed_run_lists_only_its_own_shards(tmp_path, local_config):
    bad = write_tsv(tmp_path / "p.tsv", ROWS[:700] + [ROWS[0]])
    assert run_job("ingest", local_config, f"ingest.input={bad}").returncode == 1
    good = write_tsv(tmp_path / "p.tsv", ROWS[:250])
    run = run_job("ingest", local_config, f"ingest.input={good}")
    assert run.returncode == 0, run.stderr
    snapshot = tmp_path / "store" / "passages" / "s1"
    assert sorted(p.name for p in snapshot.iterdir()) == ["_manifest.json", "part-00000-00000.parquet"]


@pytest.mark.ray
def test_many_files_are_ingested_by_ray_tasks_on_s3(tmp_path, ray_address, s3_endpoint, s3_bucket, s3_client):
    parts = [
        write_tsv(tmp_path / "a.tsv.gz", ROWS[:400]),
        write_jsonl(tmp_path / "b.jsonl", [{"id": p, "title": t, "text": x} for p, x, t in ROWS[400:700]]),
        write_parquet(
            tmp_path / "c.parquet",
            {"id": [r[0] for r in ROWS[700:]], "title": [r[2] for r in ROWS[700:]], "text": [r[1] for r in ROWS[700:]]},
        ),
    ]
    for path in parts:
        s3_client.upload_file(str(path), s3_bucket, f"in/{path.name}")
    config = write_config(
        tmp_path / "c.yaml",
        {
            "storage": {"root": f"s3://{s3_bucket}/root", "options": {"endpoint_url": s3_endpoint}},
            "ingest": {"input": f"s3://{s3_bucket}/in/", "snapshot": "multi", "shard_rows": 250},
        },
    )
    run = run_job("ingest", config)
    assert run.returncode == 0, run.stderr
    assert run.summary["rows"] == len(ROWS) and run.summary["shards"] == 2 + 2 + 2
    _, rows = read_snapshot(s3fs.S3FileSystem(endpoint_url=s3_endpoint), f"{s3_bucket}/root/passages/multi")
    assert_same_passages(rows, ROWS)

    s3_client.put_object(Bucket=s3_bucket, Key="in/d.jsonl", Body=json.dumps({"id": "12", "title": "", "text": "x"}))
    run = run_job("ingest", config, "ingest.snapshot=dups")
    assert run.returncode == 1
    assert (
        f"s3://{s3_bucket}/in/d.jsonl, line 1: duplicate id '12' (first seen in s3://{s3_bucket}/in/a.tsv.gz, "
        "line 13)" in run.stderr
    )
    assert not s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="root/passages/dups/_manifest.json").get("Contents")


def test_a_delta_snapshot_stores_only_new_and_changed_rows_and_tombstones_the_rest(tmp_path, local_config):
    """Night 2 against night 1: 10 deleted, 5 edited, 7 inserted mid-file (two input files, read as Ray tasks
    would be, here sequentially): only the 12 new and changed rows are stored; the 15 removed ids are tombstoned."""
    import fsspec
    import numpy as np

    from pipeline.store.keys import keys_of

    first = run_job("ingest", local_config, f"ingest.input={write_tsv(tmp_path / 'n1.tsv', ROWS)}")
    assert first.returncode == 0, first.stderr[-2000:]
    deleted = {str(i) for i in range(20, 30)}
    edited = {str(i) for i in range(500, 505)}
    night = [
        (pid, text + " (edited)" if pid in edited else text, title) for pid, text, title in ROWS if pid not in deleted
    ]
    night[400:400] = synthetic_rows(7, start=5000)
    (tmp_path / "n2").mkdir()
    write_tsv(tmp_path / "n2" / "a.tsv", night[:600])
    write_tsv(tmp_path / "n2" / "b.tsv", night[600:])
    overrides = [f"ingest.input={tmp_path / 'n2'}", "ingest.snapshot=s2", "ingest.base=s1", "ingest.parallel=never"]
    run = run_job("ingest", local_config, *overrides)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = run.summary
    assert (summary["new"], summary["changed"], summary["deleted"], summary["unchanged"]) == (7, 5, 10, 987)
    assert summary["rows"] == len(night) and summary["written_rows"] == 12 and summary["base"] == "s1"
    manifest, rows = read_snapshot(fsspec.filesystem("file"), str(tmp_path / "store" / "passages" / "s2"))
    assert manifest["base"] == "s1" and manifest["depth"] == 1 and manifest["live_rows"] == len(night)
    assert_same_passages(rows, [r for r in night if r[0] in edited or int(r[0]) >= 5000])
    tombstones = tmp_path / "store" / "passages" / "s2" / "_tombstones.npy"
    assert sha256_hex(tombstones.read_bytes()) == manifest["tombstones"]["sha256"]
    assert sorted(np.load(tombstones).tolist()) == sorted(keys_of(sorted(deleted | edited)).tolist())

    assert run_job("ingest", local_config, *overrides).summary["reused"] is True
    other = run_job("ingest", local_config, *overrides[:-2], "ingest.base=null")
    assert other.returncode == 1 and "another source (or base)" in other.summary["error"]


def test_a_chain_whose_base_is_missing_fails_naming_it(tmp_path, local_config):
    assert run_job("ingest", local_config, f"ingest.input={write_tsv(tmp_path / 'n1.tsv', ROWS[:50])}").returncode == 0
    overrides = ["ingest.snapshot=s2", "ingest.base=s1", f"ingest.input={write_tsv(tmp_path / 'n2.tsv', ROWS[:40])}"]
    assert run_job("ingest", local_config, *overrides).returncode == 0
    (tmp_path / "store" / "passages" / "s1" / "_manifest.json").unlink()
    run = run_job(
        "ingest",
        local_config,
        "ingest.snapshot=s3",
        "ingest.base=s2",
        f"ingest.input={write_tsv(tmp_path / 'n3.tsv', ROWS[:30])}",
    )
    assert run.returncode == 1
    assert "snapshot 's2' is a delta on 's1', whose manifest" in run.summary["error"]
    assert str(tmp_path / "store" / "passages" / "s1" / "_manifest.json") in run.summary["error"]
