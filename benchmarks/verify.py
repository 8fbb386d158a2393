"""A replica's start with a full node cache is mostly checking every file of the version against its sha256
(`pipeline.store.cache.fetch_verified`; FAISS and tantivy never read an unchecked file): 8.2 GB at 5M passages, ~32 GB
at 21M. This times that check on one thread and on `VERIFY_THREADS`, at two sizes; prints one JSON line.

    python -m benchmarks.verify [--sizes-gb 1,4] [--file-mb 256]

Files of random bytes in a local store are fetched into a cache directory once (the cold start's copy; the page
cache then holds them, as a warm node's does), then verified again with nothing to fetch, three times at each
thread count; the figures are the fastest of the three (seconds and GB/s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time

from pipeline.store import cache
from pipeline.store.manifests import FileEntry
from pipeline.store.storage import Storage


def make_store(root: str, total: int, file_bytes: int) -> tuple[Storage, list[FileEntry]]:
    storage, entries = Storage(os.path.join(root, "store")), []
    for i in range(max(1, total // file_bytes)):
        data = os.urandom(file_bytes)
        name = f"seg-{i:04d}/vectors_sq8.npy"
        storage.write_bytes(f"indexes/{name}", data)
        entries.append(FileEntry(name=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return storage, entries


def timed(storage: Storage, entries: list[FileEntry], directory: str, threads: int) -> float:
    cache.VERIFY_THREADS = threads
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        _, fetched = cache.fetch_verified(storage, entries, directory)
        best = min(best, time.perf_counter() - started)
        assert fetched == 0
    return best


def measure(total: int, file_bytes: int, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as root:
        storage, entries = make_store(root, total, file_bytes)
        directory = os.path.join(root, "cache")
        cache.fetch_verified(storage, entries, directory)
        one, many = timed(storage, entries, directory, 1), timed(storage, entries, directory, threads)
    gb = sum(e.bytes for e in entries) / 1e9
    return {
        "gb": round(gb, 2),
        "one_thread_s": round(one, 2),
        f"{threads}_threads_s": round(many, 2),
        "one_thread_gb_per_s": round(gb / one, 2),
        f"{threads}_threads_gb_per_s": round(gb / many, 2),
        "speedup": round(one / many, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", default="1,4", help="GB of files, comma-separated")
    parser.add_argument("--file-mb", type=int, default=256, help="size of each file")
    args = parser.parse_args()
    threads = cache.VERIFY_THREADS
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    line = {
        "benchmark": "verify",
        "cpus": os.cpu_count(),
        "verify_threads": threads,
        "sizes": [measure(int(gb * 1e9), args.file_mb << 20, threads) for gb in sizes],
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
