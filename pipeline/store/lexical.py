"""BM25 over the same passages as the dense index, and the fusion of the two rankings (hybrid retrieval).

The lexical index is tantivy's (Lucene's design in Rust: BM25 with k1 1.2, b 0.75, English stemming, immutable
segments with delete files, its own merge policy), chosen over an in-memory BM25 such as bm25s because its
segments follow this project's nightly model: a night opens the previous version's index, deletes the passages
the night removes or replaces (by the 64-bit key of their id), adds the new ones as a new segment, and only the
new files are uploaded; corpus statistics (IDF, average length) stay corpus-wide across segments, which
per-segment BM25 matrices cannot do. It holds no text: each passage is its 64-bit key (indexed, for deletes, and a
fast field, to read per hit) and its BM25 body (title and text, stemmed, frequencies without positions: BM25 needs
none); a hit's text and token ids are read from the version's docstores (`pipeline.store.docstore`), the files the dense
side reads, so a replica holds each passage's text once. Versions built before this (`lexical_format` 1) stored
id, title and text in tantivy and still serve from them.

A question is never parsed: it goes through the text analyzer the body field is indexed with (named by the
index's schema) and becomes a disjunction of term queries, so no text (underscores, URLs, query syntax, any script)
can make a query the index cannot run. Each distinct word of the question counts once, as tantivy's query parser
counted it (`docs/decisions/0005-bm25-queries-built-not-parsed.md`).

A version lists each tantivy file by sha256 (objects `indexes/lexical/<sha>.<kind>`, shared by the versions and
files that have the same bytes); a replica verifies every file before tantivy opens the directory of links to them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import tantivy

from pipeline.errors import PipelineError
from pipeline.primitives import Hit
from pipeline.store.cache import VIEWS, Lease, NodeCache, fetch_verified
from pipeline.store.docstore import Docstore
from pipeline.store.keys import keys_of
from pipeline.store.manifests import FileEntry, IndexManifest
from pipeline.store.published import load_docstore
from pipeline.store.segments import upload_once
from pipeline.store.snapshots import Link, LiveEmbeddings
from pipeline.store.storage import Storage, sha256_file

log = logging.getLogger(__name__)

LOCKS = (".tantivy-meta.lock", ".tantivy-writer.lock")
BODY = "body"
FORMAT = 2  # the IndexManifest's lexical_format this module writes


def schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    # The id's 64-bit key, as int64 (tantivy-py deletes no u64 term past 2**63): deletes, and a hit's passage.
    builder.add_integer_field("key", indexed=True, fast=True)
    builder.add_text_field(BODY, tokenizer_name="en_stem", index_option="freq")  # title and text: BM25's input
    return builder.build()


class LexicalWriter:
    """A tantivy index in `directory`: new, or a copy of a published version's files (of this `FORMAT`) to extend
    (a delta)."""

    def __init__(self, directory: str, base: dict[str, str] | None = None, heap_bytes: int = 128 * 2**20):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        for name, path in (base or {}).items():
            shutil.copyfile(path, os.path.join(directory, name))
        self.index = tantivy.Index.open(directory) if base else tantivy.Index(schema(), path=directory)
        self.writer = self.index.writer(heap_size=heap_bytes, num_threads=1)
        self.added = self.deleted = 0

    def delete(self, keys: np.ndarray) -> None:
        """Passages whose ids have these keys (removed, or replaced by a row added after this)."""
        for key in np.unique(np.asarray(keys, dtype=np.uint64)).view(np.int64).tolist():
            self.writer.delete_documents_by_term("key", key)
        self.deleted += len(keys)

    def add(self, passages: pa.Table) -> None:
        ids, titles, texts = (passages.column(c).to_pylist() for c in ("id", "title", "text"))
        for key, title, text in zip(keys_of(ids).view(np.int64).tolist(), titles, texts):
            doc = tantivy.Document()
            doc.add_integer("key", key)
            doc.add_text(BODY, f"{title} {text}")
            self.writer.add_document(doc)
        self.added += len(ids)

    def close(self) -> dict[str, str]:
        """Commit, let merges finish, drop unreferenced files; the index's files (name → local path)."""
        self.writer.commit()
        self.writer.garbage_collect_files()
        self.writer.wait_merging_threads()
        return {
            name: os.path.join(self.directory, name) for name in sorted(os.listdir(self.directory)) if name not in LOCKS
        }


def object_name(name: str, path: str) -> str:
    """Content-addressed name under `indexes/` of one tantivy file: its sha256 and its kind (extension), not its
    segment's random name, so files of equal bytes (the empty positions file of every segment) are one object."""
    return f"lexical/{sha256_file(path)[:20]}{os.path.splitext(name)[1]}"


def _stemmed(*filters: tantivy.Filter) -> tantivy.TextAnalyzer:
    builder = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(40))
    for extra in (tantivy.Filter.lowercase(), *filters):
        builder = builder.filter(extra)
    return builder.build()


