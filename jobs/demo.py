"""The whole chain on an offline corpus cut from Python's own documentation (`make demo`).

Each stage runs exactly as its job would, in this process, against the local `storage.root`; the index is
evaluated on the demo's questions (top-k accuracy, IVF-PQ vs exact search); then the QA app starts on Ray Serve,
answers one question over HTTP, and shuts down.
"""

import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.cli import run_job
from pipeline.config import PipelineConfig
from pipeline.demo_corpus import write_demo_corpus
from pipeline.encode.job import run_encode
from pipeline.errors import ConfigError
from pipeline.evaluate import run_evaluate
from pipeline.index.job import run_build_index
from pipeline.ingest import run_ingest
from pipeline.serve.local import ask_once

log = logging.getLogger("jobs.demo")
DEMO_QUESTION = "How do I sort a list in place?"


def run_demo(config: PipelineConfig) -> dict[str, Any]:
    if not config.ingest.input or "://" in config.ingest.input:
        raise ConfigError("the demo writes its corpus to a local ingest.input path")
    corpus = Path(config.ingest.input)
    if not corpus.exists():
        log.info("writing the demo corpus (%d passages) to %s", write_demo_corpus(corpus), corpus)
    stages = {}
    for stage, run in (
        ("ingest", run_ingest),
        ("encode", run_encode),
        ("build_index", run_build_index),
        ("evaluate", run_evaluate),
    ):
        summary = run(config)
        stages[stage] = summary.model_dump(mode="json") if isinstance(summary, BaseModel) else summary
        log.info("%s: %s", stage, stages[stage])
    evaluated = stages["evaluate"]
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
    stages["serve"] = ask_once(config, DEMO_QUESTION)
    return {"stages": stages}


def main(argv: list[str] | None = None) -> int:
    return run_job("demo", run_demo, argv)


if __name__ == "__main__":
    sys.exit(main())
