"""The reader fed token ids: the ids a build stores give the answers that tokenizing the passages gives, ids of
another tokenizer are not used, passages without ids (a version built before) are tokenized, and any question text,
however long, is read beside others without changing their answers."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings

from kit.models import tiny_dpr
from kit.questions import questions
from pipeline.models.reader import SpanReader
from pipeline.models.tokens import ReaderTokenizer
from pipeline.store.docstore import list_values

QUESTION = "which river flows past the old castle"
PASSAGES = [
    {"title": f"Title {i}", "text": f"the river number {i} flows past the old castle and the mill " * (1 + i % 3)}
    for i in range(12)
]


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    path = tiny_dpr(tmp_path_factory.mktemp("reader"), ("reader",))["reader"]
    return SpanReader(path, max_length=48, max_answer_tokens=5, device="cpu"), ReaderTokenizer(path)


def _with_ids(tokenizer: ReaderTokenizer, passages: list[dict]) -> list[dict]:
    table = tokenizer.table(pa.table({"title": [p["title"] for p in passages], "text": [p["text"] for p in passages]}))
    titles, texts = list_values(table["title_ids"]), list_values(table["text_ids"])
    return [{**p, "title_ids": t, "text_ids": x} for p, t, x in zip(passages, titles, texts)]


def test_stored_ids_give_the_answers_tokenizing_gives(reader):
    span_reader, tokenizer = reader
    assert tokenizer.fingerprint == span_reader.fingerprint  # the build's tokenizer is the reader's
    plain = [{"question": QUESTION, "passages": PASSAGES, "top_answers": 3}, {**_ask(PASSAGES[:5]), "top_answers": 1}]
    with_ids = _with_ids(tokenizer, PASSAGES)
    fed = [
        {"question": QUESTION, "passages": with_ids, "top_answers": 3, "tokenizer": tokenizer.fingerprint},
        {**_ask(with_ids[:5]), "top_answers": 1, "tokenizer": tokenizer.fingerprint},
    ]
    answers = span_reader.read(plain)
    assert span_reader.read(fed) == answers and len(answers[0]) == 3 and len(answers[1]) == 1
    mixed = [dict(p) if i % 2 else {"title": p["title"], "text": p["text"]} for i, p in enumerate(with_ids)]
    assert span_reader.read([{**fed[0], "passages": mixed}]) == answers[:1]  # some without ids: tokenized
    assert set(span_reader.seconds) == {"assemble", "forward", "spans"}


def test_ids_of_another_tokenizer_are_not_used(reader):
    span_reader, _ = reader
    garbage = [
        {**p, "title_ids": np.array([7], np.uint16), "text_ids": np.array([7] * 30, np.uint16)} for p in PASSAGES
    ]
    answers = span_reader.read([{"question": QUESTION, "passages": PASSAGES, "top_answers": 2}])
    other = span_reader.read([{"question": QUESTION, "passages": garbage, "top_answers": 2, "tokenizer": "other"}])
    assert other == answers
    used = span_reader.read(
        [{"question": QUESTION, "passages": garbage, "top_answers": 2, "tokenizer": span_reader.fingerprint}]
    )
    assert used != answers  # the test can tell: ids of the right fingerprint are what the reader reads


def _ask(passages: list[dict]) -> dict:
    return {"question": "where is the mill", "passages": passages}


def test_a_question_longer_than_the_window_leaves_its_passages_room(reader):
    span_reader, _ = reader
    [answers] = span_reader.read([{"question": "castle " * 200, "passages": PASSAGES[:3], "top_answers": 2}])
    assert len(answers) == 2
    for answer in answers:  # spans after the question's half of the 48-token window
        assert 24 < answer["start"] <= answer["end"] < 48 and answer["text"]


def _spans(answers: list[dict]) -> list[tuple]:
    return [(a["passage"], a["start"], a["end"], a["text"]) for a in answers]


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(question=questions(400))
def test_any_question_reads_and_leaves_the_others_in_its_batch_as_they_were(reader, question):
    span_reader, _ = reader
    ordinary = {"question": QUESTION, "passages": PASSAGES[:4], "top_answers": 2}
    [alone] = span_reader.read([ordinary])
    odd, beside = span_reader.read([{"question": question, "passages": PASSAGES[4:8], "top_answers": 3}, ordinary])
    assert len(odd) == 3 and all(0 <= a["start"] <= a["end"] < 48 for a in odd)
    assert _spans(beside) == _spans(alone)
    assert [a["score"] for a in beside] == pytest.approx([a["score"] for a in alone], abs=1e-4)


def test_token_ids_of_a_shard_tokenized_in_chunks_are_those_of_one_call(reader, monkeypatch):
    import pipeline.models.tokens

    _, tokenizer = reader
    table = pa.table({"title": [p["title"] for p in PASSAGES], "text": [p["text"] for p in PASSAGES]})
    whole = tokenizer.table(table)
    monkeypatch.setattr(pipeline.models.tokens, "CHUNK", 5)  # 12 rows: chunks of 5, 5 and 2
    assert tokenizer.table(table).equals(whole) and whole.num_rows == 12
    assert tokenizer.table(table.slice(0, 0)).num_rows == 0