# tantivy's built-in tokenizers by name (its TokenizerManager's defaults), rebuilt from the same parts: what a
# question must go through to meet the terms a body field of that tokenizer holds (tests/unit/test_lexical.py
# checks each against tantivy's own indexing).
ANALYZERS = {
    "default": _stemmed,
    "en_stem": lambda: _stemmed(tantivy.Filter.stemmer("english")),
}


def body_analyzer(directory: str) -> tantivy.TextAnalyzer:
    """The analyzer of the body field of the tantivy index in `directory`, by the tokenizer its schema names."""
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
        fields = {field["name"]: field for field in json.load(f)["schema"]}
    name = fields[BODY]["options"]["indexing"]["tokenizer"]
    if name not in ANALYZERS:
        raise PipelineError(f"{directory}: its BM25 body's tokenizer {name!r} has no query analyzer here")
    return ANALYZERS[name]()


def query_terms(analyzer: tantivy.TextAnalyzer, question: str) -> list[str]:
    """A question's BM25 terms: the analyzer's tokens of it, each distinct word (case aside) once; words the
    analyzer keeps nothing of (punctuation, words over 40 bytes) give none."""
    seen: set[str] = set()
    terms = []
    for token in analyzer.pre_tokenize(question).tokens:
        word = question[token.char_offset_from : token.char_offset_to].lower()
        if word not in seen:
            seen.add(word)
            terms.append(token.text)
    return terms


@dataclass
class LexicalIndex:
    """A version's BM25 index, the analyzer of its body field, and the passages its hits are read from (`store`;
    None for a `lexical_format` 1 index, whose text is in tantivy)."""

    version: str
    index: tantivy.Index
    analyzer: tantivy.TextAnalyzer
    store: Docstore | None = None
    lease: Lease | None = None  # the node cache keeps its files while it is held

    @classmethod
    def at(cls, version: str, directory: str, store: Docstore | None = None) -> LexicalIndex:
        """The tantivy index in `directory` (its files already verified) with its body's analyzer."""
        return cls(version, tantivy.Index.open(directory), body_analyzer(directory), store)

    def query(self, question: str) -> tantivy.Query | None:
        """The question as a disjunction of term queries on the body (None: no term), built, never parsed."""
        schema = self.index.schema
        terms = query_terms(self.analyzer, question)
        should = tantivy.Occur.Should
        clauses = [(should, tantivy.Query.term_query(schema, BODY, term, index_option="freq")) for term in terms]
        return tantivy.Query.boolean_query(clauses) if clauses else None

    def search(self, questions: Sequence[str], k: int) -> list[list[Hit]]:
        """Per question, the k best passages by BM25 (id, title, text, score, and from the docstores the FAISS id
        as `key` and the token ids when the version has them), best first (ties: the id); none for a question
        without a term."""
        searcher = self.index.searcher()
        found = []
        for question in questions:
            query = self.query(question)
            found.append(searcher.search(query, k, count=False).hits if query is not None else [])
        if self.store is None:
            answered = [[_stored_hit(searcher.doc(address), score) for score, address in hits] for hits in found]
        else:  # one docstore take for every question's hits
            addresses = [address for hits in found for _, address in hits]
            keys = np.array(searcher.fast_field_values("key", addresses), np.int64).view(np.uint64)
            rows = iter(self.store.hits(self.store.by_key(keys), [score for hits in found for score, _ in hits]))
            answered = [[next(rows) for _ in hits] for hits in found]
        for hits in answered:
            hits.sort(key=lambda hit: (-hit["score"], hit["id"]))
        return answered

    def keys(self) -> np.ndarray:
        """The passage key of every document the index holds (checks and tests; `lexical_format` 2)."""
        searcher = self.index.searcher()
        found = searcher.search(tantivy.Query.all_query(), max(searcher.num_docs, 1), count=False).hits
        return np.array(searcher.fast_field_values("key", [a for _, a in found]), np.int64).view(np.uint64)


def _stored_hit(doc: tantivy.Document, score: float) -> Hit:
    """A hit of a `lexical_format` 1 index, which stored the passage's fields in tantivy."""
    return {"id": doc["id"][0], "title": doc["title"][0], "text": doc["text"][0], "score": float(score)}


def open_lexical(version: str, files: dict[str, str], view_dir: str, store: Docstore | None = None) -> LexicalIndex:
    """Open a version's verified tantivy files (name → local path) through a directory of links to them, which
    replicas on a node share: each link is made under a name of its own and moved into place whole."""
    os.makedirs(view_dir, exist_ok=True)
    for name, path in files.items():
        link = os.path.join(view_dir, name)
        if not os.path.islink(link) or os.readlink(link) != os.path.abspath(path):
            made = f"{link}.{os.getpid()}.link"
            with contextlib.suppress(FileNotFoundError):
                os.remove(made)
            os.symlink(os.path.abspath(path), made)
            os.replace(made, link)
    try:
        opened = LexicalIndex.at(version, view_dir, store)
    except (ValueError, OSError, KeyError) as exc:
        raise PipelineError(f"index {version}: its BM25 index does not open ({type(exc).__name__}: {exc})") from None
    documents = opened.index.searcher().num_docs
    if store is not None and documents != store.live:
        raise PipelineError(f"index {version}: its BM25 index has {documents} passages, its docstores {store.live}")
    return opened


