"""Nightly incremental re-index (its plans: tests/unit/test_nightly_plan.py): three nights (deltas: edits,
deletions, insertions mid-file) and a compaction end to end on the S3 server, with a crash after encode, a rerun
that does nothing, the Serve app moved to each new version over its REST API under load, and every version checked
against a from-scratch build on the same quantizer."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import s3fs

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import REPO, free_port, kill_when_logged, run_job, write_config
from kit.poll import until
from kit.serveapp import put_app, serve_config
from pipeline.store.published import load_published
from pipeline.store.storage import Storage
from tests.conftest import RAY_DASHBOARD_PORT
from tests.scratch import live_embeddings, matches_a_scratch_build

ROWS = synthetic_rows(600, words=30)


def _night(tmp, rows, snapshot):
    """The night's passage file, written once: a rerun of the night reads the very same file."""
    path = tmp / f"psgs-{snapshot}.tsv"
    if not path.exists():
        write_tsv(path, rows)
    return [f"ingest.input={path}", f"ingest.snapshot={snapshot}"]


def _objects(fs: s3fs.S3FileSystem) -> dict[str, str]:
    """Every object of the store → sha256 of its content."""
    fs.invalidate_cache()
    return {path: hashlib.sha256(fs.cat_file(path)).hexdigest() for path in fs.find("nightly/root")}


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_models, s3_endpoint, ray_address):
    """Night 1 (full) published and served by an app deployed from a config through the Serve REST API."""
    import ray
    from ray import serve

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    if not fs.exists("nightly"):
        fs.mkdir("nightly")
    tmp = tmp_path_factory.mktemp("nightly")
    port = free_port()
    dashboard = f"http://127.0.0.1:{RAY_DASHBOARD_PORT}"
    config_path = write_config(
        tmp / "c.yaml",
        {
            "storage": {"root": "s3://nightly/root", "options": {"endpoint_url": s3_endpoint}},
            "ingest": {"shard_rows": 100},
            "encode": {"model": tiny_models["ctx"], "pooling": "dpr", "max_length": 64},
            # served refined: every version, deltas and compactions too, must carry its segments' vectors
            "index": {"factory": "IVF4,PQ32x8", "nprobe": 4, "queries": 50, "min_recall": 0.6, "refine_k": 40},
            "serve": {
                "question_model": tiny_models["question"],
                "reader_model": None,
                "port": port,
                "cache_dir": str(tmp / "cache"),
                "retriever_cpus": 0.25,
                "encoder_cpus": 0.25,
            },
            "nightly": {"serve_address": dashboard, "serve_timeout_s": 120},
        },
    )
    first = run_job("nightly", config_path, *_night(tmp, ROWS, "d1"), "nightly.serve_address=null")
    assert first.returncode == 0, first.stderr[-3000:]
    put_app(dashboard, serve_config(config_path, port))
    url = f"http://127.0.0.1:{port}"
    served = until(lambda: requests.get(f"{url}/v1/index", timeout=5).json()["index_version"], 180, 1, "the app")
    yield {
        "config": config_path,
        "tmp": tmp,
        "first": first.summary,
        "first_served": served,
        "url": url,
        "storage": Storage("s3://nightly/root", {"endpoint_url": s3_endpoint}),
        "fs": fs,
        "objects": _objects(fs),
    }
    ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def night2(nights):
    """Night 2 (deletions, edits, insertions mid-file) run while three clients search the app, what the app served
    right after it, the objects it wrote, a replica cache holding night 1 moved to night 2, and the same night run
    again. What tests read of the live app is taken here, before a later night moves it on."""
    storage = nights["storage"]
    deleted = {str(i) for i in range(11, 31)}
    changed = {str(i) for i in range(101, 116)}
    rows = [
        (pid, text + " revised" if pid in changed else text, title) for pid, text, title in ROWS if pid not in deleted
    ]
    rows[300:300] = synthetic_rows(25, start=1001, words=30)  # inserted mid-file: later shard boundaries move
    cache = nights["tmp"] / "replica-cache"
    load_published(storage, nights["first"]["version"], str(cache))  # a replica serving night 1
    answered, stop = [], threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(f"{nights['url']}/v1/search", json={"questions": ["river"], "k": 3}, timeout=30)
                answered.append((response.status_code, response.json().get("index_version")))
            except (requests.RequestException, ValueError) as exc:
                answered.append((0, repr(exc)))
            time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        run = run_job("nightly", nights["config"], *_night(nights["tmp"], rows, "d2"))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    written = {path: digest for path, digest in _objects(nights["fs"]).items() if path not in nights["objects"]}
    moved = load_published(storage, run.summary["version"], str(cache))
    hits = requests.post(f"{nights['url']}/v1/search", json={"questions": ["river"], "k": 3}, timeout=30).json()
    again = run_job("nightly", nights["config"], *_night(nights["tmp"], rows, "d2"))
    assert again.returncode == 0, again.stderr[-3000:]
    return {
        "rows": rows,
        "changed": changed,
        "deleted": deleted,
        "summary": run.summary,
        "served": hits["index_version"],
        "rerun": again.summary,
        "answered": answered,
        "written": written,
        "fetched": moved.fetched,
    }


