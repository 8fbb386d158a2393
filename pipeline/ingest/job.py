"""Ingest stage: passage files → `passages/<snapshot>/part-FFFFF-SSSSS.parquet` + `_manifest.json`.

Each input file is read as a stream and cut into shards of `ingest.shard_rows` rows; shard names depend only on
(file index, shard index), so a retried task overwrites its own shards. Many files are read in parallel Ray tasks.
Ids must be unique across the whole corpus: each task returns 8-byte id hashes (about 16 bytes a row in the
driver, not the rows), checked at the end; the manifest is written only when every file is good.
"""

from __future__ import annotations

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
from pipeline.errors import InputError, PipelineError
from pipeline.ingest.corpus import BadRows, InputFile, content_hash, list_input_files, read_passages
from pipeline.primitives import IngestSummary
from pipeline.store.keys import content_keys, id_hash
from pipeline.store.layout import PASSAGES, point_latest, snapshot_dir
from pipeline.store.manifests import FileEntry, PassageManifest
from pipeline.store.shards import CONTENT_HASH, PASSAGE_SCHEMA
from pipeline.store.snapshots import (
    TOMBSTONES_NAME,
    Link,
    npy_bytes,
    passage_chain,
    read_shard_keys,
    removed_later,
)
from pipeline.store.storage import Storage, parquet_bytes, read_parquet_bytes

log = logging.getLogger(__name__)


def shard_name(file_index: int, shard_index: int) -> str:
    return f"part-{file_index:05d}-{shard_index:05d}.parquet"


@dataclass(frozen=True)
class BaseKeys:
    """The live rows of the base snapshot as 64-bit keys, sorted by id key: 16 bytes a row, shipped to the tasks."""

    ids: np.ndarray  # uint64, sorted
    contents: np.ndarray  # uint64, the first 8 bytes of each row's content hash

    def diff(self, ids: np.ndarray, contents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found in the base, found with the same content) per row (pure)."""
        if not len(self.ids):
            return np.zeros(len(ids), bool), np.zeros(len(ids), bool)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        found = self.ids[at] == ids
        return found, found & (self.contents[at] == contents)


@dataclass
class FileResult:
    """What one file's task hands back to the driver: its shards and the ids it saw (hashed)."""

    file_index: int
    shards: list[FileEntry]
    id_hashes: np.ndarray  # uint64, one per row in file order
    lines: np.ndarray  # int64, the line (or row) each row came from
    bad_rows: list[dict[str, Any]]  # skipped under ingest.max_bad_rows: file, line, problem
    written: np.ndarray  # bool per row: stored in a shard (every row of a full snapshot; new and changed of a delta)
    changed: np.ndarray  # uint64 keys of rows in the base with another content

    @property
    def rows(self) -> int:
        return len(self.id_hashes)