def build_lexical(
    storage: Storage, links: list[Link], start: int | None, previous: IndexManifest | None, work_dir: str
) -> dict[str, FileEntry]:
    """The version's BM25 index, uploaded (content-addressed): {tantivy file name: entry}. With `start` (a delta
    on `previous`, which has one): the previous index minus the passages that links[start:] remove or replace,
    plus their live passages, as a new segment. Otherwise (or when `previous`'s BM25 index has another format) every
    live passage of the chain."""
    live = LiveEmbeddings(storage, links)
    base = None
    if start is not None and previous is not None and previous.lexical and previous.lexical_format == FORMAT:
        files = {entry.name: entry for entry in previous.files}
        fetched, _ = fetch_verified(
            storage, [files[name] for name in previous.lexical.values()], os.path.join(work_dir, "published")
        )
        base = {name: fetched[obj] for name, obj in previous.lexical.items()}
    else:
        start = 0
    writer = LexicalWriter(os.path.join(work_dir, "lexical"), base)
    shards = [shard for shard, (link, _) in enumerate(live.shards) if link >= start]
    if base is not None:  # deletes first: tantivy applies a delete to the documents added before it
        added = [live.live_passages(shard) for shard in shards]  # a night's passages: small
        removed = [keys_of(t.column("id").to_pylist()) for t in added] + [link.tombstones for link in links[start:]]
        writer.delete(np.concatenate(removed) if removed else np.empty(0, np.uint64))
        for table in added:
            writer.add(table)
    else:
        for shard in shards:
            writer.add(live.live_passages(shard))
    log.info("BM25 index: %d passages added, %d deleted", writer.added, writer.deleted)
    return {name: upload_once(storage, path, object_name(name, path))[0] for name, path in writer.close().items()}


def build_lexical_task(
    root: str, options: dict, links: list[Link], start: int | None, previous: IndexManifest | None
) -> dict[str, FileEntry]:
    """`build_lexical` as a Ray task of a distributed build: it runs on a worker while the add tasks run, in a
    scratch directory of its own, so the driver neither holds nor writes the BM25 index."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lexical-") as work_dir:
        return build_lexical(Storage(root, options), links, start, previous, work_dir)


def load_lexical(storage: Storage, manifest: IndexManifest, cache: NodeCache | str) -> LexicalIndex | None:
    """A published version's BM25 index and (`lexical_format` 2) the docstores its hits are read from, leased in the
    node cache (`pipeline.store.cache`) and every file checked against its sha256 first; None when it has none."""
    if not manifest.lexical:
        return None
    cache = cache if isinstance(cache, NodeCache) else NodeCache(cache)
    lease = cache.lease(manifest.version, manifest.files)
    try:
        found = _open_lexical(storage, manifest, cache)
    except BaseException:
        cache.release(lease)
        raise
    found.lease = lease
    return found


def _open_lexical(storage: Storage, manifest: IndexManifest, cache: NodeCache) -> LexicalIndex:
    store = load_docstore(storage, manifest, cache) if manifest.lexical_format == FORMAT else None
    files = {entry.name: entry for entry in manifest.files}
    try:
        paths, _ = cache.fetch(storage, [files[name] for name in manifest.lexical.values()], manifest.version)
    except PipelineError as exc:
        raise PipelineError(f"{exc}: refusing to load the BM25 index of {manifest.version}") from None
    view = os.path.join(cache.directory, VIEWS, manifest.version)
    return open_lexical(manifest.version, {name: paths[obj] for name, obj in manifest.lexical.items()}, view, store)


def fuse(
    dense: Sequence[Hit], sparse: Sequence[Hit], k: int, rrf_k: float = 60.0, dense_weight: float = 0.5
) -> list[Hit]:
    """Reciprocal-rank fusion of two rankings of passages (pure): each passage scores
    w / (rrf_k + rank) summed over the rankings it is in (rank from 1; w = dense_weight for the dense ranking,
    1 - dense_weight for BM25); the k best, ties to the better dense rank, then the id. A hit keeps its fields and
    gets the fused score."""
    fused: dict[str, list] = {}
    for weight, hits in ((dense_weight, dense), (1.0 - dense_weight, sparse)):
        for rank, hit in enumerate(hits, start=1):
            entry = fused.setdefault(hit["id"], [0.0, len(dense) + 1, hit])
            entry[0] += weight / (rrf_k + rank)
            if hits is dense:
                entry[1] = rank
    ordered = sorted(fused.items(), key=lambda item: (-item[1][0], item[1][1], item[0]))[:k]
    return [{**entry[2], "score": entry[0]} for _, entry in ordered]
