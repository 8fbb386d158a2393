"""Corpora in DPR's layouts (psgs_w100 TSV, JSONL, Parquet), synthetic passages and embeddings, written as the
tests and benchmarks need them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def dpr_tsv(rows: list[tuple[str, str, str]]) -> str:
    """psgs_w100 layout: header `id text title`, text always quoted with inner quotes doubled."""
    lines = ["id\ttext\ttitle"]
    for pid, text, title in rows:
        lines.append(f'{pid}\t"{text.replace(chr(34), chr(34) * 2)}"\t{title}')
    return "\n".join(lines) + "\n"


def write_tsv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    data = dpr_tsv(rows).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def synthetic_rows(count: int, start: int = 1, words: int = 100) -> list[tuple[str, str, str]]:
    """Deterministic passages in psgs_w100 shape (id, text, title)."""
    vocabulary = (
        "river mountain city history music science king war church language school village family "
        "film game species island county station company album party season team energy water "
        "north south empire bridge road museum theatre novel poet army ship castle garden"
    ).split()
    rows = []
    for i in range(start, start + count):
        text = (
            " ".join(
                vocabulary[(i * 2654435761 + j * 40503 + (i * j) % 97) % 9973 % len(vocabulary)] for j in range(words)
            )
            + f" passage {i}"
        )
        rows.append((str(i), text, f"Article {i // 10}"))
    return rows


def write_random_embeddings(root: str, options: dict[str, Any], snapshot: str, dim: int, seed: int = 0) -> str:
    """Embeddings for an ingested snapshot without a model: unit vectors drawn around 64 random centres (what an
    encoder's clustered output looks like to IVF), one shard per passage shard, published with their manifest as
    the encode job does. Returns the fingerprint directory's name. For build tests and benchmarks at sizes an
    encoder on this machine would take too long for."""
    import numpy as np

    from pipeline.store.layout import embeddings_dir
    from pipeline.store.manifests import EmbeddingManifest, FileEntry, PassageManifest
    from pipeline.store.shards import embedding_table, read_passage_shard
    from pipeline.store.storage import Storage, parquet_bytes

    storage = Storage(root, options)
    passages = storage.read_manifest(f"passages/{snapshot}", PassageManifest)
    fingerprint = f"random-{dim}-{seed}"
    output = embeddings_dir(snapshot, fingerprint)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    files = []
    for entry in passages.files:
        table = read_passage_shard(storage, f"passages/{snapshot}", entry)
        vectors = centres[rng.integers(0, 64, table.num_rows)] + 0.5 * rng.normal(size=(table.num_rows, dim))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        ids, hashes = table.column("id").to_pylist(), table.column("content_hash").to_pylist()
        data = parquet_bytes(embedding_table(ids, hashes, vectors, "float32"))
        digest = storage.write_bytes(f"{output}/{entry.name}", data)
        files.append(
            FileEntry(name=entry.name, bytes=len(data), sha256=digest, rows=len(ids), source_sha256=entry.sha256)
        )
    storage.write_manifest(
        output,
        EmbeddingManifest(
            files=files,
            snapshot=snapshot,
            fingerprint=fingerprint,
            dim=dim,
            encoder={"model": "random", "pooling": "mean", "max_length": 32, "normalize": True},
            embedding_dtype="float32",
            passages_manifest=passages.created_at,
        ),
    )
    return fingerprint
