"""Ingest throughput and memory on a generated psgs_w100-layout .tsv.gz; prints one JSON line.

    python -m benchmarks.ingest [--rows 200000] [--shard-rows 50000]

Baseline: DPR's own loader (csv.reader into a dict of all passages), whose memory grows with the corpus.
Each side runs in a fresh process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kit.jobs import REPO
from pipeline.runtime.telemetry import peak_rss


def _measure(side: str, corpus: str, root: str, shard_rows: int) -> dict:
    start = time.perf_counter()
    if side == "ours":
        from pipeline.config import PipelineConfig
        from pipeline.ingest.job import run_ingest

        config = PipelineConfig.model_validate(
            {"storage": {"root": root}, "ingest": {"input": corpus, "snapshot": "bench", "shard_rows": shard_rows}}
        )
        rows = run_ingest(config).rows
    else:
        import csv
        import gzip

        passages = {}
        with gzip.open(corpus, "rt", encoding="utf-8") as handle:
            for row in csv.reader(handle, delimiter="\t"):
                if row[0] != "id":
                    passages[row[0]] = (row[1].strip('"'), row[2])
        rows = len(passages)
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "peak_rss_mb": peak_rss() / 2**20}


def _run_side(side: str, corpus: Path, root: str, shard_rows: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.ingest",
        "--side",
        side,
        "--corpus",
        str(corpus),
        "--root",
        root,
        "--shard-rows",
        str(shard_rows),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shard-rows", type=int, default=50_000)
    parser.add_argument("--side", choices=["ours", "dpr"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(_measure(args.side, args.corpus, args.root, args.shard_rows)))
        return
    from kit.corpora import synthetic_rows, write_tsv

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_tsv(Path(tmp) / "psgs_w100.tsv.gz", synthetic_rows(args.rows))
        ours = _run_side("ours", corpus, f"{tmp}/store", args.shard_rows)
        baseline = _run_side("dpr", corpus, f"{tmp}/store", args.shard_rows)
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "rows": ours["rows"],
                "rows_per_s": round(ours["rows"] / ours["seconds"]),
                "peak_rss_mb": round(ours["peak_rss_mb"], 1),
                "dpr_loader_rows_per_s": round(baseline["rows"] / baseline["seconds"]),
                "dpr_loader_peak_rss_mb": round(baseline["peak_rss_mb"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
