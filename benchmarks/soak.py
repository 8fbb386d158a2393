"""Soak: the QA app under steady load for a bounded time; memory of every Serve replica after warm-up vs at the
end, and the error rate. Prints one JSON line.

    make demo && python -m benchmarks.soak [--seconds 300] [--clients 8]

The demo's app (configs/demo.yaml) runs on this machine's Ray; the load comes from a second process (the load
generator of benchmarks/serve.py). Replica memory is the resident set size (psutil) every few seconds.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import psutil

from benchmarks.serve import run_load
from kit.jobs import REPO
from kit.rss import rss_mib


def rss_mb(pid: int) -> float | None:
    try:
        return rss_mib(pid)
    except psutil.Error:
        return None


def replica_pids() -> dict[str, int]:
    from ray.util.state import list_actors

    return {
        actor.class_name.removeprefix("ServeReplica:"): actor.pid
        for actor in list_actors(filters=[("state", "=", "ALIVE")])
        if actor.class_name.startswith("ServeReplica")
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--warmup", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    from ray import serve

    from kit.serveapp import private_serve
    from pipeline.config import load_config
    from pipeline.serve.app import build_app

    config = load_config(REPO / args.config)
    with private_serve(config.serve.host, config.serve.port, dashboard=True) as url:  # the state API: replicas
        serve.run(build_app(config), name="qa", route_prefix="/")
        pids = replica_pids()
        result: dict = {}
        budget = argparse.Namespace(requests=10**9, seconds=args.warmup + args.seconds)
        loader = threading.Thread(target=lambda: result.update(run_load(url, "/v1/search", args.clients, budget)))
        loader.start()
        time.sleep(args.warmup)
        after_warmup = {name: rss_mb(pid) for name, pid in pids.items()}
        peak = dict(after_warmup)
        while loader.is_alive():
            for name, pid in pids.items():
                value = rss_mb(pid)
                if value is not None and (peak.get(name) is None or value > peak[name]):
                    peak[name] = value
            time.sleep(5)
        loader.join()
        at_end = {name: rss_mb(pid) for name, pid in pids.items()}
        replaced = sorted(name for name, pid in replica_pids().items() if pids.get(name) != pid)
    growth = {
        name: round(100 * (at_end[name] - after_warmup[name]) / after_warmup[name], 1)
        for name in pids
        if at_end.get(name) and after_warmup.get(name)
    }
    total = result["requests"] + result["failed"]
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "seconds": args.seconds,
                "warmup_seconds": args.warmup,
                "clients": args.clients,
                "requests": total,
                "errors": result["failed"],
                "error_rate": round(result["failed"] / max(1, total), 5),
                "rps": result["rps"],
                "p50_ms": result["p50_ms"],
                "p99_ms": result["p99_ms"],
                "rss_mb_after_warmup": {k: round(v, 1) for k, v in after_warmup.items() if v},
                "rss_mb_peak": {k: round(v, 1) for k, v in peak.items() if v},
                "rss_mb_at_end": {k: round(v, 1) for k, v in at_end.items() if v},
                "rss_growth_pct": growth,
                "max_rss_growth_pct": max(growth.values(), default=0.0),
                "replicas_replaced": replaced,
            }
        )
    )


if __name__ == "__main__":
    main()
