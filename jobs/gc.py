"""Retention: delete what no retained index version needs (`pipeline.ops.retention`; the nightly runs the same step
after it publishes, with `retain.after_night`). Kept: the newest `retain.versions` versions, `indexes/LATEST`'s,
`retain.pinned`, what a running app holds (asked at `nightly.serve_address`), with everything they list and their
snapshot chains; nothing younger than `retain.min_age_h`. A run that deletes is recorded in the history.

    python -m jobs.gc --config configs/wiki21m.yaml [--dry-run]

`--dry-run` deletes nothing and lists what would go (`would_delete`) and how many bytes.
"""

from pipeline.config import argument_parser
from pipeline.ops.retention import recorded_gc
from pipeline.runtime.cli import exit_process, run_job


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("gc")
    parser.add_argument("--dry-run", action="store_true", help="delete nothing; list what would go")
    args = parser.parse_args(argv)  # exits 2 on a bad command line, as every job does
    forwarded = ["--config", args.config, *[arg for item in args.overrides for arg in ("--set", item)]]
    return run_job("gc", lambda config: recorded_gc(config, args.dry_run), forwarded)


if __name__ == "__main__":
    exit_process(main())
