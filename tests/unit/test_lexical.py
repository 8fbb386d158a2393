"""The BM25 index and hybrid fusion: reciprocal-rank arithmetic on hand-made rankings, question sanitizing, a
tantivy index extended by a delta the way a night extends it (deletes, then a new segment; the old files kept),
its hits read from the docstores by passage key, and an index of the format before (text stored) still searched."""

import hashlib
import os

import numpy as np
import pyarrow as pa
import pytest
import tantivy

from kit.legacy import format1_bm25
from pipeline.docstore import Docstore, faiss_ids
from pipeline.errors import PipelineError
from pipeline.keys import keys_of
from pipeline.lexical import LexicalIndex, LexicalWriter, fuse, query_text


def _hits(*ids: str) -> list[dict]:
    return [{"id": pid, "title": "", "text": "", "score": 10.0 - rank} for rank, pid in enumerate(ids)]


def test_reciprocal_rank_fusion_arithmetic():
    fused = fuse(_hits("a", "b", "c"), _hits("c", "d"), k=4, rrf_k=60, dense_weight=0.5)
    assert [hit["id"] for hit in fused] == ["c", "a", "b", "d"]  # b and d tie at 0.5/62: b has a dense rank
    scores = {hit["id"]: hit["score"] for hit in fused}
    assert scores["c"] == pytest.approx(0.5 / 63 + 0.5 / 61)
    assert scores["a"] == pytest.approx(0.5 / 61) and scores["b"] == scores["d"] == pytest.approx(0.5 / 62)
    weighted = fuse(_hits("a", "b"), _hits("b", "a"), k=2, rrf_k=1, dense_weight=0.8)
    assert [hit["id"] for hit in weighted] == ["a", "b"]  # 0.8/2 + 0.2/3 > 0.8/3 + 0.2/2
    assert weighted[0]["score"] == pytest.approx(0.8 / 2 + 0.2 / 3)
    assert [hit["id"] for hit in fuse([], _hits("x", "y"), k=1)] == ["x"]  # one ranking alone keeps its order
    assert fuse(_hits("a"), [], k=5)[0]["title"] == ""  # a fused hit keeps its fields


def test_questions_reach_tantivy_as_plain_words():
    assert query_text('What does "AND" do in field:title (SQL)?') == "what does and do in field title sql"
    assert query_text("?!") == ""


def _table(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table({"id": [r[0] for r in rows], "title": [r[1] for r in rows], "text": [r[2] for r in rows]})


def _store(*segments: list[tuple[str, str, str]], dead: tuple[str, ...] = ()) -> Docstore:
    """The docstores of segments 1, 2, ... holding `segments`' rows, the first rows of ids in `dead` tombstoned."""
    store = Docstore({})
    for seq, rows in enumerate(segments, start=1):
        table = _table(rows)
        store.texts[seq], store.keys[seq] = table, keys_of(table.column("id").to_pylist())
    store.dead = np.sort(
        [int(faiss_ids(1, 0, len(segments[0]))[[r[0] for r in segments[0]].index(pid)]) for pid in dead]
    ).astype(np.int64)
    return store


def _digests(files: dict[str, str]) -> dict[str, str]:
    return {name: hashlib.sha256(open(path, "rb").read()).hexdigest() for name, path in files.items()}


def test_a_delta_deletes_replaced_and_removed_passages_and_adds_a_segment(tmp_path):
    rows = [(str(i), f"Title {i}", f"rivers and mountains number{i}") for i in range(50)]
    rows[7] = ("7", "Title 7", "the zeppelin hangar")
    first = LexicalWriter(str(tmp_path / "v1"))
    first.add(_table(rows))
    v1 = first.close()
    index = LexicalIndex("v1", tantivy.Index.open(str(tmp_path / "v1")), _store(rows))
    [[top]] = index.search(["Zeppelin hangars?"], 1)  # stemmed: hangars → hangar
    assert top["id"] == "7" and top["title"] == "Title 7" and top["text"] == "the zeppelin hangar" and top["score"] > 0
    assert top["key"] == int(faiss_ids(1, 7, 1)[0])  # the FAISS id of the passage's docstore row

    delta = LexicalWriter(str(tmp_path / "v2"), base=v1)
    delta.delete(keys_of(["7", "8"]))  # 7 replaced below, 8 removed
    delta.add(_table([("7", "Title 7", "an airship mooring mast"), ("60", "Title 60", "a zeppelin museum")]))
    v2 = delta.close()
    assert {n: d for n, d in _digests(v2).items() if n in v1 and n != "meta.json" and not n.startswith(".")} == {
        n: d for n, d in _digests(v1).items() if n != "meta.json" and not n.startswith(".")
    }  # the first segment's files are kept as they were: a night uploads only its new files and meta.json
    assert len(v2) > len(v1)
    added = [("7", "Title 7", "an airship mooring mast"), ("60", "Title 60", "a zeppelin museum")]
    index = LexicalIndex("v2", tantivy.Index.open(str(tmp_path / "v2")), _store(rows, added, dead=("7", "8")))
    assert [hit["id"] for hit in index.search(["zeppelin"], 5)[0]] == ["60"]  # the old text of 7 is gone
    [[airship]] = index.search(["airship mast"], 1)
    assert airship["id"] == "7" and airship["text"] == "an airship mooring mast"  # the new row, not the tombstoned
    assert "8" not in {hit["id"] for hit in index.search(["rivers mountains number8"], 50)[0]}
    assert index.index.searcher().num_docs == 50  # 50 - 2 deleted + 2 added
    assert not any(name.endswith(".lock") for name in v2) and os.path.exists(v2["meta.json"])


def test_the_index_holds_no_text(tmp_path):
    """Only the key and the BM25 body: the stored-field files are tiny, and no passage's text is a term."""
    text = "zyxwvut " * 40
    writer = LexicalWriter(str(tmp_path / "v1"))
    writer.add(_table([(str(i), "Title", f"{text} {i}") for i in range(200)]))
    files = writer.close()
    stored = sum(os.path.getsize(p) for name, p in files.items() if name.endswith(".store"))
    assert stored < 200 * 8  # a stored text would be ~330 bytes a passage before compression
    for path in files.values():
        assert b"zyxwvut zyxwvut" not in open(path, "rb").read()  # no field indexes the raw text
    index = tantivy.Index.open(str(tmp_path / "v1"))
    assert index.searcher().num_docs == 200


def test_a_bm25_key_without_a_live_docstore_row_is_an_error(tmp_path):
    writer = LexicalWriter(str(tmp_path / "v1"))
    writer.add(_table([("1", "t", "orchard apples"), ("2", "t", "orchard pears")]))
    writer.close()
    index = LexicalIndex("v1", tantivy.Index.open(str(tmp_path / "v1")), _store([("1", "t", "orchard apples")]))
    with pytest.raises(PipelineError, match="no live docstore row"):
        index.search(["orchard"], 2)


def test_an_index_of_the_format_before_still_searches(tmp_path):
    """lexical_format 1: id, title and text stored in tantivy, no docstore needed."""
    format1_bm25(tmp_path / "old", [("a", "Rivers", "the longest river"), ("b", "Hills", "a green hill")])
    index = tantivy.Index.open(str(tmp_path / "old"))
    [[hit]] = LexicalIndex("old", index).search(["rivers"], 1)
    assert hit == {"id": "a", "title": "Rivers", "text": "the longest river", "score": pytest.approx(hit["score"])}