def ingest_file(
    file_index: int,
    source: InputFile,
    storage_root: str,
    storage_options: dict[str, Any],
    config: IngestConfig,
    base: BaseKeys | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> FileResult:
    """Read one passage file and write its shards under the snapshot (no manifest: the driver writes it). With a
    base, only rows whose id is new or whose content changed are written."""
    storage = Storage(storage_root, storage_options)
    directory = snapshot_dir(config.snapshot)
    hashes, lines, shards, written, changed = array("Q"), array("q"), [], [], []
    batch: dict[str, list[str]] = {name: [] for name in PASSAGE_SCHEMA.names}
    pending: list[pa.Table] = []

    def write(table: pa.Table) -> None:
        name = shard_name(file_index, len(shards))
        data = parquet_bytes(table)
        shards.append(
            FileEntry(
                name=name,
                bytes=len(data),
                sha256=storage.write_bytes(f"{directory}/{name}", data),
                rows=table.num_rows,
                source=source.url,
            )
        )

    def flush(final: bool = False) -> None:
        rows = len(batch["id"])
        if rows:
            table = pa.table(batch, schema=PASSAGE_SCHEMA)
            keep = np.ones(rows, bool)
            if base is not None:
                keys = np.frombuffer(hashes, dtype=np.uint64)[-rows:]
                contents = content_keys(batch["content_hash"])
                found, same = base.diff(keys, contents)
                keep = ~same
                changed.append(keys[found & ~same])
                table = table.filter(pa.array(keep))
            written.append(keep)
            pending.append(table)
            for column in batch.values():
                column.clear()
            if on_rows:
                on_rows(rows)
        stored = pa.concat_tables(pending) if pending else None
        pending.clear()
        while stored is not None and (stored.num_rows >= config.shard_rows or (final and stored.num_rows)):
            write(stored.slice(0, config.shard_rows))
            stored = stored.slice(config.shard_rows)
        if stored is not None and stored.num_rows:
            pending.append(stored)

    bad = BadRows(config.max_bad_rows)
    for passage in read_passages(source.url, storage_options, config.format, config.max_text_chars, bad):
        batch["id"].append(passage.id)
        batch["title"].append(passage.title)
        batch["text"].append(passage.text)
        batch["content_hash"].append(content_hash(passage.title, passage.text))
        hashes.append(id_hash(passage.id))
        lines.append(passage.line)
        if len(batch["id"]) >= config.shard_rows:
            flush()
    flush(final=True)
    return FileResult(
        file_index,
        shards,
        np.frombuffer(hashes, dtype=np.uint64),
        np.frombuffer(lines, dtype=np.int64),
        bad.rows,
        np.concatenate(written) if written else np.zeros(0, bool),
        np.concatenate(changed) if changed else np.empty(0, np.uint64),
    )


def _ingest_sequential(files: list[InputFile], config: PipelineConfig, base: BaseKeys | None) -> list[FileResult]:
    with tqdm(desc="ingest", unit=" rows", unit_scale=True, mininterval=2) as bar:
        return [
            ingest_file(i, f, config.storage.root, config.storage.options, config.ingest, base, on_rows=bar.update)
            for i, f in enumerate(files)
        ]


def _ingest_parallel(files: list[InputFile], config: PipelineConfig, base: BaseKeys | None) -> list[FileResult]:
    import ray

    from pipeline.runtime.raycluster import connect, task_error

    connect()
    task = ray.remote(num_cpus=1, max_retries=3)(ingest_file)
    shared = ray.put(base)  # once in the object store, not once per task
    pending = [
        task.remote(i, f, config.storage.root, config.storage.options, config.ingest, shared)
        for i, f in enumerate(files)
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
                raise task_error(exc) from None
            results.append(result)
            bar.update(1)
            bar.set_postfix(rows=sum(r.rows for r in results))
    return sorted(results, key=lambda r: r.file_index)


def _shard_ids(storage: Storage, directory: str, name: str) -> list[str]:
    return read_parquet_bytes(storage.read_bytes(f"{directory}/{name}"), ["id"]).column("id").to_pylist()


def check_unique_ids(
    results: list[FileResult], files: list[InputFile], storage: Storage, directory: str, shard_rows: int
) -> None:
    """Raise InputError for the first id key seen twice, naming both places: the same id, or (about once in 10^5
    corpora of 21M) two ids whose 64-bit keys collide, which tombstones could not tell apart."""
    hashes = np.concatenate([r.id_hashes for r in results]) if results else np.zeros(0, np.uint64)
    order = np.argsort(hashes, kind="stable")
    repeats = np.nonzero(hashes[order][1:] == hashes[order][:-1])[0]
    if not len(repeats):
        return
    starts = np.cumsum([0] + [r.rows for r in results])

    def locate(position: int) -> tuple[FileResult, int, str | None]:
        result = results[int(np.searchsorted(starts, position, side="right")) - 1]
        row = position - int(starts[result.file_index])
        if not result.written[row]:  # an unchanged row of a delta: not stored, its id is not at hand
            return result, row, None
        stored = int(result.written[:row].sum())
        passage_id = _shard_ids(storage, directory, result.shards[stored // shard_rows].name)[stored % shard_rows]
        return result, row, passage_id

    index = repeats[0]
    first, second = sorted((int(order[index]), int(order[index + 1])))
    (r1, row1, id1), (r2, row2, id2) = locate(first), locate(second)
    where = f"{files[r1.file_index].url}, line {int(r1.lines[row1])}"
    if id1 is not None and id2 is not None and id1 != id2:
        raise InputError(
            files[r2.file_index].url,
            int(r2.lines[row2]),
            f"id {id2!r} has the same 64-bit key as id {id1!r} ({where}): rename one of them",
        )
    shown = f" {id2!r}" if id2 is not None else f" {id1!r}" if id1 is not None else ""
    raise InputError(files[r2.file_index].url, int(r2.lines[row2]), f"duplicate id{shown} (first seen in {where})")


def base_keys(storage: Storage, base: str) -> tuple[BaseKeys, list[Link]]:
    """The live (id key, content key) pairs of a snapshot, resolved through its chain (column reads only)."""
    from concurrent.futures import ThreadPoolExecutor

    links = passage_chain(storage, base)
    removed = removed_later(links)
    jobs = [(i, link.passages_dir, entry.name) for i, link in enumerate(links) for entry in link.passages.files]
    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(lambda job: read_shard_keys(storage, job[1], job[2]), jobs))
    ids, contents = [], []
    for (i, _, _), (shard_ids, shard_contents) in zip(jobs, read):
        live = ~np.isin(shard_ids, removed[i]) if len(removed[i]) else slice(None)
        ids.append(shard_ids[live])
        contents.append(shard_contents[live])
    ids = np.concatenate(ids) if ids else np.empty(0, np.uint64)
    contents = np.concatenate(contents) if contents else np.empty(0, np.uint64)
    order = np.argsort(ids, kind="stable")
    return BaseKeys(ids[order], contents[order]), links


def run_ingest(config: PipelineConfig) -> IngestSummary:
    """Ingest `ingest.input` into the snapshot (a delta on `ingest.base` when set); an identical earlier run of the
    same snapshot is reused."""
    if not config.ingest.input:
        raise PipelineError("ingest.input is not set: give the passage file(s) to read")
    storage = Storage(config.storage.root, config.storage.options)
    snapshot, base = config.ingest.snapshot, config.ingest.base
    if base == snapshot:
        raise PipelineError(f"ingest.base {base!r} is the snapshot being written: a delta needs an earlier one")
    directory = snapshot_dir(snapshot)
    files = list_input_files(config.ingest.input, config.storage.options)
    source = {"input": config.ingest.input, "files": [asdict(f) for f in files], "base": base}
    existing = storage.read_manifest(directory, PassageManifest)
    if existing is not None:
        if existing.source != source:
            raise PipelineError(
                f"snapshot {snapshot!r} is already published at {storage.url(directory)} from another source (or "
                "base); snapshots never change: choose a new ingest.snapshot"
            )
        log.info("snapshot %s already ingested from the same source: nothing to do", snapshot)
        return _summary(storage, directory, existing, True)

    keys, links = base_keys(storage, base) if base else (None, [])
    parallel = config.ingest.parallel == "always" or (config.ingest.parallel == "auto" and len(files) > 1)
    log.info(
        "ingesting %d file(s) into %s%s%s",
        len(files),
        storage.url(directory),
        " with Ray" if parallel else "",
        f" as a delta on {base} ({len(keys.ids)} live rows)" if base else "",
    )
    results = _ingest_parallel(files, config, keys) if parallel else _ingest_sequential(files, config, keys)
    if not any(result.rows for result in results):
        raise InputError(config.ingest.input, None, "no passages found")
    check_unique_ids(results, files, storage, directory, config.ingest.shard_rows)
    quarantine = [row for result in results for row in result.bad_rows]
    if len(quarantine) > config.ingest.max_bad_rows:  # each file kept under the limit, together they are not
        raise InputError(
            quarantine[-1]["file"],
            quarantine[-1]["line"],
            f"{quarantine[-1]['problem']} (bad row {len(quarantine)}, over ingest.max_bad_rows="
            f"{config.ingest.max_bad_rows})",
        )
    entries = [entry for result in results for entry in result.shards]
    storage.remove_unlisted(directory, keep={e.name for e in entries})
    live = sum(result.rows for result in results)
    manifest = PassageManifest(
        files=entries,
        snapshot=snapshot,
        source=source,
        content_hash=CONTENT_HASH,
        schema={field.name: str(field.type) for field in PASSAGE_SCHEMA},
        quarantine=quarantine,
        base=base,
        live_rows=live,
    )
    if keys is not None:
        seen = np.concatenate([r.id_hashes for r in results])
        changed = np.concatenate([r.changed for r in results])
        deleted = keys.ids[~np.isin(keys.ids, seen)]
        tombstones = np.union1d(deleted, changed).astype(np.uint64)
        if len(tombstones):
            data = npy_bytes(tombstones)
            manifest.tombstones = FileEntry(
                name=TOMBSTONES_NAME,
                bytes=len(data),
                sha256=storage.write_bytes(posixpath.join(directory, TOMBSTONES_NAME), data),
            )
        written = manifest.rows or 0
        manifest.depth = links[-1].passages.depth + 1
        manifest.diff = {
            "new": written - len(changed),
            "changed": len(changed),
            "deleted": len(deleted),
            "unchanged": live - written,
        }
    storage.write_manifest(directory, manifest)
    point_latest(storage, PASSAGES, snapshot)
    return _summary(storage, directory, manifest, False)


def _summary(storage: Storage, directory: str, manifest: PassageManifest, reused: bool) -> IngestSummary:
    quarantine = manifest.quarantine
    return IngestSummary(
        rows=manifest.live_rows,
        written_rows=manifest.rows or 0,
        shards=len(manifest.files),
        snapshot=manifest.snapshot,
        base=manifest.base,
        **(manifest.diff or {}),
        reused=reused,
        bad_rows=len(quarantine),
        quarantine=quarantine[:100],
        output=storage.url(directory),
    )
