"""What a local S3 server (moto) was asked: every request's method, key and response bytes.

`RequestLog` wraps the server's WSGI app, so the tests and benchmarks that count what a stage
downloads count it where it happens (the server), not by trusting the client's own bookkeeping.
Used by tests/conftest.py's `s3_requests` fixture and benchmarks/bench_resume_s3.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True)
class Request:
    method: str
    bucket: str
    key: str  # "" for a bucket-level request (a listing)
    query: str
    status: int
    bytes: int  # response body bytes sent

    @property
    def is_object_get(self) -> bool:
        """A GET of an object's content (not a listing, not a HEAD)."""
        return self.method == "GET" and bool(self.key)


class RequestLog:
    """WSGI middleware recording every request (thread-safe; moto serves from a thread pool)."""

    def __init__(self, app) -> None:
        self.app = app
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def object_gets(self, bucket: str | None = None, under: str = "") -> list[Request]:
        """GETs of object content, optionally of one bucket and under one key prefix."""
        return [r for r in self.snapshot() if r.is_object_get and (bucket is None or r.bucket == bucket)
                and r.key.startswith(under)]

    def __call__(self, environ, start_response):
        path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
        bucket, _, key = path.partition("/")
        status = [0]

        def _start(status_line, headers, exc_info=None):
            status[0] = int(status_line.split(" ", 1)[0])
            return start_response(status_line, headers, exc_info)

        sent = 0
        body = self.app(environ, _start)
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            with self._lock:
                self.requests.append(Request(environ.get("REQUEST_METHOD", ""), bucket, key,
                                             environ.get("QUERY_STRING", ""), status[0], sent))


def install(server) -> RequestLog:
    """Wrap a started moto ThreadedMotoServer's app in a RequestLog (idempotent); returns the log."""
    wsgi = server._server  # werkzeug's server looks its app up per request, so swapping it is enough
    if not isinstance(wsgi.app, RequestLog):
        wsgi.app = RequestLog(wsgi.app)
    return wsgi.app