@pytest.fixture(scope="module")
def night3(nights, night2):
    """Night 3 killed (SIGKILL) right after its encode stage wrote its manifest, then while uploading its index
    version, then run to the end, then again."""
    storage = nights["storage"]
    rows = [(pid, text + " third" if pid in {"200", "201", "202"} else text, title) for pid, text, title in ROWS]
    command = [
        sys.executable,
        "-m",
        "jobs.nightly",
        "--config",
        str(nights["config"]),
        *[arg for item in _night(nights["tmp"], rows, "d3") for arg in ("--set", item)],
    ]
    [fingerprint] = storage.list_names("embeddings/d2")
    job = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        storage.fs.invalidate_cache()
        if storage.exists(f"embeddings/d3/{fingerprint}/_manifest.json"):
            os.killpg(job.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    job.wait(timeout=60)
    record = storage.read_json("nightly/d3.json")
    # Killed again while its index build uploads the new segment and tombstones.
    killed = kill_when_logged(
        "nightly", nights["config"], "pipeline.index.job: publish…", *_night(nights["tmp"], rows, "d3")
    )
    during_upload = (killed, storage.read_bytes("indexes/LATEST").decode().strip())
    run = run_job("nightly", nights["config"], *_night(nights["tmp"], rows, "d3"))
    assert run.returncode == 0, run.stderr[-3000:]
    created = storage.read_json(f"indexes/{run.summary['version']}/manifest.json")["created_at"]
    again = run_job("nightly", nights["config"], *_night(nights["tmp"], rows, "d3"))
    return {
        "killed": job.returncode,
        "record": record,
        "summary": run.summary,
        "created_at": created,
        "rerun": again,
        "during_upload": during_upload,
    }


@pytest.fixture(scope="module")
def compacted(nights, night3):
    """The compaction job on night 3's version (three segments and tombstones), SIGKILLed while merging, then while
    publishing, then run to the end, then run again: one segment, no dead rows."""
    storage = nights["storage"]
    killed = []
    for phase in ("compact…", "publish…"):
        status = kill_when_logged("compact", nights["config"], f"pipeline.index.job: {phase}")
        killed.append((status, storage.read_bytes("indexes/LATEST").decode().strip()))
    run = run_job("compact", nights["config"])
    assert run.returncode == 0, run.stderr[-3000:]
    again = run_job("compact", nights["config"])
    assert again.returncode == 0, again.stderr[-3000:]
    return {**run.summary, "killed": killed, "again": again.summary}


def test_first_night_encodes_everything_and_trains(nights):
    first = nights["first"]
    assert first["status"] == "ok" and first["previous_snapshot"] is None
    assert (first["new"], first["changed"], first["deleted"], first["encoded"], first["reused"]) == (600, 0, 0, 600, 0)
    assert first["retrained"] is True and first["published"] is True and first["vectors"] == 600
    assert nights["first_served"] == first["version"]


def test_second_night_encodes_exactly_what_changed_and_serves_it(nights, night2):
    storage, rows, changed, second = nights["storage"], night2["rows"], night2["changed"], night2["summary"]
    assert (second["new"], second["changed"], second["deleted"]) == (25, 15, 20)
    assert second["encoded"] == 40 and second["reused"] == 605 - 40 and second["previous_snapshot"] == "d1"
    assert second["retrained"] is False and second["published"] is True  # the quantizer of night 1 was reused
    assert second["served"]["index_version"] == second["version"]

    published = load_published(storage, second["version"], str(nights["tmp"] / "check"))
    assert sorted(published.live_ids()[1]) == sorted(pid for pid, _, _ in rows)
    assert published.manifest.trained_from == nights["first"]["version"]
    assert second["index_build"] == "delta" and second["segments"] == 2  # night 1's segment, and tonight's
    before, after = live_embeddings(storage, "d1"), live_embeddings(storage, "d2")
    unchanged = [pid for pid, _, _ in rows if pid in before and pid not in changed]
    assert len(unchanged) == 565 and all(np.array_equal(before[p], after[p]) for p in unchanged)
    assert not any(np.array_equal(before[p], after[p]) for p in changed)
    # unchanged passages are found exactly as before: same vectors under the same trained quantizer
    old = load_published(storage, nights["first"]["version"], str(nights["tmp"] / "check-old"))
    queries = np.stack([after[p] for p in unchanged[:100]])
    old_ids = old.passages(old.search(queries, 1)[1][:, 0]).column("id").to_pylist()
    new_ids = published.passages(published.search(queries, 1)[1][:, 0]).column("id").to_pylist()
    assert np.mean([a == b for a, b in zip(old_ids, new_ids)]) >= 0.95
    assert night2["served"] == second["version"]
    statuses = [status for status, _ in night2["answered"]]
    assert len(statuses) >= 20 and set(statuses) == {200}, night2["answered"][-5:]  # no failed request
    assert {version for _, version in night2["answered"]} <= {nights["first"]["version"], second["version"]}

    rerun = night2["rerun"]
    assert rerun["encoded"] == 0 and rerun["published"] is False and rerun["version"] == second["version"]
    assert (rerun["new"], rerun["changed"], rerun["deleted"]) == (25, 15, 20)


def test_second_night_writes_and_fetches_only_what_changed(nights, night2):
    """No object night 2 wrote has the content of one night 1 wrote (passages, vectors, segments, quantizer are
    referenced, not copied); it wrote a fraction of night 1's bytes; a replica holding night 1 fetched only the
    new segment and tombstones."""
    fs, first, written = nights["fs"], nights["objects"], night2["written"]
    assert written and not set(written.values()) & set(first.values())
    size = {path: fs.size(path) for path in [*first, *written]}
    assert sum(size[p] for p in written) < 0.25 * sum(size[p] for p in first)
    assert not any("/quantizers/" in p for p in written)
    second = nights["storage"].read_json(f"indexes/{night2['summary']['version']}/manifest.json")
    new_files = [
        e
        for e in second["files"]
        if e["name"].startswith("segments/")
        and f"nightly/root/indexes/{e['name']}" in written
        or e["name"].endswith("tombstones.npy")
    ]
    assert 0 < night2["fetched"] == sum(e["bytes"] for e in new_files) < 0.5 * sum(e["bytes"] for e in second["files"])


def test_each_version_equals_a_scratch_build_and_hides_the_dead(nights, night2, night3, compacted):
    storage, tmp = nights["storage"], nights["tmp"]
    for name, version, snapshot in (
        ("1", nights["first"]["version"], "d1"),
        ("2", night2["summary"]["version"], "d2"),
        ("3", night3["summary"]["version"], "d3"),
        ("c", compacted["version"], "d3"),
    ):
        matches_a_scratch_build(storage, version, snapshot, tmp / f"scratch-{name}")
    second = load_published(storage, night2["summary"]["version"], str(tmp / "scratch-2"))
    old = live_embeddings(storage, "d1")
    _, found = second.search(np.stack([old[p] for p in sorted(night2["deleted"])]), 5)
    assert not set(second.passages(found[found >= 0]).column("id").to_pylist()) & night2["deleted"]
    new = live_embeddings(storage, "d2")
    _, found = second.search(np.stack([new[p] for p in sorted(night2["changed"])]), 1)
    assert all(text.endswith(" revised") for text in second.passages(found[:, 0]).column("text").to_pylist())


@pytest.mark.reliability
def test_a_compaction_killed_while_merging_or_publishing_publishes_once(nights, night3, compacted):
    third = night3["summary"]["version"]
    assert compacted["killed"] == [(-signal.SIGKILL, third)] * 2  # LATEST never moved to an incomplete version
    assert compacted["reused"] is False and compacted["version"] != third
    again = compacted["again"]  # the published compaction is found, not redone
    assert again["reused"] is True and again["version"] == compacted["version"] and again["segments"] == 1


def test_compaction_merges_the_segments_and_drops_the_dead(nights, night3, compacted):
    third = load_published(nights["storage"], night3["summary"]["version"], str(nights["tmp"] / "scratch-3"))
    assert len(third.manifest.segments) == 3 and len(third.dead) > 0
    merged = load_published(nights["storage"], compacted["version"], str(nights["tmp"] / "scratch-c"))
    assert compacted["segments"] == 1 and merged.manifest.tombstones is None and len(merged.dead) == 0
    assert merged.vectors == third.vectors == 600 and compacted["retrained"] is False
    assert merged.manifest.quantizer == third.manifest.quantizer  # no retraining, codes copied
    # the live rows' vectors copied in the merged segment's row order: refine re-scores as before compaction
    queries = np.random.default_rng(0).normal(size=(8, merged.d)).astype(np.float32)
    before, after = third.search(queries, 10, refine_k=600), merged.search(queries, 10, refine_k=600)
    assert np.allclose(before[0], after[0], atol=1e-5)
    assert [third.passages(r).column("id").to_pylist() for r in before[1]] == [
        merged.passages(r).column("id").to_pylist() for r in after[1]
    ]


@pytest.mark.reliability
def test_a_tampered_tombstone_file_is_refused(nights, night3):
    storage, version = nights["storage"], night3["summary"]["version"]
    path = f"indexes/{version}/tombstones.npy"
    original = storage.read_bytes(path)
    try:
        storage.write_bytes(path, original[:-8] + bytes(8))
        with pytest.raises(Exception, match="tombstones.npy: checksum mismatch"):
            load_published(storage, version, str(nights["tmp"] / "tampered"))
    finally:
        storage.write_bytes(path, original)


@pytest.mark.reliability
def test_a_crash_after_encode_resumes_without_re_encoding_and_publishes_once(nights, night2, night3):
    storage = nights["storage"]
    assert night3["killed"] == -signal.SIGKILL, "the nightly run finished before it could be killed after encode"
    assert night3["record"]["previous_snapshot"] == "d2"
    third = night3["summary"]
    assert third["encoded"] == 0 and third["reused"] == 600  # encoded before the crash, not again
    # vs night 2: ids 11-30 are back (new), 101-115 reverted and 200-202 edited (changed), 1001-1025 gone
    assert (third["new"], third["changed"], third["deleted"]) == (20, 18, 25)
    assert third["published"] is True and third["served"]["index_version"] == third["version"]
    # the kill during the upload left LATEST on night 2's version; the finished night published its own once
    assert night3["during_upload"] == (-signal.SIGKILL, night2["summary"]["version"])
    again = night3["rerun"]
    assert again.returncode == 0 and again.summary["published"] is False
    assert storage.read_json(f"indexes/{third['version']}/manifest.json")["created_at"] == night3["created_at"]


def test_a_new_encoder_forces_a_full_encode(nights, night3, compacted):
    """Another fingerprint (here: another max_length) shares no vectors with the published index. It runs after the
    other nights (night3), whose carry-over it would otherwise break."""
    run = run_job(
        "nightly",
        nights["config"],
        *_night(nights["tmp"], ROWS, "d4"),
        "encode.max_length=48",
        "nightly.serve_address=null",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    fourth = run.summary
    assert fourth["encoded"] == 600 and fourth["reused"] == 0 and fourth["retrained"] is True


def test_evaluate_searches_exactly_over_a_delta_chain(nights, night2):
    """jobs.evaluate on night 2's version: its exact search resolves d2's chain (d1's rows minus tombstones, plus
    d2's), so deleted passages never appear and every passage found has its current text."""
    import json

    rows = {pid: text for pid, text, _ in night2["rows"]}
    asked = ["101", "102", "200", "1001"]
    questions = nights["tmp"] / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question": " ".join(rows[p].split()[:8]), "answers": [rows[p][-20:]]}) + "\n" for p in asked
        )
    )
    output = nights["tmp"] / "evaluation"
    run = run_job(
        "evaluate",
        nights["config"],
        f"evaluate.questions={questions}",
        f"evaluate.output={output}",
        f"evaluate.index_version={night2['summary']['version']}",
        "evaluate.k=[1,10]",
        f"evaluate.cache_dir={nights['tmp'] / 'evaluate-cache'}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    exact = json.loads((output / "retriever_results_exact.json").read_text())
    found = [ctx for record in exact for ctx in record["ctxs"]]
    assert len(found) == 40 and all(ctx["text"] == rows[ctx["id"]] for ctx in found)  # live rows, current text
    assert not {ctx["id"] for ctx in found} & night2["deleted"]


def test_the_history_records_each_night_and_compaction_and_the_report_shows_them(nights, night2, night3, compacted):
    """One history record per night run (reruns included: they published nothing) and per compaction that
    published, with their kinds, modes, versions, rows and stages; nothing of the storage options or credentials in
    them; and `jobs.report`, run as a user runs it, writes a page with one table row per record."""
    import base64
    import json
    import re

    from pipeline.ops.history import read_history
    from tests.conftest import FAKE_CREDENTIALS

    storage = nights["storage"]
    records, skipped = read_history(storage)
    assert skipped == []
    ours = [r for r in records if r.snapshot in {"d1", "d2", "d3"}]  # a later test may have run night d4
    second, third = night2["summary"], night3["summary"]
    assert [(r.kind, r.snapshot, r.mode, r.version, r.published, r.status) for r in ours] == [
        ("night", "d1", "full", nights["first"]["version"], True, "ok"),
        ("night", "d2", "delta", second["version"], True, "ok"),
        ("night", "d2", "current", second["version"], False, "ok"),  # the rerun: found published
        ("night", "d3", "delta", third["version"], True, "ok"),
        ("night", "d3", "current", third["version"], False, "ok"),
        ("compact", "d3", "delta", compacted["version"], True, "ok"),  # its rerun published nothing: no record
    ]
    first, d2, d2_again, d3, d3_again, compaction = ours
    rows = [(r.rows.new, r.rows.changed, r.rows.deleted) for r in (first, d2, d2_again, d3)]
    assert rows == [(600, 0, 0), (25, 15, 20), (25, 15, 20), (20, 18, 25)]
    assert (first.rows.encoded, d2.rows.encoded, d3.rows.encoded, compaction.rows.live) == (600, 40, 0, 600)
    assert set(first.stage_seconds) == {"ingest", "encode", "build_index", "retain"} and first.serve_moved is None
    assert set(d2.stage_seconds) == {"ingest", "encode", "build_index", "serve", "retain"}
    assert d2.serve_moved is True and d2.serve_seconds == d2.stage_seconds["serve"] > 0
    assert first.recall_at_100 == nights["first"]["recall_at_100"] and d2.recall_at_100 is None  # measured: full
    assert first.retrained is True and "train" in first.build_seconds and d2.build_seconds
    assert 0 < d2.bytes_written.total < 0.25 * first.bytes_written.total
    assert min(first.bytes_written.passages, first.bytes_written.embeddings, first.bytes_written.index) > 0
    assert d2_again.bytes_written.total == 0 and d3_again.bytes_written.total == 0
    assert (d3.segments, compaction.segments, compaction.compacted, compaction.tombstone_fraction) == (3, 1, True, 0)
    assert 0 < d3.tombstone_fraction == pytest.approx(d3.tombstones / (600 + d3.tombstones), abs=1e-6)
    assert all(r.distortion and r.reference_distortion and r.max_drift == 0.2 for r in ours)
    assert all(r.bytes_per_passage["total"] > 0 for r in ours)
    written = [storage.read_bytes(f"nightly/history/{n}").decode() for n in storage.list_names("nightly/history")]
    for secret in [*FAKE_CREDENTIALS.values(), storage.options["endpoint_url"]]:
        assert not any(secret in text for text in written)

    out = nights["tmp"] / "report" / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.report", "--config", str(nights["config"]), "--out", str(out), "--last", "500"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["output"] == str(out) and summary["records"] == len(records)
    page = out.read_text()
    assert page.split("<tbody>")[1].split("</tbody>")[0].count("<tr") == len(records)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 7 and "<figcaption>The store&#x27;s bytes after each retention step" in page
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
