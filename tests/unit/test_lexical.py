"""The BM25 index and hybrid fusion: reciprocal-rank arithmetic on hand-made rankings, questions made into queries
by the body's own analyzer (any text searches; answers as tantivy's parser gave them where it could parse), a
tantivy index extended by a delta the way a night extends it (deletes, then a new segment; the old files kept), its
hits read from the docstores by passage key, and an index of the format before (text stored) still searched."""

import csv
import hashlib
import json
import os
import re

import numpy as np
import pyarrow as pa
import pytest
import tantivy
from hypothesis import given

from kit.corpora import synthetic_rows
from kit.legacy import format1_bm25
from kit.questions import TRICKY, ascii_questions, questions
from pipeline.errors import PipelineError
from pipeline.ingest.demo_corpus import passages as demo_passages
from pipeline.store.docstore import Docstore, faiss_ids
from pipeline.store.keys import keys_of
from pipeline.store.lexical import ANALYZERS, LexicalIndex, LexicalWriter, body_analyzer, fuse, query_terms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def _indexed_terms(tokenizer: str, text: str) -> set[str]:
    """The terms tantivy itself indexes for a body of `tokenizer` holding `text`."""
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("body", tokenizer_name=tokenizer, index_option="freq")
    index = tantivy.Index(builder.build())
    writer = index.writer(heap_size=15_000_000, num_threads=1)
    writer.add_document(tantivy.Document(body=text))
    writer.commit()
    writer.wait_merging_threads()
    index.reload()
    return {term for term, _ in index.searcher().terms_with_prefix("body", "")}


@pytest.mark.parametrize("tokenizer", sorted(ANALYZERS))
@given(text=questions(300))
def test_a_question_meets_the_terms_tantivy_indexes_for_the_same_text(tokenizer, text):
    """The query analyzer is the body's: the same tokenizer and filters tantivy indexes it with, for any text."""
    assert set(ANALYZERS[tokenizer]().analyze(text)) == _indexed_terms(tokenizer, text)


def test_the_analyzer_is_the_one_the_schema_names(tmp_path):
    writer = LexicalWriter(str(tmp_path / "v1"))
    writer.add(_table([("1", "Running", "page_79.htm")]))
    writer.close()
    assert body_analyzer(str(tmp_path / "v1")).analyze("Running page_79.htm") == ["run", "page", "79", "htm"]
    meta = json.loads((tmp_path / "v1" / "meta.json").read_text())
    meta["schema"][1]["options"]["indexing"]["tokenizer"] = "whitespace"
    (tmp_path / "v1" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="tokenizer 'whitespace' has no query analyzer"):
        body_analyzer(str(tmp_path / "v1"))


