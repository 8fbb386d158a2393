"""Nightly incremental re-index: ingest → encode what changed → build → publish → point the Serve app at it.

    ray job submit --working-dir . -- python -m jobs.nightly --config configs/wiki21m.yaml \
        --set ingest.input=s3://bucket/psgs/2026-11-26/ --set nightly.serve_address=http://127.0.0.1:8265
"""

from pipeline.ops.nightly import run_nightly
from pipeline.runtime.cli import exit_process, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("nightly", run_nightly, argv)


if __name__ == "__main__":
    exit_process(main())
