"""The whole chain on an offline corpus cut from Python's own documentation (`make demo`).

Two nights run exactly as `jobs.nightly` runs them, in this process, against the local `storage.root`: the first
on the demo corpus (a full snapshot, encoded and indexed in full), the second on a changed copy of it (a few
passages edited, added and deleted: a delta snapshot, only those encoded, one new segment). The index is then
evaluated on the demo's questions (top-k accuracy, IVF-PQ vs exact search); the QA app starts on Ray Serve, answers
one question over HTTP and shuts down; and `jobs.report` renders the nights' history as one HTML page, whose path
the summary gives (`report`).
"""

import csv
import gzip
import importlib
import inspect
import logging
import re
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.ingest.demo_corpus import WORDS_PER_PASSAGE, write_demo_corpus
from pipeline.ops.evaluate import run_evaluate
from pipeline.ops.nightly import run_nightly
from pipeline.ops.report import run_report
from pipeline.runtime.cli import exit_process, run_job
from pipeline.serve.local import ask_once

log = logging.getLogger("jobs.demo")
DEMO_QUESTION = "How do I sort a list in place?"
# The second night's dump adds the documentation of modules the first did not have.
ADDED_MODULES = ("glob", "fnmatch", "shlex", "bz2", "lzma")
CHANGES = 5  # passages edited, and deleted, by the second night
IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9]*(?:[._][A-Za-z0-9_]+)+\b")  # benchmarks.quality's


def _read_tsv(path: Path) -> list[tuple[str, str, str]]:
    """(id, text, title) rows of a psgs_w100-layout file, read as DPR reads it."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader)
        position = {name: i for i, name in enumerate(header)}
        return [(row[position["id"]], row[position["text"]].strip('"'), row[position["title"]]) for row in reader]


def _write_tsv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt", encoding="utf-8", newline="") as out:
        out.write("id\ttext\ttitle\n")
        for pid, text, title in rows:
            out.write(f'{pid}\t"{text.replace(chr(34), chr(34) * 2)}"\t{title}\n')


def write_changed_corpus(source: Path, target: Path, answers: list[str]) -> dict[str, list[str]]:
    """The demo corpus as the next night's dump finds it: CHANGES passages edited (a sentence added), CHANGES
    deleted, and the documentation of ADDED_MODULES added as new passages. The passages edited or deleted are
    spread over the corpus and hold none of the demo questions' `answers` and no dotted or underscored name (what
    `benchmarks.quality` cuts its questions from), so the accuracy figures measured on the demo index stand.
    Deterministic; written once (a snapshot's source never changes)."""
    rows = _read_tsv(source)
    spared = [
        i
        for i, (_, text, _) in enumerate(rows)
        if not IDENTIFIER.search(text) and not any(a.lower() in text.lower() for a in answers)
    ]
    step = max(1, len(spared) // (2 * CHANGES + 1))
    picked = spared[step::step][: 2 * CHANGES]
    edited, deleted = set(picked[0::2]), set(picked[1::2])
    changed = []
    for i in sorted(edited):
        pid, text, title = rows[i]
        rows[i] = (pid, f"{text} (This passage was revised in the second night of the demo.)", title)
        changed.append(pid)
    removed = [rows[i][0] for i in sorted(deleted)]
    rows = [row for i, row in enumerate(rows) if i not in deleted]
    next_id = max(int(pid) for pid, _, _ in rows) + 1
    added = []
    for name in ADDED_MODULES:
        words = (inspect.getdoc(importlib.import_module(name)) or f"The {name} module.").split()
        for start in range(0, min(len(words), 2 * WORDS_PER_PASSAGE), WORDS_PER_PASSAGE):
            rows.append((str(next_id), " ".join(words[start : start + WORDS_PER_PASSAGE]), f"{name} module"))
            added.append(str(next_id))
            next_id += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{target.name}")
    _write_tsv(temporary, rows)
    temporary.replace(target)
    return {"edited": changed, "deleted": removed, "added": added}


def _answers(questions: str | None) -> list[str]:
    """Every answer string of a DPR .qa.csv (question<TAB>['answer', ...])."""
    if not questions or not Path(questions).exists():
        return []
    import ast

    with open(questions, encoding="utf-8", newline="") as handle:
        return [a for row in csv.reader(handle, delimiter="\t") if len(row) > 1 for a in ast.literal_eval(row[1])]


def run_demo(config: PipelineConfig) -> dict[str, Any]:
    if not config.ingest.input or "://" in config.ingest.input:
        raise ConfigError("the demo writes its corpus to a local ingest.input path")
    corpus = Path(config.ingest.input)
    if not corpus.exists():
        log.info("writing the demo corpus (%d passages) to %s", write_demo_corpus(corpus), corpus)
    offline = config.model_copy(update={"nightly": config.nightly.model_copy(update={"serve_address": None})})
    stages: dict[str, Any] = {"night1": run_nightly(offline)}
    log.info("night 1: %s", stages["night1"])

    stem, dot, extension = corpus.name.partition(".")
    changed = corpus.with_name(f"{stem}-2{dot}{extension}")
    if not changed.exists():
        made = write_changed_corpus(corpus, changed, _answers(config.evaluate.questions))
        log.info("the second night's dump %s: %s", changed, {k: len(v) for k, v in made.items()})
    second = offline.model_copy(
        update={
            "ingest": config.ingest.model_copy(
                update={"input": str(changed), "snapshot": f"{config.ingest.snapshot}-2"}
            )
        }
    )
    stages["night2"] = run_nightly(second)
    log.info("night 2: %s", stages["night2"])

    evaluated = stages["evaluate"] = run_evaluate(second)
    names = {"ann": "IVF-PQ", "refined": "IVF-PQ re-scored", "sparse": "BM25", "hybrid": "hybrid", "exact": "exact"}
    methods = [m for m in names if f"top{config.evaluate.k[0]}_{m}" in evaluated]
    log.info(
        "top-k accuracy on %d demo questions, %s: %s",
        evaluated["questions"],
        " / ".join(names[m] for m in methods),
        ", ".join(
            f"top-{k} " + " / ".join(f"{evaluated[f'top{k}_{m}']:.2f}" for m in methods) for k in config.evaluate.k
        ),
    )
    stages["serve"] = ask_once(second, DEMO_QUESTION)
    stages["report"] = run_report(second)
    log.info("the nightly history's report: %s", stages["report"]["output"])
    return {"stages": stages, "report": stages["report"]["output"]}


def main(argv: list[str] | None = None) -> int:
    return run_job("demo", run_demo, argv)


if __name__ == "__main__":
    exit_process(main())
