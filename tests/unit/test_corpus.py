"""Reading passage files: DPR's TSV exactly as DPR reads it, JSONL, Parquet, and clear errors for bad input."""

import csv
import gzip
import tracemalloc

import pytest

from kit.corpora import synthetic_rows, write_jsonl, write_parquet, write_tsv
from pipeline.errors import InputError
from pipeline.ingest.corpus import content_hash, list_input_files, read_passages

TRICKY_ROWS = [
    ("1", 'Aaron ( or ; "Ahärôn") is a prophet', "Aaron"),
    ("2", "tab\tinside quotes and ''single'' quotes", "Tabs"),
    ("3", 'ends with a quote "quoted"', "Quotes"),
    ("4", "unicode: 東京 Ελληνικά emoji 🙂 Ωmega", "Ünïcode"),
    ("5", "line one\nline two inside one quoted field", "Multi line"),
    ("6", '"""fully quoted inside"""', "Outer quotes"),
]


def dpr_reference(path):
    """DPR's CsvCtxSrc: csv.reader with tabs, skip the header, `.strip('"')` on the text."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if row[0] == "id":
                continue
            yield row[0], row[1].strip('"'), row[2]


@pytest.mark.parametrize("name", ["psgs.tsv", "psgs.tsv.gz"])
def test_tsv_reads_exactly_as_dpr(tmp_path, name):
    path = write_tsv(tmp_path / name, TRICKY_ROWS)
    ours = [(p.id, p.text, p.title) for p in read_passages(str(path))]
    assert ours == list(dpr_reference(path))
    assert ours[1][1] == "tab\tinside quotes and ''single'' quotes"
    assert ours[5][1] == "fully quoted inside"


def test_tsv_reports_the_starting_line_of_each_record(tmp_path):
    path = write_tsv(tmp_path / "p.tsv", TRICKY_ROWS)
    lines = [p.line for p in read_passages(str(path))]
    assert lines == [2, 3, 4, 5, 6, 8]  # record 5 spans lines 6-7


def test_jsonl_and_parquet_with_integer_ids(tmp_path):
    records = [{"id": i, "title": f"T{i}", "text": f"text {i}"} for i in range(1, 4)]
    jsonl = write_jsonl(tmp_path / "p.jsonl.gz", records)
    parquet = write_parquet(
        tmp_path / "p.parquet", {"id": [1, 2, 3], "title": ["T1", "T2", "T3"], "text": ["text 1", "text 2", "text 3"]}
    )
    expected = [(str(r["id"]), r["title"], r["text"]) for r in records]
    for path in (jsonl, parquet):
        assert [(p.id, p.title, p.text) for p in read_passages(str(path))] == expected


def test_content_hash_changes_with_title_or_text():
    base = content_hash("Title", "text")
    assert base == content_hash("Title", "text")
    assert len(base) == 32
    assert (
        len({base, content_hash("Title", "text."), content_hash("Title2", "text"), content_hash("Titlet", "ext")}) == 4
    )


def _truncated_gzip(tmp_path):
    data = gzip.compress(("id\ttext\ttitle\n" + "".join(f'{i}\t"text {i}"\tT\n' for i in range(1, 5000))).encode())
    path = tmp_path / "cut.tsv.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_INPUTS = {
    "missing column": (lambda d: _raw(d / "a.tsv", b"id\ttext\n1\thello\n"), 1, "missing column(s) title"),
    "empty text": (lambda d: write_tsv(d / "b.tsv", [("1", "ok", "T"), ("2", "   ", "T")]), 3, "empty text"),
    "empty id": (lambda d: write_tsv(d / "b2.tsv", [("", "text", "T")]), 2, "empty id"),
    "non utf-8": (lambda d: _raw(d / "c.tsv", b'id\ttext\ttitle\n1\t"ok"\tT\n2\t"caf\xe9"\tT\n'), 3, "not UTF-8"),
    "field count": (lambda d: _raw(d / "d.tsv", b"id\ttext\ttitle\n1\tonly two\n"), 2, "expected 3"),
    "truncated gzip": (_truncated_gzip, None, "truncated or corrupt"),
    "invalid json": (
        lambda d: _raw(d / "e.jsonl", b'{"id": 1, "title": "", "text": "x"}\n{"id": 2,\n'),
        2,
        "invalid JSON",
    ),
    "json missing field": (lambda d: write_jsonl(d / "f.jsonl", [{"id": 1, "text": "x"}]), 1, "missing field(s) title"),
    "parquet missing column": (
        lambda d: write_parquet(d / "g.parquet", {"id": ["1"], "text": ["x"]}),
        None,
        "missing column(s) title",
    ),
    "not parquet": (lambda d: _raw(d / "h.parquet", b"PAR1 this is not parquet"), None, "not a readable Parquet"),
    "too long": (lambda d: write_tsv(d / "i.tsv", [("1", "x" * 200, "T")]), 2, "ingest.max_text_chars"),
}


def _raw(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_line(tmp_path, case):
    make, line, message = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        list(read_passages(str(path), max_text_chars=100))
    error = caught.value
    assert error.source == str(path)
    assert message in error.problem
    if line is not None:
        assert error.line == line
    assert str(path) in str(error)


def test_truncated_gzip_reports_a_line_past_the_last_good_one(tmp_path):
    with pytest.raises(InputError) as caught:
        list(read_passages(str(_truncated_gzip(tmp_path))))
    assert caught.value.line > 2


def test_reading_streams_with_bounded_memory(tmp_path):
    path = write_tsv(tmp_path / "big.tsv.gz", synthetic_rows(30_000))
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_passages(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 30_000
    corpus_bytes = sum(len(text) for _, text, _ in synthetic_rows(30_000))
    assert peak < corpus_bytes / 4, (peak, corpus_bytes)


def test_list_input_files_expands_globs_and_directories(tmp_path):
    for name in ("b.tsv", "a.jsonl.gz", "_ignored.tsv", ".hidden.tsv"):
        write_tsv(tmp_path / name, [("1", "x", "y")])
    by_glob = list_input_files(str(tmp_path / "*.*"))
    by_dir = list_input_files(str(tmp_path))
    assert [f.url for f in by_glob] == [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.tsv")]
    assert by_dir == by_glob
    with pytest.raises(InputError, match="no passage files"):
        list_input_files(str(tmp_path / "none-*.tsv"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unknown passage file type"):
        list_input_files(str(tmp_path / "notes.txt"))
