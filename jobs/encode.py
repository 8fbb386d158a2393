"""Encode a passage snapshot with the DPR context encoder on a Ray actor pool (one actor per GPU).

ray job submit --working-dir . -- python -m jobs.encode --config configs/wiki21m.yaml
"""

from pipeline.encode.job import run_encode
from pipeline.runtime.cli import exit_process, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("encode", run_encode, argv)


if __name__ == "__main__":
    exit_process(main())
