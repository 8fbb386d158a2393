"""The reader's host time per question, split into assemble (tokenize or look up ids, build the batch), forward and
spans, before and after token ids were stored by the build; prints one JSON line.

    python -m benchmarks.reader [--passages 10,100] [--questions 40]

A tiny DPR reader on CPU, so the forward is small and the host's share shows. "before" is the reader as it was:
the tokenizer over every passage of every question (`padding="max_length"`, cut to the longest row) and
`decode_best_spans`'s Python loops. "after" is `pipeline.models.reader.SpanReader` fed the ids a build stores (computed
here once, as the build does) and choosing spans with tensor operations. Both read real 100-word passages at
`max_length` 256 and return the same spans (checked). Goal: assemble + spans <= 5 ms a question at 100 passages.
`benchmarks/gpu.py` runs the same measurement with BERT-base on a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch

from pipeline.ingest.demo_corpus import real_passages, word_questions
from pipeline.models.reader import SpanReader


def requests_for(span_reader: SpanReader, count: int, passages: int) -> tuple[list[dict], list[dict]]:
    """Questions with `passages` passages each: as text only, and with the token ids a build stores."""
    titles, texts = real_passages(passages)
    tok = span_reader.tokenizer
    title_ids, text_ids = (
        [np.asarray(ids, np.uint16) for ids in tok(column, add_special_tokens=False)["input_ids"]]
        for column in (titles, texts)
    )
    plain = [{"title": t, "text": x} for t, x in zip(titles, texts)]
    with_ids = [{**p, "title_ids": a, "text_ids": b} for p, a, b in zip(plain, title_ids, text_ids)]
    asked = word_questions(count, seed=5)
    return (
        [{"question": q, "passages": plain, "top_answers": 3} for q in asked],
        [{"question": q, "passages": with_ids, "top_answers": 3, "tokenizer": span_reader.fingerprint} for q in asked],
    )


def read_before(span_reader: SpanReader, request: dict[str, Any], seconds: dict[str, float]) -> list[tuple]:
    """The reader before token ids: tokenize every passage per question, `decode_best_spans`."""
    tok, passages = span_reader.tokenizer, request["passages"]
    started = time.perf_counter()
    inputs = tok(
        questions=[request["question"]] * len(passages),
        titles=[p["title"] for p in passages],
        texts=[p["text"] for p in passages],
        padding="max_length",
        truncation=True,
        max_length=span_reader.max_length,
        return_tensors="pt",
    )
    longest = int(inputs["attention_mask"].sum(dim=1).max())
    inputs = {key: inputs[key][:, :longest] for key in ("input_ids", "attention_mask")}
    seconds["assemble"] += time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        output = span_reader.model(**{key: value.to(span_reader.device) for key, value in inputs.items()})
    output = type(output)(**{name: getattr(output, name).float().cpu() for name in output.keys()})
    if span_reader.device.type == "cuda":
        torch.cuda.synchronize()
    seconds["forward"] += time.perf_counter() - started
    started = time.perf_counter()
    spans = tok.decode_best_spans(
        inputs, output, num_spans=request["top_answers"], max_answer_length=span_reader.max_answer_tokens
    )
    seconds["spans"] += time.perf_counter() - started
    return [(s.doc_id, s.start_index, s.end_index) for s in spans]


def measure(span_reader: SpanReader, passages: int, count: int) -> dict[str, Any]:
    """Milliseconds a question by phase, before and after, one question per call (a lone client's)."""
    plain, fed = requests_for(span_reader, count, passages)
    before: dict[str, float] = dict.fromkeys(("assemble", "forward", "spans"), 0.0)
    read_before(span_reader, plain[0], dict(before))  # warm-up
    spans_before = [read_before(span_reader, request, before) for request in plain]
    span_reader.read(fed[:1])
    span_reader.seconds.clear()
    spans_after = [[(a["passage"], a["start"], a["end"]) for a in span_reader.read([r])[0]] for r in fed]
    if spans_after != spans_before:
        raise AssertionError("the reader fed ids chose other spans than decode_best_spans")
    after = dict(span_reader.seconds)

    def per_question(seconds: dict[str, float]) -> dict[str, float]:
        ms = {phase: round(1000 * value / count, 2) for phase, value in seconds.items()}
        return {**ms, "host": round(ms["assemble"] + ms["spans"], 2)}

    return {"before_ms": per_question(before), "after_ms": per_question(after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", default="10,100")
    parser.add_argument("--questions", type=int, default=40)
    args = parser.parse_args()
    from kit.models import tiny_dpr

    torch.set_num_threads(1)  # one core: a Serve reader replica's CPU share
    with tempfile.TemporaryDirectory(prefix="reader-bench-") as tmp:
        path = tiny_dpr(tmp, ("reader",))["reader"]
        span_reader = SpanReader(path, max_length=256, max_answer_tokens=10, device="cpu")
        sizes = [int(p) for p in args.passages.split(",")]
        results = {str(p): measure(span_reader, p, args.questions) for p in sizes}
    print(
        json.dumps({"benchmark": "reader", "device": "cpu", "model": "tiny-dpr-reader", "max_length": 256, **results})
    )


if __name__ == "__main__":
    main()
