"""The whole chain at 0.5M-5M passages: does the pipeline scale with the corpus? One JSON line per size, then one
comparing the largest size with 1M against the goals.

    python -m benchmarks.scale --sizes 500000,1000000,2000000,5000000 [--coarse hnsw|flat] [--clients 16]
        [--seconds 20] [--keep DIR]
    python -m benchmarks.scale --sizes 20000,40000 --seconds 5 --reference 20000     # a check in minutes

At each size, on synthetic psgs_w100 (`kit.pseudowiki`: 100-word windows of articles, about 7% shorter; a Zipf
vocabulary of pseudo-words; streamed to a TSV, never held in memory) with the tiny 768-d DPR encoder of
`benchmarks.nightly --encoder tiny` (1 layer: encoding costs next to nothing, so the data plane shows):
- the chain `jobs.ingest` -> `jobs.encode` -> `jobs.build_index`, each run as a user runs it against one local Ray:
  seconds, passages/s, bytes written to the store and the peak RSS of the job's driver and of each kind of Ray
  worker (process titles such as `ray::EncoderActor`, `ray::add_group`; every process of the cluster sampled every
  0.5 s while the job runs);
- the app deployed from a config through the Serve REST API: seconds from the deploy to the first `/v1/search`
  answer with the node cache emptied first (fetch and verify) and again with it full (the app deleted and deployed
  again); the Retriever replica's RSS after its load and after 1,000 questions; bytes a passage by kind
  (`pipeline.store.segments.footprint` of the version's manifest); `/v1/search` p50/p99 at 1 and `--clients` clients in
  dense, sparse and hybrid mode, `--seconds` each;
- then, the app deleted, a 1% night (`jobs.nightly`, the app left alone: 0.4% of the passages edited, 0.3% deleted,
  0.3% added, spread over the corpus) and a compaction (`jobs.compact`): seconds and bytes, and each as a fraction
  of the chain's.

Index settings: those of configs/wiki21m.yaml (OPQ64_256,IVF65536,PQ64 for 21M passages: 320 a list; nprobe 64,
refine_k 400, 1,000 held-out queries) scaled to the size N:
- nlist = the power of two nearest N / 320, at least `--min-lists` (64): 0.5M -> 2048, 1M -> 4096, 2M -> 8192,
  5M -> 16384;
- factory OPQ64_256,IVF{nlist}_HNSW32,PQ64 (`--coarse hnsw`, the default: the form wiki21m.yaml recommends for CPU
  clusters, as assigning to 16k flat centroids is slow on CPU) or OPQ64_256,IVF{nlist},PQ64 (`--coarse flat`);
- train_size = 39 x max(nlist, 256) (the PQ codebooks' 256 centroids want as many), at most N minus the queries;
- nprobe min(64, nlist); refine_k 400; min_recall `--min-recall` (0.2: the tiny encoder's vectors are near noise,
  and the benchmark records the recall rather than gate on it);
- built on the cluster as production builds: shard_rows = min(100,000, N / 10) (wiki21m.yaml's 100k from 1M on),
  segment_vectors = min(500,000, N / 4) (10 add tasks at 5M, as wiki21m.yaml's 2M gives 11 at 21M), add_cpus 1,
  train_cpus every CPU of the local Ray (as wiki21m.yaml's 16: the node's), max_memory 16GiB.
Encoding: `encode.actors` one per CPU of the local Ray (`--cpus`, default all cores), one torch thread each,
batch_tokens 65536 as on a GPU, max_length 256, fp16 embeddings. A tiny DPR reader is the app's `serve.reader_model`,
so the build stores the reader's token ids of every passage (`index.reader_ids`) as production's does.

Goals (the last line, largest size against `--reference`, 1M): seconds a passage of each stage within 1.25x, peak
RSS of each job's largest process within 1.25x, the 1% night <= 0.03 of the chain's seconds, the warm start
<= 30 s, dense p99 at `--clients` clients within 1.5x. `--from FILE...` prints that line from the last lines of
those sizes in results files and runs nothing: for sizes measured by separate runs of the same code. Work goes to a
temp dir on /tmp (the run refuses up front when its free disk cannot hold the largest size), removed on exit,
SIGTERM and SIGINT; `--keep DIR` works in DIR and leaves it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.nightly import store_files, written_bytes
from benchmarks.scale_goals import saved_line, summary_line
from kit.jobs import JobRun, free_port, run_job, write_config
from kit.load import Load
from kit.localray import LocalRay, exit_on_signals
from kit.models import tiny_dpr
from kit.poll import until
from kit.pseudowiki import next_night, passages, write_tsv
from kit.rss import MIB, Peaks, cluster_processes, settled
from kit.serveapp import put_app, serve_config
from pipeline.ops.client import AppClient

log = logging.getLogger("benchmarks.scale")

MODES = ("dense", "sparse", "hybrid")
CHAIN = ("ingest", "encode", "build_index")
PASSAGES_PER_LIST = 320  # wiki21m.yaml: 21M passages in 65,536 lists
# Peak disk a passage (TSVs, store after the night and the compaction, the node cache, build temp files): measured
# at 20k-40k passages (`disk_peak_bytes`) and rounded up with room to spare.
DISK_BYTES_PER_PASSAGE = 12_000


# -- settings ----------------------------------------------------------------------------------------------------
def nearest_power_of_two(x: float) -> int:
    low = 1 << max(0, int(x).bit_length() - 1)
    return low * 2 if x - low > low * 2 - x else low


def shard_rows(n: int) -> int:
    return min(100_000, max(1_000, n // 10))


def scaled_index(n: int, coarse: str, min_lists: int, min_recall: float, cpus: int) -> dict[str, Any]:
    """configs/wiki21m.yaml's index settings scaled to `n` passages (the rule in the module docstring)."""
    nlist = max(min_lists, nearest_power_of_two(n / PASSAGES_PER_LIST))
    queries = 1000
    quantizer = f"IVF{nlist}_HNSW32" if coarse == "hnsw" else f"IVF{nlist}"
    return {
        "factory": f"OPQ64_256,{quantizer},PQ64",
        "nprobe": min(64, nlist),
        "train_size": min(39 * max(nlist, 256), n - min(queries, n // 10)),
        "queries": queries,
        "min_recall": min_recall,
        "refine_k": 400,
        "max_memory": "16GiB",
        "segment_vectors": min(500_000, max(shard_rows(n), n // 4)),
        "add_cpus": 1,
        "train_cpus": cpus,
    }


def size_config(work: Path, n: int, tsv: Path, models: dict[str, str], args: argparse.Namespace, port: int) -> Path:
    index = scaled_index(n, args.coarse, args.min_lists, args.min_recall, args.cpus)
    return write_config(
        work / "scale.yaml",
        {
            "storage": {"root": str(work / "store")},
            "ingest": {"input": str(tsv), "snapshot": "s1", "shard_rows": shard_rows(n)},
            "encode": {
                "model": models["ctx"],
                "question_model": models["question"],
                "pooling": "dpr",
                "max_length": 256,
                "embedding_dtype": "float16",
                "batch_tokens": 65536,
                "actors": args.cpus,
                "cpu_threads": 1,
            },
            "index": index,
            "serve": {
                "question_model": models["question"],
                "reader_model": models["reader"],
                "port": port,
                "cache_dir": str(work / "cache"),
                "encoder_cpus": 0.5,
                "retriever_cpus": 1,
                "lexical_cpus": 0.25,
                "reader_cpus": 0.25,
            },
            "nightly": {"serve_address": None},
        },
    )


# -- jobs --------------------------------------------------------------------------------------------------------
def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_logged(job: str, config: Path, *overrides: str) -> tuple[JobRun, float]:
    """`python -m jobs.<job>` as a user runs it, its stderr kept in `logs/<job>.log` beside the config."""
    started = time.perf_counter()
    run = run_job(job, config, *overrides, timeout=None)
    seconds = time.perf_counter() - started
    (config.parent / "logs").mkdir(exist_ok=True)
    (config.parent / "logs" / f"{job}.log").write_text(run.stderr, encoding="utf-8")
    return run, seconds


def run_stage(
    job: str, config: Path, store: Path, cluster: LocalRay, n: int, *overrides: str, required: bool = True
) -> dict[str, Any]:
    """A job measured: seconds, passages/s, bytes written, peak RSS by kind. A failed job ends the run, or when not
    `required` is recorded as `failed` (its last log line) and the run goes on."""
    log.info("%s: %s at %d passages", config.parent.name, job, n)
    before, leftover = store_files(store) if store.exists() else {}, settled(cluster)
    if leftover:
        log.warning("%d workers of the jobs before still busy: left out of the peaks", len(leftover))
    with Peaks(cluster, leftover) as peaks:
        run, seconds = run_logged(job, config, *overrides)
    if run.returncode != 0:
        if required:
            raise SystemExit(f"{job} failed:\n{run.stderr[-3000:]}")
        error = next((line for line in reversed(run.stderr.splitlines()) if line.strip()), "no message")
        log.warning("%s: %s failed after %.1f s: %s", config.parent.name, job, seconds, error)
        return {"failed": error, "seconds": round(seconds, 1), "peak_rss_mib": peaks.mib(), "summary": {}}
    summary = run.summary
    measured = {
        "seconds": round(seconds, 1),
        "passages_per_s": round(n / seconds, 1),
        "bytes_written": written_bytes(before, store_files(store)),
        "peak_rss_mib": peaks.mib(),
        "processes": peaks.processes(),
    }
    log.info("%s: %s took %.1f s, peak RSS %s", config.parent.name, job, seconds, measured["peak_rss_mib"])
    return {**measured, "summary": summary}


def stage_line(stage: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A stage's measurements with the named fields of its job summary (`job_<key>` where a name is taken)."""
    measured = {k: v for k, v in stage.items() if k != "summary"}
    return {**measured, **{f"job_{k}" if k in measured else k: stage["summary"].get(k) for k in keys}}


# -- the app -----------------------------------------------------------------------------------------------------
def serve_only(port: int) -> dict[str, Any]:
    """A Serve config with no application: PUT, it starts Serve (or deletes the apps it runs) and keeps the proxy."""
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": []}


def search(url: str, question: str, mode: str) -> bool:
    body = {"questions": [question], "k": 10, "mode": mode}
    return requests.post(f"{url}/v1/search", json=body, timeout=30).status_code == 200


def replica_rss(cluster: LocalRay) -> dict[str, float]:
    """MiB of each replica of the app (`ray::ServeReplica:qa:<deployment>`), by deployment."""
    found: dict[str, float] = {}
    for _, kind, rss in cluster_processes(cluster):
        if kind.startswith("ray::ServeReplica:qa:"):
            name = kind.rsplit(":", 1)[1]
            found[name] = max(found.get(name, 0.0), round(rss / MIB, 1))
    return dict(sorted(found.items()))


def deploy(dashboard: str, url: str, config: Path, port: int, question: str) -> dict[str, float]:
    """Deploy the app from its config and time it: to the first dense answer, then to an answer in every mode."""
    started = time.monotonic()
    put_app(dashboard, serve_config(config, port))
    until(lambda: search(url, question, "dense"), 3600, 0.25, "a dense answer after the deploy")
    first = time.monotonic() - started
    until(lambda: all(search(url, question, m) for m in MODES), 3600, 0.25, "an answer in every mode")
    return {"first_answer_s": round(first, 2), "all_modes_s": round(time.monotonic() - started, 2)}


def delete_app(dashboard: str, port: int, cluster: LocalRay) -> None:
    """Delete the app and wait until its replicas are gone (their node-cache leases with them)."""
    put_app(dashboard, serve_only(port))

    def gone() -> bool:
        apps = AppClient(serve_address=dashboard).serve_details()["applications"]
        return "qa" not in apps and not replica_rss(cluster)

    until(gone, 600, 0.5, "the app deleted")


def latencies(url: str, questions: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """p50/p99 of `/v1/search` in each mode at 1 and `clients` clients, `seconds` each."""
    out: dict[str, Any] = {}
    for mode in MODES:
        for count in (1, clients):

            def body(client: int, turn: int, mode: str = mode) -> dict[str, Any]:
                return {"questions": [questions[(client * 7 + turn) % len(questions)]], "k": 10, "mode": mode}

            started = time.monotonic()
            with Load(f"{url}/v1/search", count, body) as load:
                time.sleep(seconds)
            window = load.window(started, time.monotonic())
            out[f"{mode}_{count}"] = {**window, "req_per_s": round(window["requests"] / seconds, 1)}
            log.info("%s at %d clients: %s", mode, count, out[f"{mode}_{count}"])
    return out


def after_questions(url: str, questions: list[str], clients: int, count: int) -> int:
    """Send `count` questions (modes in turn, `clients` at once); how many failed."""

    def body(client: int, turn: int) -> dict[str, Any]:
        return {"questions": [questions[(client * 7 + turn) % len(questions)]], "k": 10, "mode": MODES[turn % 3]}

    with Load(f"{url}/v1/search", clients, body) as load:
        until(lambda: len(load.answers) >= count, 3600, 0.2, f"{count} answers")
    return len(load.failed())


def measure_app(
    work: Path, config: Path, cluster: LocalRay, urls: tuple[str, str], questions: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Cold start (node cache emptied), warm start (redeployed, cache full), the replicas' RSS, latency."""
    dashboard, url = urls
    port = int(url.rsplit(":", 1)[1])
    shutil.rmtree(work / "cache", ignore_errors=True)
    log.info("%s: deploying the app, node cache empty", work.name)
    cold = {**deploy(dashboard, url, config, port, questions[0]), "rss_mib": replica_rss(cluster)}
    cache_bytes = folder_bytes(work / "cache")
    delete_app(dashboard, port, cluster)
    log.info("%s: deploying the app again, node cache full", work.name)
    warm = deploy(dashboard, url, config, port, questions[0])
    loaded = replica_rss(cluster)
    failed = after_questions(url, questions, args.clients, 1000)
    asked = replica_rss(cluster)
    timing = latencies(url, questions, args.clients, args.seconds)
    line = {
        "cold_start": cold,
        "warm_start": warm,
        "node_cache_bytes": cache_bytes,
        "rss_after_load_mib": loaded,
        "rss_after_1000_questions_mib": asked,
        "rss_after_latency_runs_mib": replica_rss(cluster),
        "failed_of_1000_questions": failed,
        "search": timing,
    }
    delete_app(dashboard, port, cluster)
    shutil.rmtree(work / "cache", ignore_errors=True)
    return line


def footprint_of(store: Path, version: str) -> dict[str, float]:
    """Bytes a live passage by kind, as `pipeline.store.segments.footprint` reads them from the version's manifest."""
    from pipeline.store.layout import read_index_manifest
    from pipeline.store.segments import footprint
    from pipeline.store.storage import Storage

    return footprint(read_index_manifest(Storage(str(store)), version))


# -- one size ----------------------------------------------------------------------------------------------------
def write_corpus(work: Path, n: int, seed: int) -> tuple[Path, list[str], float]:
    """The size's psgs_w100 TSV (streamed), questions cut from ~500 of its passages, the seconds it took."""
    started = time.monotonic()
    tsv = work / "psgs_w100.tsv"
    sampled = write_tsv(tsv, passages(n, seed=seed), sample_every=max(1, n // 500))
    questions = [" ".join(text.split()[10:16]) or title for _, text, title in sampled]
    return tsv, questions, time.monotonic() - started


def run_size(root: Path, n: int, args: argparse.Namespace, cluster: LocalRay, urls: tuple[str, str]) -> dict[str, Any]:
    """One size end to end: corpus, chain, app, night, compaction; its JSON line."""
    work = root / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    store, disk = work / "store", []
    log.info("%s: writing %d synthetic passages", work.name, n)
    tsv, questions, generate_s = write_corpus(work, n, args.seed)
    models = tiny_dpr(work, ("ctx", "question", "reader"), layers=1, projection_dim=768)
    config = size_config(work, n, tsv, models, args, int(urls[1].rsplit(":", 1)[1]))
    stages = {job: run_stage(job, config, store, cluster, n) for job in CHAIN}
    disk.append(folder_bytes(work))
    built = stages["build_index"]["summary"]
    app = measure_app(work, config, cluster, urls, questions, args)
    app["bytes_per_passage"] = footprint_of(store, built["version"])
    disk.append(disk[0] + app["node_cache_bytes"])
    night_tsv = work / "night2.tsv"
    edits = next_night(tsv, night_tsv, n, n + 1, night=2, seed=args.seed)
    disk.append(folder_bytes(work))
    tsv.unlink()
    night = run_stage("nightly", config, store, cluster, n, f"ingest.input={night_tsv}", "ingest.snapshot=s2")
    night_tsv.unlink()
    compaction = run_stage("compact", config, store, cluster, n, required=False)
    disk.append(folder_bytes(work))
    return size_line(n, config, stages, app, night, edits, compaction, generate_s, disk, args)


def size_line(
    n: int,
    config: Path,
    stages: dict[str, dict[str, Any]],
    app: dict[str, Any],
    night: dict[str, Any],
    edits: dict[str, int],
    compaction: dict[str, Any],
    generate_s: float,
    disk: list[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The JSON line of one size."""
    import yaml

    index = yaml.safe_load(config.read_text())["index"]
    chain_s = sum(s["seconds"] for s in stages.values())
    chain_bytes = sum(s["bytes_written"] for s in stages.values())
    built = stages["build_index"]["summary"]
    keys = {
        "ingest": ("shards", "written_rows"),
        "encode": ("passages_per_s", "device", "dim", "shards"),
        "build_index": (
            "recall_at_10",
            "recall_at_100",
            "refined_recall_at_10",
            "refined_recall_at_100",
            "segments",
            "add_nodes",
            "driver_peak_rss",
            "phase_seconds",
        ),
    }
    return {
        "benchmark": "scale",
        "code": code_version(),
        "passages": n,
        "coarse": args.coarse,
        "factory": index["factory"],
        "index": {k: v for k, v in index.items() if k != "factory"},
        "cpus": args.cpus,
        "corpus_generate_s": round(generate_s, 1),
        **{job: stage_line(stages[job], keys[job]) for job in CHAIN},
        "chain_seconds": round(chain_s, 1),
        "chain_bytes": chain_bytes,
        "recall_at_100": built["recall_at_100"],
        "refined_recall_at_100": built.get("refined_recall_at_100"),
        "replica": app,
        "night": {
            **stage_line(night, ("index_build", "encoded", "segments", "phase_seconds")),
            **edits,
            **fractions(night, chain_s, chain_bytes),
        },
        "compaction": {
            **stage_line(compaction, ("segments", "tombstones", "vectors", "phase_seconds")),
            **fractions(compaction, chain_s, chain_bytes),
        },
        "disk_peak_bytes": max(disk),
        "disk_bytes_per_passage": round(max(disk) / n),
    }


def code_version() -> str:
    """The commit measured (`+changes` when the work tree differs from it): lines of one run compare like with
    like, and `--from` should only put lines of the same code side by side."""
    git = ["git", "-C", str(Path(__file__).parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return f"{head or 'unknown'}{'+changes' if dirty.stdout.strip() else ''}"


def fractions(stage: dict[str, Any], chain_s: float, chain_bytes: int) -> dict[str, float | None]:
    """A night's or a compaction's seconds and bytes written as fractions of the chain's."""
    written = stage.get("bytes_written")
    return {
        "seconds_fraction": round(stage["seconds"] / chain_s, 4),
        "bytes_fraction": round(written / chain_bytes, 4) if written is not None else None,
    }


# -- the run -----------------------------------------------------------------------------------------------------
def check_disk(work: Path, sizes: list[int], keep: bool) -> None:
    """Refuse up front when the free disk cannot hold the run (the largest size; every size with --keep)."""
    need = (sum(sizes) if keep else max(sizes)) * DISK_BYTES_PER_PASSAGE
    free = shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(
            f"{work}: {free / 1e9:.1f} GB free, the run needs about {need / 1e9:.1f} GB "
            f"({DISK_BYTES_PER_PASSAGE:,} bytes a passage at {max(sizes):,} passages"
            f"{', every size kept' if keep else ''}): free some space, or run smaller --sizes"
        )
    log.info("%.1f GB free in %s, about %.1f GB needed", free / 1e9, work, need / 1e9)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500000,1000000,2000000,5000000", help="passages, comma-separated")
    parser.add_argument("--coarse", choices=["hnsw", "flat"], default="hnsw", help="the IVF coarse quantizer")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20, help="of load per mode and client count")
    parser.add_argument("--keep", type=Path, help="work in this directory and leave it there")
    parser.add_argument("--reference", type=int, default=1_000_000, help="the size the largest is compared with")
    parser.add_argument("--from", type=Path, nargs="+", dest="saved", help="print the goals line from results files")
    parser.add_argument("--min-lists", type=int, default=64, help="the fewest IVF lists at small sizes")
    parser.add_argument("--min-recall", type=float, default=0.2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="of the local Ray (default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.saved:
        largest, reference = (saved_line(args.saved, n) for n in (max(args.sizes), args.reference))
        print(json.dumps(summary_line(largest, reference, args.clients)))
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-scale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    exit_on_signals()  # SIGTERM / SIGINT still stop the cluster and remove the work dir
    dashboard_port, port = free_port(), free_port()
    cluster = LocalRay(Path(tempfile.mkdtemp(prefix="ray-")), num_cpus=args.cpus, dashboard_port=dashboard_port)
    lines: dict[int, dict[str, Any]] = {}
    try:
        check_disk(work, args.sizes, args.keep is not None)
        os.environ["RAY_ADDRESS"] = cluster.start()
        urls = (f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{port}")
        put_app(urls[0], serve_only(port))  # Serve's controller and proxy start here, outside the measurements
        for n in args.sizes:
            lines[n] = run_size(work, n, args, cluster, urls)
            print(json.dumps(lines[n]), flush=True)
            if args.keep is None:
                shutil.rmtree(work / f"n{n}", ignore_errors=True)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    largest = max(lines)
    if args.reference in lines and largest > args.reference:
        print(json.dumps(summary_line(lines[largest], lines[args.reference], args.clients)), flush=True)


if __name__ == "__main__":
    main()
