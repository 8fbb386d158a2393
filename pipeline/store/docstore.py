"""A version's passages as a replica reads them: each segment's docstore (id, title, text) and, when the build
stored them, the reader's token ids of each passage, memory-mapped, addressed by FAISS id (`seq << 40 | row`) or
by passage key. The dense shards and the BM25 deployment read the same files, so a replica's disk holds each
passage's text once (no torch or tantivy here).

Both are block files (`pipeline.store.blocks`: zstd blocks of 8 rows, a hit decompresses its own), `docstore.zst` and
`reader_ids.zst`; versions built before them have uncompressed Arrow IPC files (`docstore.arrow`, `reader_ids.arrow`),
read as they were.

Token ids: `reader_ids.zst` beside a segment's docstore, row i = the docstore's row i, with `title_ids` and
`text_ids` (uint16 when the reader's vocabulary fits, else uint32) as the reader's tokenizer gives them without
special tokens; the reader assembles `[CLS] question [SEP] title [SEP] text` from them instead of tokenizing the
passages of every question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.store.blocks import BlockFile

DOCSTORE_FILE, TOKENS_FILE = "docstore.zst", "reader_ids.zst"
ARROW_DOCSTORE_FILE, ARROW_TOKENS_FILE = "docstore.arrow", "reader_ids.arrow"  # versions before block files
# A segment's docstore and its token ids, under either name (block files first): it has one of each at most.
DOCSTORE_FILES, TOKENS_FILES = (DOCSTORE_FILE, ARROW_DOCSTORE_FILE), (TOKENS_FILE, ARROW_TOKENS_FILE)
DOCSTORE_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
SEQ_SHIFT = 40
ROW_MASK = (1 << SEQ_SHIFT) - 1


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> SEQ_SHIFT, ids & ROW_MASK


def faiss_ids(seq: int, start: int, count: int) -> np.ndarray:
    return (np.int64(seq) << SEQ_SHIFT) | np.arange(start, start + count, dtype=np.int64)


def tokens_schema(vocabulary: int) -> pa.Schema:
    """The token-id file's columns: uint16 ids when the vocabulary fits (BERT's 30,522 does), else uint32."""
    kind = pa.uint16() if vocabulary <= 2**16 else pa.uint32()
    return pa.schema([("title_ids", pa.list_(kind)), ("text_ids", pa.list_(kind))])


def open_arrow(path: str) -> pa.Table:
    """An Arrow IPC file memory-mapped (one already checked against its manifest's sha256)."""
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def take_rows(tables: dict[int, pa.Table | BlockFile], ids: np.ndarray) -> pa.Table:
    """The rows of FAISS ids `ids` from per-segment tables, in the order given (zero-copy takes from Arrow files, one
    block decompressed per row from block files)."""
    seqs, rows = split_ids(ids)
    parts, positions = [], []
    for seq in np.unique(seqs):
        where = np.nonzero(seqs == seq)[0]
        parts.append(tables[int(seq)].take(pa.array(rows[where])))
        positions.append(where)
    table = pa.concat_tables(parts)
    return table.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))


def list_values(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each row of a list column as a numpy view of its values."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


@dataclass
class Docstore:
    """The passages of a version's segments (`seq` → memory-mapped block files, or Arrow tables in versions before
    them) and their reader token ids where every segment has them. `dead` (sorted FAISS ids) and `keys` (`seq` →
    each row's 64-bit passage key) let a passage be found by its key (the BM25 index holds only keys)."""

    texts: dict[int, pa.Table | BlockFile]
    tokens: dict[int, pa.Table | BlockFile] = field(default_factory=dict)
    tokenizer: str | None = None  # the fingerprint of the tokenizer the ids are from (None: no ids)
    dead: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    keys: dict[int, np.ndarray] = field(default_factory=dict)
    _by_key: tuple[np.ndarray, np.ndarray] | None = None

    def passages(self, ids: Sequence[int]) -> pa.Table:
        """id, title, text of each FAISS id, in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        return take_rows(self.texts, ids) if len(ids) else DOCSTORE_SCHEMA.empty_table()

    def token_ids(self, ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """(title ids, text ids) of each FAISS id; None for a row whose segment was built without them."""
        ids = np.asarray(ids, dtype=np.int64)
        found: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(ids)
        have = np.nonzero(np.isin(split_ids(ids)[0], list(self.tokens)))[0] if self.tokenizer else []
        if len(have):
            table = take_rows(self.tokens, ids[have])
            for i, title, text in zip(have, list_values(table["title_ids"]), list_values(table["text_ids"])):
                found[i] = (title, text)
        return found

    def hits(self, ids: Sequence[int], scores: Sequence[float]) -> list[dict]:
        """Hits (id, title, text, score, key = FAISS id, and the token ids when there are some) in the order given."""
        ids = [int(i) for i in ids]
        table = self.passages(ids)
        tokens = self.token_ids(ids)
        names, titles, texts = (table.column(c).to_pylist() for c in ("id", "title", "text"))
        hits = [
            {"id": n, "title": t, "text": x, "score": float(s), "key": i}
            for n, t, x, s, i in zip(names, titles, texts, scores, ids)
        ]
        for hit, ids_of in zip(hits, tokens):
            if ids_of is not None:
                hit["title_ids"], hit["text_ids"] = ids_of
        return hits

    def by_key(self, keys: Sequence[int]) -> np.ndarray:
        """The live FAISS id of each passage key (what the BM25 index returns), built once per version: the
        segments' keys minus the tombstoned rows, sorted (16 bytes a passage in memory)."""
        if self._by_key is None:
            seqs = sorted(self.keys)
            every = np.concatenate([self.keys[s] for s in seqs]) if seqs else np.empty(0, np.uint64)
            ids = np.concatenate([faiss_ids(s, 0, len(self.keys[s])) for s in seqs]) if seqs else np.empty(0, np.int64)
            alive = ~np.isin(ids, self.dead)
            order = np.argsort(every[alive], kind="stable")
            self._by_key = every[alive][order], ids[alive][order]
        sorted_keys, sorted_ids = self._by_key
        wanted = np.asarray(keys, dtype=np.uint64)
        at = np.minimum(np.searchsorted(sorted_keys, wanted), max(len(sorted_keys) - 1, 0))
        missing = wanted if not len(sorted_keys) else wanted[sorted_keys[at] != wanted]
        if len(missing):
            raise PipelineError(f"passage keys {missing[:3].tolist()} are in the BM25 index but no live docstore row")
        return sorted_ids[at]

    @property
    def live(self) -> int:
        return sum(t.num_rows for t in self.texts.values()) - len(self.dead)
