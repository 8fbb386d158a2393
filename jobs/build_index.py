"""Train and publish a FAISS IVF-PQ index (with its docstore) from an encode job's embedding shards; a run that
publishes a version (or fails) is recorded in the history (`nightly/history/`, `python -m jobs.report`).

ray job submit --working-dir . -- python -m jobs.build_index --config configs/wiki21m.yaml
"""

from pipeline.index.job import run_build_index
from pipeline.ops.history import recorded
from pipeline.runtime.cli import exit_process, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("build_index", recorded("build", run_build_index), argv)


if __name__ == "__main__":
    exit_process(main())
