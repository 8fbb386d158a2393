"""Passage corpora as DPR ships them, read as a stream of validated rows.

Formats: DPR's `psgs_w100.tsv` (header `id text title`, text quoted with doubled inner quotes, read with
`csv.reader(delimiter="\\t")` and `.strip('"')` exactly as DPR's CsvCtxSrc does), JSONL `{id, title, text}` and
Parquet, each optionally gzip-compressed (not Parquet). Every row is checked; a bad row raises InputError naming
the file and line (row number for Parquet), so a 21M-passage run never fails with an anonymous traceback.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import posixpath
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.store.storage import resolve

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "text", "title")
SUFFIXES = {".tsv": "tsv", ".tsv.gz": "tsv", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # length is checked per row against ingest.max_text_chars


@dataclass(frozen=True)
class Passage:
    line: int  # 1-based line of the record's start (TSV/JSONL) or row number (Parquet)
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    version: str  # ETag on object stores, mtime locally: detects a changed source


def detect_format(url: str, configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    name = url.lower()
    for suffix, fmt in sorted(SUFFIXES.items(), key=lambda item: -len(item[0])):
        if name.endswith(suffix):
            return fmt
    raise InputError(url, None, f"unknown passage file type; expected one of {', '.join(SUFFIXES)}")


def content_hash(title: str, text: str) -> str:
    """What nightly runs compare to decide whether a passage must be re-encoded."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(title.encode("utf-8"))
    digest.update(b"\x1f")
    digest.update(text.encode("utf-8"))
    return digest.hexdigest()


