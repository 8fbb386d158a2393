"""Ingest stage: passage files → `passages/<snapshot>/part-FFFFF-SSSSS.parquet` + `_manifest.json`.

Each input file is read as a stream and cut into shards of `ingest.shard_rows` rows; shard names depend only on
(file index, shard index), so a retried task overwrites its own shards. Many files are read in parallel Ray tasks.
Ids must be unique across the whole corpus: each task returns 8-byte id hashes (about 16 bytes a row in the
driver, not the rows), checked at the end; the manifest is written only when every file is good.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.config import IngestConfig, PipelineConfig
from pipeline.corpus import BadRows, InputFile, content_hash, list_input_files, read_passages
from pipeline.errors import InputError, PipelineError
from pipeline.storage import FileEntry, Manifest, Storage, parquet_bytes, read_parquet_bytes

log = logging.getLogger(__name__)

PASSAGE_SCHEMA = pa.schema(
    [("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("content_hash", pa.string())]
)
CONTENT_HASH = "blake2b-128(utf8(title) 0x1f utf8(text))"


def snapshot_dir(snapshot: str) -> str:
    return posixpath.join("passages", snapshot)


def shard_name(file_index: int, shard_index: int) -> str:
    return f"part-{file_index:05d}-{shard_index:05d}.parquet"


def id_hash(passage_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class FileResult:
    """What one file's task hands back to the driver: its shards and the ids it saw (hashed)."""

    file_index: int
    shards: list[FileEntry]
    id_hashes: np.ndarray  # uint64, one per row in file order
    lines: np.ndarray  # int64, the line (or row) each row came from
    bad_rows: list[dict[str, Any]]  # skipped under ingest.max_bad_rows: file, line, problem

    @property
    def rows(self) -> int:
        return len(self.id_hashes)


def ingest_file(
    file_index: int,
    source: InputFile,
    storage_root: str,
    storage_options: dict[str, Any],
    config: IngestConfig,
    on_rows: Callable[[int], None] | None = None,
) -> FileResult:
    """Read one passage file and write its shards under the snapshot (no manifest: the driver writes it)."""
    storage = Storage(storage_root, storage_options)
    directory = snapshot_dir(config.snapshot)
    hashes, lines, shards = array("Q"), array("q"), []
    buffer: dict[str, list[str]] = {name: [] for name in PASSAGE_SCHEMA.names}

    def flush() -> None:
        rows = len(buffer["id"])
        if not rows:
            return
        name = shard_name(file_index, len(shards))
        data = parquet_bytes(pa.table(buffer, schema=PASSAGE_SCHEMA))
        shards.append(FileEntry(name=name, bytes=len(data), sha256=storage.write_bytes(f"{directory}/{name}", data),
                                rows=rows, source=source.url))
        for column in buffer.values():
            column.clear()
        if on_rows:
            on_rows(rows)

    bad = BadRows(config.max_bad_rows)
    for passage in read_passages(source.url, storage_options, config.format, config.max_text_chars, bad):
        buffer["id"].append(passage.id)
        buffer["title"].append(passage.title)
        buffer["text"].append(passage.text)
        buffer["content_hash"].append(content_hash(passage.title, passage.text))
        hashes.append(id_hash(passage.id))
        lines.append(passage.line)
        if len(buffer["id"]) >= config.shard_rows:
            flush()
    flush()
    return FileResult(file_index, shards, np.frombuffer(hashes, dtype=np.uint64), np.frombuffer(lines, dtype=np.int64),
                      bad.rows)


def _ingest_sequential(files: list[InputFile], config: PipelineConfig) -> list[FileResult]:
    with tqdm(desc="ingest", unit=" rows", unit_scale=True, mininterval=2) as bar:
        return [
            ingest_file(i, f, config.storage.root, config.storage.options, config.ingest, on_rows=bar.update)
            for i, f in enumerate(files)
        ]


def _ingest_parallel(files: list[InputFile], config: PipelineConfig) -> list[FileResult]:
    import ray

    from pipeline.raycluster import connect

    connect()
    task = ray.remote(num_cpus=1, max_retries=3)(ingest_file)
    pending = [
        task.remote(i, f, config.storage.root, config.storage.options, config.ingest) for i, f in enumerate(files)
    ]
    results: list[FileResult] = []
    with tqdm(total=len(files), desc="ingest", unit=" files", mininterval=2) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                for ref in pending:
                    ray.cancel(ref)
                cause = exc.cause if isinstance(exc.cause, Exception) else exc
                raise cause from None
            results.append(result)
            bar.update(1)
            bar.set_postfix(rows=sum(r.rows for r in results))
    return sorted(results, key=lambda r: r.file_index)


