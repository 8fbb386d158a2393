"""Merge the published index version's segments into one and drop its tombstoned rows, as a new version (the
nightly does this by itself past index.max_segments / index.max_tombstone_fraction). A compaction that publishes
(or fails) is recorded in the history (`nightly/history/`, `python -m jobs.report`).

    ray job submit --working-dir . -- python -m jobs.compact --config configs/wiki21m.yaml
"""

from pipeline.index.job import run_compact
from pipeline.ops.history import recorded
from pipeline.runtime.cli import exit_process, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("compact", recorded("compact", run_compact), argv)


if __name__ == "__main__":
    exit_process(main())
