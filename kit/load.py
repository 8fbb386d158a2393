"""HTTP load on the QA app from client threads, bounded by a `with` block, every answer kept."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import requests


class Answer(NamedTuple):
    sent: float  # time.monotonic() when sent
    seconds: float
    status: int  # 0: no HTTP answer
    request: dict[str, Any]
    body: dict[str, Any]  # the JSON answer, or {"error": ...}


class Load:
    """`clients` threads POSTing `body(client, turn)` to `url` until the `with` block ends, pausing `pause_s` between
    requests."""

    def __init__(self, url: str, clients: int, body: Callable[[int, int], dict[str, Any]], pause_s: float = 0.0):
        self.url, self.body, self.pause_s = url, body, pause_s
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, client: int) -> None:
        session, turn = requests.Session(), 0
        while not self.stop.is_set():
            request, sent = self.body(client, turn), time.monotonic()
            turn += 1
            try:
                response = session.post(self.url, json=request, timeout=60)
                answer = Answer(sent, time.monotonic() - sent, response.status_code, request, response.json())
            except (requests.RequestException, ValueError) as exc:
                answer = Answer(sent, time.monotonic() - sent, 0, request, {"error": repr(exc)})
            self.answers.append(answer)
            if self.pause_s:
                time.sleep(self.pause_s)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def failed(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Requests sent in [start, end): how many, how many failed, p50 and p99 of the answered ones (ms)."""
        inside = [a for a in self.answers if start <= a.sent < end]
        latencies = [a.seconds * 1000 for a in inside if a.status == 200]
        return {
            "requests": len(inside),
            "failed": sum(a.status != 200 for a in inside),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        }
