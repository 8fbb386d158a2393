"""The contract every job keeps: `--config FILE [--set k=v ...]`, logs on stderr, one JSON summary on stdout.

Exit codes: 0 success, 1 a failed run (the message names what failed), 2 a bad config or command line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import PipelineConfig, argument_parser, load_config
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("pipeline")


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def emit_summary(job: str, status: str, **fields: Any) -> None:
    """The last line on stdout: what orchestrators and users parse."""
    print(json.dumps({"job": job, "status": status, **fields}, default=str), flush=True)


def run_job(job: str, body: Callable[[PipelineConfig], dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """Parse, validate, run `body`, report; returns the process exit code."""
    _configure_logging()
    args = argument_parser(job).parse_args(argv)  # argparse exits 2 on a bad command line
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        log.error("%s: %s", job, exc)
        emit_summary(job, "error", error=str(exc))
        return 2
    started = time.perf_counter()
    try:
        summary = body(config)
    except ConfigError as exc:
        log.error("%s: %s", job, exc)
        emit_summary(job, "error", error=str(exc))
        return 2
    except PipelineError as exc:
        log.error("%s failed: %s", job, exc)
        emit_summary(job, "error", error=str(exc), seconds=round(time.perf_counter() - started, 3))
        return 1
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still ends with a summary line
        log.exception("%s failed unexpectedly", job)
        emit_summary(job, "error", error=f"{type(exc).__name__}: {exc}",
                     seconds=round(time.perf_counter() - started, 3))
        return 1
    emit_summary(job, "ok", **summary, seconds=round(time.perf_counter() - started, 3))
    return 0
