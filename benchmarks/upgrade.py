"""An encoder-upgrade night under load: the QA app moves to an index built with another DPR pair (another
dimension) while clients search it; one JSON line.

    python -m benchmarks.upgrade [--passages 2000] [--clients 16] [--before-s 20] [--idle-s 30]

Night 1 is published with a tiny 32-d DPR pair and served by the app, deployed from a config through the Serve
REST API (as `serve deploy` does) on a local Ray. `--clients` threads search it (dense, sparse and hybrid in turn)
for `--before-s` seconds, then the nightly runs with a 48-d pair (`encode.model` and `encode.question_model`) and
moves the app, and the clients go on until the question encoder holds one model again (`serve.version_idle_s` =
`--idle-s` after the last request for the old version). `/v1/index` is polled 4 times a second for what the
question encoder replica holds.

Reported: requests and failures before, during the night and after; p50/p99 before, during the night, and in
the switch window (from the app's version set to the new one until every answer comes from it); seconds the
question encoder held two models; the night's phase seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import free_port, run_ok, write_config
from kit.load import Load
from kit.localray import LocalRay, exit_on_signals
from kit.models import tiny_dpr
from kit.poll import until
from kit.serveapp import put_app, serve_config

MODES = ("dense", "sparse", "hybrid")


def body(rows: list) -> Callable[[int, int], dict]:
    """Each client's turn: four words of a passage as the question, dense, sparse and hybrid in turn."""

    def make(client: int, turn: int) -> dict:
        question = " ".join(rows[((client + turn) * 31) % len(rows)][1].split()[:4])
        return {"questions": [question], "k": 10, "mode": MODES[(client + turn) % len(MODES)]}

    return make


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--before-s", type=float, default=20)
    parser.add_argument("--idle-s", type=float, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-upgrade-"))
    exit_on_signals()
    dashboard_port, port = free_port(), free_port()
    cluster = LocalRay(Path(tempfile.mkdtemp(prefix="ray-")), dashboard_port=dashboard_port)
    try:
        os.environ["RAY_ADDRESS"] = cluster.start()
        dashboard, url = f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{port}"
        old_pair = tiny_dpr(work, hidden=32, layers=1, seed=1, name="32")
        new_pair = tiny_dpr(work, hidden=48, layers=1, seed=5, name="48")
        rows = synthetic_rows(args.passages, words=60)
        source = write_tsv(work / "psgs.tsv", rows)
        config = write_config(
            work / "c.yaml",
            {
                "storage": {"root": str(work / "store")},
                "ingest": {"input": str(source), "shard_rows": 1000},
                "encode": {"model": old_pair["ctx"], "question_model": old_pair["question"], "max_length": 64},
                "index": {"factory": "IVF16,Flat", "nprobe": 8, "min_recall": 0.5},
                "serve": {
                    "reader_model": None,
                    "port": port,
                    "cache_dir": str(work / "cache"),
                    # small reservations: the night's encode actor needs a whole CPU of this 2-CPU Ray beside them
                    "encoder_cpus": 0.2,
                    "retriever_cpus": 0.2,
                    "lexical_cpus": 0.1,
                    "version_idle_s": args.idle_s,
                },
                "nightly": {"serve_address": dashboard, "serve_timeout_s": 300},
            },
        )
        first, _ = run_ok("nightly", config, "ingest.snapshot=n1", "nightly.serve_address=null")
        put_app(dashboard, serve_config(config, port))
        until(
            lambda: requests.get(f"{url}/v1/index", timeout=10).json().get("index_version") == first["version"],
            300,
            1,
            "the app answering from night 1",
        )
        held, stop_polling = [], threading.Event()

        def poll() -> None:
            while not stop_polling.is_set():
                try:
                    info = requests.get(f"{url}/v1/index", timeout=10).json()
                    held.append((time.monotonic(), info.get("target"), info.get("held", {}).get("QuestionEncoder", [])))
                except (requests.RequestException, ValueError):
                    pass
                time.sleep(0.25)

        load = Load(f"{url}/v1/search", args.clients, body(rows))
        poller = threading.Thread(target=poll, daemon=True)
        with load:
            poller.start()
            time.sleep(3)  # warm-up, not measured
            before_start = time.monotonic()
            time.sleep(args.before_s)
            night_start = time.monotonic()
            second, _ = run_ok(
                "nightly",
                config,
                "ingest.snapshot=n2",
                f"encode.model={new_pair['ctx']}",
                f"encode.question_model={new_pair['question']}",
            )
            night_end = time.monotonic()
            with contextlib.suppress(AssertionError):  # reported either way: two_question_models_s says so
                until(
                    lambda: held and len(held[-1][2]) == 1 and held[-1][1] == second["version"],
                    args.idle_s + 60,
                    0.5,
                    "the question encoder holding the new model alone",
                )
            time.sleep(2)
        stop_polling.set()
        poller.join(timeout=90)
        end = time.monotonic()
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    new = second["version"]
    set_at = next((t for t, target, _ in held if target == new), night_end)
    moved_at = next((a.sent for a in sorted(load.answers) if a.body.get("index_version") == new), end)
    two = [t for t, _, models in held if len(models) == 2]
    versions = {a.body["index_version"] for a in load.answers if a.status == 200}
    print(
        json.dumps(
            {
                "benchmark": "upgrade",
                "passages": args.passages,
                "clients": args.clients,
                "dims": [32, 48],
                "versions": [first["version"], new],
                "answered_from": sorted(versions),
                "before": load.window(before_start, night_start),
                "during_night": load.window(night_start, night_end),
                "switch": {**load.window(set_at, moved_at + 2), "seconds": round(moved_at - set_at, 1)},
                "after": load.window(night_end, end),
                "all": load.window(before_start, end),
                "two_question_models_s": round(max(two) - min(two), 1) if two else 0.0,
                "version_idle_s": args.idle_s,
                "night_phase_seconds": second["phase_seconds"],
            }
        )
    )


if __name__ == "__main__":
    main()
