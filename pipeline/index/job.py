"""`jobs.build_index` and `jobs.compact`: plan → build (delta, full, or distributed) → recall gate → compact →
publish, each phase timed. A build is one of three kinds, planned before any work (`plan.plan_build`):
- delta: the published version was built for an earlier snapshot of the same chain with the same settings: one
  new segment on its quantizer. It stands while the version's relative quantization error stays within
  `index.max_drift` of the error measured with the last recall; else the build is a full one.
- full: every live row of the chain into one segment (one per shard group with `index.segment_vectors`), on the
  published quantizer while its recall holds, else on a newly trained one.
- current: the published version already indexes the snapshot: nothing to do.
Then: refuse below `index.min_recall` → compact past the limits → upload what is new → manifest → LATEST."""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import faiss

from pipeline.config import IndexConfig, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.index.build import Built, build_delta, build_full
from pipeline.index.compact import compact
from pipeline.index.distributed import build_distributed, cancelled_on_error, start_lexical
from pipeline.index.plan import GiB, IndexPlan, plan_build, plan_compaction, plan_index
from pipeline.index.publish import (
    compatible_previous,
    find_embeddings,
    index_version,
    publish,
    reused_summary,
    settings_digest,
)
from pipeline.index.quality import drifted
from pipeline.models.tokens import ReaderTokenizer, reader_tokenizer
from pipeline.primitives import BuildMode, BuildSummary
from pipeline.runtime.raycluster import get
from pipeline.runtime.telemetry import PhaseTimer, peak_rss, reset_peak_rss
from pipeline.store.cache import fetch_verified
from pipeline.store.docstore import TOKENS_FILES
from pipeline.store.layout import INDEX_MANIFEST, published_version, read_index_manifest, version_dir
from pipeline.store.lexical import FORMAT as LEXICAL_FORMAT
from pipeline.store.lexical import build_lexical
from pipeline.store.manifests import FileEntry, IndexManifest
from pipeline.store.segments import IVF_FILE, LocalSegment, files_of, footprint, segments_of, split_ids
from pipeline.store.snapshots import Link, LiveEmbeddings, embedding_chain, live_rows
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Planned:
    """What the build of a new version starts from: its chain, the published version it may build on, the kind of
    build, the version's name and the plan."""

    snapshot: str
    links: list[Link]
    previous: tuple[str, IndexManifest] | None
    mode: BuildMode
    start: int  # the first link a delta adds
    question_model: str | None
    version: str
    plan: IndexPlan
    live: LiveEmbeddings
    tokenizer: ReaderTokenizer | None  # the reader's, whose token ids the new segments store

    @property
    def lexical_base(self) -> IndexManifest | None:
        """The BM25 index is a delta when the dense build planned one, even if that falls back to a full build."""
        return self.previous[1] if self.previous and self.mode == "delta" else None


def plan_version(storage: Storage, config: PipelineConfig) -> Planned | BuildSummary:
    """The build to run, sized before any work (refused when it cannot fit `index.max_memory`); or the summary of
    the published version that already holds these inputs."""
    snapshot, fingerprint = find_embeddings(storage, config.index)
    links = embedding_chain(storage, snapshot, fingerprint)
    head = links[-1].embeddings
    previous = compatible_previous(storage, config.index, head)
    mode, start = plan_build(
        [link.snapshot for link in links],
        previous[1].snapshot if previous else None,
        previous is not None
        and previous[1].settings == settings_digest(config.index)
        and config.encode.question_model in (None, previous[1].encoder.get("question_model")),
    )
    compact_already = len(segments_of(previous[1])) <= 1 and not previous[1].tombstones if previous else False
    if mode == "current" and (config.index.compact != "always" or compact_already):
        log.info("index %s already serves snapshot %s: pointing LATEST at it", previous[0], snapshot)
        return reused_summary(storage, *previous)
    if mode == "current":
        mode, start = "delta", len(links)
    # the question encoder paired with these vectors: the config's, else the one the published version records
    question_model = config.encode.question_model or (previous[1].encoder.get("question_model") if previous else None)
    delta = mode == "delta"
    tokenizer = reader_tokenizer(config.serve.reader_model) if config.index.reader_ids else None
    version = index_version(
        snapshot,
        links[start:] if delta else links,
        config.index,
        previous[0] if delta else None,
        question_model,
        tokenizer.fingerprint if tokenizer else None,
    )
    existing = storage.read_manifest(version_dir(version), IndexManifest, name=INDEX_MANIFEST)
    if existing is not None:
        log.info("index %s is already published: pointing LATEST at it", version)
        return reused_summary(storage, version, existing)
    live = LiveEmbeddings(storage, links)
    plan = plan_index(config.index.factory, int(head.dim), live_rows(links), max(live.stored_rows), config.index)
    log.info(
        "plan: %s build, %d live vectors x %d, nlist %s, train on %d, %d held-out queries, ~%.2f GiB peak",
        mode,
        plan.vectors,
        plan.dim,
        plan.nlist,
        plan.train_size,
        plan.queries,
        plan.memory_bytes / GiB,
    )
    if mode == "full" and plan.memory_bytes > config.index.max_memory:
        raise PipelineError(
            f"building {config.index.factory} over {plan.vectors} x {plan.dim} vectors needs about "
            f"{plan.memory_bytes / GiB:.2f} GiB, over index.max_memory "
            f"({config.index.max_memory / GiB:.2f} GiB): raise it or choose a smaller factory"
        )
    return Planned(snapshot, links, previous, mode, start, question_model, version, plan, live, tokenizer)


