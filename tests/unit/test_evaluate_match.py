"""Evaluation without I/O: DPR's answer matching, question files and top-k accuracy."""

import pytest

from kit.jobs import REPO
from pipeline.errors import InputError
from pipeline.ops.evaluate import dpr_words, has_answer, parse_jsonl, parse_qa_csv, top_k_accuracy


@pytest.mark.parametrize(
    ("answers", "text", "match", "expected"),
    [
        (["Paris"], "The capital is PARIS.", "string", True),  # case
        (["the Beatles"], "songs by The Beatles", "string", True),
        (["the Beatles"], "songs by Beatles", "string", False),  # DPR keeps articles in retrieval matching
        (["U.S."], "the U.S. army", "string", True),  # punctuation: one token per mark
        (["US"], "the U.S. army", "string", False),
        (["cat"], "concatenate the files", "string", False),  # whole tokens only
        (["17"], "passage 170", "string", False),
        (["New York"], "new\nyork city", "string", True),  # whitespace between tokens is not compared
        (["Café"], "Cafe\u0301 society", "string", True),  # unicode: NFD on both sides
        (["naïve"], "a naive guess", "string", False),  # accents are not stripped
        (["nope", "1954"], "born in 1954,", "string", True),  # any of the answers
        (["19[0-9]{2}"], "Born in 1954.", "regex", True),
        (["^born"], "Born in 1954.", "regex", True),  # case-insensitive
        (["(unclosed"], "(unclosed", "regex", False),  # an invalid pattern matches nothing, as in DPR
        (["paris"], "Parisian", "regex", True),  # regex matches inside tokens
    ],
)
def test_has_answer_as_dpr(answers, text, match, expected):
    assert has_answer(answers, text, match) is expected


def test_dpr_tokenizer_splits_like_simple_tokenizer():
    assert dpr_words("Hello, World's 2nd-best (U.S.) café!") == [
        "hello",
        ",",
        "world",
        "'",
        "s",
        "2nd",
        "-",
        "best",
        "(",
        "u",
        ".",
        "s",
        ".",
        ")",
        "cafe\u0301",
        "!",
    ]


def test_qa_csv_parser_handles_tricky_answer_lists():
    text = (
        "who said \"hi\"?\t['it\\'s', 'say \"hi\"', 'a, b']\r\n"
        "\n"
        "größte stadt\t[\"Köln\", 'München']\n"
        "year\t['19[0-9]{2}']\n"
    )
    questions = parse_qa_csv(text, "q.csv")
    assert [q.question for q in questions] == ['who said "hi"?', "größte stadt", "year"]
    assert questions[0].answers == ["it's", 'say "hi"', "a, b"]
    assert questions[1].answers == ["Köln", "München"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("no tab here", "expected question<TAB>"),
        ("q\t__import__('os').system('true')", "not a Python list literal"),
        ("q\t['unterminated", "not a Python list literal"),
        ("q\t'just a string'", "non-empty list of strings"),
        ("q\t[1, 2]", "non-empty list of strings"),
        ("q\t[]", "non-empty list of strings"),
        ("q\t['  ']", "an answer is empty"),
        ("\t['a']", "question is missing"),
    ],
)
def test_malformed_qa_lines_name_the_line(line, problem):
    with pytest.raises(InputError, match=rf"q\.csv, line 2: .*{problem}"):
        parse_qa_csv("fine\t['x']\n" + line + "\n", "q.csv")


def test_jsonl_questions_and_their_errors():
    questions = parse_jsonl(
        '{"question": "q1", "answers": ["a"]}\n\n{"question": "q2", "answers": ["b", "c"]}\n', "q.jsonl"
    )
    assert [(q.question, q.answers) for q in questions] == [("q1", ["a"]), ("q2", ["b", "c"])]
    with pytest.raises(InputError, match=r"q\.jsonl, line 1: not JSON"):
        parse_jsonl("{oops\n", "q.jsonl")
    with pytest.raises(InputError, match=r"q\.jsonl, line 1: answers must"):
        parse_jsonl('{"question": "q", "answers": "a"}\n', "q.jsonl")


def test_top_k_accuracy_counts_the_first_hit():
    hits = [[False, True, False], [False, False, False], [True, False, True], [False, False, True]]
    assert top_k_accuracy(hits, [1, 2, 3]) == {1: 0.25, 2: 0.5, 3: 0.75}


def test_demo_questions_parse_and_each_answer_is_in_the_demo_corpus():
    from pipeline.ingest.demo_corpus import passages

    questions = parse_qa_csv((REPO / "configs" / "demo-questions.qa.csv").read_text(), "demo-questions.qa.csv")
    texts = [text for _, text, _ in passages()]
    assert len(questions) >= 20
    for question in questions:
        found = sum(has_answer(question.answers, text) for text in texts)
        assert 1 <= found <= 30, (question, found)  # present, and specific enough to mean something
