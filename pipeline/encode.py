"""Encode stage: passage shards → `embeddings/<snapshot>/<fingerprint>/part-*.parquet`, exactly once.

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
import os
import posixpath
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from pipeline.config import EncodeConfig, PipelineConfig
from pipeline.errors import InputError, PipelineError
from pipeline.keys import content_keys, keys_of
from pipeline.layout import embeddings_dir, latest_snapshot, published_index
from pipeline.manifests import EmbeddingManifest, FileEntry
from pipeline.raycluster import connect, get, task_error
from pipeline.shards import embedding_matrix, embedding_table, read_passage_shard, read_shard
from pipeline.snapshots import Link, embedding_chain, passage_chain, read_shard_keys
from pipeline.storage import Storage, parquet_bytes
from pipeline.text_encoder import EncoderSettings, PassageTokenizer, TextEncoder, Tokens

log = logging.getLogger(__name__)

PROGRESS_NAME = "_progress.json"
# One CPU core tokenizes 2,100-3,600 psgs_w100 passages/s and a BERT-base encoder on an H100 or H200 takes
# 12,900-14,200/s (benchmarks/results/gpu-2026-11-27.jsonl): 4 to 7 cores keep one GPU fed, by the host.
TOKENIZERS_PER_GPU = 6


def plan_shards(passage_files: list[FileEntry], done: dict[str, FileEntry]) -> tuple[list[FileEntry], list[FileEntry]]:
    """(to encode, reusable): a finished embedding shard is reused only if it came from the same passage bytes."""
    todo, reused = [], []
    for entry in passage_files:
        previous = done.get(entry.name)
        if previous is not None and previous.source_sha256 == entry.sha256:
            reused.append(previous)
        else:
            todo.append(entry)
    return todo, reused


@dataclass(frozen=True)
class ShardKeys:
    """A shard's rows as 64-bit hashes of the id and of the content hash: 16 bytes a row for planning."""

    ids: np.ndarray  # uint64
    contents: np.ndarray  # uint64


def shard_keys(ids: list[str], content_hashes: list[str]) -> ShardKeys:
    return ShardKeys(keys_of(ids), content_keys(content_hashes))


@dataclass
class CarryPlan:
    """Which previous embedding shards hold each new shard's unchanged passages, and the diff in counts."""

    sources: list[list[int]]  # per new shard: indices of the previous shards to carry vectors from
    unchanged: int
    new: int
    changed: int
    deleted: int


def plan_carry_over(new: list[ShardKeys], previous: list[ShardKeys]) -> CarryPlan:
    """Diff two snapshots by id and content hash without reading a vector (pure; the actors verify the real ids
    and hashes when they copy, so a 64-bit hash collision can only cost a re-encode, never a wrong vector)."""
    if not sum(len(k.ids) for k in previous):
        return CarryPlan([[] for _ in new], 0, sum(len(k.ids) for k in new), 0, 0)
    old_ids = np.concatenate([k.ids for k in previous])
    old_contents = np.concatenate([k.contents for k in previous])
    old_shard = np.repeat(np.arange(len(previous)), [len(k.ids) for k in previous])
    order = np.argsort(old_ids, kind="stable")
    sorted_ids = old_ids[order]
    sources, unchanged, added, changed = [], 0, 0, 0
    for keys in new:
        at = np.minimum(np.searchsorted(sorted_ids, keys.ids), len(sorted_ids) - 1)
        found = sorted_ids[at] == keys.ids
        same = found & (old_contents[order[at]] == keys.contents)
        sources.append(sorted(set(old_shard[order[at[same]]].tolist())))
        unchanged += int(same.sum())
        added += int((~found).sum())
        changed += int((found & ~same).sum())
    new_ids = np.concatenate([k.ids for k in new]) if new else np.empty(0, np.uint64)
    deleted = int((~np.isin(old_ids, new_ids)).sum())
    return CarryPlan(sources, unchanged, added, changed, deleted)


