"""Compaction carries the reader's token ids: the merged segment's `reader_ids.zst` holds, row for row, the ids of
its live docstore rows (copied, not recomputed); with one merged segment lacking them, it has none. And the kept
vectors' sq8 codes, copied as they are."""

import os

import faiss
import numpy as np
import pyarrow as pa
import pytest

from kit.models import tiny_dpr
from pipeline.index.build import Built
from pipeline.index.compact import compact
from pipeline.models.tokens import ReaderTokenizer
from pipeline.runtime.telemetry import PhaseTimer
from pipeline.store.blocks import open_table
from pipeline.store.docstore import TOKENS_FILE
from pipeline.store.segments import DOCSTORE_FILE, SQ8_FILE, SegmentWriter, Sq8, faiss_ids
from pipeline.store.storage import Storage


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ReaderTokenizer(tiny_dpr(tmp_path_factory.mktemp("reader"), ("reader",))["reader"])


def _segments(
    tmp_path, tokenizer, with_ids=(True, True), factory: str = "IVF2,PQ2x4", sq8: Sq8 | None = None
) -> tuple[Built, list[pa.Table]]:
    rng = np.random.default_rng(0)
    quantizer = faiss.index_factory(8, factory, faiss.METRIC_INNER_PRODUCT)
    quantizer.train(rng.normal(size=(300, 8)).astype(np.float32))
    path = str(tmp_path / "quantizer.faiss")
    faiss.write_index(quantizer, path)
    segments, tables = [], []
    for seq, ids in zip((1, 2), with_ids):
        rows = pa.table(
            {
                "id": [f"{seq}-{i}" for i in range(20)],
                "title": [f"Title {seq} {i}" for i in range(20)],
                "text": [f"passage {i} of segment {seq} about rivers " * (1 + i % 3) for i in range(20)],
            }
        )
        writer = SegmentWriter(quantizer, seq, str(tmp_path), True, tokenizer if ids else None, sq8)
        writer.add(rng.normal(size=(20, 8)).astype(np.float32), rows)
        segments.append(writer.close())
        tables.append(rows)
    dead = np.concatenate([faiss_ids(1, 0, 20)[[2, 5]], faiss_ids(2, 0, 20)[[0, 19]]])
    return Built(path, segments, dead, {10: 1.0, 100: 1.0}, {}, 40, None, None), tables


def test_compaction_copies_the_live_rows_token_ids(tmp_path, tokenizer):
    built, _ = _segments(tmp_path, tokenizer)
    merged = compact(Storage(str(tmp_path / "store"), {}), built, [0, 1], {}, str(tmp_path), PhaseTimer())
    [segment] = merged.segments
    docstore = open_table(segment.paths[DOCSTORE_FILE]).read_all()
    tokens = open_table(segment.paths[TOKENS_FILE]).read_all()
    assert docstore.num_rows == tokens.num_rows == 36 and "1-2" not in docstore.column("id").to_pylist()
    assert tokens.equals(tokenizer.table(docstore))  # row for row, the live rows' ids


def test_a_merged_segment_without_ids_leaves_the_compacted_one_without(tmp_path, tokenizer):
    built, _ = _segments(tmp_path, tokenizer, with_ids=(True, False))
    merged = compact(Storage(str(tmp_path / "store"), {}), built, [0, 1], {}, str(tmp_path), PhaseTimer())
    assert TOKENS_FILE not in merged.segments[0].paths
    assert not os.path.exists(os.path.join(os.path.dirname(merged.segments[0].paths[DOCSTORE_FILE]), TOKENS_FILE))


def test_compaction_copies_the_live_rows_sq8_codes_behind_an_opq_rotation(tmp_path, tokenizer):
    """The kept vectors have the vectors' dimension, not the IVF's (an OPQ rotation's output, 4 here): the live rows'
    sq8 codes are copied as they are."""
    sq8 = Sq8.train(np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32))
    built, _ = _segments(tmp_path, tokenizer, factory="OPQ2_4,IVF2,PQ2x4", sq8=sq8)
    before = [np.load(s.paths[SQ8_FILE]) for s in built.segments]
    alive = [~np.isin(faiss_ids(s.seq, 0, s.rows), built.dead) for s in built.segments]
    merged = compact(Storage(str(tmp_path / "store"), {}), built, [0, 1], {}, str(tmp_path), PhaseTimer())
    [segment] = merged.segments
    codes = np.load(segment.paths[SQ8_FILE])
    assert codes.shape == (36, 8) and np.array_equal(codes, np.concatenate([c[a] for c, a in zip(before, alive)]))
