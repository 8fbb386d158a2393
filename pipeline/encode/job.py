"""`jobs.encode`: passage shards → `embeddings/<snapshot>/<fingerprint>/part-*.parquet`, exactly once.

Reader → mapper → writer: CPU tokenizer actors read a passage shard (verified against its manifest) and
tokenize it; an actor pool (one actor pinned to each GPU, or CPU actors that tokenize for themselves) runs the
model and writes the embedding shard under the passage shard's own name, so a retried shard overwrites itself
instead of duplicating. Each actor has two shards in flight, so the next shard's tokenization overlaps the
current forward passes.

Exactly once and resumable: the driver records every finished shard in `_progress.json` (with the sha256 of the
passage shard it came from); a rerun skips those, and `_manifest.json` is written last, listing each shard once.
An actor that dies is restarted by Ray; its shards go to healthy actors, up to `encode.max_attempts` tries each.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import asdict
from typing import Any

from tqdm import tqdm

from pipeline.config import PipelineConfig
from pipeline.encode.actors import ActorPool, WriterSettings, read_keys, start_actors, started
from pipeline.encode.plan import Carry, plan_carry_over, plan_shards
from pipeline.encode.scheduler import ShardScheduler
from pipeline.errors import InputError, PipelineError
from pipeline.models.settings import EncoderSettings
from pipeline.primitives import EncodeSummary
from pipeline.runtime.raycluster import connect, get
from pipeline.store.layout import embeddings_dir, latest_snapshot, published_index
from pipeline.store.manifests import EmbeddingManifest, FileEntry
from pipeline.store.snapshots import Link, embedding_chain, passage_chain
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)


PROGRESS_NAME = "_progress.json"


def _load_progress(storage: Storage, output: str) -> dict[str, FileEntry]:
    """Shards finished by an earlier attempt whose objects are still there with the recorded size."""
    try:
        recorded = [FileEntry.model_validate(e) for e in storage.read_json(posixpath.join(output, PROGRESS_NAME))]
    except FileNotFoundError:
        return {}
    present = set(storage.list_names(output))
    return {e.name: e for e in recorded if e.name in present}


def run_encode(config: PipelineConfig) -> EncodeSummary:
    """Encode a passage snapshot (default: the latest) into embedding shards; resumes an interrupted run. A delta
    snapshot's own rows are encoded, and any snapshot of its chain that this encoder has not encoded yet."""
    storage = Storage(config.storage.root, config.storage.options)
    snapshot = config.encode.snapshot or latest_snapshot(storage)
    links = passage_chain(storage, snapshot)
    enc = config.encode
    settings = EncoderSettings(
        model=enc.model,
        pooling=enc.pooling,
        max_length=enc.max_length,
        normalize=enc.normalize,
        dtype=enc.dtype,
        cast_weights=enc.cast_weights,
    )
    writer = WriterSettings(
        config.storage.root,
        config.storage.options,
        enc.embedding_dtype,
        enc.batch_tokens,
        enc.max_batch_size,
        enc.cpu_threads,
        enc.max_shard_bytes,
        enc.compile,
    )
    connect()
    pool = start_actors(config, settings, writer)
    try:
        described = started(pool, config.encode.start_timeout_s)
        fingerprints = {d["fingerprint"] for d in described}
        if len(fingerprints) != 1:
            raise PipelineError(f"encoder actors disagree on the model fingerprint: {sorted(fingerprints)}")
        done = [_encode_snapshot(pool, storage, config, settings, described[0], link) for link in links]
    finally:
        pool.kill()
    head, encoded = done[-1], sum(d["rows"] for d in done)
    live = links[-1].passages.live_rows
    diff = links[-1].passages.diff or head.pop("diff")
    head.pop("diff", None)
    encoded_snapshots = [link.snapshot for link, d in zip(links, done) if d["encoded_shards"]]
    return EncodeSummary(
        **{**head, **diff, "rows": encoded, "reused": max(0, live - encoded), "snapshots_encoded": encoded_snapshots}
    )