def _build(
    storage: Storage, planned: Planned, config: IndexConfig, work_dir: str, timer: PhaseTimer
) -> tuple[Built, str | None, BuildMode]:
    """A delta segment while the new rows fit the published quantizer; else everything, on the published quantizer
    while its recall holds (no k-means), else on a newly trained one. Returns the build, the version whose
    quantizer it used (None: trained now) and the mode it ran."""
    links, previous, plan = planned.links, planned.previous, planned.plan
    if planned.mode == "delta":
        version, manifest = previous
        built = build_delta(storage, manifest, links[planned.start :], config, work_dir, timer, planned.tokenizer)
        if not drifted(built.reference_distortion, built.distortion, config.max_drift):
            return built, manifest.trained_from or version, "delta"
        log.info(
            "the version's quantization error %s would be over %s's reference %s by more than index.max_drift "
            "%.2f: a full build",
            built.distortion,
            version,
            built.reference_distortion,
            config.max_drift,
        )
    live = planned.live
    full = build_distributed if config.segment_vectors else build_full
    if previous is not None:
        version, manifest = previous
        path = fetch_verified(storage, [files_of(manifest)[manifest.quantizer]], os.path.join(work_dir, "published"))[
            0
        ][manifest.quantizer]
        built = full(live, config, plan, work_dir, timer, faiss.read_index(path), planned.tokenizer)
        if built.gated_recall >= config.min_recall:
            log.info("reused the quantizer trained for %s (recall@100 %.4f)", version, built.gated_recall)
            return built, manifest.trained_from or version, "full"
        log.info(
            "the quantizer of %s gives recall@100 %.4f on the new vectors, below %.2f: retraining",
            version,
            built.recall[100],
            config.min_recall,
        )
    return full(live, config, plan, work_dir, timer, tokenizer=planned.tokenizer), None, "full"


def _gate(built: Built, config: IndexConfig, version: str) -> None:
    """Nothing below `index.min_recall` is published (refined recall when the version is searched refined)."""
    log.info(
        "recall@10 %.4f, recall@100 %.4f vs exact at nprobe %d", built.recall[10], built.recall[100], config.nprobe
    )
    if built.refined:
        log.info("refine_k %d: recall@10 %.4f, recall@100 %.4f", config.refine_k, *built.refined.values())
    if built.gated_recall < config.min_recall:
        raise PipelineError(
            f"recall@100 {built.gated_recall:.4f} of {config.factory} at nprobe {config.nprobe}"
            f"{f' refined from {config.refine_k}' if built.refined else ''} is below index.min_recall "
            f"{config.min_recall}: version {version} not published"
        )


def _reusable(previous: tuple[str, IndexManifest] | None, tokenizer: ReaderTokenizer | None) -> dict[str, FileEntry]:
    """The published version's files a new version may list again: all but the token ids of another tokenizer
    (the reader tokenizes those segments' passages itself)."""
    if previous is None:
        return {}
    files, recorded = files_of(previous[1]), (previous[1].tokenizer or {}).get("fingerprint")
    if tokenizer is not None and recorded == tokenizer.fingerprint:
        return files
    return {name: entry for name, entry in files.items() if posixpath.basename(name) not in TOKENS_FILES}


def _compacted(
    storage: Storage, built: Built, files: dict[str, FileEntry], config: IndexConfig, work_dir: str, timer: PhaseTimer
) -> Built:
    """The build with its segments merged past `index.max_segments` / `index.max_tombstone_fraction`."""
    dead_seqs = split_ids(built.dead)[0]
    merge = plan_compaction(
        [s.rows for s in built.segments], [int((dead_seqs == s.seq).sum()) for s in built.segments], config
    )
    return compact(storage, built, merge, files, work_dir, timer) if merge else built


