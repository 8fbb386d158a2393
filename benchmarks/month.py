"""A month of nights in an hour: nightly re-indexing with retention under steady load, a Serve replica killed every
few nights; one JSON line.

    python -m benchmarks.month [--passages 100000] [--nights 30] [--clients 16] [--kill-every 5]

Night 1 is published and served by the app (deployed from a config through the Serve REST API on a local Ray, as
`serve deploy` does; the tiny 768-d DPR encoder of `benchmarks.nightly --encoder tiny`, so the data plane shows).
Then `--clients` threads search it in dense, sparse and hybrid mode in turn for the whole run while each night edits
1%, deletes 0.5% and adds 0.5% of the passages and runs the nightly: a delta (a full snapshot every
`nightly.max_chain` nights), compactions past `index.max_segments`, the app moved to the new version, and the
retention step (`retain.versions`, `min_age_h` 0). Every `--kill-every` nights one Retriever replica (of 2) gets
SIGKILL while the night runs.

Per night and in total: requests, failures outside the kill windows (from the kill until Serve has replaced the
replica, + 5 s) and inside them, p50/p99, the replicas' RSS, the node cache's bytes (against one version's),
the store's bytes, hits of passages deleted in the version that answered (`deleted_returned`) and hits whose text is
not that version's (`stale_text`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from benchmarks.nightly import next_night
from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import free_port, run_ok, write_config
from kit.load import Load
from kit.localray import LocalRay, exit_on_signals
from kit.models import tiny_dpr
from kit.poll import until
from kit.rss import rss_mib
from kit.serveapp import put_app, serve_config

MODES = ("dense", "sparse", "hybrid")


def replicas() -> dict[str, list[int]]:
    """Deployment -> pids of its live replicas."""
    from ray.util.state import list_actors

    found: dict[str, list[int]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name.startswith("ServeReplica:qa:"):
            found.setdefault(actor.class_name.rsplit(":", 1)[1], []).append(actor.pid)
    return found


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class Truth:
    """Each version's live passages: a hit is checked against the version that answered it."""

    def __init__(self) -> None:
        self.live: dict[str, dict[str, str]] = {}  # version -> id -> text (one dict object shared while unchanged)

    def add(self, version: str, rows: list[tuple[str, str, str]]) -> None:
        self.live[version] = {pid: text for pid, text, _ in rows}

    def check(self, answers) -> tuple[int, int]:
        """(hits of passages not live in the version that answered, hits whose text is not that version's)."""
        deleted = stale = 0
        for answer in answers:
            live = self.live.get(answer.body.get("index_version"))
            if answer.status != 200 or live is None:
                continue
            for hit in answer.body["results"][0]:
                text = live.get(hit["id"])
                deleted += text is None
                stale += text is not None and text != hit["text"]
        return deleted, stale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kill-every", type=int, default=5)
    parser.add_argument("--retain", type=int, default=7, help="retain.versions")
    parser.add_argument("--max-chain", type=int, default=7, help="nightly.max_chain: a full snapshot after as many")
    parser.add_argument("--shard-rows", type=int, default=20_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-month-"))
    exit_on_signals()
    dashboard_port, port = free_port(), free_port()
    # 4 logical CPUs on this 2-core machine: the app's replicas hold slices while each night's encode actors need
    # whole ones (on a real cluster the nightly runs on its own workers).
    cluster = LocalRay(Path(tempfile.mkdtemp(prefix="ray-")), num_cpus=4, dashboard_port=dashboard_port)
    nights, truth = [], Truth()
    try:
        os.environ["RAY_ADDRESS"] = cluster.start()
        dashboard, url = f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{port}"
        pair = tiny_dpr(work, ("ctx", "question"), layers=1, projection_dim=768)
        rows = synthetic_rows(args.passages, words=100)
        config = write_config(
            work / "c.yaml",
            {
                "storage": {"root": str(work / "store")},
                "ingest": {"shard_rows": args.shard_rows},
                "encode": {"model": pair["ctx"], "pooling": "dpr", "max_length": 128, "embedding_dtype": "float16"},
                "index": {"factory": "IVF256,PQ64", "nprobe": 16, "min_recall": 0.3, "max_segments": 4},
                "serve": {
                    "question_model": pair["question"],
                    "reader_model": None,
                    "port": port,
                    "cache_dir": str(work / "cache"),
                    "encoder_cpus": 0.2,
                    "retriever_cpus": 0.2,
                    "retriever_replicas": 2,
                    "lexical_cpus": 0.1,
                    "version_idle_s": 30,
                },
                "nightly": {"serve_address": dashboard, "serve_timeout_s": 600, "max_chain": args.max_chain},
                "retain": {"versions": args.retain, "min_age_h": 0},
            },
        )
        first, seconds = run_ok(
            "nightly",
            config,
            f"ingest.input={write_tsv(work / 'n01.tsv', rows)}",
            "ingest.snapshot=n01",
            "nightly.serve_address=null",
        )
        truth.add(first["version"], rows)
        put_app(dashboard, serve_config(config, port))
        until(lambda: requests.get(f"{url}/v1/index", timeout=10).json()["index_version"] == first["version"], 600, 1)
        questions = [" ".join(text.split()[:4]) for _, text, _ in rows[:: max(1, len(rows) // 500)]]

        def body(client: int, turn: int) -> dict:
            return {"questions": [questions[(client * 7 + turn) % len(questions)]], "k": 10, "mode": MODES[turn % 3]}

        load = Load(f"{url}/v1/search", args.clients, body)
        with load:
            time.sleep(5)
            for night in range(2, args.nights + 1):
                rows, _ = next_night(rows, 0.02, night, mix=(0.5, 0.25))  # 1% edited, 0.5% deleted, 0.5% added
                started = time.monotonic()
                kill: list[float] = []  # [when killed, when replaced + 5 s], filled by a watcher while the night runs
                watcher = None
                if night % args.kill_every == 0:
                    victim = replicas()["Retriever"][0]
                    os.kill(victim, signal.SIGKILL)
                    kill.append(time.monotonic())
                    watcher = threading.Thread(target=_replaced, args=(kill, victim), daemon=True)
                    watcher.start()
                summary, seconds = run_ok(
                    "nightly",
                    config,
                    f"ingest.input={write_tsv(work / f'n{night:02d}.tsv', rows)}",
                    f"ingest.snapshot=n{night:02d}",
                )
                truth.add(summary["version"], rows)
                (work / f"n{night - 1:02d}.tsv").unlink()
                if watcher is not None:
                    watcher.join(timeout=600)
                nights.append(
                    {
                        "night": night,
                        "seconds": round(seconds, 1),
                        "version": summary["version"],
                        "build": summary["index_build"],
                        "segments": summary["segments"],
                        "retention": summary["retention"],
                        "started": started,
                        "ended": time.monotonic(),
                        "kill": kill or None,
                        "rss_mib": {name: [rss_mib(pid) for pid in pids] for name, pids in replicas().items()},
                        "cache_bytes": folder_bytes(work / "cache"),
                        "store_bytes": folder_bytes(work / "store"),
                        "version_bytes": _version_bytes(work / "store", summary["version"]),
                    }
                )
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    try:
        print(json.dumps(report(args, load, truth, nights)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _replaced(kill: list[float], victim: int) -> None:
    """Wait until Serve has replaced the killed Retriever replica, then 5 s more: the end of the kill window."""

    def replaced() -> bool:
        alive = replicas().get("Retriever", [])
        return len(alive) == 2 and victim not in alive

    until(replaced, 600, 1, "the killed replica replaced")
    time.sleep(5)
    kill.append(time.monotonic())


def _version_bytes(store: Path, version: str) -> int:
    manifest = json.loads((store / "indexes" / version / "manifest.json").read_text())
    return sum(entry["bytes"] for entry in manifest["files"])


def report(args, load: Load, truth: Truth, nights: list[dict]) -> dict:
    kills = [n["kill"] for n in nights if n["kill"]]

    def in_kill(sent: float) -> bool:
        return any(start <= sent < end for start, end in kills)

    per_night = []
    for n in nights:
        answers = [a for a in load.answers if n["started"] <= a.sent < n["ended"]]
        outside = [a for a in answers if not in_kill(a.sent)]
        inside = [a for a in answers if in_kill(a.sent)]
        latencies = [a.seconds * 1000 for a in answers if a.status == 200]
        deleted, stale = truth.check(answers)
        per_night.append(
            {
                "night": n["night"],
                "seconds": n["seconds"],
                "build": n["build"],
                "segments": n["segments"],
                "requests": len(answers),
                "failed_outside_kills": sum(a.status != 200 for a in outside),
                "failed_in_kill_window": sum(a.status != 200 for a in inside),
                "kill_window_requests": len(inside),
                "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
                "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
                "rss_mib": n["rss_mib"],
                "cache_bytes": n["cache_bytes"],
                "cache_versions": round(n["cache_bytes"] / n["version_bytes"], 2) if n["version_bytes"] else None,
                "store_bytes": n["store_bytes"],
                "dropped_versions": (n["retention"] or {}).get("dropped_versions"),
                "deleted_returned": deleted,
                "stale_text": stale,
            }
        )
    all_latencies = [a.seconds * 1000 for a in load.answers if a.status == 200]
    failed_in = [a for a in load.answers if a.status != 200 and in_kill(a.sent)]
    in_windows = [a for a in load.answers if in_kill(a.sent)]
    outside_failures = [a for a in load.answers if a.status != 200 and not in_kill(a.sent)]
    deleted, stale = truth.check(load.answers)
    second, last = per_night[0], per_night[-1]
    rss_ratio = {
        name: round(max(last["rss_mib"][name]) / max(second["rss_mib"][name]), 3)
        for name in last["rss_mib"]
        if name in second["rss_mib"]
    }
    return {
        "benchmark": "month",
        "passages": args.passages,
        "nights": args.nights,
        "clients": args.clients,
        "retain_versions": args.retain,
        "max_chain": args.max_chain,
        "requests": len(load.answers),
        "failed_outside_kills": len(outside_failures),
        "failed_in_kill_windows": len(failed_in),
        "kill_window_requests": len(in_windows),
        "kill_window_failure_rate": round(len(failed_in) / max(1, len(in_windows)), 4),
        "failures_all_json_with_request_id": all(a.body.get("request_id") for a in [*failed_in, *outside_failures]),
        "p50_ms": round(float(np.percentile(all_latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(all_latencies, 99)), 1),
        "rss_last_vs_night2": rss_ratio,
        "cache_versions_max": max(n["cache_versions"] or 0 for n in per_night),
        "store_bytes_night": {n["night"]: n["store_bytes"] for n in per_night},
        "deleted_returned": deleted,
        "stale_text": stale,
        "per_night": per_night,
    }


if __name__ == "__main__":
    main()