def _shard_ids(storage: Storage, directory: str, name: str) -> list[str]:
    return read_parquet_bytes(storage.read_bytes(f"{directory}/{name}"), ["id"]).column("id").to_pylist()


def check_unique_ids(results: list[FileResult], files: list[InputFile], storage: Storage, directory: str,
                     shard_rows: int) -> None:
    """Raise InputError for the first id seen twice, naming both places; hash collisions are verified away."""
    hashes = np.concatenate([r.id_hashes for r in results]) if results else np.zeros(0, np.uint64)
    order = np.argsort(hashes, kind="stable")
    repeats = np.nonzero(hashes[order][1:] == hashes[order][:-1])[0]
    if not len(repeats):
        return
    starts = np.cumsum([0] + [r.rows for r in results])

    def locate(position: int) -> tuple[FileResult, int, str]:
        result = results[int(np.searchsorted(starts, position, side="right")) - 1]
        row = position - int(starts[result.file_index])
        passage_id = _shard_ids(storage, directory, result.shards[row // shard_rows].name)[row % shard_rows]
        return result, row, passage_id

    for index in repeats:
        first, second = sorted((int(order[index]), int(order[index + 1])))
        (r1, row1, id1), (r2, row2, id2) = locate(first), locate(second)
        if id1 == id2:
            raise InputError(
                files[r2.file_index].url, int(r2.lines[row2]),
                f"duplicate id {id2!r} (first seen in {files[r1.file_index].url}, line {int(r1.lines[row1])})",
            )


def run_ingest(config: PipelineConfig) -> dict[str, Any]:
    """Ingest `ingest.input` into the snapshot; an identical earlier run of the same snapshot is reused."""
    if not config.ingest.input:
        raise PipelineError("ingest.input is not set: give the passage file(s) to read")
    storage = Storage(config.storage.root, config.storage.options)
    directory = snapshot_dir(config.ingest.snapshot)
    files = list_input_files(config.ingest.input, config.storage.options)
    source = {"input": config.ingest.input, "files": [asdict(f) for f in files]}
    existing = storage.read_manifest(directory)
    if existing is not None:
        if getattr(existing, "source", None) != source:
            raise PipelineError(
                f"snapshot {config.ingest.snapshot!r} is already published at {storage.url(directory)} from "
                "another source; snapshots never change: choose a new ingest.snapshot"
            )
        log.info("snapshot %s already ingested from the same source: nothing to do", config.ingest.snapshot)
        return _summary(storage, directory, existing, True)

    parallel = config.ingest.parallel == "always" or (config.ingest.parallel == "auto" and len(files) > 1)
    log.info("ingesting %d file(s) into %s%s", len(files), storage.url(directory), " with Ray" if parallel else "")
    results = _ingest_parallel(files, config) if parallel else _ingest_sequential(files, config)
    if not any(result.rows for result in results):
        raise InputError(config.ingest.input, None, "no passages found")
    check_unique_ids(results, files, storage, directory, config.ingest.shard_rows)
    quarantine = [row for result in results for row in result.bad_rows]
    if len(quarantine) > config.ingest.max_bad_rows:  # each file kept under the limit, together they are not
        raise InputError(quarantine[-1]["file"], quarantine[-1]["line"],
                         f"{quarantine[-1]['problem']} (bad row {len(quarantine)}, over ingest.max_bad_rows="
                         f"{config.ingest.max_bad_rows})")
    entries = [entry for result in results for entry in result.shards]
    storage.remove_unlisted(directory, keep={e.name for e in entries})
    manifest = storage.write_manifest(
        directory, "passages", entries, snapshot=config.ingest.snapshot, source=source, content_hash=CONTENT_HASH,
        schema={field.name: str(field.type) for field in PASSAGE_SCHEMA}, quarantine=quarantine,
    )
    storage.write_bytes("passages/LATEST", f"{config.ingest.snapshot}\n".encode())
    return _summary(storage, directory, manifest, False)


def _summary(storage: Storage, directory: str, manifest: Manifest, reused: bool) -> dict:
    quarantine = getattr(manifest, "quarantine", None) or []
    return {"rows": manifest.rows or 0, "shards": len(manifest.files), "snapshot": manifest.snapshot,
            "reused": reused, "bad_rows": len(quarantine), "quarantine": quarantine[:100],
            "output": storage.url(directory)}
