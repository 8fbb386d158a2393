"""Top-k accuracy of the published demo index: IVF-PQ, refined, BM25, hybrid and exact search, on the
demo's own questions, on paraphrased questions and on a larger question set cut from the corpus; prints one JSON
line.

    make demo && python -m benchmarks.quality [--questions 300] [--refine-k 400] [--nprobe 12] [--dense-weight 0.3]
        [--output DIR]

The paraphrased set (`benchmarks/assets/paraphrased-questions.qa.csv`, 84 questions): written by hand in words of
their own about the standard library the corpus documents, kept where the answer occurs in 1-40 passages.

The larger set: for passages of the demo corpus that name a rare identifier (a dotted or underscored name found
in at most 3 passages), the question is a partial sentence of the same passage that does not contain it (its
first words dropped, at most 14 kept), and the answer is the identifier: a span elsewhere in the passage, so the
question never contains its answer and is never the passage's text verbatim. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

from kit.jobs import REPO

IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9]*(?:[._][A-Za-z0-9_]+)+\b")
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def cut_questions(passages: list[tuple[str, str, str]], count: int, seed: int = 0) -> list[dict]:
    """(id, text, title) → [{question, answers}] as described above (pure)."""
    found = {pid: set(IDENTIFIER.findall(text)) for pid, text, _ in passages}
    spread = Counter(name for names in found.values() for name in names)
    questions = []
    for pid, text, _ in passages:
        rare = sorted(name for name in found[pid] if spread[name] <= 3 and len(name) >= 6)
        if not rare:
            continue
        answer = rare[0]
        sentences = [s for s in SENTENCE.split(text) if answer not in s and len(s.split()) >= 10]
        if not sentences:
            continue
        words = max(sentences, key=len).split()
        questions.append({"question": " ".join(words[3:17]), "answers": [answer]})
    random.Random(seed).shuffle(questions)
    return questions[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--refine-k", type=int, default=None, help="default: the index's own refine_k")
    parser.add_argument("--output", help="keep each set's evaluation (results, report, plot) in OUTPUT/<set>")
    parser.add_argument("--nprobe", type=int, default=None, help="default: the index's own nprobe")
    parser.add_argument("--dense-weight", type=float, default=None, help="default: the config's serve.dense_weight")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from pipeline.config import load_config
    from pipeline.ingest.demo_corpus import passages
    from pipeline.ops.evaluate import run_evaluate

    config = load_config(REPO / args.config)
    if args.dense_weight is not None:
        serve = config.serve.model_copy(update={"dense_weight": args.dense_weight})
        config = config.model_copy(update={"serve": serve})
    cut = cut_questions(list(passages()), args.questions)  # the corpus `make demo` indexed
    results = {}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        generated = Path(tmp) / "cut.jsonl"
        generated.write_text("".join(json.dumps(q) + "\n" for q in cut))
        sets = {
            "demo": str(REPO / config.evaluate.questions),
            "paraphrased": str(REPO / "benchmarks/assets/paraphrased-questions.qa.csv"),
            "cut": str(generated),
        }
        for name, questions in sets.items():
            evaluate = config.evaluate.model_copy(
                update={
                    "questions": questions,
                    "output": str(Path(args.output or tmp) / name),
                    "refine_k": args.refine_k,
                    "nprobe": args.nprobe,
                }
            )
            summary = run_evaluate(config.model_copy(update={"evaluate": evaluate}))
            methods = [m for m in ("ann", "refined", "sparse", "hybrid", "exact") if f"top1_{m}" in summary]
            results[name] = {
                "questions": summary["questions"],
                **{m: {k: summary[f"top{k}_{m}"] for k in config.evaluate.k} for m in methods},
                "refined_difference_points": summary.get("refined_difference_points"),
                "difference_points": summary["difference_points"],
            }
    line = {
        "benchmark": "quality",
        "index_version": summary["index_version"],
        "refine_k": summary.get("refine_k"),
        "nprobe": summary["nprobe"],
        "dense_weight": config.serve.dense_weight,
    }
    print(json.dumps({**line, **results}))


if __name__ == "__main__":
    main()
