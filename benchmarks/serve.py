"""QA service throughput and latency over HTTP, with `serve.batch` on and off; prints one JSON line.

    make demo && python benchmarks/serve.py [--requests 200] [--seconds 30]

The app serves the demo's published index (configs/demo.yaml) on this machine's Ray. The load comes from a second
process on 127.0.0.1 (this script re-run with --load), N client threads, each request timed, bounded in count and
time. batched_speedup = requests/s of /v1/search at 16 clients with batching ÷ without (and
_ask for /v1/ask).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
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


def load(url: str, route: str, clients: int, requests_total: int, seconds: float) -> dict:
    """The load generator (its own process): latencies of `requests_total` requests from `clients` threads."""
    import requests

    latencies, failures, lock, counter = [], [], threading.Lock(), iter(range(requests_total))
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        for i in counter:
            if time.monotonic() > deadline:
                return
            question = QUESTIONS[i % len(QUESTIONS)]
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


def run_load(url: str, route: str, clients: int, args) -> dict:
    command = [
        sys.executable,
        __file__,
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
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--route", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load, args.route, args.clients, args.requests, args.seconds)))
        return

    import logging

    import ray
    from ray import serve

    from pipeline.config import load_config
    from pipeline.serve.app import build_app
    from tests.localray import exit_on_signals

    config = load_config(REPO / args.config)
    url = f"http://{config.serve.host}:{config.serve.port}"
    exit_on_signals()  # SIGTERM / SIGINT still shut Serve and this private Ray down
    ray.init(address="local", logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    results = {}
    try:
        for mode, batch in (("batch_on", config.serve.batch_max_size), ("batch_off", 1)):
            serve_config = config.serve.model_copy(update={"batch_max_size": batch})
            serve.run(build_app(config.model_copy(update={"serve": serve_config})), name="qa", route_prefix="/")
            run_load(url, "/v1/search", 4, argparse.Namespace(requests=20, seconds=30))  # warm-up
            results[mode] = {
                route: {f"clients_{c}": run_load(url, route, c, args) for c in (1, 16)}
                for route in ("/v1/search", "/v1/ask")
            }
    finally:
        serve.shutdown()
        ray.shutdown()

    def speedup(route: str) -> float:
        on, off = (results[mode][route]["clients_16"]["rps"] for mode in ("batch_on", "batch_off"))
        return round(on / off, 2)

    print(
        json.dumps(
            {
                "benchmark": "serve",
                "index": "demo",
                "batch_max_size": config.serve.batch_max_size,
                "batch_wait_s": config.serve.batch_wait_s,
                **results,
                "batched_speedup": speedup("/v1/search"),
                "batched_speedup_ask": speedup("/v1/ask"),
            }
        )
    )


if __name__ == "__main__":
    main()