def _lineage(
    storage: Storage,
    planned: Planned,
    built: Built,
    files: dict[str, FileEntry],
    config: IndexConfig,
    timer: PhaseTimer,
    trained_from: str | None,
    mode: BuildMode,
) -> dict[str, Any]:
    """The manifest's fields beside its files: where the version comes from and what it measured."""
    head = planned.links[-1]
    ivf_bytes = sum(
        os.path.getsize(s.paths[IVF_FILE]) if isinstance(s, LocalSegment) else files[s.file(IVF_FILE)].bytes
        for s in built.segments
    )
    vectors = built.stored - len(built.dead)
    question = {"question_model": planned.question_model} if planned.question_model else {}
    tokenizer = planned.tokenizer
    return {
        "lexical_format": LEXICAL_FORMAT,
        "tokenizer": {"model": tokenizer.model, "fingerprint": tokenizer.fingerprint} if tokenizer else None,
        "snapshot": planned.snapshot,
        "embeddings": storage.url(head.embeddings_dir),
        "fingerprint": head.embeddings.fingerprint,
        "encoder": {**head.embeddings.encoder, **question},
        "dim": planned.plan.dim,
        "factory": config.factory,
        "metric": "inner_product",
        "nprobe": config.nprobe,
        "settings": settings_digest(config),
        "train_size": planned.plan.train_size,
        "vectors": vectors,
        "queries": planned.plan.queries,
        "recall_at_10": built.recall[10],
        "recall_at_100": built.recall[100],
        "refine_k": config.refine_k if built.refined else 0,
        "refined_recall_at_10": built.refined.get(10),
        "refined_recall_at_100": built.refined.get(100),
        "reference_distortion": built.reference_distortion,
        "distortion": built.distortion,
        "bytes_per_vector": round(ivf_bytes / max(1, vectors), 2),
        "passages_manifest": head.passages.created_at,
        "seconds": dict(timer.seconds),
        "trained_from": trained_from,
        "retrained": trained_from is None,
        "built_on": planned.previous[0] if mode == "delta" else None,
        "mode": mode,
    }


def run_build_index(config: PipelineConfig) -> BuildSummary:
    reset_peak_rss()  # the summary's driver_peak_rss: the build's own, not the imports'
    storage = Storage(config.storage.root, config.storage.options)
    planned = plan_version(storage, config)
    if isinstance(planned, BuildSummary):
        return planned
    timer, base = PhaseTimer(log), planned.lexical_base
    lexical_task = start_lexical(storage, planned.links, planned.start if base else None, base, config.index)
    with tempfile.TemporaryDirectory(prefix="build-index-") as work_dir, cancelled_on_error(lexical_task):
        built, trained_from, mode = _build(storage, planned, config.index, work_dir, timer)
        _gate(built, config.index, planned.version)
        files = {**_reusable(planned.previous, planned.tokenizer), **built.uploaded}
        built = _compacted(storage, built, files, config.index, work_dir, timer)
        lexical = None
        if config.index.lexical:
            with timer("lexical"):  # a distributed build's: the wait for its task, after the dense add
                start = planned.start if base else None
                lexical = (
                    get([lexical_task])[0]
                    if lexical_task is not None
                    else build_lexical(storage, planned.links, start, base, work_dir)
                )
        with timer("publish"):
            lineage = _lineage(storage, planned, built, files, config.index, timer, trained_from, mode)
            manifest, written = publish(storage, planned.version, built, files, lexical, lineage)
    return BuildSummary(
        **{key: lineage[key] for key in ("vectors", "mode", "bytes_per_vector", "retrained", "trained_from")},
        version=planned.version,
        output=storage.url("indexes", planned.version),
        segments=len(built.segments),
        tombstones=len(built.dead),
        added=built.new_rows,
        recall_at_10=round(built.recall[10], 4),
        recall_at_100=round(built.recall[100], 4),
        **{f"refined_recall_at_{r}": round(value, 4) for r, value in built.refined.items()},
        distortion=round(built.distortion, 5),
        bytes_written=written + built.written,
        train_seconds=timer.seconds.get("train", 0.0),
        add_seconds=timer.seconds.get("add", 0.0),
        phase_seconds=timer.seconds,
        reused=manifest is None,
        bytes_per_passage=footprint(manifest) if manifest is not None else None,
        add_nodes=len(built.nodes),
        driver_peak_rss=peak_rss(),
    )


def run_compact(config: PipelineConfig) -> BuildSummary:
    """Merge the published version's segments into one and drop its tombstoned rows: a new version of the same
    passages on the same quantizer (codes copied, nothing re-encoded or retrained)."""
    storage = Storage(config.storage.root, config.storage.options)
    version = published_version(storage)
    manifest = read_index_manifest(storage, version)
    return run_build_index(
        config.model_copy(
            update={
                "index": config.index.model_copy(
                    update={"snapshot": manifest.snapshot, "fingerprint": manifest.fingerprint, "compact": "always"}
                )
            }
        )
    )
