"""A fault-injecting HTTP proxy in front of the S3 API server, on 127.0.0.1: a seeded fraction of requests get a
500 or a 503, have their connection dropped before any answer, or (reads) their body cut short, the kinds taken in
turn. Everything else is forwarded to the real server untouched."""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("500", "503", "drop", "truncate")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyS3Proxy:
    def __init__(self, upstream: str, rate: float, seed: int = 0):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.rate, self.rng, self.lock = rate, random.Random(seed), threading.Lock()
        self.injected: Counter[str] = Counter()
        self.turns: Counter[str] = Counter()
        self.forwarded = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, method: str) -> str | None:
        with self.lock:
            if self.rng.random() >= self.rate:
                self.forwarded += 1
                return None
            choices = FAULTS if method == "GET" else FAULTS[:3]  # a cut-short body only on reads
            kind = "GET" if method == "GET" else "other"
            fault = choices[self.turns[kind] % len(choices)]  # every kind comes up, whatever the timing
            self.turns[kind] += 1
            self.injected[fault] += 1
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._fault(self.command)
                if fault == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault in ("500", "503"):
                    code = "InternalError" if fault == "500" else "SlowDown"
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected fault</Message></Error>"
                    ).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP and (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)  # HEAD keeps the object's length: it carries no body
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])  # the promised length never arrives
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