def test_query_terms_keep_each_distinct_word_once():
    """As tantivy's parser counted them: 'the ... The' once, 'runs running' as two 'run' terms."""
    analyzer = ANALYZERS["en_stem"]()
    assert query_terms(analyzer, "The cat and THE cat") == ["the", "cat", "and"]
    assert query_terms(analyzer, "runs running") == ["run", "run"]
    assert query_terms(analyzer, 'What does "AND" do in field:title (SQL)?') == [
        *("what", "doe", "and", "do", "in", "field", "titl", "sql")
    ]
    assert query_terms(analyzer, "what is a_b") == ["what", "is", "a", "b"]
    assert query_terms(analyzer, "?! \u200b " + "x" * 41) == []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus (Python's docs: code, identifiers, URLs) and passages of the serve tests' vocabulary, with
    rows of tricky words, as a BM25 index with its docstores."""
    rows = [(pid, title, text) for pid, text, title in demo_passages()]
    rows += [(f"s{pid}", title, text) for pid, text, title in synthetic_rows(300, words=40)]
    rows += [(f"t{i}", "Tricky", f"{word} beside {TRICKY[i - 1]}") for i, word in enumerate(TRICKY, start=1)]
    directory = str(tmp_path_factory.mktemp("bm25") / "v1")
    writer = LexicalWriter(directory)
    writer.add(_table(rows))
    writer.close()
    return LexicalIndex.at("v1", directory, _store(rows)), rows


def _parsed(index: LexicalIndex, question: str, k: int) -> list[tuple[str, float]] | None:
    """What the release before answered: the question's lower-cased `\\w+` words through tantivy's query parser;
    None where that failed (a word the analyzer splits, `a_b`, made a phrase query, which needs positions)."""
    words = " ".join(re.findall(r"\w+", question.lower()))
    if not words:
        return []
    try:
        query = index.index.parse_query(words, ["body"])
    except ValueError:
        return None
    searcher = index.index.searcher()
    try:
        found = searcher.search(query, k, count=False).hits
    except ValueError:
        return None
    keys = np.array(searcher.fast_field_values("key", [a for _, a in found]), np.int64).view(np.uint64)
    hits = index.store.hits(index.store.by_key(keys), [score for score, _ in found])
    return sorted(((hit["id"], hit["score"]) for hit in hits), key=lambda hit: (-hit[1], hit[0]))


def _built(index: LexicalIndex, question: str, k: int) -> list[tuple[str, float]]:
    return [(hit["id"], hit["score"]) for hit in index.search([question], k)[0]]


DEMO_QUESTIONS = [
    row[0] for row in csv.reader(open(os.path.join(REPO, "configs/demo-questions.qa.csv")), delimiter="\t")
]
# The questions the sparse tests ask (here, test_serve, test_nightly, test_app_version, test_evaluate).
SPARSE_TESTS = ["Zeppelin hangars?", "airship mast", "rivers mountains number8", "orchard", "north", "castle road"]


def test_built_queries_answer_the_demo_and_sparse_test_questions_as_the_parser_did(corpus):
    index, _ = corpus
    for question in DEMO_QUESTIONS + SPARSE_TESTS:
        parsed = _parsed(index, question, 20)
        assert parsed is not None, question
        assert _built(index, question, 20) == parsed, question
    assert len(DEMO_QUESTIONS) == 25 and all(_built(index, q, 5) for q in DEMO_QUESTIONS)


@given(question=ascii_questions(["garden", "river", "castle", "list", "sort", "the", "Sort", "runs", "dict", "a"]))
def test_built_queries_answer_as_the_parser_did_wherever_it_could_parse(corpus, question):
    index, _ = corpus
    parsed = _parsed(index, question, 10)
    if parsed is not None:
        assert _built(index, question, 10) == parsed


@given(question=questions(2000, ordinary=["sort", "list", "castle", "garden"]))
def test_any_question_text_searches(corpus, question):
    """No text fails: each hit shares a term with the question, best first; no term, no hit."""
    index, rows = corpus
    terms = set(query_terms(index.analyzer, question))
    [hits] = index.search([question], 10)
    assert len(hits) <= 10 and (terms or not hits)
    assert hits == sorted(hits, key=lambda hit: (-hit["score"], hit["id"]))
    bodies = {pid: f"{title} {text}" for pid, title, text in rows}
    for hit in hits:
        assert terms & set(index.analyzer.analyze(bodies[hit["id"]])), (question, hit["id"])


def test_the_questions_of_the_issue_search_in_one_batch(corpus):
    index, _ = corpus
    asked = ["what is a_b", "see https://personal.math.ubc.ca/~cbm/aands/page_79.htm", "castle road", "?!", "東京都"]
    found = index.search(asked, 5)
    assert (
        found[0] and found[1] and found[2] and found[3] == [] and found[4][0]["id"] == f"t{TRICKY.index('東京都') + 1}"
    )
    assert found[2] == index.search(["castle road"], 5)[0]  # a question answers in a batch as alone


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
    index = LexicalIndex.at("v1", str(tmp_path / "v1"), _store(rows))
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
    index = LexicalIndex.at("v2", str(tmp_path / "v2"), _store(rows, added, dead=("7", "8")))
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
    index = LexicalIndex.at("v1", str(tmp_path / "v1"), _store([("1", "t", "orchard apples")]))
    with pytest.raises(PipelineError, match="no live docstore row"):
        index.search(["orchard"], 2)


def test_an_index_of_the_format_before_still_searches(tmp_path):
    """lexical_format 1: id, title and text stored in tantivy, no docstore needed."""
    format1_bm25(tmp_path / "old", [("a", "Rivers", "the longest river"), ("b", "Hills", "a green hill")])
    [[hit]] = LexicalIndex.at("old", str(tmp_path / "old")).search(["rivers"], 1)
    assert hit == {"id": "a", "title": "Rivers", "text": "the longest river", "score": pytest.approx(hit["score"])}
