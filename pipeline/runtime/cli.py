"""The contract every job keeps: `--config FILE [--set k=v ...]`, logs on stderr, one JSON summary on stdout.

Exit codes: 0 success, 1 a failed run (the message names what failed), 2 a bad config or command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pydantic import BaseModel

from pipeline.config import PipelineConfig, argument_parser, load_config
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("pipeline")


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried, at every start


def _disconnect_ray() -> None:
    """Stop Ray's background printers, so nothing they say can follow the summary line."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _run(
    job: str, body: Callable[[PipelineConfig], dict[str, Any] | BaseModel], argv: Sequence[str] | None
) -> tuple[int, dict[str, Any]]:
    args = argument_parser(job).parse_args(argv)  # argparse exits 2 on a bad command line
    started = time.perf_counter()
    try:
        config = load_config(args.config, args.overrides)
        try:
            summary = body(config)
        finally:
            _disconnect_ray()
    except ConfigError as exc:
        log.error("%s: %s", job, exc)
        return 2, {"status": "error", "error": str(exc)}
    except PipelineError as exc:
        log.error("%s failed: %s", job, exc)
        return 1, {"status": "error", "error": str(exc), "seconds": round(time.perf_counter() - started, 3)}
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still ends with a summary line
        log.exception("%s failed unexpectedly", job)
        return 1, {
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}",
            "seconds": round(time.perf_counter() - started, 3),
        }
    if isinstance(summary, BaseModel):  # a typed summary (pipeline.primitives)
        summary = summary.model_dump(mode="json")
    return 0, {"status": "ok", **summary, "seconds": round(time.perf_counter() - started, 3)}


def run_job(
    job: str, body: Callable[[PipelineConfig], dict[str, Any] | BaseModel], argv: Sequence[str] | None = None
) -> int:
    """Parse, validate, run `body`, report; returns the process exit code."""
    _configure_logging()
    summary_stream = sys.stdout
    # stdout carries the summary line alone: what libraries print (Ray's worker notices, ...) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        code, summary = _run(job, body, argv)
    print(json.dumps({"job": job, **summary}, default=str), file=summary_stream, flush=True)
    return code


def exit_process(code: int) -> NoReturn:
    """End the job's process with `code`, its output flushed, skipping the interpreter's teardown: the summary is
    out, and a library's native thread destroyed at exit ("terminate called without an active exception", SIGABRT,
    seen after a failed ingest under load) must not turn the status the job decided into a crash."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
