"""Ingest passage files into a Parquet passage snapshot.

python -m jobs.ingest --config configs/wiki21m.yaml --set ingest.snapshot=2026-11-26
"""

from pipeline.ingest.job import run_ingest
from pipeline.runtime.cli import exit_process, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("ingest", run_ingest, argv)


if __name__ == "__main__":
    exit_process(main())
