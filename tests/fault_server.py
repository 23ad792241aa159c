"""A file server on 127.0.0.1 that misbehaves on demand, for testing every downloader.

routes maps a request path to its bytes. Faults, per path (`fail`) or one-shot in order for
any path (`queue`):
  drop      full Content-Length, half the body, then close
  overlong  the whole body but a Content-Length 100 bytes larger
  corrupt   `garbage` bytes (not the file) with a correct Content-Length
  partial   status 206 with the valid body
  cut:N     the first N bytes of the body, then close
  500 / 404 that status
hits counts requests per key (the path, or what `key` makes of it); `ranges` lists each request's
Range header (None without one); with `honour_range`, `Range: bytes=N-` gets a 206 from byte N.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    garbage = b"<html>this is not the file you asked for</html>\n" * 40

    def __init__(self):
        self.routes: dict[str, bytes] = {}
        self.hits = Counter()
        self.faults: dict[str, list] = {}  # key -> [kind, remaining requests or None for always]
        self.queue: list[str] = []  # one-shot faults for whatever is requested next
        self.honour_range = False
        self.ranges: list[str | None] = []
        self.delay = 0.0  # seconds each request waits (to make concurrent callers overlap)
        self.barrier: threading.Barrier | None = None  # every request waits until barrier.parties are in flight
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def key(self, path: str) -> str:
        return path

    def fail(self, key: str, kind: str, times: int | None = None) -> None:
        self.faults[key] = [kind, times]

    def _take(self, key: str) -> str | None:
        with self.lock:
            self.hits[key] += 1
            if self.queue:
                return self.queue.pop(0)
            fault = self.faults.get(key)
            if fault is None or fault[1] == 0:
                return None
            if fault[1] is not None:
                fault[1] -= 1
            return fault[0]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fault = server._take(server.key(self.path))
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                if server.delay:
                    time.sleep(server.delay)
                if server.barrier is not None:
                    try:
                        server.barrier.wait(timeout=5)
                    except threading.BrokenBarrierError:
                        return self.send_error(500, "requests were not concurrent")
                body = server.routes.get(self.path)
                if body is None or fault == "404":
                    return self.send_error(404, "Not Found")
                if fault == "500":
                    return self.send_error(500)
                if fault == "corrupt":
                    body = server.garbage
                start = int(rng[len("bytes="):-1]) if rng and server.honour_range else 0
                declared = len(body) - start + (100 if fault == "overlong" else 0)
                self.send_response(206 if fault == "partial" or start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                cut = len(body) // 2 if fault == "drop" else int(fault[4:]) if fault and fault.startswith("cut:") else None
                self.wfile.write(body[start:][:cut])

        return Handler

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
