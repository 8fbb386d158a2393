"""A settings change under load while the app is pinned, against a pin move without one; one JSON line.

    python -m benchmarks.settings [--passages 2000] [--clients 16] [--pairs 3] [--window-s 20]

Three versions of one corpus are published (other seeds: no segment or quantizer shared). The app (3 index shards
and BM25) is deployed from a config through the Serve REST API on a local Ray, as `serve deploy` does, pinned to the
first, while `--clients` threads search in dense, sparse and hybrid mode in turn. Then, `--pairs` times, two moves
to the next version (round the three): a pin move (`index_version` only: every replica stays and loads it), and a
settings move (the version and `serve.version_idle_s` in one deploy: the args change, so Serve replaces every
replica). `serve.version_idle_s` is a few seconds, so each move loads a version no replica holds. Each move is
measured over the `--window-s` seconds from its deploy (both kinds are done well within it: checked); `p99_ratio`
is the settings moves' p99 over the pin moves' (goal: at most 2). The slowest requests of each settings move are
listed with their mode and when they were sent, to show where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.upgrade import body
from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import free_port, run_ok, write_config
from kit.load import Load
from kit.localray import LocalRay, exit_on_signals
from kit.models import tiny_dpr
from kit.poll import until
from kit.serveapp import put_app, serve_config
from pipeline.config.serve import with_settings
from pipeline.ops.client import AppClient


def replica_ids(dashboard: str) -> set[str]:
    app = AppClient(serve_address=dashboard).serve_details()["applications"]["qa"]
    return {r["replica_id"] for d in app["deployments"].values() for r in d["replicas"]}


def slowest(load: Load, start: float, end: float, n: int = 5) -> list[dict[str, Any]]:
    inside = sorted((a for a in load.answers if start <= a.sent < end), key=lambda a: -a.seconds)[:n]
    return [
        {"ms": round(a.seconds * 1000), "sent_s": round(a.sent - start, 2), "mode": a.request["mode"]} for a in inside
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=20)
    parser.add_argument("--logs", type=Path, help="copy the Serve logs here before the local Ray is removed")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-settings-"))
    exit_on_signals()
    dashboard_port, port = free_port(), free_port()
    cluster = LocalRay(Path(tempfile.mkdtemp(prefix="ray-")), num_cpus=4, dashboard_port=dashboard_port)
    moves: list[dict[str, Any]] = []
    try:
        os.environ["RAY_ADDRESS"] = cluster.start()
        dashboard, url = f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{port}"
        pair = tiny_dpr(work, ("ctx", "question"), layers=1)
        rows = synthetic_rows(args.passages, words=60)
        settings = {
            "storage": {"root": str(work / "store")},
            "ingest": {"input": str(write_tsv(work / "psgs.tsv", rows)), "shard_rows": max(1, args.passages // 4)},
            "encode": {"model": pair["ctx"], "question_model": pair["question"], "max_length": 64},
            "index": {
                "factory": "IVF16,PQ16x4",
                "nprobe": 8,
                "min_recall": 0.3,
                "compact": "never",
                "segment_vectors": max(1, args.passages // 4),  # four segments: something for each shard
            },
            "serve": {
                "reader_model": None,
                "port": port,
                "shards": 3,
                "cache_dir": str(work / "cache"),
                "encoder_cpus": 0.2,
                "retriever_cpus": 0.2,
                "lexical_cpus": 0.1,
                "version_idle_s": 3,  # a version left is dropped: every move loads one
            },
        }
        config = write_config(work / "c.yaml", settings)
        versions = [run_ok("nightly", config, "ingest.snapshot=s1")[0]["version"]]
        for seed in (2, 3):
            built, _ = run_ok("build_index", config, f"index.seed={seed}", "index.reuse_trained=false")
            versions.append(built["version"])

        def deploy(version: str) -> None:
            put_app(dashboard, with_settings(serve_config(config, port, index_version=version), config))

        def answering(version: str) -> bool:
            return requests.get(f"{url}/v1/index", timeout=10).json()["index_version"] == version

        deploy(versions[0])
        until(lambda: answering(versions[0]), 600, 1)
        load = Load(f"{url}/v1/search", args.clients, body(rows))
        with load:
            time.sleep(10)  # warm-up
            for move in range(1, 2 * args.pairs + 1):
                kind, version = ("pin", "settings")[(move + 1) % 2], versions[move % 3]
                before = replica_ids(dashboard)
                if kind == "settings":
                    settings["serve"]["version_idle_s"] = 3 + move / 10  # the args change: every replica goes
                    write_config(config, settings)
                started = time.monotonic()
                deploy(version)
                if kind == "settings":
                    until(lambda b=before: not replica_ids(dashboard) & b, 600, 0.5, "every replica replaced")
                until(lambda v=version: answering(v), 600, 0.5)
                done_s = time.monotonic() - started
                assert done_s < args.window_s, f"move {move} ({kind}) took {done_s:.1f} s: raise --window-s"
                if kind == "pin":
                    assert replica_ids(dashboard) == before, "a pin move replaced a replica"
                time.sleep(args.window_s - done_s)
                window = load.window(started, started + args.window_s)
                moves.append({"kind": kind, "version": version, "done_s": round(done_s, 1), **window})
                if kind == "settings":
                    moves[-1]["slowest"] = slowest(load, started, started + args.window_s)
        failed = load.failed()
    finally:
        cluster.stop()
        if args.logs:
            shutil.copytree(cluster.temp_dir / "session_latest" / "logs" / "serve", args.logs, dirs_exist_ok=True)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    p99 = {kind: max(m["p99_ms"] for m in moves if m["kind"] == kind) for kind in ("pin", "settings")}
    print(
        json.dumps(
            {
                "benchmark": "settings",
                "passages": args.passages,
                "clients": args.clients,
                "shards": 3,
                "window_s": args.window_s,
                "requests": len(load.answers),
                "failed": len(failed),
                "p99_ms_pin_moves": p99["pin"],
                "p99_ms_settings_moves": p99["settings"],
                "p99_ratio": round(p99["settings"] / p99["pin"], 2),
                "moves": moves,
            }
        )
    )


if __name__ == "__main__":
    main()
