"""The nightly history (pipeline.ops.history) and its report (pipeline.ops.report, jobs.report) without Ray or a model:
records round-trip through local storage, the record is closed, the page has one row per record, inline PNGs only, marks
for full builds and compactions on every plot, and nothing unescaped or secret."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import re

import pytest
from pydantic import ValidationError

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.ops import history
from pipeline.ops.history import BytesWritten, HistoryRecord, Retention, Rows, read_history
from pipeline.ops.report import Plotter, render
from pipeline.primitives import BuildSummary
from pipeline.store.layout import HISTORY
from pipeline.store.storage import Storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.timezone.utc)


def _night(day: int, **fields) -> HistoryRecord:
    values = {
        "when": T0 + dt.timedelta(days=day),
        "kind": "night",
        "status": "ok",
        "seconds": 40.0 + day,
        "snapshot": f"2026-11-{20 + day:02d}",
        "previous_snapshot": f"2026-11-{19 + day:02d}",
        "version": f"2026-11-{20 + day:02d}-abcdef{day:04d}",
        "mode": "delta",
        "published": True,
        "rows": Rows(live=1000, new=10 + day, changed=5, deleted=3, encoded=15 + day, added=15 + day),
        "stage_seconds": {"ingest": 2.0, "encode": 30.0 + day, "build_index": 3.0, "serve": 4.5},
        "build_seconds": {"add": 0.4, "measure": 0.2, "tombstone": 0.1, "lexical": 0.3, "publish": 0.1},
        "bytes_written": BytesWritten(passages=20_000, embeddings=30_000, index=50_000),
        "segments": 1 + day,
        "tombstones": 3 * day,
        "tombstone_fraction": 3 * day / (1000 + 3 * day),
        "distortion": 0.05 + 0.001 * day,
        "reference_distortion": 0.05,
        "max_drift": 0.2,
        "bytes_per_passage": {"codes": 72.0, "docstore": 640.0, "total": 712.0},
        "serve_moved": True,
        "serve_seconds": 4.5,
    }
    return HistoryRecord(**{**values, **fields})


def _records() -> list[HistoryRecord]:
    """A full first night, two deltas, a compaction, a failed night and a full build, oldest first."""
    first = _night(
        0,
        mode="full",
        previous_snapshot=None,
        retrained=True,
        rows=Rows(live=1000, new=1000, changed=0, deleted=0, encoded=1000, added=1000),
        bytes_written=BytesWritten(passages=2_000_000, embeddings=3_000_000, index=5_000_000),
        build_seconds={"sample": 0.5, "train": 9.0, "add": 2.0, "measure": 0.5, "lexical": 1.0, "publish": 0.2},
        recall_at_100=0.91,
        refined_recall_at_100=0.99,
        tombstones=0,
        tombstone_fraction=0.0,
        distortion=0.05,
    )
    compaction = HistoryRecord(
        when=T0 + dt.timedelta(days=2, hours=3),
        kind="compact",
        status="ok",
        seconds=12.0,
        snapshot="2026-11-22",
        version="2026-11-22-compacted01",
        mode="delta",
        published=True,
        compacted=True,
        rows=Rows(live=1000, added=0),
        stage_seconds={"build_index": 12.0},
        build_seconds={"compact": 9.0, "lexical": 1.0, "publish": 0.5},
        bytes_written=BytesWritten(index=4_000_000),
        segments=1,
        tombstones=0,
        tombstone_fraction=0.0,
        distortion=0.052,
        reference_distortion=0.05,
        max_drift=0.2,
    )
    failed = HistoryRecord(
        when=T0 + dt.timedelta(days=3),
        kind="night",
        status="failed",
        error="encode: the actor died <oops> & more",
        failed_stage="encode",
        seconds=20.0,
        snapshot="2026-11-23",
        stage_seconds={"ingest": 2.0, "encode": 18.0},
        rows=Rows(live=1000, new=4, changed=1, deleted=0),
    )
    build = _night(4, kind="build", mode="full", recall_at_100=0.9, segments=1, tombstones=0, tombstone_fraction=0.0)
    return [first, _night(1), _night(2), compaction, failed, build]


# -- records -------------------------------------------------------------------------------------------------------
def test_records_round_trip_through_storage(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    records = _records()
    names = [history.append(storage, record) for record in reversed(records)]  # written in any order
    assert all(name.startswith(f"{HISTORY}/") and name.endswith(".json") for name in names)
    assert len(set(names)) == len(records)
    read, skipped = read_history(storage)
    assert read == records and skipped == []  # oldest first, every field as written
    assert read_history(storage, last=2)[0] == records[-2:]
    again = HistoryRecord.model_validate_json(records[0].model_dump_json())
    assert again == records[0] and again.bytes_written.total == 10_000_000
    # two records of the same run and moment do not overwrite each other
    assert history.append(storage, records[0]) != history.append(storage, records[0])


def test_the_record_is_closed():
    valid = json.loads(_records()[0].model_dump_json())
    HistoryRecord.model_validate(valid)
    with pytest.raises(ValidationError, match="extra_field"):
        HistoryRecord.model_validate({**valid, "extra_field": 1})
    with pytest.raises(ValidationError, match="rows.bogus"):
        HistoryRecord.model_validate({**valid, "rows": {**valid["rows"], "bogus": 2}})
    with pytest.raises(ValidationError):
        HistoryRecord.model_validate({**valid, "kind": "weekly"})
    with pytest.raises(ValidationError):
        HistoryRecord.model_validate({k: v for k, v in valid.items() if k != "when"})


def test_an_unreadable_record_is_skipped_and_named(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    history.append(storage, _records()[0])
    storage.write_bytes(f"{HISTORY}/20261121T000000.000000Z-night-bad.json", b'{"format": 1, "surprise": true}')
    storage.write_bytes(f"{HISTORY}/notes.txt", b"not a record")
    records, skipped = read_history(storage)
    assert len(records) == 1 and len(skipped) == 1 and "night-bad.json" in skipped[0]


def test_errors_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    text = history.redact("GET https://user:pw@example.com/x failed; key very-secret-value-123 rejected")
    assert "user:pw" not in text and "very-secret-value-123" not in text
    assert "https://***@example.com/x" in text
    assert len(history.redact("x" * 10_000)) == history.MAX_ERROR_CHARS


def _summary(**fields) -> BuildSummary:
    values = {
        "version": "v1",
        "output": "/x/indexes/v1",
        "vectors": 90,
        "mode": "full",
        "segments": 1,
        "tombstones": 10,
        "added": 100,
        "recall_at_10": 0.9,
        "recall_at_100": 0.95,
        "distortion": 0.05,
        "bytes_per_vector": 40.0,
        "bytes_per_passage": {"codes": 40.0, "total": 900.0},
        "bytes_written": 12345,
        "train_seconds": 1.0,
        "add_seconds": 0.5,
        "phase_seconds": {"train": 1.0, "add": 0.5, "compact": 0.3},
        "retrained": True,
        "trained_from": None,
        "reused": False,
    }
    return BuildSummary(**{**values, **fields})


def test_builds_and_compactions_are_recorded_when_they_publish_or_fail(tmp_path):
    config_path = tmp_path / "c.yaml"
    config_path.write_text(f"storage: {{root: {tmp_path / 'store'}}}\nindex: {{max_drift: 0.3}}\n")
    config = load_config(config_path, [])
    storage = Storage(config.storage.root)

    summary = history.recorded("compact", lambda _config: _summary())(config)
    assert summary["history"].startswith(HISTORY) and summary["version"] == "v1"
    assert history.recorded("build", lambda _config: _summary(reused=True))(config).reused  # found: not a run

    def failing(_config):
        raise PipelineError("s3://key:secret@bucket/x: recall@100 0.41 is below index.min_recall")

    with pytest.raises(PipelineError):
        history.recorded("build", failing)(config)
    done, failed = read_history(storage)[0]
    assert (done.kind, done.status, done.version, done.mode, done.compacted) == ("compact", "ok", "v1", "full", True)
    assert done.tombstone_fraction == pytest.approx(0.1) and done.max_drift == 0.3
    assert done.recall_at_100 == 0.95 and done.bytes_written.index == 12345 and done.rows.added == 100
    assert (failed.kind, failed.status, failed.failed_stage) == ("build", "failed", "build_index")
    assert "below index.min_recall" in failed.error and "key:secret" not in failed.error


def test_a_failed_night_is_recorded(tmp_path):
    """A night whose dump is missing fails in ingest; the history says so (no Ray, no model reached)."""
    from pipeline.ops.nightly import run_nightly

    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        f"storage: {{root: {tmp_path / 'store'}}}\ningest: {{input: {tmp_path / 'missing.tsv'}, snapshot: n1}}\n"
    )
    with pytest.raises(PipelineError, match="no passage files"):
        run_nightly(load_config(config_path, []))
    [record], _ = read_history(Storage(str(tmp_path / "store")))
    assert (record.kind, record.status, record.failed_stage, record.snapshot) == ("night", "failed", "ingest", "n1")
    assert "no passage files" in record.error and set(record.stage_seconds) == {"ingest"}
    assert record.version is None and record.serve_moved is None


# -- the report ----------------------------------------------------------------------------------------------------
def _pngs(page: str) -> list[bytes]:
    sources = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    return [base64.b64decode(s.split(",", 1)[1], validate=True) for s in sources]


def test_the_report_has_a_row_per_record_and_inline_pngs_only():
    records = _records()
    page = render(records, "/tmp/store")
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr") == len(records)
    assert body.index("2026-11-24") < body.index("2026-11-20")  # newest first
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    images = _pngs(page)
    assert len(images) == 7
    import matplotlib.image

    for data in images:
        assert data.startswith(PNG_SIGNATURE)
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 500
    try:
        from PIL import Image
    except ImportError:
        return
    for data in images:
        Image.open(io.BytesIO(data)).verify()


def test_full_builds_compactions_and_failures_are_marked_on_every_plot():
    records = _records()
    plotter = Plotter(records)
    assert len(plotter.all()) == 7
    for title, labels in plotter.legends.items():
        assert {"full build", "compaction", "failed run"} <= set(labels), title
    assert "limit: reference × (1 + max_drift)" in next(v for k, v in plotter.legends.items() if "drift limit" in k)
    page = render(records, "/tmp/store")
    assert page.count('class="mark full"') == 2  # the first night and the full build
    assert page.count('class="mark compaction"') == 1 and page.count('class="mark failed"') == 1
    # without any, nothing is marked
    quiet = Plotter([_night(1), _night(2)])
    quiet.all()
    assert all(not {"full build", "compaction", "failed run"} & set(v) for v in quiet.legends.values())


def test_text_is_escaped():
    evil = _records()[4].model_copy(update={"error": '<script>alert("x")</script>', "snapshot": "<b>snap</b>"})
    page = render([evil], 'root "<i>"')
    assert "<script>" not in page and "<b>snap</b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and "&lt;b&gt;snap&lt;/b&gt;" in page
    empty = render([], "/tmp/store")
    assert "<tr" not in empty.split("<tbody>")[1] and "<img" not in empty and "No runs recorded yet" in empty


def test_the_report_job_writes_where_it_says(tmp_path, capsys):
    from jobs.report import main

    storage = Storage(str(tmp_path / "store"))
    for record in _records():
        history.append(storage, record)
    config_path = tmp_path / "c.yaml"
    config_path.write_text(f"storage: {{root: {tmp_path / 'store'}}}\n")
    assert main(["--config", str(config_path), "--last", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["records"] == 4
    assert summary["output"] == str(tmp_path / "store" / "nightly" / "report.html")  # a local root: under it
    page = (tmp_path / "store" / "nightly" / "report.html").read_text()
    assert page.split("<tbody>")[1].count("<tr") == 4
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["--config", str(config_path), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"] == str(out)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config_path), "--last", "0"])
    assert exit_.value.code == 2


def test_retention_steps_are_plotted_and_their_store_bytes_tabled():
    records = _records()
    deleted = {"deleted_objects": 12, "deleted_bytes": 1_000_000}
    step = Retention(kept_versions=["v2"], dropped_versions=["v0"], store_bytes=9_000_000, **deleted)
    records[1] = records[1].model_copy(update={"retention": step})
    gc = HistoryRecord(
        when=T0 + dt.timedelta(days=6), kind="gc", status="ok", seconds=1.5, retention=Retention(store_bytes=8_500_000)
    )
    plotter = Plotter([*records, gc])
    plotter.all()
    assert {"store", "deleted by retention"} <= set(plotter.legends["The store's bytes after each retention step"])
    page = render([*records, gc], "/tmp/store")
    assert "9 MB" in page and "8.5 MB" in page and "deleted 12 objects, 1,000,000 bytes" in page
    quiet = Plotter(_records())
    quiet.all()
    assert "no retention step recorded" in quiet.legends["The store's bytes after each retention step"]
