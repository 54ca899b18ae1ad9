"""A tiny web app for nonstop's demo and tests (Python standard library only).

Routes:
  /             hello page naming the instance and the release
  /health       200 "ok" (500 when the file named by $FAIL_HEALTH_FILE exists)
  /slow?ms=N    answers after N milliseconds
  /pid          the pid of this process
  /database     the name of the database $DATABASE_URL points at ("-": none)
  /env-sha256?name=VAR
                the SHA-256 (hex) of environment variable VAR's value, "-" when
                unset: tells which value an instance got (a secret) without
                ever showing it
With BROKEN_PAGES=1 every page except /health answers 500 (a release whose
health view works while its pages do not, e.g. a forgotten collectstatic).
Graceful on SIGTERM: stops accepting, lets in-flight requests finish.
"""
import hashlib
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PORT = int(os.environ["PORT"])
INSTANCE = os.environ.get("NONSTOP_INSTANCE", "?")
GREETING = os.environ.get("GREETING", "hello")
VERSION = os.environ.get("APP_VERSION", "1")
FAIL_FILE = os.environ.get("FAIL_HEALTH_FILE", "")
BOOT_DELAY = float(os.environ.get("BOOT_DELAY", "0"))
BROKEN_PAGES = os.environ.get("BROKEN_PAGES", "") == "1"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Headers and body are written separately: without this, Nagle's
        # algorithm and delayed ACKs add 40 ms to every response.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status, body, ctype="text/plain; charset=utf-8"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            if FAIL_FILE and os.path.exists(FAIL_FILE):
                return self._send(500, "failing on purpose\n")
            return self._send(200, "ok\n")
        if BROKEN_PAGES:
            return self._send(500, "<title>ValueError: Missing staticfiles manifest entry</title>\n", "text/html")
        if url.path == "/slow":
            ms = int(parse_qs(url.query).get("ms", ["100"])[0])
            time.sleep(ms / 1000)
            return self._send(200, f"slept {ms}ms on {INSTANCE}\n")
        if url.path == "/pid":
            return self._send(200, f"{os.getpid()}\n")
        if url.path == "/database":
            name = urlparse(os.environ.get("DATABASE_URL", "")).path.lstrip("/")
            return self._send(200, f"{name or '-'}\n")
        if url.path == "/env-sha256":
            value = os.environ.get(parse_qs(url.query).get("name", [""])[0])
            digest = "-" if value is None else hashlib.sha256(value.encode()).hexdigest()
            return self._send(200, f"{digest}\n")
        if url.path == "/headers":
            return self._send(200, "".join(f"{k}: {v}\n" for k, v in self.headers.items()))
        return self._send(200, f"{GREETING} from {INSTANCE} (pid {os.getpid()}, version {VERSION})\n")

    do_HEAD = do_GET

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        return self._send(200, f"got {len(body)} bytes on {INSTANCE}\n")

    def log_message(self, fmt, *args):
        pass  # quiet: the proxy is the access log


def main():
    if BOOT_DELAY:
        time.sleep(BOOT_DELAY)
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = False
    server.block_on_close = True

    def stop(signum, frame):
        print(f"{INSTANCE}: got signal {signum}, finishing in-flight requests", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{INSTANCE}: listening on 127.0.0.1:{PORT} (pid {os.getpid()}, version {VERSION})", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    print(f"{INSTANCE}: stopped", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