@dataclass(frozen=True)
class Carry:
    """Where an encoder actor finds the previous vectors of a shard's unchanged passages: (directory, shard)."""

    sources: list[tuple[str, FileEntry]]


@ray.remote(num_cpus=0.5)
def read_keys(storage_root: str, options: dict[str, Any], directory: str, name: str) -> ShardKeys:
    """Only the id and content_hash columns (column projection: the texts and vectors stay on the store)."""
    return ShardKeys(*read_shard_keys(Storage(storage_root, options), directory, name))


class TokenizerActor:
    """The reader/mapper half, on CPU: verified passage shard → (ids, tokens). Long-lived, so the tokenizer and
    the imports are loaded once, before the first shard is timed. Also used inline by CPU encoder actors."""

    def __init__(
        self, settings: EncoderSettings, storage_root: str, options: dict[str, Any], max_shard_bytes: int | None = None
    ):
        self.storage = Storage(storage_root, options)
        self.max_shard_bytes = max_shard_bytes
        self.tokenize = PassageTokenizer(settings)

    def ready(self) -> bool:
        return True

    def tokenize_shard(self, passages: str, entry: FileEntry) -> tuple[list[str], list[str], Tokens]:
        table = read_passage_shard(self.storage, passages, entry, self.max_shard_bytes)
        tokens = self.tokenize(table.column("title").to_pylist(), table.column("text").to_pylist())
        return table.column("id").to_pylist(), table.column("content_hash").to_pylist(), tokens


@dataclass(frozen=True)
class WriterSettings:
    storage_root: str
    storage_options: dict[str, Any]
    embedding_dtype: str
    batch_tokens: int | None
    max_batch_size: int
    cpu_threads: int | None
    max_shard_bytes: int
    compile: bool = False


class EncoderActor:
    """The model half: one per GPU (or CPU actors), encodes tokenized shards and writes embedding shards."""

    def __init__(self, settings: EncoderSettings, writer: WriterSettings):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(writer.cpu_threads or len(os.sched_getaffinity(0)))
        self.writer = writer
        self.storage = Storage(writer.storage_root, writer.storage_options)
        self.encoder = TextEncoder(
            settings, batch_tokens=writer.batch_tokens, max_batch_size=writer.max_batch_size, compile=writer.compile
        )
        self._fingerprint = self.encoder.fingerprint()
        # Without a GPU to keep busy, tokenizing here beats shipping tokens from other actors on the same cores.
        self.reader = TokenizerActor(settings, writer.storage_root, writer.storage_options, writer.max_shard_bytes)

    def describe(self) -> dict[str, Any]:
        return {
            "fingerprint": self._fingerprint,
            "dim": self.encoder.dim,
            "device": str(self.encoder.device),
            "dtype": str(self.encoder.compute_dtype).removeprefix("torch."),
            "pid": os.getpid(),
        }

    def encode_shard(
        self,
        output: str,
        passages: str,
        entry: FileEntry,
        shard: tuple[list[str], list[str], Tokens] | None,
        carry: Carry | None = None,
    ) -> FileEntry:
        if carry is not None:
            ids, hashes, vectors, encoded = self._carry_and_encode(passages, entry, carry)
        else:
            ids, hashes, tokens = shard if shard is not None else self.reader.tokenize_shard(passages, entry)
            vectors, encoded = self.encoder.encode_tokens(tokens), len(ids)
        data = parquet_bytes(embedding_table(ids, hashes, vectors, self.writer.embedding_dtype))
        digest = self.storage.write_bytes(posixpath.join(output, entry.name), data)
        return FileEntry(
            name=entry.name, bytes=len(data), sha256=digest, rows=len(ids), source_sha256=entry.sha256, encoded=encoded
        )

    def _carry_and_encode(
        self, passages: str, entry: FileEntry, carry: Carry
    ) -> tuple[list[str], list[str], np.ndarray, int]:
        """Copy the vectors of passages whose id and content hash are unchanged; encode only the others."""
        table = read_passage_shard(self.storage, passages, entry, self.writer.max_shard_bytes)
        ids, hashes = table.column("id").to_pylist(), table.column("content_hash").to_pylist()
        found: dict[str, tuple[str, np.ndarray, int]] = {}
        for directory, source in carry.sources:
            previous = read_shard(self.storage, directory, source)
            matrix = embedding_matrix(previous)
            for row, (pid, digest) in enumerate(
                zip(previous.column("id").to_pylist(), previous.column("content_hash").to_pylist())
            ):
                found[pid] = (digest, matrix, row)
        vectors = np.empty((len(ids), self.encoder.dim), dtype=np.float32)
        todo = []
        for row, (pid, digest) in enumerate(zip(ids, hashes)):
            hit = found.get(pid)
            if hit is not None and hit[0] == digest:
                vectors[row] = hit[1][hit[2]]
            else:
                todo.append(row)
        if todo:
            titles, texts = table.column("title").take(todo), table.column("text").take(todo)
            vectors[todo] = self.encoder.encode_tokens(self.reader.tokenize(titles.to_pylist(), texts.to_pylist()))
        return ids, hashes, vectors, len(todo)


