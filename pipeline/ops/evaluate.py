"""Evaluation in DPR's formats: top-k retrieval accuracy of a published index, and of exact search over the same
embeddings, on DPR's question files; DPR's retriever-results JSON, a report and a plot.

Questions: DPR's `*.qa.csv` (question<TAB>Python-literal list of answers, no header; parsed with
`ast.literal_eval`, never `eval`) or JSONL `{"question", "answers"}`. A retrieved passage "has the answer" exactly as
DPR's `has_answer` decides: NFD-normalized text, DPR's SimpleTokenizer (runs of letters/digits/marks, or single
other non-space characters), lower-cased token sequences (`match: string`); or a case-insensitive regex search
(`match: regex`, CuratedTREC). As in DPR, only the passage text is searched, not its title.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import posixpath
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import regex
from faiss.contrib.exhaustive_search import knn_ground_truth
from tqdm import tqdm

from pipeline.config import PipelineConfig
from pipeline.errors import InputError, PipelineError
from pipeline.models.text_encoder import TextEncoder, question_settings
from pipeline.store.layout import published_version
from pipeline.store.lexical import fuse, load_lexical
from pipeline.store.published import load_published
from pipeline.store.snapshots import LiveEmbeddings, embedding_chain
from pipeline.store.storage import Storage, resolve

log = logging.getLogger(__name__)


# -- questions ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]


def parse_qa_csv(text: str, source: str) -> list[Question]:
    """DPR's `question<TAB>['answer', ...]` lines; a malformed line is an error naming it."""
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        question, tab, literal = line.rstrip("\r").partition("\t")
        if not tab:
            raise InputError(source, number, "expected question<TAB>['answer', ...]")
        try:
            answers = ast.literal_eval(literal.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise InputError(source, number, f"answers are not a Python list literal: {literal[:80]!r}") from None
        questions.append(_question(question, answers, source, number))
    return questions


def parse_jsonl(text: str, source: str) -> list[Question]:
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InputError(source, number, f"not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise InputError(source, number, "expected an object {question, answers}")
        questions.append(_question(record.get("question"), record.get("answers"), source, number))
    return questions


def _question(question: Any, answers: Any, source: str, number: int) -> Question:
    if not isinstance(question, str) or not question.strip():
        raise InputError(source, number, "question is missing or empty")
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(source, number, "answers must be a non-empty list of strings")
    if not all(a.strip() for a in answers):  # DPR would count an empty answer as found in every passage
        raise InputError(source, number, "an answer is empty")
    return Question(question.strip(), list(answers))


def read_questions(url: str, options: dict[str, Any]) -> list[Question]:
    fs, path = resolve(url, options)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise InputError(url, None, "question file not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(url, None, f"not UTF-8 ({exc})") from None
    name = path.lower()
    questions = parse_jsonl(text, url) if name.endswith((".jsonl", ".json")) else parse_qa_csv(text, url)
    if not questions:
        raise InputError(url, None, "no questions")
    return questions


# -- answer matching (DPR's qa_validation.has_answer) ------------------------------------------------------------------
_TOKEN = regex.compile(
    r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
)


def dpr_words(text: str) -> list[str]:
    """DPR's SimpleTokenizer(...).words(uncased=True) on NFD-normalized text."""
    return [match.group().lower() for match in _TOKEN.finditer(unicodedata.normalize("NFD", text))]


def has_answer(answers: list[str], text: str, match: str = "string") -> bool:
    if match == "regex":
        normalized = unicodedata.normalize("NFD", text)
        for pattern in answers:
            try:
                compiled = regex.compile(
                    unicodedata.normalize("NFD", pattern), flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
                )
            except regex.error:
                continue  # as DPR: an invalid pattern matches nothing
            if compiled.search(normalized) is not None:
                return True
        return False
    words = dpr_words(text)
    for answer in answers:
        wanted = dpr_words(answer)
        if wanted and any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1)):
            return True
    return False


def top_k_accuracy(hits: list[list[bool]], ks: list[int]) -> dict[int, float]:
    """Fraction of questions with an answer-bearing passage within the first k (DPR's top-k hits / questions)."""
    first = [next((rank for rank, hit in enumerate(row) if hit), None) for row in hits]
    return {k: sum(1 for f in first if f is not None and f < k) / max(1, len(hits)) for k in ks}


# -- retrieval ------------------------------------------------------------------------------------------------------
def exact_search(live: LiveEmbeddings, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k over every live embedding of the chain (streamed); hits numbered by live position."""
    blocks = (vectors for _, _, vectors in tqdm(live, total=len(live.shards), desc="exact", unit=" shards"))
    scores, rows = knn_ground_truth(queries, blocks, k, faiss.METRIC_INNER_PRODUCT)
    return scores, np.where(np.isfinite(scores), rows, -1)  # fewer than k passages: no result, not a position


def exact_passages(live: LiveEmbeddings, positions: np.ndarray) -> pa.Table:
    """The passages at live positions (as `exact_search` numbers them), in the order given."""
    wanted = np.asarray(positions, dtype=np.int64)
    parts, where, offset = [], [], 0
    for shard in range(len(live.shards)):
        _, _, alive = live.read(shard)
        count = int(alive.sum())
        inside = np.nonzero((wanted >= offset) & (wanted < offset + count))[0]
        if len(inside):
            passages = live.passages(shard).filter(pa.array(alive)).select(["id", "title", "text"])
            parts.append(passages.take(pa.array(wanted[inside] - offset)))
            where.append(inside)
        offset += count
    if not parts:
        return pa.table({"id": [], "title": [], "text": []})
    return pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(where), kind="stable")))


def ranked(scores: np.ndarray, rows: np.ndarray, passages: pa.Table) -> list[list[dict[str, Any]]]:
    """Per question, its found passages best first ({id, title, text, score}); `passages` holds the passage of
    each found row (rows >= 0, in order)."""
    ids, titles, texts = (passages.column(c).to_pylist() for c in ("id", "title", "text"))
    hits, position = [], 0
    for row_scores, row in zip(scores, rows):
        found = []
        for score, r in zip(row_scores, row):
            if r >= 0:
                found.append({"id": ids[position], "title": titles[position], "text": texts[position], "score": score})
                position += 1
        hits.append(found)
    return hits


def dpr_results(questions: list[Question], hits: list[list[dict[str, Any]]], match: str) -> list[dict[str, Any]]:
    """DPR's retriever-results JSON records, best first (scores as strings, as DPR writes them)."""
    return [
        {
            "question": question.question,
            "answers": question.answers,
            "ctxs": [
                {
                    "id": hit["id"],
                    "title": hit["title"],
                    "text": hit["text"],
                    "score": str(float(hit["score"])),
                    "has_answer": has_answer(question.answers, hit["text"], match),
                }
                for hit in found
            ],
        }
        for question, found in zip(questions, hits)
    ]


def plot_accuracy(curves: dict[str, list[float]], ks: list[int], title: str) -> bytes:
    """PNG of top-k accuracy against k, one line per retrieval method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for label, values in curves.items():
        axes.plot(ks, [100 * v for v in values], marker="o", label=label)
    axes.set_xscale("log")
    axes.set_xlabel("k (passages retrieved)")
    axes.set_ylabel("top-k accuracy (%)")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def run_evaluate(config: PipelineConfig) -> dict[str, Any]:
    ev = config.evaluate
    if not ev.questions:
        raise PipelineError("evaluate.questions is not set: give a DPR .qa.csv or a JSONL question file")
    storage = Storage(config.storage.root, config.storage.options)
    questions = read_questions(ev.questions, config.storage.options)
    version = published_version(storage, ev.index_version)
    ks = sorted(set(ev.k))
    depth = max(ks)
    index = load_published(storage, version, ev.cache_dir, nprobe=ev.nprobe)
    settings = question_settings(index.manifest, config.serve.question_model, config.serve.question_pooling)
    log.info(
        "evaluating %d questions from %s on index %s (%d vectors)", len(questions), ev.questions, version, index.vectors
    )
    started = time.perf_counter()
    vectors = TextEncoder(settings).encode(None, [q.question for q in questions])
    ann_scores, ann_rows = index.search(vectors, depth)
    ann_seconds = time.perf_counter() - started
    refine_k = index.manifest.refine_k if ev.refine_k is None else ev.refine_k
    searched = {"ann": (ann_scores, ann_rows)}
    if refine_k:
        searched["refined"] = index.search(vectors, depth, refine_k)
    # exact search over the very vectors the index was built from (its lineage), delta chains resolved
    live = LiveEmbeddings(storage, embedding_chain(storage, index.manifest.snapshot, index.manifest.fingerprint))
    exact_scores, exact_rows = exact_search(live, vectors, depth)
    hits = {name: ranked(scores, rows, index.passages(rows[rows >= 0])) for name, (scores, rows) in searched.items()}
    lexical = load_lexical(storage, index.manifest, ev.cache_dir)
    if lexical is not None:  # BM25, and its fusion with the ranking Serve gives (refined when it refines)
        s = config.serve
        hits["sparse"] = lexical.search([q.question for q in questions], depth)
        dense = hits.get("refined", hits["ann"])
        hits["hybrid"] = [fuse(d, b, depth, s.rrf_k, s.dense_weight) for d, b in zip(dense, hits["sparse"])]
    hits["exact"] = ranked(exact_scores, exact_rows, exact_passages(live, exact_rows[exact_rows >= 0]))
    results = {name: dpr_results(questions, found, ev.match) for name, found in hits.items()}
    accuracy = {
        name: top_k_accuracy([[c["has_answer"] for c in r["ctxs"]] for r in records], ks)
        for name, records in results.items()
    }
    report = {
        "index_version": version,
        "questions_file": ev.questions,
        "questions": len(questions),
        "match": ev.match,
        "factory": index.manifest.factory,
        "nprobe": ev.nprobe or index.manifest.nprobe,
        "refine_k": refine_k,
        "top_k": {name: {str(k): round(v, 4) for k, v in acc.items()} for name, acc in accuracy.items()},
        "difference_points": {str(k): round(100 * (accuracy["exact"][k] - accuracy["ann"][k]), 2) for k in ks},
        **(
            {
                "refined_difference_points": {
                    str(k): round(100 * (accuracy["exact"][k] - accuracy["refined"][k]), 2) for k in ks
                }
            }
            if "refined" in accuracy
            else {}
        ),
        "questions_per_s": round(len(questions) / ann_seconds, 1),
    }
    output = ev.output or storage.url("evaluations", version)
    out_fs, out_path = resolve(output, config.storage.options)
    labels = {
        "ann": f"IVF-PQ ({report['factory']}, nprobe {report['nprobe']})",
        "refined": f"IVF-PQ, {refine_k} candidates re-scored exactly",
        "sparse": "BM25",
        "hybrid": f"hybrid (reciprocal-rank fusion, dense weight {config.serve.dense_weight:g})",
        "exact": "exact inner product",
    }
    files = {
        **{
            f"retriever_results{'' if name == 'ann' else '_' + name}.json": json.dumps(
                records, ensure_ascii=False, indent=1
            ).encode()
            for name, records in results.items()
        },
        "report.json": json.dumps(report, indent=1).encode(),
        "top_k_accuracy.png": plot_accuracy(
            {labels[name]: list(values.values()) for name, values in accuracy.items()},
            ks,
            f"{len(questions)} questions, index {version}",
        ),
    }
    out_fs.makedirs(out_path, exist_ok=True)
    for name, data in files.items():
        out_fs.pipe_file(posixpath.join(out_path, name), data)
    summary = {f"top{k}_{name}": round(accuracy[name][k], 4) for k in ks for name in accuracy}
    return {
        "questions": len(questions),
        "index_version": version,
        "nprobe": report["nprobe"],
        **summary,
        "difference_points": report["difference_points"],
        **{key: report[key] for key in ("refine_k", "refined_difference_points") if key in report},
        "questions_per_s": report["questions_per_s"],
        "output": output.rstrip("/"),
        "results": posixpath.join(output.rstrip("/"), "retriever_results.json"),
    }
