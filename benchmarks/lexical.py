"""The BM25 index (tantivy, `pipeline.store.lexical`) at two corpus sizes: build time, index bytes, query latency (hits
read from memory-mapped docstores, as a replica reads them), and a night's delta (1% of passages replaced, 0.1%
removed) against a rebuild; prints one JSON line.

    python -m benchmarks.lexical [--sizes 100000,1000000] [--queries 500]

Passages are 100 words drawn from a Zipf(1.1) vocabulary of 200,000 words (a psgs_w100-like term distribution)
with 2-word titles; questions are 6 words of a passage, so each has a passage that matches it well. One thread
builds and one searches (k = 100, the hybrid depth).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from pipeline.store.docstore import DOCSTORE_SCHEMA, Docstore, open_arrow
from pipeline.store.keys import keys_of
from pipeline.store.lexical import LexicalIndex, LexicalWriter

VOCABULARY = 200_000
CHUNK = 50_000


def passages(start: int, count: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    words = np.minimum(rng.zipf(1.1, size=(count, 102)), VOCABULARY)
    ids = [str(i) for i in range(start, start + count)]
    titles = [f"w{a} w{b}" for a, b in words[:, :2]]
    texts = [" ".join(f"w{w}" for w in row) for row in words[:, 2:]]
    return pa.table({"id": ids, "title": titles, "text": texts})


def build(directory: str, size: int) -> tuple[dict[str, str], float, Docstore]:
    """The BM25 index of `size` passages (timed) and their docstores, one segment per chunk (not timed)."""
    writer = LexicalWriter(directory, heap_bytes=512 * 2**20)
    store, seconds = Docstore({}), 0.0
    for seq, start in enumerate(range(0, size, CHUNK), start=1):
        table = passages(start, min(CHUNK, size - start), seed=start)  # generating them is not timed
        path = os.path.join(directory, f"../docstore-{size}-{seq}.arrow")
        with pa.ipc.new_file(path, DOCSTORE_SCHEMA) as out:
            out.write_table(table)
        store.texts[seq], store.keys[seq] = open_arrow(path), keys_of(table.column("id").to_pylist())
        started = time.perf_counter()
        writer.add(table)
        seconds += time.perf_counter() - started
    started = time.perf_counter()
    files = writer.close()
    return files, seconds + time.perf_counter() - started, store


def measure(size: int, queries: int, tmp: str) -> dict:
    files, seconds, store = build(os.path.join(tmp, f"full-{size}"), size)
    index = LexicalIndex.at("bench", os.path.join(tmp, f"full-{size}"), store)
    rng = np.random.default_rng(1)
    sample = passages(0, min(size, CHUNK), seed=0).column("text").to_pylist()
    questions = [" ".join(sample[i].split()[5:11]) for i in rng.choice(len(sample), queries, replace=False)]
    latencies = []
    for question in questions:
        started = time.perf_counter()
        index.search([question], 100)
        latencies.append(time.perf_counter() - started)
    # a night: 1% of passages replaced (deleted, added again with new text), 0.1% removed, on a copy
    changed, removed = size // 100, size // 1000
    delta = LexicalWriter(os.path.join(tmp, f"delta-{size}"), base=files, heap_bytes=512 * 2**20)
    started = time.perf_counter()
    replaced = passages(0, changed, seed=99)
    delta.delete(
        np.concatenate(
            [keys_of(replaced.column("id").to_pylist()), keys_of([str(size - 1 - i) for i in range(removed)])]
        )
    )
    delta.add(replaced)
    after = delta.close()
    delta_seconds = time.perf_counter() - started
    new_bytes = sum(os.path.getsize(p) for n, p in after.items() if n not in files or n == "meta.json")
    total = sum(os.path.getsize(p) for p in files.values())
    ms = np.array(latencies) * 1000
    return {
        "build_seconds": round(seconds, 1),
        "passages_per_s": round(size / seconds),
        "index_mib": round(total / 2**20, 1),
        "bytes_per_passage": round(total / size, 1),
        "query_p50_ms": round(float(np.percentile(ms, 50)), 2),
        "query_p99_ms": round(float(np.percentile(ms, 99)), 2),
        "queries_per_s": round(len(ms) / (ms.sum() / 1000), 1),
        "delta_seconds": round(delta_seconds, 1),
        "delta_new_mib": round(new_bytes / 2**20, 1),
        "delta_vs_build": round(delta_seconds / seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="lexical-bench-") as tmp:
        results = {str(size): measure(size, args.queries, tmp) for size in sizes}
    print(json.dumps({"benchmark": "lexical", "engine": "tantivy", "sizes": sizes, **results}))


if __name__ == "__main__":
    main()
