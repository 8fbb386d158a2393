"""The segmented index format: its files, writing a segment, and the search primitives over one (no torch here:
serving imports it; `pipeline.store.published` loads a published version for search).

A version (`indexes/<version>/manifest.json`) lists, by sha256, everything it needs, named relative to `indexes/`:
- one trained, empty FAISS index: `quantizers/<sha>.faiss` (OPQ rotation, coarse centroids, PQ codebooks), stored
  once per training and shared by every version and segment built on it;
- with `index.refine_codes: sq8` (the default), `quantizers/<sha>.sq8.npy`: the 8-bit scalar quantizer of the kept
  vectors (`Sq8`), trained on the quantizer's training sample (the manifest's `sq8`);
- its segments, immutable and content-addressed: `segments/<seq>-<hash>/` with `ivf.bin` (FAISS inverted lists
  only: codes and ids), `docstore.zst` (id, title, text; row i = the segment's row i, in zstd blocks of a few rows:
  `pipeline.store.blocks`), `keys.npy` (the 64-bit key of each row's passage id, to find rows to tombstone), the kept
  vectors unless built with `index.keep_vectors: false` (`vectors_sq8.npy`, a byte a dimension, or `vectors.npy` in
  fp16: a search re-scores its IVF-PQ candidates from them, memory-mapped, when asked for `refine_k` candidates) and
  the reader's token ids (`reader_ids.zst`). Versions built before block files have `docstore.arrow` and
  `reader_ids.arrow` (uncompressed Arrow IPC) and fp16 vectors, read as they were;
- `tombstones.npy`: FAISS ids of rows that are dead in this version (deleted or replaced by a newer segment).

A FAISS id is `seq << 40 | row`, so ids stay unique across segments even when a changed passage lives in two
(its old row tombstoned). A replica stacks the segments' inverted lists on the shared quantizer
(`HStackInvertedLists`, memory-mapped), so one search scans every segment's lists, and drops tombstoned ids inside
the search (`IDSelectorNot`), so a query still gets k results. Same quantizer and nprobe → the same codes and so the
same scores as a from-scratch build of the same passages.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.store.blocks import BlockWriter
from pipeline.store.docstore import (
    ARROW_DOCSTORE_FILE,
    ARROW_TOKENS_FILE,
    DOCSTORE_FILE,
    DOCSTORE_SCHEMA,
    SEQ_SHIFT,
    TOKENS_FILE,
    faiss_ids,
    split_ids,
)
from pipeline.store.keys import keys_of
from pipeline.store.manifests import FileEntry, IndexManifest
from pipeline.store.snapshots import npy_bytes
from pipeline.store.storage import Storage, sha256_file

log = logging.getLogger(__name__)

IVF_FILE, KEYS_FILE, TOMBSTONES_FILE, VECTORS_FILE = "ivf.bin", "keys.npy", "tombstones.npy", "vectors.npy"
SQ8_FILE = "vectors_sq8.npy"  # the kept vectors as 8-bit codes (index.refine_codes sq8)
# Vectors (fp16 or sq8) and token ids when built with them; Arrow docstores and token ids in versions before blocks.
SEGMENT_FILES = (
    IVF_FILE,
    DOCSTORE_FILE,
    KEYS_FILE,
    VECTORS_FILE,
    SQ8_FILE,
    TOKENS_FILE,
    ARROW_DOCSTORE_FILE,
    ARROW_TOKENS_FILE,
)
REFINE_FILES = (VECTORS_FILE, SQ8_FILE)


def ivf_of(index: faiss.Index) -> faiss.IndexIVF:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise PipelineError("segmented indexes need an IVF factory (e.g. IVF65536,PQ64 or OPQ64_256,IVF65536,PQ64)")
    return ivf


def write_invlists(invlists: faiss.InvertedLists, path: str) -> None:
    writer = faiss.FileIOWriter(path)
    faiss.write_InvertedLists(invlists, writer)
    del writer  # closes the file


def read_invlists(path: str) -> faiss.InvertedLists:
    """Memory-mapped, read-only inverted lists (OnDiskInvertedLists). faiss's wrapper does not own what it reads:
    `free_invlists` unmaps them."""
    return faiss.read_InvertedLists(faiss.FileIOReader(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


def free_invlists(lists: Sequence[faiss.InvertedLists]) -> None:
    """Delete lists `read_invlists` mapped, unmapping their files, once nothing searches them. Left to Python, they
    never were: a replica kept every version it had dropped mapped (7 MiB of RSS a night at 100k passages)."""
    for one in lists:
        type(one).__swig_destroy__(one)


def search_parameters(index: faiss.Index, nprobe: int, dead: np.ndarray) -> tuple[faiss.SearchParameters, list]:
    """nprobe and the tombstone filter for `index.search(..., params=)`, and the objects they point to (keep them
    alive as long as the parameters)."""
    ivf_params = faiss.SearchParametersIVF()
    ivf_params.nprobe = nprobe
    keep: list = [ivf_params]
    if len(dead):
        dead = np.ascontiguousarray(dead, dtype=np.int64)
        batch = faiss.IDSelectorBatch(dead)
        selector = faiss.IDSelectorNot(batch)
        ivf_params.sel = selector
        keep += [dead, batch, selector]
    if isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        params.index_params = ivf_params
        keep.append(params)
        return params, keep
    return ivf_params, keep


def copy_live_codes(
    sources: Sequence[faiss.InvertedLists], remap: dict[int, np.ndarray], seq: int, nlist: int, code_size: int
) -> faiss.ArrayInvertedLists:
    """Compaction without the vectors: the codes of live rows copied list by list into one new inverted file,
    their ids renumbered to `seq << 40 | new row`. `remap[old seq]` gives each old row its new row (-1 = dead)."""
    merged = faiss.ArrayInvertedLists(nlist, code_size)
    for invlists in sources:
        for list_no in range(nlist):
            size = invlists.list_size(list_no)
            if not size:
                continue
            ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy()
            codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * code_size).copy().reshape(size, code_size)
            old_seq, old_row = split_ids(ids)
            new_row = np.empty(size, dtype=np.int64)
            for seq_of_rows in np.unique(old_seq):
                at = old_seq == seq_of_rows
                new_row[at] = remap[int(seq_of_rows)][old_row[at]]
            keep = new_row >= 0
            if keep.any():
                new_ids = np.ascontiguousarray((np.int64(seq) << SEQ_SHIFT) | new_row[keep])
                kept = np.ascontiguousarray(codes[keep])
                merged.add_entries(list_no, int(keep.sum()), faiss.swig_ptr(new_ids), faiss.swig_ptr(kept))
    return merged


def exact_scores(
    queries: np.ndarray, ids: np.ndarray, stored: dict[int, np.ndarray | Sq8Vectors], chunk: int = 64
) -> np.ndarray:
    """Each candidate's inner product with its query, from the stored vectors (`seq` → [rows, d] fp16, or `Sq8Vectors`,
    memory-mapped: only the candidates' rows are read, in ascending order); -inf where the id is -1. `chunk` queries
    at a time: the candidates' vectors in float32 are chunk x candidates x d (a build's 1,000 held-out queries x 400
    candidates x 768 dims would be 1.2 GB at once)."""
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        seqs, rows = split_ids(part)
        for seq in np.unique(seqs[part >= 0]):
            at = np.nonzero((seqs == seq) & (part >= 0))
            wanted, inverse = np.unique(rows[at], return_inverse=True)
            vectors = np.asarray(stored[int(seq)][wanted], dtype=np.float32)[inverse]
            scores[start : start + chunk][at] = np.einsum("ij,ij->i", queries[start : start + chunk][at[0]], vectors)
    return scores


def best_by_score(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (score descending, ties to the smaller id, -1 ids last) as (scores, ids)."""
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=-1)[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    return best, np.where(np.isfinite(best), np.take_along_axis(ids, order, axis=1), -1)


def rescore(
    queries: np.ndarray, ids: np.ndarray, k: int, stored: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Refine: the k best of each query's IVF-PQ candidates by exact inner product."""
    return best_by_score(exact_scores(queries, ids, stored), ids, k)


class Sq8:
    """The 8-bit scalar quantizer of the kept vectors (`index.refine_codes: sq8`): each dimension's range, trained
    on the quantizer's training sample and stored beside it (`quantizers/<sha>.sq8.npy`, float32 [2, d]: minimum,
    width), so every segment of a version decodes with the same one. 1 byte a dimension instead of fp16's 2."""

    def __init__(self, trained: np.ndarray):
        self.trained = np.ascontiguousarray(trained, dtype=np.float32)
        self.d = self.trained.shape[1]
        self.quantizer = faiss.ScalarQuantizer(self.d, faiss.ScalarQuantizer.QT_8bit)
        faiss.copy_array_to_vector(self.trained.ravel(), self.quantizer.trained)

    @classmethod
    def train(cls, sample: np.ndarray) -> Sq8:
        quantizer = faiss.ScalarQuantizer(sample.shape[1], faiss.ScalarQuantizer.QT_8bit)
        quantizer.train(np.ascontiguousarray(sample, dtype=np.float32))
        return cls(faiss.vector_to_array(quantizer.trained).reshape(2, sample.shape[1]))

    @classmethod
    def read(cls, path: str, dim: int, where: str) -> Sq8:
        """From its file (one already checked against its manifest's sha256)."""
        trained = np.load(path, allow_pickle=False)
        if trained.shape != (2, dim) or trained.dtype != np.float32:
            raise PipelineError(f"{where}: an sq8 quantizer of shape {trained.shape} {trained.dtype} for {dim} dims")
        return cls(trained)

    def save(self, path: str) -> str:
        with open(path, "wb") as handle:
            handle.write(npy_bytes(self.trained))
        return path

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        return self.quantizer.compute_codes(np.ascontiguousarray(vectors, dtype=np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.quantizer.decode(np.ascontiguousarray(codes, dtype=np.uint8))


class Sq8Vectors:
    """A segment's sq8 codes, memory-mapped, read as float32 vectors: `rows[i]` decodes only the rows asked for."""

    def __init__(self, codes: np.ndarray, sq8: Sq8):
        self.codes, self.sq8 = codes, sq8

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, rows) -> np.ndarray:
        codes = self.codes[rows]
        return self.sq8.decode(codes[None])[0] if codes.ndim == 1 else self.sq8.decode(codes)


def open_vectors(path: str, rows: int, dim: int, where: str, sq8: Sq8 | None = None) -> np.ndarray | Sq8Vectors:
    """A segment's kept vectors, memory-mapped (a file already checked against its manifest's sha256): fp16, or
    with `sq8` its 8-bit codes, decoded as they are read."""
    vectors = open_rows(path, rows, dim, np.uint8 if sq8 is not None else np.float16, where)
    return Sq8Vectors(vectors, sq8) if sq8 is not None else vectors


def open_rows(path: str, rows: int, dim: int, dtype: type, where: str) -> np.ndarray:
    """A .npy of [rows, dim] `dtype`, memory-mapped (verified already); refused when it is not that."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.shape != (rows, dim) or array.dtype != dtype:
        raise PipelineError(
            f"{where}: vectors of shape {array.shape} {array.dtype} for {rows} rows of {dim} {np.dtype(dtype)}"
        )
    return array


def open_refine(
    paths: dict[str, str], rows: int, dim: int, where: str, sq8: Sq8 | None
) -> np.ndarray | Sq8Vectors | None:
    """A segment's kept vectors from its files by name (`vectors.npy` fp16 or `vectors_sq8.npy`), None without."""
    if VECTORS_FILE in paths:
        return open_vectors(paths[VECTORS_FILE], rows, dim, where)
    if SQ8_FILE in paths:
        if sq8 is None:
            raise PipelineError(f"{where}: sq8 vectors but no sq8 quantizer in its version's manifest")
        return open_vectors(paths[SQ8_FILE], rows, dim, where, sq8)
    return None


# -- writing -------------------------------------------------------------------------------------------------------
@dataclass
class LocalSegment:
    """A segment written in the work dir, not yet uploaded."""

    seq: int
    rows: int
    paths: dict[str, str]  # ivf.bin, docstore.zst, keys.npy (vectors_sq8.npy or vectors.npy, reader_ids.zst) → path

    @property
    def name(self) -> str:
        """Content-addressed: the same rows on the same quantizer give the same name."""
        digest = hashlib.sha256("".join(sha256_file(self.paths[n]) for n in sorted(self.paths)).encode())
        return f"segments/{self.seq:06d}-{digest.hexdigest()[:16]}"


class VectorWriter:
    """Rows (fp16 vectors, or sq8 codes) appended in order to a .npy whose header, written by numpy, is rewritten at
    the end with the row count (a fixed 128 bytes for any 2-D shape): the vectors stream to disk, never held."""

    def __init__(self, path: str, dim: int, dtype: type = np.float16):
        self.path, self.dim, self.rows, self.dtype = path, dim, 0, np.dtype(dtype)
        self._file = open(path, "wb")
        self._file.write(self._header())

    def _header(self) -> bytes:
        buffer = io.BytesIO()
        header = {"descr": self.dtype.str, "fortran_order": False, "shape": (self.rows, self.dim)}
        np.lib.format.write_array_header_1_0(buffer, header)
        if buffer.tell() != 128:
            raise PipelineError(f"{self.path}: unexpected .npy header size {buffer.tell()}")
        return buffer.getvalue()

    def add(self, vectors: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self.rows += len(vectors)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(self._header())
        self._file.close()


class SegmentWriter:
    """Adds vectors to a copy of the trained quantizer under ids `seq << 40 | row`, and writes the docstore part,
    the keys, (with `keep_vectors`) the vectors, in fp16 or as `sq8` codes, and (with a `tokenizer`, a
    `pipeline.models.tokens.ReaderTokenizer`) the reader's token ids in the same row order."""

    def __init__(
        self,
        quantizer: faiss.Index,
        seq: int,
        work_dir: str,
        keep_vectors: bool = True,
        tokenizer=None,
        sq8: Sq8 | None = None,
    ):
        self.index, self.seq, self.rows = faiss.clone_index(quantizer), seq, 0
        self.directory = os.path.join(work_dir, f"segment-{seq:06d}")
        os.makedirs(self.directory, exist_ok=True)
        self._docstore = BlockWriter(os.path.join(self.directory, DOCSTORE_FILE), DOCSTORE_SCHEMA)
        self._keys: list[np.ndarray] = []
        self.sq8 = sq8
        self._vectors = None
        if keep_vectors:
            name, dtype = (SQ8_FILE, np.uint8) if sq8 is not None else (VECTORS_FILE, np.float16)
            self._vectors = VectorWriter(os.path.join(self.directory, name), quantizer.d, dtype)
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self._tokens = BlockWriter(os.path.join(self.directory, TOKENS_FILE), tokenizer.schema)

    def add(self, vectors: np.ndarray, passages: pa.Table) -> np.ndarray:
        """Returns the FAISS ids given to the rows."""
        ids = faiss_ids(self.seq, self.rows, len(vectors))
        self.index.add_with_ids(vectors, ids)
        self._docstore.write_table(passages)
        self._keys.append(keys_of(passages.column("id").to_pylist()))
        if self._vectors is not None:
            self._vectors.add(self.sq8.encode(vectors) if self.sq8 is not None else vectors)
        if self.tokenizer is not None:
            self._tokens.write_table(self.tokenizer.table(passages))
        self.rows += len(vectors)
        return ids

    def close(self) -> LocalSegment:
        self._docstore.close()
        if self._vectors is not None:
            self._vectors.close()
        if self.tokenizer is not None:
            self._tokens.close()
        return finish_segment(self.seq, self.rows, ivf_of(self.index).invlists, self._keys, self.directory)

    def discard(self) -> None:
        """Close and delete an empty segment's files, so that nothing left open writes into a directory that a
        later segment of the same seq (compaction's) reuses."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def finish_segment(
    seq: int, rows: int, invlists: faiss.InvertedLists, keys: list[np.ndarray], directory: str
) -> LocalSegment:
    """Write the inverted lists and keys beside an already written docstore (and vectors and token ids, when
    written)."""
    paths = {name: os.path.join(directory, name) for name in SEGMENT_FILES}
    for optional in SEGMENT_FILES[3:]:
        if not os.path.exists(paths[optional]):
            del paths[optional]
    write_invlists(invlists, paths[IVF_FILE])
    with open(paths[KEYS_FILE], "wb") as handle:
        handle.write(npy_bytes(np.concatenate(keys) if keys else np.empty(0, np.uint64)))
    return LocalSegment(seq, rows, paths)


def upload_once(storage: Storage, path: str, rel: str) -> tuple[FileEntry, int]:
    """Upload a content-addressed object unless it is already there whole; (its entry, bytes written)."""
    entry = FileEntry(name=rel, bytes=os.path.getsize(path), sha256=sha256_file(path))
    target = posixpath.join("indexes", rel)
    if storage.exists(target) and storage.fs.size(storage.path(target)) == entry.bytes:
        return entry, 0
    storage.upload(path, target)
    return entry, entry.bytes


# -- the manifest of a version ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentRef:
    name: str  # segments/<seq>-<hash>, relative to indexes/
    seq: int
    rows: int

    def file(self, name: str) -> str:
        return posixpath.join(self.name, name)


def segments_of(manifest: IndexManifest) -> list[SegmentRef]:
    return [SegmentRef(s.name, s.seq, s.rows) for s in manifest.segments]


def assign_segments(segments: Sequence[SegmentRef], shards: int) -> dict[int, int]:
    """Which serving shard holds each segment (seq → shard), balanced by vector count (pure): the largest segment
    first, each to the shard holding the fewest vectors so far (ties: the lower shard). Versions that only add
    small segments (nightly deltas) place the big ones where they were, so a shard's replicas keep their cache."""
    load = [0] * shards
    owner = {}
    for segment in sorted(segments, key=lambda s: (-s.rows, s.seq)):
        shard = min(range(shards), key=lambda i: (load[i], i))
        owner[segment.seq] = shard
        load[shard] += segment.rows
    return owner


def files_of(manifest: IndexManifest) -> dict[str, FileEntry]:
    return {entry.name: entry for entry in manifest.files}


KINDS = {
    IVF_FILE: "codes",
    VECTORS_FILE: "vectors",
    SQ8_FILE: "vectors",
    DOCSTORE_FILE: "docstore",
    TOKENS_FILE: "token_ids",
    ARROW_DOCSTORE_FILE: "docstore",
    ARROW_TOKENS_FILE: "token_ids",
    KEYS_FILE: "keys",
}


def footprint(manifest: IndexManifest) -> dict[str, float]:
    """What a replica holding the whole version stores, in bytes per live passage by kind: codes (inverted lists:
    PQ codes and ids), vectors (fp16, for refine), docstore (the text), token_ids (the reader's), bm25, keys, and
    shared (the quantizer and the tombstones); pure, from the manifest."""
    lexical = set((manifest.lexical or {}).values())
    totals = dict.fromkeys([*KINDS.values(), "bm25", "shared"], 0)
    for entry in {e.name: e for e in manifest.files}.values():
        kind = "bm25" if entry.name in lexical else KINDS.get(posixpath.basename(entry.name), "shared")
        totals[kind] += entry.bytes
    live = max(manifest.vectors, 1)
    per_passage = {kind: round(size / live, 1) for kind, size in totals.items()}
    return {**per_passage, "total": round(sum(totals.values()) / live, 1)}