def _encode_snapshot(
    pool: ActorPool,
    storage: Storage,
    config: PipelineConfig,
    settings: EncoderSettings,
    described: dict[str, Any],
    link: Link,
) -> dict[str, Any]:
    """One snapshot of the chain: its own shards (a delta's new and changed rows), exactly once."""
    fingerprint, dim, device = described["fingerprint"], described["dim"], described["device"]
    output = embeddings_dir(link.snapshot, fingerprint)
    passage_manifest = link.passages
    published = storage.read_manifest(output, EmbeddingManifest)
    done = {e.name: e for e in published.files} if published else _load_progress(storage, output)
    todo, reused = plan_shards(passage_manifest.files, done)
    if todo:
        log.info(
            "encoding snapshot %s with %s (dim %d, %s) into %s",
            link.snapshot,
            fingerprint,
            dim,
            device,
            storage.url(output),
        )
    previous = _previous_embeddings(storage, config, link, fingerprint) if todo else None
    diff, carries = _plan_carry(storage, config, link.passages_dir, passage_manifest.files, todo, previous)
    completed = list(reused)
    started = time.perf_counter()
    with tqdm(
        total=passage_manifest.rows or 0,
        initial=sum(e.rows or 0 for e in reused),
        desc="encode",
        unit=" passages",
        unit_scale=True,
        mininterval=2,
    ) as bar:

        def on_done(entry: FileEntry) -> None:
            completed.append(entry)
            storage.write_json(posixpath.join(output, PROGRESS_NAME), [e.model_dump() for e in completed])
            bar.update(entry.rows)

        scheduler = ShardScheduler(pool, config.encode, output, link.passages_dir, carries)
        finished = scheduler.run(todo, on_done) if todo else []
    seconds = time.perf_counter() - started
    order = {e.name: i for i, e in enumerate(passage_manifest.files)}
    completed.sort(key=lambda e: order[e.name])
    if published is None or finished:
        storage.remove_unlisted(output, keep={e.name for e in completed})
        enc = config.encode
        storage.write_manifest(
            output,
            EmbeddingManifest(
                files=completed,
                snapshot=link.snapshot,
                fingerprint=fingerprint,
                dim=dim,
                encoder={**asdict(settings), "compute_dtype": described["dtype"]},
                base=link.base,
                embedding_dtype=enc.embedding_dtype,
                passages_manifest=passage_manifest.created_at,
                carried_from=previous[-1][0] if previous else None,
                quarantine=scheduler.quarantine,
            ),
        )
    encoded = sum((e.rows if e.encoded is None else e.encoded) or 0 for e in finished)
    previous_snapshot = link.base or (previous[-1][0].split("/")[1] if previous else None)
    return {
        "rows": encoded,
        "diff": diff,
        "shards": len(completed),
        "encoded_shards": len(finished),
        "retried_shards": scheduler.retried,
        "quarantine": scheduler.quarantine,
        "dim": dim,
        "device": device,
        "passages_per_s": round(encoded / seconds, 1) if encoded else 0.0,
        "fingerprint": fingerprint,
        "previous_snapshot": previous_snapshot,
        "output": storage.url(output),
    }


def _previous_embeddings(
    storage: Storage, config: PipelineConfig, link: Link, fingerprint: str
) -> list[tuple[str, EmbeddingManifest]] | None:
    """For a full snapshot: the earlier snapshot's embeddings by the same model (every link of its chain), whose
    unchanged vectors are copied rather than encoded again: `encode.previous_snapshot`, else the snapshot the
    published index was built from. A different fingerprint (another model or settings) carries nothing, and a
    delta snapshot carries nothing (its unchanged rows stay in its base)."""
    if not config.encode.carry_over or link.base is not None:
        return None
    published = published_index(storage)  # the snapshot the serving index was built from
    previous = config.encode.previous_snapshot or (published.snapshot if published else None)
    if not previous or previous == link.snapshot:
        return None
    try:
        chain = embedding_chain(storage, previous, fingerprint)
    except PipelineError as exc:
        log.info("nothing to carry over from snapshot %s (%s): every passage is encoded", previous, exc)
        return None
    return [(prior.embeddings_dir, prior.embeddings) for prior in chain]


def _plan_carry(
    storage: Storage,
    config: PipelineConfig,
    passages: str,
    files: list[FileEntry],
    todo: list[FileEntry],
    previous: list[tuple[str, EmbeddingManifest]] | None,
) -> tuple[dict[str, int], dict[str, Carry]]:
    """Diff counts against the previous snapshot, and for each shard still to do, where its unchanged vectors are.
    Every row of the previous chain counts, dead ones too: a vector depends only on its passage's content."""
    if previous is None:
        return {}, {}
    root, options = config.storage.root, config.storage.options
    sources = [(directory, entry) for directory, manifest in previous for entry in manifest.files]
    new_keys = get([read_keys.remote(root, options, passages, e.name) for e in files])
    try:
        old_keys = get([read_keys.remote(root, options, directory, e.name) for directory, e in sources])
    except InputError as exc:  # e.g. shards written before embeddings carried their content hash
        log.warning("cannot diff against %s (%s): every passage is encoded", storage.url(previous[-1][0]), exc)
        return {}, {}
    plan = plan_carry_over(new_keys, old_keys)
    log.info(
        "against %s: %d unchanged, %d new, %d changed, %d deleted passages",
        storage.url(previous[-1][0]),
        plan.unchanged,
        plan.new,
        plan.changed,
        plan.deleted,
    )
    position = {e.name: i for i, e in enumerate(files)}
    carries = {
        e.name: Carry([sources[i] for i in plan.sources[position[e.name]]])
        for e in todo
        if plan.sources[position[e.name]]
    }
    return {"new": plan.new, "changed": plan.changed, "deleted": plan.deleted, "unchanged": plan.unchanged}, carries
