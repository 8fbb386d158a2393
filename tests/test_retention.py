"""Retention over a dozen nights on the S3 server, as an operator runs it: `jobs.nightly` with its retention step
(deltas, a full snapshot every fourth night, compactions), a version pinned with `retain.pinned`, `jobs.gc
--dry-run`, and `jobs.gc` while a night writes. The store stays bounded; every retained version loads and answers
exactly as it did the night it was built; nothing a night in flight wrote is lost. The plan itself:
tests/unit/test_retention.py."""

import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import s3fs

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import REPO, run_job, write_config
from pipeline.ops.history import read_history
from pipeline.store.layout import read_latest
from pipeline.store.lexical import load_lexical
from pipeline.store.published import load_published
from pipeline.store.storage import Storage

pytestmark = pytest.mark.ray
NIGHTS = 12
BASE = synthetic_rows(240, words=20)
QUERIES = np.random.default_rng(7).standard_normal((6, 32)).astype(np.float32)  # the tiny encoders' width


def _rows(night: int) -> list[tuple[str, str, str]]:
    """Night n's corpus: from night 2 on, 1% of the passages deleted, 2% edited and 1% added every night."""
    rows = {pid: (pid, text, title) for pid, text, title in BASE}
    for n in range(2, night + 1):
        ids = sorted(rows, key=lambda pid: (zlib.crc32(f"{pid}/{n}".encode()), pid))
        for pid in ids[:2]:
            del rows[pid]
        for pid in ids[2:7]:
            _, text, title = rows[pid]
            rows[pid] = (pid, f"{text} night{n}", title)
        for i in range(3):
            pid = f"n{n}-{i}"
            rows[pid] = (pid, f"river castle garden night{n} number {i}", f"Night {n}")
    return list(rows.values())


def _answers(storage: Storage, version: str, cache) -> tuple:
    """What a version answers: its dense top 10 for fixed vectors and its BM25 top 10 for fixed words."""
    published = load_published(storage, version, str(cache))
    scores, rows = published.search(QUERIES, 10)
    dense = [published.passages(r[r >= 0]).column("id").to_pylist() for r in rows]
    lexical = load_lexical(storage, published.manifest, str(cache))
    sparse = [[hit["id"] for hit in hits] for hits in lexical.search(["river castle", "night7", "garden"], 10)]
    return dense, np.round(scores, 4).tolist(), sparse


def _store_bytes(fs: s3fs.S3FileSystem, root: str) -> int:
    fs.invalidate_cache()
    return sum(info["size"] for info in fs.find(root, detail=True).values())


@pytest.fixture(scope="module")
def month(tmp_path_factory, tiny_models, s3_endpoint, ray_address):
    """Twelve nights; after each, what its version answers and the store's bytes."""
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    if not fs.exists("retention"):
        fs.mkdir("retention")
    tmp = tmp_path_factory.mktemp("retention")
    options = {"endpoint_url": s3_endpoint}
    settings = {
        "storage": {"root": "s3://retention/root", "options": options},
        "ingest": {"shard_rows": 80},
        "encode": {"model": tiny_models["ctx"], "pooling": "dpr", "max_length": 48},
        "index": {"factory": "IVF4,PQ16x4", "nprobe": 4, "queries": 30, "min_recall": 0.3, "max_segments": 3},
        "serve": {"question_model": tiny_models["question"], "reader_model": None},
        "nightly": {"max_chain": 3},
        "retain": {"versions": 3, "min_age_h": 0},
    }
    config = write_config(tmp / "c.yaml", settings)
    storage = Storage("s3://retention/root", options)
    versions, answers, store = [], {}, []
    for night in range(1, NIGHTS + 1):
        path = write_tsv(tmp / f"n{night:02d}.tsv", _rows(night))
        run = run_job("nightly", config, f"ingest.input={path}", f"ingest.snapshot=n{night:02d}")
        assert run.returncode == 0, f"night {night}: {run.stderr[-3000:]}"
        version = run.summary["version"]
        versions.append(version)
        answers[version] = _answers(storage, version, tmp / f"cache-{night}")
        store.append(_store_bytes(fs, "retention/root"))
        assert run.summary["retention"]["error"] is None, run.summary["retention"]
        if night == 2:  # the operator pins night 2's version in the deployment YAML: kept from now on
            settings["retain"]["pinned"] = [version]
            write_config(config, settings)
    return {
        "config": config,
        "tmp": tmp,
        "storage": storage,
        "fs": fs,
        "versions": versions,
        "answers": answers,
        "store": store,
        "pinned": versions[1],
    }


