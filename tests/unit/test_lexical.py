"""The BM25 index and hybrid fusion: reciprocal-rank arithmetic on hand-made rankings, question sanitizing, and a
tantivy index extended by a delta the way a night extends it (deletes, then a new segment; the old files kept)."""

import hashlib
import os

import pyarrow as pa
import pytest
import tantivy

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


def _digests(files: dict[str, str]) -> dict[str, str]:
    return {name: hashlib.sha256(open(path, "rb").read()).hexdigest() for name, path in files.items()}


def test_a_delta_deletes_replaced_and_removed_passages_and_adds_a_segment(tmp_path):
    rows = [(str(i), f"Title {i}", f"rivers and mountains number{i}") for i in range(50)]
    rows[7] = ("7", "Title 7", "the zeppelin hangar")
    first = LexicalWriter(str(tmp_path / "v1"))
    first.add(_table(rows))
    v1 = first.close()
    index = LexicalIndex("v1", tantivy.Index.open(str(tmp_path / "v1")))
    [[top]] = index.search(["Zeppelin hangars?"], 1)  # stemmed: hangars → hangar
    assert top["id"] == "7" and top["title"] == "Title 7" and top["score"] > 0

    delta = LexicalWriter(str(tmp_path / "v2"), base=v1)
    delta.delete(keys_of(["7", "8"]))  # 7 replaced below, 8 removed
    delta.add(_table([("7", "Title 7", "an airship mooring mast"), ("60", "Title 60", "a zeppelin museum")]))
    v2 = delta.close()
    assert {n: d for n, d in _digests(v2).items() if n in v1 and n != "meta.json" and not n.startswith(".")} == {
        n: d for n, d in _digests(v1).items() if n != "meta.json" and not n.startswith(".")
    }  # the first segment's files are kept as they were: a night uploads only its new files and meta.json
    assert len(v2) > len(v1)
    index = LexicalIndex("v2", tantivy.Index.open(str(tmp_path / "v2")))
    assert [hit["id"] for hit in index.search(["zeppelin"], 5)[0]] == ["60"]  # the old text of 7 is gone
    assert index.search(["airship mast"], 1)[0][0]["id"] == "7"
    assert "8" not in {hit["id"] for hit in index.search(["rivers mountains number8"], 50)[0]}
    assert index.index.searcher().num_docs == 50  # 50 - 2 deleted + 2 added
    assert not any(name.endswith(".lock") for name in v2) and os.path.exists(v2["meta.json"])
