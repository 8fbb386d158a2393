"""Top-k retrieval accuracy of a published index vs exact search, on DPR's question files, in DPR's formats.

python -m jobs.evaluate --config configs/wiki21m.yaml --set evaluate.questions=s3://bucket/nq-test.qa.csv
"""

from pipeline.ops.evaluate import run_evaluate
from pipeline.runtime.cli import exit_process, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("evaluate", run_evaluate, argv)


if __name__ == "__main__":
    exit_process(main())
