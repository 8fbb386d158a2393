"""The DPR reader's answer spans, chosen with tensor operations instead of `DPRReaderTokenizer.decode_best_spans`.

Why: `decode_best_spans` (transformers 5.x) walks every start and every length up to `max_answer_length` of every
passage it visits in Python, on 0-d tensors, then sorts the Python list: tens of milliseconds of host time per
question at 100 passages of 256 tokens, which a GPU reader's batch then waits on. Here the candidate scores of all
passages come from one broadcast add over a `[P, T, L]` band; each passage that is needed (in relevance order, until
`num_spans` spans are gathered) gets one stable sort, and only the greedy nested-span filter runs in Python, over the
few best candidates.

Equality with `decode_best_spans` is the contract (tests/unit/test_spans.py checks it), quirks included:

* a passage's span region starts after the first `[SEP]` at position >= 2 (the `[SEP]` after the question when the
  question is not empty: title tokens are candidates too) and ends before the first pad token when the row's last
  id is the pad id (else at the row's end);
* ties keep Python's stable `sorted(..., reverse=True)` order: passages in their original order, spans by start, then
  by length;
* a candidate nested in, or containing, a span already chosen in its passage is dropped (partial overlaps are kept);
  at most `num_spans_per_passage` spans a passage; passages are visited until `num_spans` spans are gathered and the
  result is cut to `num_spans`;
* scores are added in the logits' dtype, as there (NaN logits are not supported: Python's sort has no order for them).

Also `assemble`: the reader's `[CLS] question [SEP] title [SEP] text` batch from token ids computed ahead of time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

_CHUNK = 64  # sorted candidates moved to Python at a time: the greedy filter rarely needs more


@dataclass(frozen=True)
class Span:
    passage: int  # row in the batch of the request's passages (DPR's doc_id)
    start: int  # token positions in that row's input ids (inclusive)
    end: int
    score: float  # start + end logit
    relevance: float  # the passage's relevance logit


def _regions(input_ids: torch.Tensor, *, sep_token_id: int, pad_token_id: int) -> tuple[list[int], list[int]]:
    """Each row's span region [offset, length): after the first [SEP] at position >= 2 (offset -1 where there is
    none), before the padding when the row ends in it."""
    rows, width = input_ids.shape
    seps = input_ids[:, 2:] == sep_token_id
    offsets = torch.where(seps.any(dim=1), seps.int().argmax(dim=1) + 3, -1)
    padded = input_ids[:, -1] == pad_token_id
    first_pad = (input_ids == pad_token_id).int().argmax(dim=1)
    lengths = torch.where(padded, first_pad, width)
    return offsets.tolist(), lengths.tolist()


def _sorted_candidates(scores: torch.Tensor, valid: torch.Tensor) -> Iterator[tuple[int, float]]:
    """One passage's valid candidates (flat band index, score), best first; ties by index, as Python's sort."""
    index = valid.nonzero().squeeze(1)
    values, order = torch.sort(scores[index], descending=True, stable=True)
    for idx_chunk, val_chunk in zip(index[order].split(_CHUNK), values.split(_CHUNK)):
        yield from zip(idx_chunk.tolist(), val_chunk.tolist())


def best_spans(
    input_ids: torch.Tensor,
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    relevance_logits: torch.Tensor,
    *,
    sep_token_id: int,
    pad_token_id: int,
    num_spans: int,
    max_answer_length: int,
    num_spans_per_passage: int = 4,
) -> list[Span]:
    """The spans decode_best_spans chooses for one request's passages ([P, T] ids and logits, [P] relevance)."""
    input_ids = torch.as_tensor(input_ids).detach().cpu()
    start = torch.as_tensor(start_logits).detach().cpu()
    end = torch.as_tensor(end_logits).detach().cpu()
    relevance = torch.as_tensor(relevance_logits).detach().cpu().tolist()
    rows, width = input_ids.shape
    span_len = max_answer_length
    if rows == 0 or width == 0:
        return []
    offsets, lengths = _regions(input_ids, sep_token_id=sep_token_id, pad_token_id=pad_token_id)
    if span_len > 0:  # band[p, i, l] = start[p, i] + end[p, i + l]: the span (i, i + l); flat i * L + l: Python's order
        band = (start.unsqueeze(2) + torch.nn.functional.pad(end, (0, span_len - 1)).unfold(1, span_len, 1)).flatten(1)
    begins = torch.arange(width).unsqueeze(1)  # [T, 1]
    finals = begins + torch.arange(max(span_len, 0))  # [T, L]: the span's end position

    spans: list[Span] = []
    for p in sorted(range(rows), reverse=True, key=relevance.__getitem__):
        if offsets[p] < 0:
            raise ValueError(f"passage {p} has no [SEP] ({sep_token_id}) at position >= 2")
        valid = (begins >= offsets[p]) & (finals < lengths[p])
        chosen: list[tuple[int, int]] = []
        for flat, score in _sorted_candidates(band[p], valid.flatten()) if span_len > 0 else ():
            s, e = divmod(flat, span_len)
            e += s
            if any(s <= ps <= pe <= e or ps <= s <= e <= pe for ps, pe in chosen):
                continue
            chosen.append((s, e))
            spans.append(Span(passage=p, start=s, end=e, score=score, relevance=relevance[p]))
            if len(chosen) == num_spans_per_passage:
                break
        if len(spans) >= num_spans:
            break
    return spans[:num_spans]


def assemble(
    question_ids: Sequence[int],
    titles: Sequence[np.ndarray],
    texts: Sequence[np.ndarray],
    *,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    max_length: int,
) -> np.ndarray:
    """[P, longest] int64 ids of `[CLS] question [SEP] title [SEP] text`, each truncated to max_length and padded with
    pad_id to the longest row: what DPRReaderTokenizer(questions=..., titles=..., texts=..., truncation=True,
    max_length=..., padding='longest') gives. Ids are without special tokens (`add_special_tokens=False`); an empty
    title still gets its `[SEP]`, as the tokenizer's batch pair encoding gives it. A question is cut to half of
    max_length, so that a long one leaves its passages room (the tokenizer would cut them away whole, and with them
    every span)."""
    if len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles but {len(texts)} texts")
    head = np.asarray([cls_id, *question_ids[: max_length // 2], sep_id], dtype=np.int64)
    rows = [
        np.concatenate([head, np.asarray(title, dtype=np.int64), [sep_id], np.asarray(text, dtype=np.int64)])[
            :max_length
        ]
        for title, text in zip(titles, texts)
    ]
    out = np.full((len(rows), max((len(row) for row in rows), default=0)), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