@dataclass
class ActorPool:
    encoders: list
    tokenizers: list

    def kill(self) -> None:
        for actor in self.encoders + self.tokenizers:
            ray.kill(actor)


def _start_actors(config: PipelineConfig, settings: EncoderSettings, writer: WriterSettings) -> ActorPool:
    """Encoder actors pinned one per GPU (else CPU actors), and CPU tokenizer actors to keep them fed."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    encoders = config.encode.actors or max(gpus, 1)
    options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    tokenizers = config.encode.tokenizer_actors
    if tokenizers is None:
        tokenizers = max(1, min(TOKENIZERS_PER_GPU * encoders, cpus - encoders)) if gpus else 0
    log.info(
        "starting %d encoder actor(s) on %s and %d tokenizer actor(s)", encoders, "GPU" if gpus else "CPU", tokenizers
    )
    encoder_class = ray.remote(max_restarts=-1, max_task_retries=0, **options)(EncoderActor)
    tokenizer_class = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)(TokenizerActor)
    return ActorPool(
        encoders=[encoder_class.remote(settings, writer) for _ in range(encoders)],
        tokenizers=[
            tokenizer_class.remote(settings, config.storage.root, config.storage.options, writer.max_shard_bytes)
            for _ in range(tokenizers)
        ],
    )


def _load_progress(storage: Storage, output: str) -> dict[str, FileEntry]:
    """Shards finished by an earlier attempt whose objects are still there with the recorded size."""
    try:
        recorded = [FileEntry.model_validate(e) for e in storage.read_json(posixpath.join(output, PROGRESS_NAME))]
    except FileNotFoundError:
        return {}
    present = set(storage.list_names(output))
    return {e.name: e for e in recorded if e.name in present}


class _ShardScheduler:
    """Feeds shards to encoder actors, two in flight each (tokenized round-robin by the tokenizer actors).

    When an actor dies, its in-flight shards go back to the queue (one attempt each) for any healthy actor, and
    the dead one gets no work until a probe finds it restarted by Ray: shards are not burnt on an actor that is
    still starting up.

    Why not Ray Data's actor pool: docs/decisions/0002-encode-scheduler-not-ray-data.md.
    """

    IN_FLIGHT = 2
    PROBE_INTERVAL_S = 0.5
    RECOVERY_TIMEOUT_S = 600.0

    def __init__(self, pool: ActorPool, config: EncodeConfig, output: str, passages: str, carries: dict[str, Carry]):
        self.actors, self.tokenizers = pool.encoders, pool.tokenizers
        self.max_attempts, self.max_bad_shards = config.max_attempts, config.max_bad_shards
        self.output, self.passages, self.carries = output, passages, carries
        self.quarantine: list[dict[str, str]] = []  # bad passage shards skipped under encode.max_bad_shards
        self.inflight: dict[Any, tuple[int, FileEntry]] = {}
        self.load = [0] * len(self.actors)
        self.probes: dict[Any, int] = {}
        self.recovering: dict[int, float] = {}  # actor → when it died
        self.attempts: dict[str, int] = {}
        self.submitted = 0
        self.retried = 0

    def _fill(self, queue: deque) -> None:
        for actor in range(len(self.actors)):
            while queue and actor not in self.recovering and self.load[actor] < self.IN_FLIGHT:
                entry = queue.popleft()
                carry, shard = self.carries.get(entry.name), None
                if self.tokenizers and carry is None:  # a carried shard tokenizes only its few changed rows
                    shard = self.tokenizers[self.submitted % len(self.tokenizers)].tokenize_shard.remote(
                        self.passages, entry
                    )
                self.submitted += 1
                ref = self.actors[actor].encode_shard.remote(self.output, self.passages, entry, shard, carry)
                self.inflight[ref] = (actor, entry)
                self.load[actor] += 1

    def _probe(self, actor: int) -> None:
        if time.monotonic() - self.recovering[actor] > self.RECOVERY_TIMEOUT_S:
            self._cancel()
            raise PipelineError(f"encoder actor {actor} did not come back within {self.RECOVERY_TIMEOUT_S:.0f}s")
        self.probes[self.actors[actor].describe.remote()] = actor

    def run(self, todo: list[FileEntry], on_done) -> list[FileEntry]:
        queue, finished = deque(todo), []
        self._fill(queue)
        while self.inflight or (queue and self.probes):
            [ref], _ = ray.wait(list(self.inflight) + list(self.probes), num_returns=1)
            if ref in self.probes:
                actor = self.probes.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    time.sleep(self.PROBE_INTERVAL_S)  # still restarting
                    self._probe(actor)
                    continue
                log.info("encoder actor %d is back", actor)
                del self.recovering[actor]
                self._fill(queue)
                continue
            actor, entry = self.inflight.pop(ref)
            self.load[actor] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self.attempts[entry.name] = self.attempts.get(entry.name, 0) + 1
                if self.attempts[entry.name] >= self.max_attempts:
                    self._cancel()
                    raise PipelineError(
                        f"shard {entry.name}: encoder actor died {self.attempts[entry.name]} times "
                        f"({exc.__class__.__name__})"
                    ) from None
                log.warning("encoder actor %d died with shard %s in flight; requeued", actor, entry.name)
                self.retried += 1
                queue.appendleft(entry)
                if actor not in self.recovering:
                    self.recovering[actor] = time.monotonic()
                    self._probe(actor)
            except ray.exceptions.RayTaskError as exc:
                cause = task_error(exc)
                if isinstance(cause, InputError) and len(self.quarantine) < self.max_bad_shards:
                    log.warning("quarantined: %s", cause)
                    self.quarantine.append({"shard": entry.name, "problem": str(cause)})
                else:
                    self._cancel()
                    raise cause from None
            else:
                finished.append(result)
                on_done(result)
            self._fill(queue)
        return finished

    def _cancel(self) -> None:
        for ref in self.inflight:
            ray.cancel(ref, force=False)
        self.inflight.clear()
        self.probes.clear()


def run_encode(config: PipelineConfig) -> dict[str, Any]:
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
    pool = _start_actors(config, settings, writer)
    try:
        described = ray.get([actor.describe.remote() for actor in pool.encoders])
        ray.get([actor.ready.remote() for actor in pool.tokenizers])
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
    return {
        **head,
        "rows": encoded,
        "reused": max(0, live - encoded),
        **diff,
        "snapshots_encoded": [link.snapshot for link, d in zip(links, done) if d["encoded_shards"]],
    }


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

        scheduler = _ShardScheduler(pool, config.encode, output, link.passages_dir, carries)
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
