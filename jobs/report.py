"""The nightly history as one self-contained HTML page: a table of the last runs (newest first) and plots of time
per stage, bytes written, rows changed, distortion against its drift limit, segments and tombstones, with full
builds, compactions and failed runs marked.

    python -m jobs.report --config configs/wiki21m.yaml [--out report.html] [--last 60]

Without `--out` the page goes to `<storage.root>/nightly/report.html` when the root is a local path, else to
`report.html` in the working directory; the summary line's `output` says where.
"""

from pipeline.config import argument_parser
from pipeline.ops.report import DEFAULT_LAST, run_report
from pipeline.runtime.cli import exit_process, run_job


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("report")
    parser.add_argument(
        "--out",
        default=None,
        help="the HTML file to write (default: <storage.root>/nightly/report.html for a local root, "
        "./report.html for a remote one)",
    )
    parser.add_argument("--last", type=int, default=DEFAULT_LAST, help=f"runs shown, newest (default {DEFAULT_LAST})")
    args = parser.parse_args(argv)  # exits 2 on a bad command line, as every job does
    if args.last < 1:
        parser.error("--last must be at least 1")
    forwarded = ["--config", args.config, *[arg for item in args.overrides for arg in ("--set", item)]]
    return run_job("report", lambda config: run_report(config, args.out, args.last), forwarded)


if __name__ == "__main__":
    exit_process(main())