def _published(storage: Storage) -> set[str]:
    names = [name for name in storage.list_names("indexes") if name not in ("quantizers", "segments", "lexical")]
    return {name for name in names if storage.exists(f"indexes/{name}/manifest.json")}


def test_the_store_stays_bounded_over_a_dozen_nights(month):
    """What stays is what the retained versions need and nothing else, and the store does not grow from one cycle of
    snapshots (a full one every fourth night) to the next: it rises with a full snapshot's new chain and falls as the
    old one goes."""
    storage, store = month["storage"], month["store"]
    records, _ = read_history(storage)
    assert store[11] <= 1.25 * store[7] and store[10] <= 1.25 * store[6], store  # nights 12 and 11 against 8 and 7
    run = run_job("gc", month["config"], flags=("--dry-run",))  # as the nights left it: nothing to take
    assert run.returncode == 0 and run.summary["would_delete"] == [], run.summary
    published = _published(storage)
    assert len(published) <= 3 + 1 + 1 and len(set(month["versions"])) > len(published)  # newest 3, pinned, LATEST
    [twelfth] = [r for r in records if r.kind == "night" and r.snapshot == f"n{NIGHTS}"]
    assert abs(twelfth.retention.store_bytes - store[-1]) < 20_000  # what the report plots (the record came after)


def test_the_pinned_version_and_latest_survive_and_every_retained_version_answers_as_it_did(month):
    storage, published = month["storage"], _published(month["storage"])
    latest = read_latest(storage, "indexes")  # night 12's, or night 13's when that test ran first
    assert {latest, month["versions"][-1], month["pinned"]} <= published
    for version in published:
        if version in month["answers"]:  # each night's version (a compaction's twin is published beside it)
            assert _answers(storage, version, month["tmp"] / f"after-{version}") == month["answers"][version], version
    for version in set(month["versions"]) - published:
        assert not list(storage.inventory(f"indexes/{version}"))  # a version that went left nothing of its own


def test_a_dry_run_deletes_nothing(month):
    storage = month["storage"]
    before = storage.inventory("")
    run = run_job("gc", month["config"], "retain.versions=1", "retain.pinned=[]", flags=("--dry-run",))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.summary["dry_run"] and run.summary["would_delete"] and run.summary["deleted_bytes"] > 0
    assert storage.inventory("") == before


def test_a_gc_while_a_night_writes_loses_nothing_of_that_night(month):
    """jobs.gc again and again (only objects over 72 s old may go) while night 13 runs: the night publishes, and its
    version loads and answers, every object its chain needs in place."""
    storage, tmp = month["storage"], month["tmp"]
    path = write_tsv(tmp / "n13.tsv", _rows(13))
    command = [sys.executable, "-m", "jobs.nightly", "--config", str(month["config"])]
    command += ["--set", f"ingest.input={path}", "--set", "ingest.snapshot=n13"]
    night = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = 0
    while night.poll() is None:
        gc = run_job("gc", month["config"], "retain.min_age_h=0.02")
        assert gc.returncode == 0, gc.stderr[-2000:]
        runs += 1
        time.sleep(0.5)
    out, err = night.communicate()
    assert night.returncode == 0, err[-3000:]
    assert runs >= 2
    version = read_latest(storage, "indexes")
    assert version not in month["versions"]
    dense, _, sparse = _answers(storage, version, tmp / "cache-13")
    assert all(len(hits) == 10 for hits in dense) and sparse[1]  # "night7" passages still live on night 13