def list_input_files(url: str, options: dict[str, Any] | None = None) -> list[InputFile]:
    """Expand a file, directory or glob into its passage files, sorted so shard numbering is deterministic."""
    fs, path = resolve(url, options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if any(ch in path for ch in "*?["):
        infos = fs.glob(path, detail=True)
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
    else:
        try:
            infos = {path: fs.info(path)}
        except FileNotFoundError:
            infos = {}
    files = []
    for name, info in sorted(infos.items()):
        if info.get("type") == "directory" or posixpath.basename(name).startswith((".", "_")):
            continue
        version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        files.append(InputFile(url=prefix + name, size=int(info.get("size") or 0), version=version.strip('"')))
    if not files:
        raise InputError(url, None, "no passage files found")
    for f in files:
        detect_format(f.url)
    return files


class BadRows:
    """Row-level problems (a malformed record, an empty or oversized text, a non-UTF-8 line): fatal by default;
    with `ingest.max_bad_rows` > 0 that many are skipped and listed for the summary and the manifest. Problems of a
    whole file (no header, broken compression, unreadable Parquet) are always fatal."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self.rows: list[dict[str, Any]] = []

    def skip(self, error: InputError) -> None:
        if len(self.rows) >= self.limit:
            raise error
        log.warning("skipped bad row: %s", error)
        self.rows.append({"file": error.source, "line": error.line, "problem": error.problem})


def read_passages(
    url: str,
    options: dict[str, Any] | None = None,
    fmt: str = "auto",
    max_text_chars: int = 100_000,
    bad: BadRows | None = None,
) -> Iterator[Passage]:
    """Stream validated passages from one file; memory does not depend on the file's size."""
    bad = bad if bad is not None else BadRows()
    fmt = detect_format(url, fmt)
    fs, path = resolve(url, options)
    with fs.open(path, "rb") as raw:
        if fmt == "parquet":
            rows: Iterable[Passage] = _parquet_rows(url, raw, bad)
        else:
            stream: BinaryIO = raw
            if url.lower().endswith(".gz"):
                stream = gzip.GzipFile(fileobj=raw, mode="rb")  # buffered itself: errors surface near their line
            lines = _LineCounter(url, stream, bad)
            rows = _tsv_rows(url, lines, bad) if fmt == "tsv" else _jsonl_rows(url, lines, bad)
        yield from _validated(url, rows, max_text_chars, bad)


class _LineCounter:
    """Decodes lines one by one so a non-UTF-8 byte is reported with its line, and a broken gzip too."""

    def __init__(self, url: str, stream: BinaryIO, bad: BadRows):
        self.url, self.stream, self.line, self.bad = url, stream, 0, bad

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                raw = self.stream.readline()
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
                raise InputError(self.url, self.line + 1, f"truncated or corrupt compressed stream ({exc})") from None
            if not raw:
                return
            self.line += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.bad.skip(InputError(self.url, self.line, f"not UTF-8 ({exc.reason} at byte {exc.start})"))
                continue
            if self.line == 1:
                text = text.removeprefix("\ufeff")
            yield text


def _tsv_rows(url: str, lines: _LineCounter, bad: BadRows) -> Iterator[Passage]:
    reader = csv.reader(lines, delimiter="\t")
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(url, 1, "empty file: expected the header 'id<TAB>text<TAB>title'") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(url, 1, f"missing column(s) {', '.join(missing)} in header {header!r}")
    position = {name: header.index(name) for name in REQUIRED_COLUMNS}
    while True:
        start = lines.line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InputError(url, start, f"malformed TSV record ({exc})") from None
        if len(row) != len(header):
            bad.skip(InputError(url, start, f"expected {len(header)} tab-separated fields, found {len(row)}"))
            continue
        yield Passage(
            line=start,
            id=row[position["id"]],
            title=row[position["title"]],
            text=row[position["text"]].strip('"'),  # as DPR's CsvCtxSrc
        )


def _jsonl_rows(url: str, lines: _LineCounter, bad: BadRows) -> Iterator[Passage]:
    for text_line in lines:
        if not text_line.strip():
            continue
        try:
            yield _jsonl_passage(url, lines.line, text_line)
        except InputError as error:
            bad.skip(error)


def _jsonl_passage(url: str, line: int, text_line: str) -> Passage:
    try:
        record = json.loads(text_line)
    except json.JSONDecodeError as exc:
        raise InputError(url, line, f"invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise InputError(url, line, "expected a JSON object {id, title, text}")
    missing = [c for c in REQUIRED_COLUMNS if c not in record]
    if missing:
        raise InputError(url, line, f"missing field(s) {', '.join(missing)}")
    for field in ("title", "text"):
        if not isinstance(record[field], str):
            raise InputError(url, line, f"field '{field}' must be a string")
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        raise InputError(url, line, "field 'id' must be a string or an integer")
    return Passage(line=line, id=str(record["id"]), title=record["title"], text=record["text"])


def _parquet_rows(url: str, raw: BinaryIO, bad: BadRows, batch_rows: int = 8192) -> Iterator[Passage]:
    try:
        parquet = pq.ParquetFile(raw)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(url, None, f"not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(url, None, f"missing column(s) {', '.join(missing)} (columns: {', '.join(names)})")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(REQUIRED_COLUMNS), use_threads=False):
            ids = pc.cast(batch.column("id"), pa.string()).to_pylist()
            texts = batch.column("text").to_pylist()
            titles = batch.column("title").to_pylist()
            for offset, (pid, text, title) in enumerate(zip(ids, texts, titles)):
                if not isinstance(text, str) or not isinstance(title, (str, type(None))):
                    bad.skip(InputError(url, row + offset + 1, "columns 'text' and 'title' must be strings"))
                    continue
                yield Passage(line=row + offset + 1, id=pid or "", title=title or "", text=text)
            row += batch.num_rows
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as exc:
        raise InputError(url, row + 1, f"unreadable Parquet data ({exc})") from None


def _validated(url: str, rows: Iterable[Passage], max_text_chars: int, bad: BadRows) -> Iterator[Passage]:
    for passage in rows:
        problem = None
        if not passage.id.strip():
            problem = "empty id"
        elif not passage.text.strip():
            problem = f"empty text for id {passage.id!r}"
        elif len(passage.text) > max_text_chars:
            problem = (
                f"text of id {passage.id!r} has {len(passage.text)} characters "
                f"(ingest.max_text_chars is {max_text_chars})"
            )
        if problem:
            bad.skip(InputError(url, passage.line, problem))
            continue
        yield passage
